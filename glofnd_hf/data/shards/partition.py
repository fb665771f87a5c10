"""Which shards and samples each rank and DataLoader worker reads, and how many batches.

Pure functions of ``(seed, epoch, rank, world_size, worker)``: every rank computes the same
plan without talking to the others (see :mod:`glofnd_hf.data.shards` for the semantics).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

__all__ = [
    "buffer_shuffle",
    "epoch_batches_per_rank",
    "resampled_shards",
    "seeded_rng",
    "shard_partition",
    "worker_quota",
    "worker_skip_batches",
]

T = TypeVar("T")


def seeded_rng(*parts: int) -> random.Random:
    """A RNG seeded by integers, identical in every process and Python version."""
    # str seeds are hashed with sha512: stable across processes and Python versions
    return random.Random("glofnd-shards:" + ":".join(str(int(p)) for p in parts))


def shard_partition(
    urls: Sequence[str],
    rank: int,
    world_size: int,
    num_workers: int,
    worker_id: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
) -> list[str]:
    """Shards read by ``worker_id`` of ``rank`` in ``epoch`` (non-resampled mode), in order.

    The list is permuted with ``(seed, epoch)`` (same permutation on every rank),
    then split ``perm[rank::world_size][worker_id::num_workers]``.  Over all ranks
    and workers the result is a partition of ``urls``.
    """
    num_workers = max(1, num_workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id {worker_id} outside [0, {num_workers})")
    order = list(urls)
    if shuffle:
        seeded_rng(seed, epoch).shuffle(order)
    return order[rank::world_size][worker_id::num_workers]


def resampled_shards(
    urls: Sequence[str], rank: int, worker_id: int, epoch: int, seed: int, pass_id: int = 0
) -> list[str]:
    """``len(urls)`` shards drawn with replacement for one pass of one worker (resampled mode)."""
    rng = seeded_rng(seed, epoch, rank, worker_id, pass_id, 1)
    return [urls[rng.randrange(len(urls))] for _ in range(len(urls))]


def epoch_batches_per_rank(total_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch: ``total // (world_size * batch_size)``."""
    return total_samples // (world_size * batch_size)


def worker_quota(batches_per_rank: int, num_workers: int, worker_id: int) -> int:
    """Batches worker ``worker_id`` yields so that the rank yields ``batches_per_rank``."""
    num_workers = max(1, num_workers)
    return batches_per_rank // num_workers + (
        1 if worker_id < batches_per_rank % num_workers else 0
    )


def worker_skip_batches(skip_batches: int, num_workers: int, worker_id: int) -> int:
    """How many of the rank's first ``skip_batches`` batches come from ``worker_id``."""
    # rank batch i comes from worker i % W; count i < skip_batches with i % W == worker_id
    return max(0, math.ceil((skip_batches - worker_id) / max(1, num_workers)))


def buffer_shuffle(items: Iterable[T], bufsize: int, rng: random.Random) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``bufsize`` items (``<= 1``: pass through)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(bufsize)
        out, buf[k] = buf[k], item
        yield out
    rng.shuffle(buf)
    yield from buf
