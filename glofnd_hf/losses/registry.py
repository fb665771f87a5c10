"""The registry of bimodal contrastive losses: what the trainer, the argument checks and the
model card know of each ``loss_type``.

A loss is known to the package by one ``register(LossSpec(...))`` next to its class; nothing
else names it. The spec's factory builds the loss from the chosen detector and any object
with the settings of :class:`LossSettings` (the training arguments are one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..named_registry import NamedRegistry

if TYPE_CHECKING:
    from ..fnd.interface import FalseNegativeDetector
    from ..fnd.table import StateSharding
    from .base import BimodalContrastiveLoss


class LossSettings(Protocol):
    """The settings a loss's factory may read (``GloFNDTrainingArguments`` has them all)."""

    fn_strategy: str
    check_inputs: bool
    temperature_scheme: str
    rho: float
    temperature_gradient: str

    def gamma_schedule_obj(self) -> Any:
        """The global losses' gamma schedule (``GammaSchedule``)."""


@dataclass(frozen=True)
class Citation:
    """A paper a model card cites for this loss: what it stands for, and its BibTeX."""

    what: str
    bibtex: str


@dataclass(frozen=True)
class LossBuild:
    """Where a loss's per-sample state lives (the global losses' ``u``)."""

    num_samples: int
    device: torch.device | str = "cpu"
    pin_memory: bool = False
    sharding: StateSharding = "replicated"
    """replicated, or sharded across the processes (``fnd.table.make_table``)."""


@dataclass(frozen=True)
class LossSpec:
    name: str
    description: str
    """One line for ``--help`` and docs/settings.md."""
    objective: str
    """The training objective in the model card's words."""
    factory: Callable[[FalseNegativeDetector, LossSettings, LossBuild], BimodalContrastiveLoss]
    citations: tuple[Citation, ...] = ()
    """Papers cited beside GloFND and CLIP (which every card cites)."""
    state_bytes_per_sample: int = 0
    """Per-sample state the loss keeps (bytes, both sides)."""
    uses_logit_bias: bool = False
    """Needs the model's logit bias (SigLIP-style models only)."""
    fixed_temperature: bool = False
    """Trains only with ``temperature_scheme: fixed``."""

    def build(
        self, detector: FalseNegativeDetector, settings: LossSettings, where: LossBuild
    ) -> BimodalContrastiveLoss:
        return self.factory(detector, settings, where)


_LOSSES: NamedRegistry[LossSpec] = NamedRegistry("loss_type")
register = _LOSSES.register
unregister = _LOSSES.unregister
get = _LOSSES.get
names = _LOSSES.names


def help_text() -> str:
    """``loss_type``'s help: every registered loss with its description."""
    return "; ".join(f"{spec.name}: {spec.description}" for spec in _LOSSES.values()) + "."
