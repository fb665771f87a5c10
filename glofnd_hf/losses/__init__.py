"""Bimodal contrastive losses that take a false-negative detector."""

from .base import BimodalContrastiveLoss, LossOutput, Masks, Strategy
from .clip import ClipLoss
from .global_loss import (
    TEMPERATURE_SCHEMES,
    U_BYTES_PER_SAMPLE,
    GammaSchedule,
    GlobalContrastiveLoss,
    TemperatureScheme,
    temperature_scheme,
)

__all__ = [
    "TEMPERATURE_SCHEMES",
    "U_BYTES_PER_SAMPLE",
    "BimodalContrastiveLoss",
    "ClipLoss",
    "GammaSchedule",
    "GlobalContrastiveLoss",
    "LossOutput",
    "Masks",
    "Strategy",
    "TemperatureScheme",
    "temperature_scheme",
]
