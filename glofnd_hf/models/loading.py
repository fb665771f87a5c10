"""Loading a dual encoder by name or folder, with the family (hf or open_clip) inferred."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import DualEncoderAdapter
from .families import families_by_folder_priority, get_family
from .hf_adapter import HFDualEncoder  # registers "hf"
from .open_clip_adapter import OPEN_CLIP_CONFIG_NAME  # registers "open_clip"

__all__ = ["family_of_folder", "infer_family", "load_dual_encoder"]


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or name in (".", "..")
    )


def family_of_folder(folder: str | os.PathLike) -> str:
    """The family whose marker file the folder holds (``open_clip_config.json``: open_clip,
    ``config.json``: hf); ``ValueError`` for anything else (not a folder, or no model in it)."""
    path = Path(folder).expanduser()
    families = families_by_folder_priority()
    for family in families:
        if (path / family.folder_marker).is_file():
            return family.name
    expected = " or ".join(f"{f.folder_marker} ({f.library_name})" for f in families)
    raise ValueError(
        f"{str(folder)!r} holds no model: expected {expected}; cannot load a dual encoder from it"
    )


def infer_family(model_name_or_path: str) -> str:
    """``"open_clip"`` or ``"hf"`` for a name/folder, without loading anything.

    open_clip: ``hf-hub:``/``local-dir:`` names, ``open_clip.list_models()`` architectures and
    folders with ``open_clip_config.json``. HF: folders with ``config.json`` and anything else that
    could be a Hub id. Raises ``FileNotFoundError``/``ValueError`` for unusable paths.
    """
    name = str(model_name_or_path)
    if name.startswith(("hf-hub:", "local-dir:")):
        return "open_clip"
    path = Path(name).expanduser()
    if path.is_dir():
        return family_of_folder(path)
    if path.is_file():
        raise ValueError(
            f"{name!r} is a file; pass an open_clip architecture name with pretrained={name!r}, "
            "or a folder"
        )
    import open_clip

    known = set(open_clip.list_models())
    if name in known or name.replace("/", "-") in known:
        return "open_clip"
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{name!r} looks like a local path but does not exist (tried: folder with "
            f"{OPEN_CLIP_CONFIG_NAME} or config.json)"
        )
    return "hf"


def load_dual_encoder(
    model_name_or_path: str | Path,
    *,
    family: str = "auto",
    pretrained: str | None = None,
    **kwargs: Any,
) -> DualEncoderAdapter:
    """Load a CLIP-style model as a :class:`DualEncoderAdapter`.

    ``family="auto"``: open_clip for ``hf-hub:``/``local-dir:`` names, open_clip architecture
    names (``open_clip.list_models()``, with ``pretrained`` = tag or checkpoint file) and folders
    with ``open_clip_config.json``; Hugging Face ``AutoModel``/``AutoProcessor`` for folders with
    ``config.json`` and Hub ids. ``kwargs`` go to the family's loader.
    """
    name = str(model_name_or_path)
    try:
        return _load(name, family, pretrained, **kwargs)
    except Exception as err:
        if not _is_damaged_weights(err):
            raise
        raise DamagedWeightsError(
            f"the weights of {name!r} are damaged or incomplete ({_damaged_file(name) or 'a weight file'}: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:200]}); copy or download them "
            "again (a run's checkpoint-N folders hold earlier copies)"
        ) from err


class DamagedWeightsError(OSError):
    """A weight file that exists but cannot be read (truncated, overwritten, not weights)."""


_DAMAGED_MESSAGES = (
    "PytorchStreamReader",
    "invalid load key",
    "unexpected EOF",
    "Ran out of input",
)


def _is_damaged_weights(err: BaseException) -> bool:
    import pickle

    if type(err).__name__ == "SafetensorError" or isinstance(
        err, (EOFError, pickle.UnpicklingError)
    ):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _DAMAGED_MESSAGES)


def _damaged_file(name: str) -> str | None:
    """The first weight file of a local folder whose header cannot be read, if any."""
    folder = Path(name.removeprefix("local-dir:"))
    if not folder.is_dir():
        return None
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:
            return str(path)
    return None


def _load(name: str, family: str, pretrained: str | None, **kwargs: Any) -> DualEncoderAdapter:
    fam = get_family(family if family != "auto" else infer_family(name))
    if fam.takes_pretrained:
        return fam.adapter.from_pretrained(name, pretrained=pretrained, **kwargs)
    if pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r} only applies to open_clip architectures; {name!r} resolved "
            f"to the {fam.library_name} family (put the weights' Hub id or folder in "
            "model_name_or_path)"
        )
    if fam.adapter is not HFDualEncoder:
        return fam.adapter.from_pretrained(name, **kwargs)
    try:
        return HFDualEncoder.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if family != "auto":
            raise
        import open_clip

        raise OSError(
            f"could not load {name!r} as a dual encoder. Tried: open_clip (not an "
            f"hf-hub:/local-dir: name, not one of the {len(open_clip.list_models())} "
            f"open_clip.list_models() architectures, not a folder with {OPEN_CLIP_CONFIG_NAME}); Hugging Face transformers "
            f"(AutoModel/AutoProcessor.from_pretrained failed: {type(e).__name__}: {e})"
        ) from e
