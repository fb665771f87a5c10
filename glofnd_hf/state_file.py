"""Reading a checkpoint's per-sample state file (``glofnd_state.safetensors``) with every
problem reported as one :class:`StateFileError` that names the file and the first bad entry:
unreadable or truncated files, another N, and entries the loss or detector refuses (dtype,
shape, non-finite or out-of-range values). Nothing is changed when the file is refused."""

from __future__ import annotations

import os

import torch

__all__ = ["StateFileError", "load_detector_state", "load_state_file", "read_state_file"]


class StateFileError(ValueError):
    """A per-sample state file that cannot be restored (the message says which and why)."""


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a file that is not one (truncated,
    corrupt, empty) raises :class:`StateFileError` instead of safetensors' own error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {key: f.get_tensor(key) for key in f.keys()}, metadata  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise StateFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err


def load_state_file(path: str | os.PathLike, loss, num_samples: int | None) -> None:
    """Restore ``loss``'s per-sample state (``loss.load_state_dict``) from ``path``, after
    checking that the file was written for ``num_samples`` (N) samples."""
    state, metadata = read_state_file(path)
    _check_num_samples(path, metadata, num_samples)
    try:
        loss.load_state_dict(state)
    except ValueError as err:  # StateError names the entry; others name keys or settings
        raise StateFileError(f"{path}: {err}") from err


def load_detector_state(path: str | os.PathLike, detector, num_samples: int | None) -> None:
    """Restore only the detector's part (``detector.*`` entries) of a checkpoint's state file
    into ``detector``, with the same checks as :func:`load_state_file`; entries of the loss
    itself (the global loss's ``u``) are left out. For tools that read thresholds without
    building the training loss."""
    from .fnd.table import StateError

    state, metadata = read_state_file(path)
    _check_num_samples(path, metadata, num_samples)
    prefix = "detector."
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        detector.load_state_dict(own)
    except StateError as err:
        raise StateFileError(f"{path}: {err.within(prefix)}") from err
    except ValueError as err:
        raise StateFileError(f"{path}: {err}") from err


def _check_num_samples(path, metadata: dict[str, str], num_samples: int | None) -> None:
    stored_n = metadata.get("num_samples")
    if stored_n is not None and num_samples is not None and stored_n != str(num_samples):
        raise StateFileError(
            f"{path}: holds the state of N={stored_n} samples, this run has N={num_samples} "
            "(another data set, or another num_samples?)"
        )
