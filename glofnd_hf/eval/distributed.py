"""Sharing a zero-shot evaluation among the processes of a ``torch.distributed`` group.

The items (images, captions, prompts) are cut into the ``batch_size`` batches one process
would form; each process embeds a contiguous run of whole batches, so every embedding is
computed from exactly the batch a single process would have used, and gathering the runs in
rank order gives back the single-process embeddings. Every process makes the same number of
forward passes (the ones with fewer batches repeat their last one and drop the result): a
model sharded with FSDP needs its processes to run forward in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..fnd import comm

__all__ = [
    "BatchPlan",
    "any_process",
    "broadcast_from_main",
    "gather_rows",
    "share_batches",
]


@dataclass(frozen=True)
class BatchPlan:
    """One process's share of ``n`` items in batches."""

    local: list[tuple[int, int]]
    """``(start, stop)`` of the batches this process embeds, in order."""
    padding: list[tuple[int, int]]
    """Batches to run and drop, so that every process makes as many forward passes."""
    rows_per_rank: list[int]
    """How many items each process embeds (rank order)."""

    @property
    def local_items(self) -> int:
        return sum(stop - start for start, stop in self.local)


def share_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> BatchPlan:
    """Split the batches ``[0, batch_size), [batch_size, 2 batch_size), ...`` of ``n`` items
    into ``world`` contiguous runs of whole batches (sizes differ by at most one batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    cuts = [len(bounds) * r // world for r in range(world + 1)]
    runs = [bounds[cuts[r] : cuts[r + 1]] for r in range(world)]
    most = max(len(run) for run in runs)
    mine = runs[rank]
    filler = mine[-1:] or bounds[-1:]  # the last batch is the smallest one
    padding = filler * (most - len(mine)) if filler else []
    rows = [sum(stop - start for start, stop in run) for run in runs]
    return BatchPlan(mine, padding, rows)


def _collective_device() -> torch.device:
    """Where collectives want their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: torch.Tensor, rows_per_rank: list[int]) -> torch.Tensor:
    """Every process's ``local`` rows ([rows_per_rank[rank], D], any D the same everywhere)
    concatenated in rank order, on the CPU, on every process (one padded all-gather)."""
    most = max(rows_per_rank)
    device = _collective_device()
    buffer = torch.zeros(most, local.shape[1], dtype=local.dtype, device=device)
    buffer[: local.shape[0]] = local.to(device)
    everyone = comm.all_gather_no_grad(buffer).cpu()
    return torch.cat([everyone[r * most : r * most + rows] for r, rows in enumerate(rows_per_rank)])


def broadcast_from_main(value: Any) -> Any:
    """The main process's ``value`` (a picklable object) on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (one tiny all-reduce)."""
    value = torch.tensor([float(flag)], device=_collective_device())
    return bool(comm.all_reduce_sum(value).item() > 0)
