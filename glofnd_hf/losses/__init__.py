"""Bimodal contrastive losses that take a false-negative detector."""

from .base import BimodalContrastiveLoss, LossOutput, Masks, Strategy
from .clip import ClipLoss
from .global_loss import GammaSchedule, GlobalContrastiveLoss

__all__ = [
    "BimodalContrastiveLoss", "ClipLoss", "GammaSchedule", "GlobalContrastiveLoss",
    "LossOutput", "Masks", "Strategy",
]
