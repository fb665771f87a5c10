"""The table of model families: what the package knows of each (how its folders are
recognised, how its releases are saved and named, how cards describe it).

A family is known by one ``register_family(ModelFamily(...))`` next to its adapter; the
loader, the training arguments, the command lines, the trainer's saving, the Hub push and
the model cards read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..named_registry import NamedRegistry

if TYPE_CHECKING:
    from .base import DualEncoderAdapter


@dataclass(frozen=True)
class ModelFamily:
    name: str
    adapter: type[DualEncoderAdapter]
    """Its adapter class; ``adapter.from_pretrained(name, **kwargs)`` loads a model."""
    library_name: str
    """The Hub's ``library_name`` of its cards."""
    folder_marker: str
    """The file that marks one of its saved folders."""
    layout: str
    """Its saved layout in the model card's words."""
    aliases: tuple[str, ...] = ()
    """Other spellings accepted for ``family`` / ``model_family``."""
    folder_priority: int = 0
    """Where folders could hold several markers, the lower is tried first."""
    hub_prefix: str = ""
    """Prefix of a Hub repo id in the name its own library loads it by (``hf-hub:``)."""
    tags: tuple[str, ...] = ()
    """Tags its cards add."""
    release_save_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """``adapter.save`` keyword arguments for a release (the Hub push, the trainer's saves)."""
    saves_beside_trainer: bool = False
    """The Trainer's own weight file does not load in the family's library: the trainer also
    writes the family's layout into every folder it saves."""
    takes_pretrained: bool = False
    """Loads with a separate ``pretrained`` tag or checkpoint file (open_clip)."""


_FAMILIES: NamedRegistry[ModelFamily] = NamedRegistry("model family")
register_family = _FAMILIES.register
unregister_family = _FAMILIES.unregister
family_names = _FAMILIES.names


def family_choices() -> list[str]:
    """What ``family`` / ``model_family`` accept: ``auto`` and every family's name."""
    return ["auto", *_FAMILIES.names()]


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` or one of its aliases (case-insensitive)."""
    key = name.lower()
    for family in _FAMILIES.values():
        if key == family.name or key in family.aliases:
            return family
    raise ValueError(f"unknown family {name!r}; use {', '.join(map(repr, family_choices()))}")


def families_by_folder_priority() -> list[ModelFamily]:
    return sorted(_FAMILIES.values(), key=lambda f: f.folder_priority)


def family_of_adapter(adapter: DualEncoderAdapter) -> ModelFamily:
    return get_family(adapter.family)
