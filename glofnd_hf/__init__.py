"""GloFND for CLIP-style image-text training on the Hugging Face stack.

The names below are the public API; each is imported on first use, so ``import glofnd_hf``
stays cheap (no transformers or open_clip until a name that needs them is touched)::

    from glofnd_hf import GloFNDTrainer, GloFNDTrainingArguments, load_dual_encoder
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "GloFNDTrainer": "glofnd_hf.trainer",
    "GloFNDTrainingArguments": "glofnd_hf.args",
    "ModelArguments": "glofnd_hf.args",
    "DataArguments": "glofnd_hf.args",
    "DualEncoderAdapter": "glofnd_hf.models",
    "load_dual_encoder": "glofnd_hf.models",
    "build_tiny_model": "glofnd_hf.models",
    "evaluate": "glofnd_hf.eval.run",
    "ZeroShotEvaluator": "glofnd_hf.eval.zero_shot",
    "ClipLoss": "glofnd_hf.losses",
    "GlobalContrastiveLoss": "glofnd_hf.losses",
    "SigmoidLoss": "glofnd_hf.losses",
    "cached_contrastive_step": "glofnd_hf.losses",
    "inspect_checkpoint": "glofnd_hf.inspection",
    "registry": "glofnd_hf.fnd",
    "build_detector": "glofnd_hf.fnd",
    "DetectorSpec": "glofnd_hf.fnd",
    "FalseNegativeDetector": "glofnd_hf.fnd",
    "GloFNDDetector": "glofnd_hf.fnd",
    "GloFNDConfig": "glofnd_hf.fnd",
    "BatchQuantileDetector": "glofnd_hf.fnd",
    "OracleDetector": "glofnd_hf.fnd",
    "IFNDDetector": "glofnd_hf.fnd",
    "NoDetector": "glofnd_hf.fnd",
    "push_to_hub": "glofnd_hf.hub",
    "write_model_card": "glofnd_hf.model_card",
}

__all__ = [  # written out so that linters and type checkers read it
    "__version__",
    "GloFNDTrainer",
    "GloFNDTrainingArguments",
    "ModelArguments",
    "DataArguments",
    "DualEncoderAdapter",
    "load_dual_encoder",
    "build_tiny_model",
    "evaluate",
    "ZeroShotEvaluator",
    "ClipLoss",
    "GlobalContrastiveLoss",
    "SigmoidLoss",
    "cached_contrastive_step",
    "inspect_checkpoint",
    "registry",
    "build_detector",
    "DetectorSpec",
    "FalseNegativeDetector",
    "GloFNDDetector",
    "GloFNDConfig",
    "BatchQuantileDetector",
    "OracleDetector",
    "IFNDDetector",
    "NoDetector",
    "push_to_hub",
    "write_model_card",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glofnd_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what static type checkers and IDEs see
    from .args import DataArguments, GloFNDTrainingArguments, ModelArguments
    from .eval.run import evaluate
    from .eval.zero_shot import ZeroShotEvaluator
    from .fnd import (
        BatchQuantileDetector,
        DetectorSpec,
        FalseNegativeDetector,
        GloFNDConfig,
        GloFNDDetector,
        IFNDDetector,
        NoDetector,
        OracleDetector,
        build_detector,
        registry,
    )
    from .hub import push_to_hub
    from .inspection import inspect_checkpoint
    from .losses import ClipLoss, GlobalContrastiveLoss, SigmoidLoss, cached_contrastive_step
    from .model_card import write_model_card
    from .models import DualEncoderAdapter, build_tiny_model, load_dual_encoder
    from .trainer import GloFNDTrainer
