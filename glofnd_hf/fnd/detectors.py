"""False-negative detectors behind one interface (``interface``): the baselines
(``baselines``), GloFND (``glofnd``) and IFND (``ifnd``). This module gathers the interface
and the built-in detectors under one name (the path older code imports them from); each
detector is known to the package by one ``registry.register(DetectorSpec(...))`` next to its
class.
"""

from .baselines import BatchQuantileDetector, NoDetector, OracleDetector
from .glofnd import GloFNDDetector, glofnd_state_bytes
from .interface import (
    SIDES,
    Detection,
    DetectionBatch,
    FalseNegativeDetector,
    RowDetection,
    RowwiseDetector,
    SimilarityRows,
    nothing_found,
    threshold_summary,
)

__all__ = [
    "SIDES",
    "BatchQuantileDetector",
    "Detection",
    "DetectionBatch",
    "FalseNegativeDetector",
    "GloFNDDetector",
    "NoDetector",
    "OracleDetector",
    "RowDetection",
    "RowwiseDetector",
    "SimilarityRows",
    "glofnd_state_bytes",
    "nothing_found",
    "threshold_summary",
]
