"""A checkpoint's per-sample state file (``glofnd_state.safetensors``), written and read
here only: the tensors of the loss's state, and metadata that records the loss's
configuration (``config``, JSON: detector name and settings) and ``num_samples``. Reading
reports every problem as one :class:`StateFileError` that names the file and the first bad entry:
unreadable or truncated files, another N, and entries the loss or detector refuses (dtype,
shape, non-finite or out-of-range values). Nothing is changed when the file is refused.

A state sharded over processes (``state_sharding: sharded``) is a set of per-process files
``glofnd_state.rank{r}-of-{w}.safetensors`` (written by :mod:`glofnd_hf.state_shards`)
under a manifest in the state file's place: no tensors, the config and N, and ``shards``
(w). The set is read and checked here too (:func:`load_shard_set`), every file before any
table changes, so that resuming and the offline tools read it alike."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoints import shard_file_name, write_atomically
from .fnd.table import StateError

__all__ = [
    "StateFileError",
    "load_detector_state",
    "load_shard_set",
    "load_state_file",
    "manifest_shards",
    "read_state_config",
    "read_state_file",
    "read_state_metadata",
    "shard_file_name",
    "state_metadata",
    "write_state_file",
]

#: The entries of each table in a shard file (``{table}.{field}``).
SHARD_FIELDS = ("rows", "index", "world_size", "num_samples")
EXTRA = "extra."
"""Prefix of a loss's state that is not per sample (``shard_extras``, e.g. IFND's
schedule and bank width): the same in every shard, read from the first."""
_DETECTOR = "detector."  # the loss's name for its detector's entries


class StateFileError(ValueError):
    """A per-sample state file that cannot be restored (the message says which and why)."""


def read_state_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a file that is not one (truncated,
    corrupt, empty) raises :class:`StateFileError` instead of safetensors' own error."""
    return _read(path, tensors=True)


def read_state_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a state file, from its header only (not its tensors)."""
    return _read(path, tensors=False)[1]


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

    metadata = state_metadata(config, num_samples)
    write_atomically(path, lambda tmp: save_file(dict(state), tmp, metadata=metadata))


def state_metadata(config: Mapping[str, Any], num_samples: int) -> dict[str, str]:
    """The metadata every state file (and shard, and manifest) records: the loss's
    ``config`` (JSON) and ``num_samples``."""
    return {"config": json.dumps(dict(config), default=str), "num_samples": str(num_samples)}


def read_state_config(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The loss's configuration and N that a state file records; :class:`StateFileError`
    where it records no detector or no N. Reads the header only, not the tensors."""
    metadata = read_state_metadata(path)
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
    building the training loss.

    ``path`` may be the manifest of a shard set (``state_sharding: sharded``): every shard it
    names is read, checked and assembled into the detector's tables (a replicated detector
    takes every row), whatever the number of processes that wrote it. One process, no
    ``torch.distributed``; the shards and the full table are held here, O(N) memory, which
    offline tools (``glofnd-inspect``) can afford."""
    state, metadata = read_state_file(path)
    _check_num_samples(path, metadata, num_samples)
    if manifest_shards(metadata) is not None:
        load_shard_set(path, _DetectorTables(path, detector), num_samples)
        return
    own = {k[len(_DETECTOR) :]: v for k, v in state.items() if k.startswith(_DETECTOR)}
    try:
        detector.load_state_dict(own)
    except StateError as err:
        raise StateFileError(f"{path}: {err.within(_DETECTOR)}") from err
    except ValueError as err:
        raise StateFileError(f"{path}: {err}") from err


class _DetectorTables:
    """A detector's tables under the names a loss's shards store them by (``detector.*``),
    so that a shard set loads into the detector alone (the loss's own tables left out)."""

    def __init__(self, path: str | os.PathLike, detector: Any) -> None:
        if getattr(detector, "shard_tables", None) is None:
            raise StateFileError(
                f"{path} marks a state split over per-process files, and the "
                f"{type(detector).__name__} keeps no per-sample table to load it into"
            )
        self.detector = detector

    def shard_tables(self) -> dict:
        return {_DETECTOR + k: v for k, v in self.detector.shard_tables().items()}

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        check = getattr(self.detector, "check_shard_rows", None)
        if check is None:
            return
        try:
            check(name[len(_DETECTOR) :], rows)
        except StateError as err:
            raise err.within(_DETECTOR) from err


def manifest_shards(metadata: Mapping[str, str]) -> int | None:
    """The number of shard files a state file's metadata names (None: a single file)."""
    shards = metadata.get("shards")
    return None if shards is None else int(shards)


def load_shard_set(manifest: str | os.PathLike, loss: Any, num_samples: int | None) -> None:
    """Load the shard set that ``manifest`` names (the shards lie beside it) into the tables
    of ``loss`` (``shard_tables()``, values checked by its ``check_shard_rows`` when it has
    one). The loss's state that is not per sample comes first (``load_shard_extras``, where
    it has any: it may size a table, IFND's bank); then the shards are read **one at a
    time**, each checked and its rows staged for the tables that own them (a sharded table
    its own, a replicated one every row), so a process holds one shard and its own rows,
    never the whole set. The tables change only once every shard has passed; nothing
    changes on an error (a StateFileError naming the file)."""
    world = manifest_shards(read_state_metadata(manifest))
    if world is None or world < 1:
        raise StateFileError(f"{manifest} names no set of per-process shards")
    folder = os.path.dirname(os.fspath(manifest)) or "."
    paths = [os.path.join(folder, shard_file_name(rank, world)) for rank in range(world)]
    first = _read_shard(paths[0], 0, world, num_samples)
    load_extras = getattr(loss, "load_shard_extras", None)
    before = loss.shard_extras() if load_extras is not None else None
    if load_extras is not None:
        extras = {k[len(EXTRA) :]: v for k, v in first.items() if k.startswith(EXTRA)}
        try:
            load_extras(extras)  # checked first
        except ValueError as err:
            raise StateFileError(f"{paths[0]}: {err}") from err
    pending = [first]  # shard 0, handed over so that no frame here keeps it
    del first
    try:
        _load_tables(folder, loss, paths, pending, num_samples)
    except StateFileError:
        if load_extras is not None:
            load_extras(before)
        raise


def _load_tables(
    folder: str, loss: Any, paths: list[str], pending: list[dict], num_samples: int | None
) -> None:
    """Every table's rows, streamed shard by shard (``pending`` holds shard 0, already
    read)."""
    tables = loss.shard_tables()
    check = getattr(loss, "check_shard_rows", None)
    loaders = {name: table.loader() for name, table in tables.items()}
    world = len(paths)
    for rank, path in enumerate(paths):
        state = pending.pop() if rank == 0 else _read_shard(path, rank, world, num_samples)
        _check_shard_rows(path, state, tables, check)
        try:
            for name, loader in loaders.items():
                loader.take(rank, {f: state[f"{name}.{f}"] for f in SHARD_FIELDS})
        except ValueError as err:
            raise StateFileError(f"{path}: {name}: {err}") from err
        del state
    try:
        for loader in loaders.values():
            loader.check()
    except ValueError as err:
        raise StateFileError(f"{folder}: per-sample state shards of {world}: {err}") from err
    for loader in loaders.values():
        loader.commit()


def _read_shard(path: str, rank: int, world: int, num_samples: int | None) -> dict:
    """Shard ``rank`` of ``world``, read and checked (present, readable, rank and world size
    as named, N): a StateFileError naming it."""
    if not os.path.isfile(path):
        raise StateFileError(
            f"{path} is missing: the checkpoint's per-sample state is split over {world} "
            f"files and every one is needed"
        )
    state, metadata = read_state_file(path)
    if metadata.get("rank") != str(rank) or metadata.get("world_size") != str(world):
        raise StateFileError(
            f"{path} is not shard {rank} of {world} (it records rank "
            f"{metadata.get('rank')} of {metadata.get('world_size')})"
        )
    _check_num_samples(path, metadata, num_samples)
    return state


def _check_shard_rows(path: str, state: dict, tables: Mapping, check) -> None:
    """Every table's entries in one shard and their values (the ranges loading a single
    state file checks): a StateFileError naming the file."""
    for name in tables:
        missing = [f for f in SHARD_FIELDS if f"{name}.{f}" not in state]
        if missing:
            raise StateFileError(
                f"{path} holds no {name} rows (missing {', '.join(missing)}): was it "
                "written with another loss or detector?"
            )
        rows = state[f"{name}.rows"]
        fits = tuple(rows.shape[1:]) == tuple(tables[name].data.shape[1:])
        if check is not None and fits:  # a wrong shape: load_shards names it
            try:
                check(name, rows)
            except ValueError as err:
                raise StateFileError(f"{path}: {err}") from err


def _check_num_samples(path, metadata: dict[str, str], num_samples: int | None) -> None:
    stored_n = metadata.get("num_samples")
    if stored_n is not None and num_samples is not None and stored_n != str(num_samples):
        raise StateFileError(
            f"{path}: holds the state of N={stored_n} samples, this run has N={num_samples} "
            "(another data set, or another num_samples?)"
        )
