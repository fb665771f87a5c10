"""The settings a model card records: the GloFND and loss settings that differ from their
defaults, and the Trainer's hyperparameters."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

__all__ = ["default_settings", "hyperparameters", "non_default_settings"]

# Fields of GloFNDTrainingArguments that are not method settings (or are reported elsewhere).
_NOT_SETTINGS = {"num_samples", "state_device", "check_inputs", "remove_unused_columns"}


def default_settings() -> dict[str, Any]:
    """What a default ``GloFNDTrainingArguments()`` holds in its GloFND/loss fields.

    Read from the dataclass fields: building an instance sets up devices, which resets
    accelerate's state (fatal in the middle of training). ``__post_init__`` only validates these
    fields, so the values are the same (a test checks this).
    """
    return dict(_default_settings())


@functools.lru_cache(maxsize=1)
def _default_settings() -> dict[str, Any]:
    out = {}
    for f in _setting_fields():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _setting_fields() -> list[dataclasses.Field]:
    from transformers import TrainingArguments

    from ..args import GloFNDTrainingArguments
    from ..renamed_settings import RENAMED_SETTINGS

    # The detector's own settings are listed one by one from detector_kwargs (see
    # non_default_settings); deprecated flat names never hold a value after validation.
    skip = (
        {f.name for f in dataclasses.fields(TrainingArguments)}
        | _NOT_SETTINGS
        | {r.old for r in RENAMED_SETTINGS}
        | {"detector_kwargs"}
    )
    return [f for f in dataclasses.fields(GloFNDTrainingArguments) if f.name not in skip]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def non_default_settings(args: Any) -> list[dict[str, Any]]:
    """GloFND and loss settings of ``args`` that differ from a default
    ``GloFNDTrainingArguments()``: ``[{"name", "value", "default"}, ...]`` in field order."""
    defaults = _default_settings()
    rows = []
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if not _same(value, default):
            rows.append({"name": name, "value": value, "default": default})
    # The chosen detector's own settings, against that detector's defaults.
    spec_of = getattr(args, "detector_spec", None)
    if spec_of is not None:
        spec = spec_of()
        chosen, default_settings_ = args.detector_settings(), spec.make_settings()
        for name in spec.setting_names():
            value, default = getattr(chosen, name), getattr(default_settings_, name)
            if not _same(value, default):
                rows.append({"name": f"detector_kwargs.{name}", "value": value, "default": default})
    return rows


def hyperparameters(args: Any) -> dict[str, Any]:
    """The Trainer settings a card lists (the global batch computed)."""
    world = int(getattr(args, "world_size", 1) or 1)
    accum = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    per_device = int(getattr(args, "per_device_train_batch_size", 0) or 0)
    out: dict[str, Any] = {
        "learning_rate": getattr(args, "learning_rate", None),
        "per_device_train_batch_size": per_device,
        "global_batch_size": per_device * world * accum,
        "gradient_accumulation_steps": accum,
        "num_processes": world,
        "num_train_epochs": getattr(args, "num_train_epochs", None),
        "max_steps": getattr(args, "max_steps", None),
        "lr_scheduler_type": str(
            getattr(
                getattr(args, "lr_scheduler_type", None),
                "value",
                getattr(args, "lr_scheduler_type", None),
            )
        ),
        "warmup_steps": getattr(args, "warmup_steps", None),
        "weight_decay": getattr(args, "weight_decay", None),
        "optim": str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))),
        "mixed_precision": "bf16"
        if getattr(args, "bf16", False)
        else ("fp16" if getattr(args, "fp16", False) else "no"),
        "seed": getattr(args, "seed", None),
    }
    if out["max_steps"] and out["max_steps"] > 0:
        out.pop("num_train_epochs")  # max_steps decides
    else:
        out.pop("max_steps")
    return {k: v for k, v in out.items() if v is not None}
