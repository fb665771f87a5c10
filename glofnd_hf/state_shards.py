"""Per-process checkpoints of a sharded per-sample state (``state_sharding: sharded``,
issue 30): each process writes the rows it owns, ``glofnd_state.rank{r}-of-{w}.safetensors``
(every table's ``shard_state_dict`` under ``{table}.rows`` / ``.index`` / ``.world_size`` /
``.num_samples``, the loss's config, N, rank and world size as metadata), atomically; once
every shard is on disk the first process writes the completeness mark, the usual
``glofnd_state.safetensors``, as a manifest: no tensors, the config and N as a state file
records them, and ``shards`` (the world size) naming the set. Replicated runs (and sharded
runs in one process) write today's single file unchanged. A loss with state that is not per
sample (IFND's schedule and bank width: ``shard_extras``) stores it in every shard under
``extra.*``; loading takes it from the first shard, before the tables' rows.

Resuming reads every shard of the set (any world size into any world size: each process
keeps its rows, ``ShardedPerSampleTable.load_shards``; a replicated run takes every row).
A missing, truncated or foreign shard is one :class:`~glofnd_hf.state_file.StateFileError`
naming the file, and nothing is changed."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoints import STATE_FILE, write_atomically
from .fnd.table import ShardedPerSampleTable
from .state_file import StateFileError, read_state_file

__all__ = [
    "is_sharded",
    "load_state_shards",
    "manifest_shards",
    "shard_file_name",
    "write_shard_manifest",
    "write_state_shard",
]

_FIELDS = ("rows", "index", "world_size", "num_samples")
EXTRA = "extra."
"""Prefix of the loss's state that is not per sample (``shard_extras``, e.g. IFND's
schedule): the same in every shard, read from the first."""


def shard_file_name(rank: int, world_size: int) -> str:
    return f"{STATE_FILE.removesuffix('.safetensors')}.rank{rank}-of-{world_size}.safetensors"


def is_sharded(loss) -> bool:
    """Whether ``loss``'s per-sample state is split over more than one process (its
    checkpoint is then one file per process)."""
    tables = getattr(loss, "shard_tables", None)
    if tables is None:
        return False
    return any(isinstance(t, ShardedPerSampleTable) and t.world_size > 1 for t in tables().values())


def _metadata(config: Mapping[str, Any], num_samples: int) -> dict[str, str]:
    return {"config": json.dumps(dict(config), default=str), "num_samples": str(num_samples)}


def write_state_shard(folder: str | os.PathLike, loss, num_samples: int) -> str:
    """This process's rows of every table of ``loss`` (sharded) to its shard file, atomically;
    returns its path. No communication."""
    tables = loss.shard_tables()
    rank = world = None
    state: dict[str, torch.Tensor] = {}
    for name, table in tables.items():
        rank, world = table.rank, table.world_size
        for field, value in table.shard_state_dict().items():
            state[f"{name}.{field}"] = value.contiguous()
    extras = getattr(loss, "shard_extras", None)
    for key, value in ({} if extras is None else extras()).items():
        state[f"{EXTRA}{key}"] = value.contiguous().cpu()
    metadata = _metadata(loss.config_dict(), num_samples)
    metadata.update(rank=str(rank), world_size=str(world), tables=json.dumps(sorted(tables)))
    path = os.path.join(folder, shard_file_name(rank, world))
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def write_shard_manifest(
    folder: str | os.PathLike, config: Mapping[str, Any], num_samples: int, world_size: int
) -> None:
    """The completeness mark of a set of ``world_size`` shards (written last, by one
    process, once every shard is on disk)."""
    from safetensors.torch import save_file

    metadata = _metadata(config, num_samples)
    metadata["shards"] = str(world_size)
    path = os.path.join(folder, STATE_FILE)
    write_atomically(path, lambda tmp: save_file({}, tmp, metadata=metadata))


def manifest_shards(metadata: Mapping[str, str]) -> int | None:
    """The number of shard files a state file's metadata names (None: a single file)."""
    shards = metadata.get("shards")
    return None if shards is None else int(shards)


def load_state_shards(folder: str | os.PathLike, loss, num_samples: int | None) -> None:
    """Load the shard set of ``folder`` (named by its manifest) into ``loss``: every file is
    read and checked first, then the loss's extras (``load_shard_extras``, where it has
    them) and each table take their rows; nothing changes on an error."""
    manifest = os.path.join(folder, STATE_FILE)
    _, meta = read_state_file(manifest)
    world = manifest_shards(meta)
    if world is None or world < 1:
        raise StateFileError(f"{manifest} names no set of per-process shards")
    paths = [os.path.join(folder, shard_file_name(rank, world)) for rank in range(world)]
    shards = [_read_shard(path, rank, world, num_samples) for rank, path in enumerate(paths)]
    load_extras = getattr(loss, "load_shard_extras", None)
    before = loss.shard_extras() if load_extras is not None else {}
    if load_extras is not None:
        extras = {k[len(EXTRA) :]: v for k, v in shards[0].items() if k.startswith(EXTRA)}
        try:
            load_extras(extras)  # checked first; may size a table (IFND's bank)
        except ValueError as err:
            raise StateFileError(f"{paths[0]}: {err}") from err
    try:
        _load_tables(folder, loss, paths, shards)
    except StateFileError:
        if load_extras is not None:
            load_extras(before)
        raise


def _read_shard(path: str, rank: int, world: int, num_samples: int | None) -> dict:
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
    stored_n = metadata.get("num_samples")
    if num_samples is not None and stored_n != str(num_samples):
        raise StateFileError(
            f"{path}: holds the state of N={stored_n} samples, this run has N={num_samples} "
            "(another data set, or another num_samples?)"
        )
    return state


def _load_tables(folder, loss, paths: list[str], shards: list[dict]) -> None:
    """Every table's rows from every shard, each checked before any table changes."""
    tables = loss.shard_tables()
    check = getattr(loss, "check_shard_rows", None)
    for path, state in zip(paths, shards, strict=True):
        for name in tables:
            missing = [f for f in _FIELDS if f"{name}.{f}" not in state]
            if missing:
                raise StateFileError(
                    f"{path} holds no {name} rows (missing {', '.join(missing)}): was it "
                    "written with another loss or detector?"
                )
            rows = state[f"{name}.rows"]
            fits = tuple(rows.shape[1:]) == tuple(tables[name].data.shape[1:])
            if check is not None and fits:  # a wrong shape: load_shards names it
                try:  # the value ranges loading a single state file checks
                    check(name, rows)
                except ValueError as err:
                    raise StateFileError(f"{path}: {err}") from err
    # Check every table against every shard before changing any (load_shards checks first).
    backups = {name: table.data.clone() for name, table in tables.items()}
    try:
        for name, table in tables.items():
            parts = [{f: s[f"{name}.{f}"] for f in _FIELDS} for s in shards]
            if isinstance(table, ShardedPerSampleTable):
                table.load_shards(parts)
            else:  # a replicated table takes every row
                whole = ShardedPerSampleTable(
                    table.num_samples,
                    table.data.shape[1:],
                    0.0,
                    rank=0,
                    world_size=1,
                    dtype=table.data.dtype,
                )
                whole.load_shards(parts)
                table.data.copy_(whole.data.to(table.data.device))
    except ValueError as err:
        for name, table in tables.items():
            table.data.copy_(backups[name])
        raise StateFileError(f"{folder}: per-sample state shards of {len(shards)}: {err}") from err
