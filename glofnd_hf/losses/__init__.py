"""Bimodal contrastive losses that take a false-negative detector: CLIP InfoNCE, the SogCLR /
FastCLIP global loss and SigLIP's sigmoid loss, each known by its registration
(``registry``: ``registry.get(loss_type)``)."""

from . import registry
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
from .registry import Citation, LossBuild, LossSettings, LossSpec
from .sigmoid import SigmoidLoss

__all__ = [
    "registry",
    "GAMMA_GRANULARITIES",
    "TEMPERATURE_GRADIENTS",
    "TEMPERATURE_SCHEMES",
    "U_BYTES_PER_SAMPLE",
    "BimodalContrastiveLoss",
    "CachedStepResult",
    "Citation",
    "ClipLoss",
    "GammaGranularity",
    "GammaSchedule",
    "GlobalContrastiveLoss",
    "LossBuild",
    "LossOutput",
    "LossSettings",
    "LossSpec",
    "Masks",
    "SigmoidLoss",
    "Strategy",
    "TemperatureGradient",
    "TemperatureScheme",
    "cached_contrastive_step",
    "chunk_bounds",
    "temperature_scheme",
]
