"""Flat setting names of earlier versions and where each lives now.

A value given under an old name moves to its new place with a ``FutureWarning``; given
together with its new name, the two must agree. Kept apart from ``args`` so that the
arguments module holds the settings themselves."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["RENAMED_SETTINGS", "RenamedSetting", "apply_renamed_settings"]


@dataclass(frozen=True)
class RenamedSetting:
    """A flat setting of earlier versions and where it lives now."""

    old: str
    new: str
    """A field of the training arguments, or (``detector`` set) a key of detector_kwargs."""
    detector: str | None = None
    position: int | None = None
    """Set: the old setting is this element of the new (a sequence)."""

    def new_spelling(self) -> str:
        if self.detector is None:
            return self.new
        where = "" if self.position is None else f", element {self.position}"
        return f"detector_kwargs: {{{self.new}: ...}} (detector: {self.detector}{where})"


_GLOFND = "glofnd"
RENAMED_SETTINGS: tuple[RenamedSetting, ...] = (
    RenamedSetting("glofnd_alpha", "fn_alpha"),
    RenamedSetting("glofnd_mask_start_epoch", "fn_start_epoch"),
    *(
        RenamedSetting(f"glofnd_{key}", key, _GLOFND)
        for key in (
            "update_rule",
            "tail_size",
            "band",
            "step_floor",
            "lr",
            "eps",
            "clip_grad_mult",
            "init_quantile",
            "update_start_epoch",
        )
    ),
    RenamedSetting("glofnd_beta1", "betas", _GLOFND, position=0),
    RenamedSetting("glofnd_beta2", "betas", _GLOFND, position=1),
    *(
        RenamedSetting(f"ifnd_{key}", key, "ifnd")
        for key in ("num_clusters", "cluster_every", "accept_warmup_epochs")
    ),
)


def _field_default(dataclass_type: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(dataclass_type) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def apply_renamed_settings(args: Any, detector_defaults: Any) -> None:
    """Move the values of ``args`` (training arguments) given under a deprecated name to their
    new place; ``detector_defaults``: the chosen detector's default settings (for a renamed
    element of a sequence setting). A value that contradicts its new name is a ValueError."""
    for renamed in RENAMED_SETTINGS:
        value = getattr(args, renamed.old)
        if value is None:
            continue
        setattr(args, renamed.old, None)  # one place for each value
        if renamed.detector is not None and renamed.detector != args.detector:
            warnings.warn(
                f"{renamed.old} is deprecated (now {renamed.new_spelling()}) and has no "
                f"effect with detector {args.detector!r}: ignored",
                FutureWarning,
                stacklevel=5,
            )
            continue
        warnings.warn(
            f"{renamed.old} is deprecated: use {renamed.new_spelling()}",
            FutureWarning,
            stacklevel=5,
        )
        if renamed.detector is None:
            # The new field at its default counts as not given (a dataclass cannot tell).
            current = getattr(args, renamed.new)
            if current != _field_default(type(args), renamed.new) and current != value:
                raise ValueError(
                    f"{renamed.old}={value!r} contradicts {renamed.new}={current!r}: set "
                    f"only {renamed.new}"
                )
            setattr(args, renamed.new, value)
        elif renamed.position is not None:
            default = getattr(detector_defaults, renamed.new)
            sequence = list(args.detector_kwargs.get(renamed.new, default))
            given = renamed.new in args.detector_kwargs
            if given and sequence[renamed.position] not in (value, default[renamed.position]):
                raise ValueError(
                    f"{renamed.old}={value!r} contradicts detector_kwargs {renamed.new}="
                    f"{args.detector_kwargs[renamed.new]!r}: set only detector_kwargs"
                )
            sequence[renamed.position] = value
            args.detector_kwargs[renamed.new] = sequence
        elif args.detector_kwargs.get(renamed.new, value) != value:
            raise ValueError(
                f"{renamed.old}={value!r} contradicts detector_kwargs {renamed.new}="
                f"{args.detector_kwargs[renamed.new]!r}: set only detector_kwargs"
            )
        else:
            args.detector_kwargs[renamed.new] = value
