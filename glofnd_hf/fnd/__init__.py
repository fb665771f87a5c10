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
    register_detector,
)
from .health import TrackingHealth
from .ifnd import IFNDConfig, IFNDDetector  # noqa: F401  (registers "ifnd")
from .quantiles import masked_quantile, tail_estimate
from .table import PerSampleTable, segment_mean
from .thresholds import (
    UPDATE_RULES,
    AdamRule,
    GloFNDConfig,
    TailRule,
    ThresholdRule,
    ThresholdState,
    adam_step,
    pinball_gradient,
)

__all__ = [
    "UPDATE_RULES", "AdamRule", "BatchQuantileDetector", "Detection", "DetectionBatch",
    "FalseNegativeDetector", "GloFNDConfig", "GloFNDDetector", "NoDetector", "OracleDetector",
    "PerSampleTable", "TailRule", "ThresholdRule", "ThresholdState", "TrackingHealth",
    "adam_step", "available_detectors", "build_detector", "masked_quantile", "pinball_gradient",
    "register_detector", "segment_mean", "tail_estimate",
]
