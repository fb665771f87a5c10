"""The pieces of an IFND clustering round with scikit-learn (one process clusters every
row): k-means, assignment with a confidence, acceptance ranks, and sharing rank 0's result
with the other ranks. The torch round over rows split across processes:
``fnd.kmeans_torch``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ifnd_config import IFNDConfig

ASSIGN_CHUNK = 65536  # rows assigned at a time (bounds the (chunk, k) distance matrix)
logger = logging.getLogger(__name__)


def sklearn_round(
    bank: torch.Tensor,
    seen: torch.Tensor,
    num_clusters: Sequence[int],
    seeds: Sequence[int],
    config: IFNDConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """k-means of the seen rows of every sample's ``bank`` at every granularity (on the
    host): (G, N) labels (int32, -1 unseen), confidences (NaN unseen), exact acceptance
    ranks (inf unseen), and the number of seen samples."""
    g, n = len(num_clusters), bank.shape[0]
    labels = torch.full((g, n), -1, dtype=torch.int32)
    confidence = torch.full((g, n), float("nan"), dtype=torch.float32)
    rank = torch.full((g, n), math.inf, dtype=torch.float32)
    members = seen.nonzero().squeeze(1).cpu()
    if members.numel() < 2:
        return labels, confidence, rank, members.numel()
    x = bank.index_select(0, members.to(bank.device)).float().cpu()
    x = F.normalize(x, dim=-1)
    x_np = x.numpy()
    for level, (k, seed) in enumerate(zip(num_clusters, seeds, strict=True)):
        k_eff = min(k, members.numel())
        if k_eff < k:
            logger.warning(
                "ifnd: only %d samples seen, clustering with k=%d instead of %d",
                members.numel(),
                k_eff,
                k,
            )
        centers = kmeans_centers(x_np, k_eff, seed, config)
        lab, conf = assign_to_centers(x, torch.from_numpy(centers).float(), config.confidence)
        labels[level, members] = lab.to(torch.int32)
        confidence[level, members] = conf
        rank[level, members] = acceptance_rank(lab, conf, config.accept_scope)
    return labels, confidence, rank, members.numel()


def kmeans_centers(x: np.ndarray, k: int, seed: int, config: IFNDConfig) -> np.ndarray:
    """(k, D) centres of scikit-learn's (MiniBatch)KMeans on the rows of ``x``."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    minibatch = config.kmeans_algorithm == "minibatch" or (
        config.kmeans_algorithm == "auto" and x.shape[0] > config.minibatch_threshold
    )
    if minibatch:
        km = MiniBatchKMeans(
            n_clusters=k,
            max_iter=config.kmeans_iters,
            n_init=config.kmeans_n_init,
            batch_size=config.minibatch_size,
            random_state=seed,
            compute_labels=False,
        )
    else:
        km = KMeans(
            n_clusters=k,
            max_iter=config.kmeans_iters,
            n_init=config.kmeans_n_init,
            random_state=seed,
        )
    km.fit(x)
    return km.cluster_centers_


def assign_to_centers(
    x: torch.Tensor, centers: torch.Tensor, confidence: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre (Euclidean, as k-means) and the confidence of each row of ``x``."""
    labels, conf = [], []
    c_sq = (centers * centers).sum(-1)
    c_unit = F.normalize(centers, dim=-1)
    for s in range(0, x.shape[0], ASSIGN_CHUNK):
        chunk = x[s : s + ASSIGN_CHUNK]
        d2 = ((chunk * chunk).sum(-1, keepdim=True) - 2.0 * chunk @ centers.t() + c_sq).clamp(min=0)
        if confidence == "margin" and centers.shape[0] > 1:
            two = d2.topk(2, dim=-1, largest=False)
            lab = two.indices[:, 0]
            distance = two.values.sqrt()
            conf.append(distance[:, 1] - distance[:, 0])
        else:
            lab = d2.argmin(-1)
            if confidence == "margin":
                conf.append(torch.zeros(chunk.shape[0]))
            else:
                conf.append((F.normalize(chunk, dim=-1) * c_unit[lab]).sum(-1))
        labels.append(lab)
    return torch.cat(labels), torch.cat(conf)


def acceptance_rank(labels: torch.Tensor, conf: torch.Tensor, scope: str) -> torch.Tensor:
    """(position in the confidence order, most confident first, ties by row) / count, over all
    rows (``global``) or within each label (``cluster``): values in (0, 1]."""
    n = conf.shape[0]
    order_conf = np.lexsort((np.arange(n), -conf.numpy().astype(np.float64)))
    if scope == "global":
        rank = np.empty(n, dtype=np.float64)
        rank[order_conf] = (np.arange(n) + 1) / n
        return torch.from_numpy(rank).float()
    lab = labels.numpy()
    # Stable sort by label of the confidence order: within each label, most confident first.
    order = order_conf[np.argsort(lab[order_conf], kind="stable")]
    sorted_lab = lab[order]
    counts = np.bincount(lab)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(n) - starts[sorted_lab]
    rank = np.empty(n, dtype=np.float64)
    rank[order] = (position + 1) / counts[sorted_lab]
    return torch.from_numpy(rank).float()


def broadcast_from_first_rank(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, on the host (sent through the GPU under NCCL)."""
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    moved = tensor.to(device).contiguous()
    dist.broadcast(moved, src=0)
    return moved.cpu()
