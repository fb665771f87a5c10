"""The GloFND method: per-sample thresholds and false-negative detectors (torch only)."""

from .detectors import (
    BatchQuantileDetector,
    Detection,
    DetectionBatch,
    FalseNegativeDetector,
    GloFNDDetector,
    NoDetector,
    OracleDetector,
    available_detectors,
    build_detector,
    masked_quantile,
    register_detector,
)
from .ifnd import IFNDConfig, IFNDDetector  # noqa: F401  (registers "ifnd")
from .table import PerSampleTable, segment_mean
from .thresholds import GloFNDConfig, ThresholdState, threshold_step

__all__ = [
    "BatchQuantileDetector", "Detection", "DetectionBatch", "FalseNegativeDetector",
    "GloFNDConfig", "GloFNDDetector", "NoDetector", "OracleDetector", "PerSampleTable",
    "ThresholdState", "available_detectors", "build_detector", "masked_quantile",
    "register_detector", "segment_mean", "threshold_step",
]
