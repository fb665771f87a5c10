"""A checkpoint's per-sample state file (``glofnd_state.safetensors``), written and read
here only: the tensors of the loss's state, and metadata that records the loss's
configuration (``config``, JSON: detector name and settings) and ``num_samples``. Reading
reports every problem as one :class:`StateFileError` that names the file and the first bad entry:
unreadable or truncated files, another N, and entries the loss or detector refuses (dtype,
shape, non-finite or out-of-range values). Nothing is changed when the file is refused."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoints import write_atomically

__all__ = [
    "StateFileError",
    "load_detector_state",
    "load_state_file",
    "read_state_config",
    "read_state_file",
    "write_state_file",
]


class StateFileError(ValueError):
    """A per-sample state file that cannot be restored (the message says which and why)."""


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a file that is not one (truncated,
    corrupt, empty) raises :class:`StateFileError` instead of safetensors' own error."""
    return _read(path, tensors=True)


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}  # noqa: SIM118
            return state, metadata
    except (SafetensorError, OSError, RuntimeError) as err:
        raise StateFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): "
            f"{type(err).__name__}: {err}"
        ) from err


def write_state_file(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    num_samples: int,
) -> None:
    """Write ``state`` with the loss's ``config`` and ``num_samples`` as metadata, atomically
    (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(dict(config), default=str), "num_samples": str(num_samples)}
    write_atomically(path, lambda tmp: save_file(dict(state), tmp, metadata=metadata))


def read_state_config(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The loss's configuration and N that a state file records; :class:`StateFileError`
    where it records no detector or no N. Reads the header only, not the tensors."""
    _, metadata = _read(path, tensors=False)
    try:
        config = json.loads(metadata["config"])
        config["detector"]
    except (KeyError, TypeError, ValueError) as err:
        raise StateFileError(
            f"{path} does not record its detector (no 'config' with 'detector' in its metadata)"
        ) from err
    num_samples = int(metadata.get("num_samples") or config.get("num_samples") or 0)
    if num_samples <= 0:
        raise StateFileError(f"{path} does not record N (num_samples) in its metadata")
    return config, num_samples


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
    if metadata.get("shards") is not None:
        raise StateFileError(
            f"{path} marks a state split over {metadata['shards']} per-process files "
            "(state_sharding: sharded), which this tool does not read yet"
        )
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
