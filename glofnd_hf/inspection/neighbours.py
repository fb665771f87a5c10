"""Which samples an anchor's threshold marks as false negatives, against the whole data set.

The rule is the detectors' (``glofnd_hf.fnd.detectors``), applied to every sample of the data
set instead of one batch:

* image side: anchor image ``u_i`` against the texts ``v_j`` of the other samples,
  ``s_ij = <u_i, v_j>``; text side: anchor text ``v_i`` against the images ``u_j``;
* a candidate whose dataset index equals the anchor's (its own pair) is not a negative;
* a negative is a detected false negative when ``s_ij > lambda_i`` (strictly), compared in
  float32.

Embeddings are rows of the data set; ``index`` gives each row's dataset index (the key of
the per-sample state). Everything here is torch only and works on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fnd.interface import SIDES
from ..fnd.quantiles import masked_quantile

__all__ = ["AnchorScan", "SideNeighbours", "anchor_neighbours", "scan_anchors", "similarities"]


def similarities(
    image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor, side: int
) -> torch.Tensor:
    """(len(rows), R) float32 similarities of the anchors at ``rows`` to every row: image
    anchors against all texts (side 0), text anchors against all images (side 1)."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    anchors, candidates = (image, text) if side == 0 else (text, image)
    return anchors[rows] @ candidates.t()


def negatives_of(index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(len(rows), R) bool: candidates whose dataset index differs from the anchor's."""
    return index.unsqueeze(0) != index[rows].unsqueeze(1)


@dataclass
class SideNeighbours:
    """One anchor, one side: its threshold and the candidates around it."""

    threshold: float
    positive_similarity: float
    """Similarity to its own pair (for reference; never a negative)."""
    num_negatives: int
    num_detected: int
    detected: list[tuple[int, float]]
    """(row, similarity) of detected false negatives, most similar first (capped)."""
    below: list[tuple[int, float]]
    """(row, similarity) of the most similar negatives at or below the threshold."""


def anchor_neighbours(
    image: torch.Tensor,
    text: torch.Tensor,
    index: torch.Tensor,
    row: int,
    thresholds: torch.Tensor,
    max_detected: int,
    num_below: int,
) -> list[SideNeighbours]:
    """Both sides of the anchor at ``row``; ``thresholds``: its (2,) [image, text] values."""
    rows = torch.tensor([row], device=image.device)
    negatives = negatives_of(index, rows)[0]
    out = []
    for side in range(len(SIDES)):
        sim = similarities(image, text, rows, side)[0]
        lam = float(thresholds[side])
        detected = (sim > torch.tensor(lam, dtype=sim.dtype)) & negatives
        out.append(
            SideNeighbours(
                threshold=lam,
                positive_similarity=float(sim[row]),
                num_negatives=int(negatives.sum()),
                num_detected=int(detected.sum()),
                detected=_most_similar(sim, detected, max_detected),
                below=_most_similar(sim, negatives & ~detected, num_below),
            )
        )
    return out


def _most_similar(sim: torch.Tensor, keep: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most similar kept rows, ties to the lower row (a stable descending sort)."""
    candidates = keep.nonzero().squeeze(-1)
    order = torch.sort(sim[candidates], descending=True, stable=True).indices[:k]
    chosen = candidates[order]
    return [(int(r), float(sim[r])) for r in chosen]


@dataclass
class AnchorScan:
    """Per anchor and side ((2, A) tensors), over the whole data set as candidates."""

    rows: torch.Tensor
    """(A,) the scanned anchors' rows."""
    threshold: torch.Tensor
    exact_quantile: torch.Tensor
    """The anchor's exact (1 - alpha) quantile over its negatives in the data set."""
    num_negatives: torch.Tensor
    num_detected: torch.Tensor
    num_same_label: torch.Tensor | None = None
    """Negatives sharing the anchor's label (the true false negatives)."""
    detected_same_label: torch.Tensor | None = None
    exact_detected: torch.Tensor | None = None
    """Negatives above the exact quantile (the rule GloFND's thresholds approximate)."""
    exact_detected_same_label: torch.Tensor | None = None


@torch.no_grad()
def scan_anchors(
    image: torch.Tensor,
    text: torch.Tensor,
    index: torch.Tensor,
    rows: torch.Tensor,
    alpha: float,
    thresholds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> AnchorScan:
    """Counts for the anchors at ``rows`` against every row, ``chunk_size`` anchors at a time
    (memory: a few chunk_size x R tensors; default: about 2^25 similarities per chunk, at most
    512 anchors). ``thresholds``: (R, 2) per row, or None to use each anchor's exact
    (1 - alpha) quantile (the in-batch quantile rule applied to the whole data set)."""
    if chunk_size is None:
        chunk_size = max(1, min(512, 2**25 // max(1, len(index))))
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start : start + chunk_size]
        negatives = negatives_of(index, chunk)
        same = None
        if labels is not None:
            same = (labels.unsqueeze(0) == labels[chunk].unsqueeze(1)) & negatives
        for side in range(len(SIDES)):
            sim = similarities(image, text, chunk, side)
            quantile = masked_quantile(sim, negatives, 1.0 - alpha)
            lam = quantile if thresholds is None else thresholds[chunk, side].float()
            detected = (sim > lam.unsqueeze(-1)) & negatives
            exact = (sim > quantile.unsqueeze(-1)) & negatives
            values = {
                "threshold": lam,
                "exact_quantile": quantile,
                "num_negatives": negatives.sum(-1),
                "num_detected": detected.sum(-1),
                "exact_detected": exact.sum(-1),
            }
            if same is not None:
                values["num_same_label"] = same.sum(-1)
                values["detected_same_label"] = (detected & same).sum(-1)
                values["exact_detected_same_label"] = (exact & same).sum(-1)
            for key, value in values.items():
                parts.setdefault(f"{key}/{side}", []).append(value.cpu())
    joined = {
        key: torch.stack([torch.cat(parts[f"{key}/{s}"]) for s in range(len(SIDES))])
        for key in {k.split("/")[0] for k in parts}
    }
    return AnchorScan(rows=rows.cpu(), **joined)
