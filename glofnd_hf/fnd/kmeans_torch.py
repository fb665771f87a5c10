"""IFND's clustering round in torch over rows that may be split across processes
(``kmeans: torch``; what ``state_sharding: sharded`` runs).

Each process passes the rows it holds (its shard of the feature bank, or every row when
one process clusters alone) with their dataset indices; every exchange is an all-reduce or
all-gather of O(k x D), O(k x world) or a fixed-size histogram, never O(N).

* **Initial centres**: k-means++ seeding on a sample of about 4 k rows (at least 1024, all
  when fewer) that every process agrees on: the seen samples whose pseudo-random key (a hash
  of the dataset index and the seed) falls below a threshold, gathered (O(k x D)) and ordered
  by key, then seeded with the same generator on every process. The sample depends on the
  indices only, so it is the same whatever the number of processes. k-means++ over every
  row would take k passes over the data, each with a collective; random centres (no
  k-means++) too often merge two clusters and split another.
* **Lloyd iterations**: every process assigns its rows to the nearest centre (float64
  distances) and adds them per cluster in fixed point (int64 multiples of 2**-24, which
  float16 bank values are exactly): integer sums are exact and associative, so one
  all-reduce of (k x D + k + 2) int64 gives every process the same sums as one process
  would get, bit for bit, in any reduction order. An empty cluster keeps its centre. Stops
  when no assignment changed, or after ``kmeans_iters``. With ``kmeans_n_init`` restarts,
  the lowest inertia (also in fixed point) wins.
* **Acceptance ranks**: an exact global rank needs the whole confidence order, so the ranks
  come from an all-reduced histogram of ``rank_bins`` bins between the all-reduced lowest
  and highest confidence (per cluster with ``accept_scope="cluster"``). A sample's rank is
  the count in the bins above its own plus its place within its bin, interpolated linearly
  from its confidence (at least 1), over the count ranked. It stays monotone in the
  confidence (a more confident sample is never ranked after a less confident one) and
  differs from the exact rank by at most the count of its bin over the count ranked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .clustering import assign_to_centers
from .ifnd_config import IFNDConfig

FIXED_POINT = float(2**24)
"""Fixed-point scale of the per-cluster sums: float16 values are multiples of 2**-24."""
DISTANCE_ENTRIES = 1 << 22
"""(rows, k) distance entries computed at a time (32 MB in float64)."""
MIN_CLUSTER_BINS = 16
SAMPLE_PER_CLUSTER = 4
"""Rows per cluster in the sample k-means++ seeds from (at least ``MIN_SAMPLE``)."""
MIN_SAMPLE = 1024
_MASK32 = 0xFFFFFFFF
_NO_KEY = 1 << 40  # above every 32-bit key: padding of a process with fewer than k rows


@dataclass(frozen=True)
class Collectives:
    """All-reduce and all-gather over the processes, or nothing when the rows of this call
    are all there is (``distributed`` False)."""

    distributed: bool

    def _device(self, tensor: torch.Tensor) -> torch.device:
        if dist.get_backend() == "nccl":  # NCCL reduces accelerator tensors only
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if not self.distributed:
            return tensor
        moved = tensor.to(self._device(tensor)).contiguous()
        dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        moved = tensor.to(self._device(tensor)).contiguous()
        parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c mod 2**32`` for 32-bit ``h`` and ``c`` without int64 overflow."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sample_keys(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random 32-bit key (int64) per dataset index: the same on every process."""
    index = index.to(torch.long)
    high = _fmix32((index >> 32) ^ (int(seed) & _MASK32))
    return _fmix32(high ^ (index & _MASK32))


def _row_chunk(k: int) -> int:
    return max(64, min(4096, DISTANCE_ENTRIES // max(1, k)))


def seeding_sample(
    rows: torch.Tensor,
    index: torch.Tensor,
    members: torch.Tensor,
    k: int,
    seed: int,
    total: int,
    group: Collectives,
) -> torch.Tensor:
    """(m, D) float64 on the host, the same on every process: the members whose
    :func:`sample_keys` fall below a threshold that keeps about ``SAMPLE_PER_CLUSTER x k``
    (at least ``MIN_SAMPLE``, at least k) of the ``total`` members, ordered by (key, index).
    The set depends on the indices only, not on which process holds them."""
    mine = index[members]
    keys = sample_keys(mine, seed)
    wanted = min(total, max(SAMPLE_PER_CLUSTER * k, MIN_SAMPLE))
    limit = 1 << 32 if wanted >= total else math.ceil(2**32 * wanted / total)
    while True:  # a threshold that keeps at least k (random counts: raised when short)
        count = int(group.all_reduce(torch.tensor([int((keys < limit).sum())]))[0])
        if count >= min(k, total) or limit >= 1 << 32:
            break
        limit = min(1 << 32, 2 * limit)
    picked = (keys < limit).nonzero().squeeze(1)  # ascending by index
    most = int(group.all_reduce(torch.tensor([picked.numel()]), "max")[0])
    pad = most - picked.numel()
    ids = torch.stack([keys[picked], mine[picked]], 1).cpu()
    ids = torch.cat([ids, torch.tensor([[_NO_KEY, -1]], dtype=torch.long).expand(pad, 2)])
    chosen = rows[members[picked]]
    chosen = torch.cat([chosen, chosen.new_zeros(pad, rows.shape[1])])
    ids, chosen = group.all_gather(ids), group.all_gather(chosen).cpu()
    real = ids[:, 0] != _NO_KEY
    ids, chosen = ids[real], chosen[real]
    by_index = torch.sort(ids[:, 1], stable=True).indices
    order = by_index[torch.sort(ids[by_index, 0], stable=True).indices]
    return chosen[order].double()


def kmeans_plus_plus(sample: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(k, D) float64 centres by k-means++ seeding on the rows of ``sample`` (host, seeded:
    every process draws the same)."""
    gen = torch.Generator().manual_seed(int(seed))
    centers = sample.new_zeros(k, sample.shape[1])
    first = int(torch.randint(sample.shape[0], (1,), generator=gen))
    centers[0] = sample[first]
    d2 = ((sample - centers[0]) ** 2).sum(-1)
    for c in range(1, k):
        if bool(d2.sum() > 0):
            pick = int(torch.multinomial(d2, 1, generator=gen))
        else:  # every row sits on a centre (duplicates): any row
            pick = int(torch.randint(sample.shape[0], (1,), generator=gen))
        centers[c] = sample[pick]
        d2 = torch.minimum(d2, ((sample - centers[c]) ** 2).sum(-1))
    return centers


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each float64 row and the squared distance to it."""
    d2 = (x * x).sum(-1, keepdim=True) - 2.0 * x @ centers.t() + (centers * centers).sum(-1)
    d2 = d2.clamp(min=0)
    best = d2.min(-1)
    return best.indices, best.values


def lloyd(
    rows: torch.Tensor,
    members: torch.Tensor,
    centers: torch.Tensor,
    iterations: int,
    group: Collectives,
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations from ``centers``; returns the final centres and the inertia of the
    last assignment (fixed point, int)."""
    k, width = centers.shape
    previous = torch.full((members.numel(),), -1, dtype=torch.long, device=rows.device)
    chunk = _row_chunk(k)
    inertia = 0
    for _ in range(iterations):
        sums = torch.zeros(k * width + k + 2, dtype=torch.long, device=rows.device)
        cluster_sums, counts = sums[: k * width].view(k, width), sums[k * width : -2]
        for s in range(0, members.numel(), chunk):
            x = rows[members[s : s + chunk]].double()
            label, d2 = _nearest(x, centers)
            cluster_sums.index_add_(0, label, torch.round(x * FIXED_POINT).long())
            counts.index_add_(0, label, torch.ones_like(label))
            sums[-2] += torch.round(d2 * FIXED_POINT).long().sum()
            sums[-1] += (label != previous[s : s + chunk]).sum()
            previous[s : s + chunk] = label
        total = group.all_reduce(sums)
        inertia = int(total[-2])
        if int(total[-1]) == 0:  # the assignment repeated: the centres are a fixed point
            break
        counts = total[k * width : -2].view(k, 1)
        means = total[: k * width].view(k, width).double() / FIXED_POINT / counts.clamp(min=1)
        centers = torch.where(counts > 0, means, centers)
    return centers, inertia


def histogram_rank(
    conf: torch.Tensor, groups: torch.Tensor, num_groups: int, bins: int, group: Collectives
) -> torch.Tensor:
    """Acceptance rank in (0, 1] of each confidence within its group (most confident first)
    from an all-reduced histogram of ``bins`` bins per group (module docstring)."""
    c = conf.double()
    extremes = torch.full((2, num_groups), -math.inf, dtype=torch.float64, device=c.device)
    extremes[0].scatter_reduce_(0, groups, -c, "amax")  # minus the lowest
    extremes[1].scatter_reduce_(0, groups, c, "amax")
    extremes = group.all_reduce(extremes, "max")
    low, high = -extremes[0][groups], extremes[1][groups]
    width = high - low
    scaled = torch.where(width > 0, (high - c) / width * bins, 0.0)
    slot = scaled.floor().clamp(0, bins - 1).long()
    within = (scaled - slot).clamp(0, 1)  # 0: the top of the bin, 1: its bottom
    counts = torch.zeros(num_groups * bins, dtype=torch.long, device=c.device)
    counts.index_add_(0, groups * bins + slot, torch.ones_like(slot))
    counts = group.all_reduce(counts).view(num_groups, bins)
    above = counts.cumsum(1) - counts
    count = counts[groups, slot]
    place = torch.minimum(torch.ceil(within * count).long().clamp(min=1), count)
    position = above[groups, slot] + place
    return (position.double() / counts.sum(1)[groups].double()).float()


def cluster_rows(
    rows: torch.Tensor,
    index: torch.Tensor,
    seen: torch.Tensor,
    num_clusters: Sequence[int],
    seeds: Sequence[int],
    settings: IFNDConfig,
    group: Collectives,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """k-means of the seen ``rows`` (dataset ``index``, ascending) at every granularity;
    returns (G, n) labels (int64, -1 unseen), confidences (NaN unseen), acceptance ranks
    (inf unseen) for these rows, and the number of seen samples over every process."""
    g, n = len(num_clusters), rows.shape[0]
    labels = torch.full((g, n), -1, dtype=torch.long, device=rows.device)
    confidence = torch.full((g, n), math.nan, dtype=torch.float32, device=rows.device)
    rank = torch.full((g, n), math.inf, dtype=torch.float32, device=rows.device)
    members = seen.nonzero().squeeze(1)
    total = int(group.all_reduce(torch.tensor([members.numel()], dtype=torch.long))[0])
    if total < 2:
        return labels, confidence, rank, total
    for level, (k, seed) in enumerate(zip(num_clusters, seeds, strict=True)):
        k = min(k, total)
        best = None
        for restart in range(settings.kmeans_n_init):
            seed_r = seed + 104729 * restart
            sample = seeding_sample(rows, index, members, k, seed_r, total, group)
            start = kmeans_plus_plus(sample, k, seed_r).to(rows.device)
            centers, inertia = lloyd(rows, members, start, settings.kmeans_iters, group)
            if best is None or inertia < best[1]:
                best = (centers, inertia)
        lab, conf = _assign(rows, members, best[0], settings.confidence)
        per_cluster = settings.accept_scope == "cluster"
        bins = max(MIN_CLUSTER_BINS, settings.rank_bins // k) if per_cluster else settings.rank_bins
        grouped = lab if per_cluster else torch.zeros_like(lab)
        labels[level, members] = lab
        confidence[level, members] = conf
        rank[level, members] = histogram_rank(conf, grouped, k if per_cluster else 1, bins, group)
    return labels, confidence, rank, total


def _assign(
    rows: torch.Tensor, members: torch.Tensor, centers: torch.Tensor, confidence: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final labels and float32 confidences of the member rows (float64 distances)."""
    labels, conf = [], []
    chunk = _row_chunk(centers.shape[0])
    for s in range(0, members.numel(), chunk):
        x = rows[members[s : s + chunk]].double()
        lab, c = assign_to_centers(x, centers, confidence)
        labels.append(lab)
        conf.append(c.float())
    return torch.cat(labels), torch.cat(conf)
