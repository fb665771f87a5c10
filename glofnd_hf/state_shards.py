"""Per-process checkpoints of a sharded per-sample state (``state_sharding: sharded``,
issue 30): each process writes the rows it owns, ``glofnd_state.rank{r}-of-{w}.safetensors``
(every table's ``shard_state_dict`` under ``{table}.rows`` / ``.index`` / ``.world_size`` /
``.num_samples``, the loss's config, N, rank and world size as metadata), atomically; once
every shard is on disk the first process writes the completeness mark, the usual
``glofnd_state.safetensors``, as a manifest: no tensors, the config and N as a state file
records them, and ``shards`` (the world size) naming the set. Replicated runs (and sharded
runs in one process) write today's single file unchanged. A process that cannot write its
shard (disk full, no permission) does not leave the others waiting: after the writes every
process learns every process's outcome (:func:`write_state_shards`, a collective in place
of a barrier) and all raise the same error, so no process marks the set complete. A loss with
state that is not per sample (IFND's schedule and bank width: ``shard_extras``) stores it
in every shard under ``extra.*``; loading takes it from the first shard, before the tables'
rows.

Resuming reads every shard of the set (any world size into any world size: each process
keeps its rows, ``ShardedPerSampleTable.load_shards``; a replicated run takes every row),
through :func:`glofnd_hf.state_file.load_shard_set`, which the offline tools' reading
(``load_detector_state``) shares. A missing, truncated or foreign shard is one
:class:`~glofnd_hf.state_file.StateFileError` naming the file, and nothing is changed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .checkpoints import STATE_FILE, CheckpointWriteError, write_atomically
from .fnd import comm
from .fnd.table import ShardedPerSampleTable
from .state_file import EXTRA, load_shard_set, manifest_shards, shard_file_name, state_metadata

__all__ = [
    "is_sharded",
    "load_state_shards",
    "manifest_shards",
    "shard_file_name",
    "write_shard_manifest",
    "write_state_shard",
    "write_state_shards",
]


def is_sharded(loss) -> bool:
    """Whether ``loss``'s per-sample state is split over more than one process (its
    checkpoint is then one file per process)."""
    tables = getattr(loss, "shard_tables", None)
    if tables is None:
        return False
    return any(isinstance(t, ShardedPerSampleTable) and t.world_size > 1 for t in tables().values())


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
    metadata = state_metadata(loss.config_dict(), num_samples)
    metadata.update(rank=str(rank), world_size=str(world), tables=json.dumps(sorted(tables)))
    path = os.path.join(folder, shard_file_name(rank, world))
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def write_state_shards(folder: str | os.PathLike, loss, num_samples: int) -> str:
    """Every process writes its shard (:func:`write_state_shard`), then all exchange their
    outcome (:func:`agree_on_writes`, in place of a barrier). Returns this process's shard
    path when every process wrote its own; otherwise every process raises the same
    :class:`CheckpointWriteError` naming the failing process(es) and file(s), so none goes
    on to mark the checkpoint complete."""
    world = comm.world_size()
    failure: Exception | None = None
    path = ""
    try:
        os.makedirs(folder, exist_ok=True)
        path = write_state_shard(folder, loss, num_samples)
    except Exception as err:  # told to every process below, then raised everywhere
        failure = err
    agree_on_writes(folder, failure, lambda rank: shard_file_name(rank, world))
    return path


def agree_on_writes(
    folder: str | os.PathLike, failure: BaseException | None, written: Callable[[int], str]
) -> None:
    """Every process learns every process's outcome of its part of a checkpoint's writes (an
    all-gather of each one's error text: a collective every process calls, in place of a
    barrier, so a process that failed does not leave the others waiting). Where any failed,
    every process raises the same one-line :class:`CheckpointWriteError` naming each failed
    process and what it was writing (``written(rank)``), so none marks ``folder`` complete."""
    world = comm.world_size()
    problem = None
    if failure is not None:
        problem = " ".join(f"{type(failure).__name__}: {failure}".split())[:300]
    problems = [problem] * world
    if world > 1:
        dist.all_gather_object(problems, problem)
    failed = [
        f"process {r} could not write {written(r)} ({text})"
        for r, text in enumerate(problems)
        if text is not None
    ]
    if failed:
        raise CheckpointWriteError(
            f"checkpoint {folder} is incomplete: {'; '.join(failed)}; no process marks it "
            f"complete ({STATE_FILE} is not written): fix the cause, then resume with "
            f"resume_from_checkpoint=last (the last complete checkpoint)"
        ) from failure


def write_shard_manifest(
    folder: str | os.PathLike, config: Mapping[str, Any], num_samples: int, world_size: int
) -> None:
    """The completeness mark of a set of ``world_size`` shards (written last, by one
    process, once every shard is on disk)."""
    from safetensors.torch import save_file

    metadata = state_metadata(config, num_samples)
    metadata["shards"] = str(world_size)
    path = os.path.join(folder, STATE_FILE)
    write_atomically(path, lambda tmp: save_file({}, tmp, metadata=metadata))


def load_state_shards(folder: str | os.PathLike, loss, num_samples: int | None) -> None:
    """Load the shard set of ``folder`` (named by its manifest) into ``loss``: every file is
    read and checked first, then the loss's extras (``load_shard_extras``, where it has
    them) and each table take their rows; nothing changes on an error."""
    load_shard_set(os.path.join(folder, STATE_FILE), loss, num_samples)
