"""``glofnd-inspect``: what a checkpoint's false-negative detector removes, sample by sample.

For chosen anchors, the samples of the whole data set above each side's threshold (detected
false negatives) and the nearest ones below it; for the whole data set, thresholds against
the exact quantiles, detections per anchor, and precision and recall against labels. Output:
JSON, a self-contained HTML page and PNG grids. See ``docs/inspection.md``.
"""

from .errors import InspectionError
from .run import inspect_checkpoint, output_paths

__all__ = ["InspectionError", "inspect_checkpoint", "output_paths"]
