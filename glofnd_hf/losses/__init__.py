"""Bimodal contrastive losses that take a false-negative detector: CLIP InfoNCE, the SogCLR /
FastCLIP global loss and SigLIP's sigmoid loss."""

from .base import BimodalContrastiveLoss, LossOutput, Masks, Strategy
from .cached import CachedStepResult, cached_contrastive_step, chunk_bounds
from .clip import ClipLoss
from .global_loss import (
    GAMMA_GRANULARITIES,
    TEMPERATURE_GRADIENTS,
    TEMPERATURE_SCHEMES,
    U_BYTES_PER_SAMPLE,
    GammaGranularity,
    GammaSchedule,
    GlobalContrastiveLoss,
    TemperatureGradient,
    TemperatureScheme,
    temperature_scheme,
)
from .sigmoid import SigmoidLoss

__all__ = [
    "GAMMA_GRANULARITIES",
    "TEMPERATURE_GRADIENTS",
    "TEMPERATURE_SCHEMES",
    "U_BYTES_PER_SAMPLE",
    "BimodalContrastiveLoss",
    "CachedStepResult",
    "ClipLoss",
    "GammaGranularity",
    "GammaSchedule",
    "GlobalContrastiveLoss",
    "LossOutput",
    "Masks",
    "SigmoidLoss",
    "Strategy",
    "TemperatureGradient",
    "TemperatureScheme",
    "cached_contrastive_step",
    "chunk_bounds",
    "temperature_scheme",
]
