"""Thin helpers over ``torch.distributed``: the method needs only gathers.

Everything here is a no-op in a single process, so the method code never branches on
whether it runs distributed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the explicit values where given, else those of the initialised
    process group, else the ``RANK`` / ``WORLD_SIZE`` environment variables (what launchers
    set before a process group exists, e.g. while DataLoaders are built), else 0 / 1.

    Raises ``ValueError`` unless ``world_size >= 1`` and ``0 <= rank < world_size``.
    """
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = int(os.environ.get("RANK", 0)) if rank is None else rank
            world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} / world_size {world_size}")
    return int(rank), int(world_size)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); no gradient."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank; gradients flow back to each rank's slice.

    The backward of ``torch.distributed.nn.all_gather`` sums the gradients of every rank's
    loss into the owner's slice, which together with DDP's gradient averaging gives the
    gradient of the mean loss over the global batch.
    """
    if world_size() == 1:
        return tensor
    try:  # functional collectives: differentiable since torch 2.6
        from torch.distributed._functional_collectives import all_gather_single

        return _wait(all_gather_single(tensor.contiguous(), 0, dist.group.WORLD))
    except ImportError:  # older torch
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    wait = getattr(tensor, "wait", None)
    return wait() if callable(wait) else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy); no gradient."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total
