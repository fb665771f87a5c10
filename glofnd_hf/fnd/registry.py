"""The detector registry: one entry per false-negative detector.

An entry (:class:`DetectorSpec`) owns everything the rest of the package needs to know about
a detector: its name, a one-line description (``--help``, model cards, reports), its settings
dataclass, whether it needs ground-truth labels, its per-sample state size and its factory.
Adding a detector is one :func:`register` call next to its class; the training arguments,
the Trainer and the CLI read the registry.

Every detector receives the :class:`SharedSettings` (alpha, the masking start, the seed);
its own settings come from a dataclass whose fields a user sets by name (``detector_kwargs``
of the training arguments). A settings dataclass may also hold shared settings as fields
(``shared_fields``: GloFND's ``GloFNDConfig`` has ``alpha`` and ``mask_start_epoch``): those
are filled from the shared settings and are not accepted as detector settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from inspect import signature
from typing import TYPE_CHECKING, Any

import torch

from ..named_registry import NamedRegistry
from .setting_types import check_dataclass_values
from .table import STATE_SHARDINGS, StateSharding

if TYPE_CHECKING:
    from .interface import FalseNegativeDetector


@dataclass(frozen=True)
class SharedSettings:
    """Settings every detector receives (a detector uses those it needs)."""

    alpha: float = 1e-3
    """Fraction of the data set taken as false negatives of each anchor."""
    mask_start_epoch: float = 0.0
    """Epoch from which detected false negatives are acted on."""
    seed: int = 0
    """Seed of any randomness of the detector (the training seed under the Trainer)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.mask_start_epoch < 0:
            raise ValueError(f"mask_start_epoch must be >= 0, got {self.mask_start_epoch}")


@dataclass
class NoSettings:
    """Settings of a detector that has none besides the shared ones."""


def no_state(settings: Any) -> int:
    """Per-sample state bytes of a stateless detector."""
    return 0


DetectorFactory = Callable[..., "FalseNegativeDetector"]
"""``factory(settings, shared, *, num_samples, device, pin_memory) -> detector``; a
``shardable`` detector's factory also takes ``sharding``."""


@dataclass(frozen=True)
class DetectorSpec:
    """What the package knows about one detector."""

    name: str
    description: str
    """One line: what the detector takes as false negatives (for --help and model cards)."""
    detector_class: type[FalseNegativeDetector]
    factory: DetectorFactory
    settings: type = NoSettings
    """Dataclass of the detector's own settings."""
    shared_fields: tuple[str, ...] = ()
    """Fields of ``settings`` filled from :class:`SharedSettings` (same names)."""
    needs_num_samples: bool = False
    """Keeps per-sample state, so needs N (the size of the dataset index space)."""
    state_bytes: Callable[..., int] = no_state
    """Per-sample state bytes for given settings (sizes the state's placement); a detector
    whose state holds embeddings also takes ``embed_width`` (None: not known yet)."""
    shardable: bool = False
    """Its per-sample state can be sharded across processes (``state_sharding: sharded``;
    the factory takes ``sharding``). A detector without per-sample state needs nothing."""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"settings of detector {self.name!r} must be a dataclass")
        shared = {f.name for f in dataclasses.fields(SharedSettings)}
        names = {f.name for f in dataclasses.fields(self.settings)}
        wrong = sorted(set(self.shared_fields) - (shared & names))
        if wrong:
            raise ValueError(
                f"shared_fields {wrong} of detector {self.name!r} must be fields of both "
                f"{self.settings.__name__} and SharedSettings"
            )

    @property
    def requires_labels(self) -> bool:
        """Needs ground-truth labels for every sample of the batch (the oracle)."""
        return self.detector_class.requires_labels

    def setting_fields(self) -> tuple[dataclasses.Field, ...]:
        """The detector's own settings: what ``detector_kwargs`` may set."""
        return tuple(
            f
            for f in dataclasses.fields(self.settings)
            if f.init and f.name not in self.shared_fields
        )

    def setting_names(self) -> list[str]:
        return [f.name for f in self.setting_fields()]

    def make_settings(
        self, kwargs: Mapping[str, Any] | None = None, shared: SharedSettings | None = None
    ) -> Any:
        """The settings dataclass from a mapping of its fields (defaults for the others);
        raises ValueError naming an unknown key and the valid ones, or a value of the wrong
        type and the expected one."""
        kwargs = dict(kwargs or {})
        shared = shared or SharedSettings()
        valid = self.setting_names()
        for key in kwargs:
            if key in self.shared_fields:
                raise ValueError(
                    f"{key!r} is a setting shared by every detector, not a setting of the "
                    f"{self.name!r} detector: set it there"
                )
            if key not in valid:
                raise ValueError(
                    f"unknown setting {key!r} for the {self.name!r} detector; its settings are: "
                    f"{', '.join(valid) if valid else '(none)'}"
                )
        kwargs = check_dataclass_values(self.settings, kwargs)  # types, before any use
        kwargs.update({name: getattr(shared, name) for name in self.shared_fields})
        return self.settings(**kwargs)

    def bytes_per_sample(self, settings: Any = None, embed_width: int | None = None) -> int:
        """Per-sample state bytes of the detector (0 when it keeps none), for embeddings of
        ``embed_width`` where the model says it (passed on where ``state_bytes`` takes it)."""
        settings = settings if settings is not None else self.make_settings()
        if embed_width is not None and "embed_width" in signature(self.state_bytes).parameters:
            return self.state_bytes(settings, embed_width=embed_width)
        return self.state_bytes(settings)

    def check_sharding(self, settings: Any, sharding: StateSharding) -> None:
        """Raise ValueError unless the detector can hold its per-sample state ``sharding``
        with these settings (a settings dataclass may add its own ``check_sharding``)."""
        if sharding not in STATE_SHARDINGS:
            raise ValueError(f"state sharding must be one of {STATE_SHARDINGS}, got {sharding!r}")
        if sharding == "replicated" or not self.needs_num_samples:
            return
        if not self.shardable:
            raise ValueError(
                f"the {self.name} detector cannot shard its per-sample state yet: use "
                "state_sharding: replicated"
            )
        check = getattr(settings, "check_sharding", None)
        if check is not None:
            check(sharding)

    def build(
        self,
        settings: Any = None,
        shared: SharedSettings | None = None,
        *,
        num_samples: int | None = None,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        sharding: StateSharding = "replicated",
    ) -> FalseNegativeDetector:
        """The detector; ``settings``: its settings dataclass, or a mapping of its fields;
        ``sharding``: where its per-sample state lives (``fnd.table.make_table``)."""
        shared = shared or SharedSettings()
        if not isinstance(settings, self.settings):
            settings = self.make_settings(settings, shared)
        if self.needs_num_samples and num_samples is None:
            raise ValueError(
                f"the {self.name} detector needs num_samples (the size of the index space)"
            )
        self.check_sharding(settings, sharding)
        extra = {}
        if sharding != "replicated" and self.needs_num_samples:
            extra["sharding"] = sharding
        return self.factory(
            settings,
            shared,
            num_samples=num_samples,
            device=device,
            pin_memory=pin_memory,
            **extra,
        )


_DETECTORS: NamedRegistry[DetectorSpec] = NamedRegistry("detector", sort_names=True)
register = _DETECTORS.register
unregister = _DETECTORS.unregister
get = _DETECTORS.get
names = _DETECTORS.names


def describe() -> str:
    """``name: description`` of every detector, one per line (for --help)."""
    return "\n".join(f"{spec.name}: {spec.description}" for spec in _DETECTORS.values())


def build_detector(
    name: str,
    *,
    num_samples: int | None = None,
    config: Any = None,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
    options: Mapping[str, Any] | None = None,
    sharding: StateSharding = "replicated",
) -> FalseNegativeDetector:
    """Detector by name (the older call form of :meth:`DetectorSpec.build`).

    ``config`` (a ``GloFNDConfig``, optional) gives the shared alpha and masking start of
    every detector and is the glofnd detector's settings; ``options`` the settings of any
    other detector (e.g. IFND's clustering)."""
    spec = get(name)
    shared = SharedSettings()
    if config is not None:
        shared = SharedSettings(alpha=config.alpha, mask_start_epoch=config.mask_start_epoch)
    settings = config if isinstance(config, spec.settings) else options
    return spec.build(
        settings,
        shared,
        num_samples=num_samples,
        device=device,
        pin_memory=pin_memory,
        sharding=sharding,
    )
