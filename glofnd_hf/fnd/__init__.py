"""The GloFND method: per-sample thresholds and false-negative detectors (torch only).

Detectors are known through :mod:`.registry` (``registry.get(name)``, ``registry.names()``).
"""

from . import registry
from .detectors import (
    BatchQuantileDetector,
    Detection,
    DetectionBatch,
    FalseNegativeDetector,
    GloFNDDetector,
    NoDetector,
    OracleDetector,
    RowDetection,
    RowwiseDetector,
    SimilarityRows,
)
from .health import TrackingHealth
from .ifnd import IFNDDetector  # registers "ifnd"
from .ifnd_config import IFNDConfig
from .quantiles import masked_quantile, tail_estimate
from .registry import DetectorSpec, NoSettings, SharedSettings, build_detector
from .table import PerSampleTable, StateError, ValueRange, check_state_tensor, segment_mean
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

available_detectors = registry.names

__all__ = [
    "UPDATE_RULES",
    "AdamRule",
    "BatchQuantileDetector",
    "Detection",
    "DetectionBatch",
    "DetectorSpec",
    "FalseNegativeDetector",
    "GloFNDConfig",
    "GloFNDDetector",
    "IFNDConfig",
    "IFNDDetector",
    "NoDetector",
    "NoSettings",
    "OracleDetector",
    "RowDetection",
    "RowwiseDetector",
    "SimilarityRows",
    "PerSampleTable",
    "SharedSettings",
    "StateError",
    "TailRule",
    "ThresholdRule",
    "ThresholdState",
    "TrackingHealth",
    "ValueRange",
    "adam_step",
    "available_detectors",
    "build_detector",
    "check_state_tensor",
    "masked_quantile",
    "pinball_gradient",
    "registry",
    "segment_mean",
    "tail_estimate",
]
