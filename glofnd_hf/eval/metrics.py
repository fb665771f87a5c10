"""Zero-shot retrieval and classification metrics (pure torch, no model code).

Definitions follow the usual CLIP benchmark conventions:

* Scores are dot products of L2-normalised embeddings, computed in float32
  (inputs are normalised here even if the caller already did it).
* Text-to-image retrieval: each caption is a query; it hits at ``k`` when its own
  image is among the top ``k`` images. Averaged over all captions.
* Image-to-text retrieval: each image is a query; it hits at ``k`` when ANY of its
  captions is among the top ``k`` captions. Averaged over all images.
* Zero-shot classification: each image is a query over the class embeddings; it
  hits at ``k`` when its label is among the top ``k`` classes.

Tie rule
--------
Candidates are ranked by descending score; candidates with exactly equal scores
are ordered by ascending candidate index, i.e. exactly the order a *stable*
descending sort produces. The 0-based rank of a positive candidate ``p`` for a
query is therefore::

    rank(p) = #{c : s[c] > s[p]} + #{c : s[c] == s[p] and c < p}

and the query hits at ``k`` iff ``rank < k``. When a query has several positives
(an image with several captions) its rank is that of its best-ranked positive.
This is the default rule, ``ties="lower-index"``: it does not depend on the device
or on the order in which a kernel visits candidates.

``ties="clip-benchmark"`` instead reproduces CLIP_benchmark's outcome: the top ``k``
candidates are whatever ``torch.topk`` selects among equal scores (an implementation
detail of its kernel, which differs between CPU and CUDA and need not prefer low
indices). As CLIP_benchmark does, scores are dot products of caption rows with images
(``texts @ images.T``, image queries read its transpose), ``torch.topk`` runs once per
``k`` on rows of that matrix, and classification logits are
``(100 * images) @ classes.T`` with one ``topk`` for the largest ``k``. Both rules
agree wherever no tie straddles the ``k``-th place; with duplicate captions (or
images) they can differ by a few queries in a thousand. Published CLIP_benchmark
numbers are matched by the second rule on the device they were computed on
(``topk_device``).

Memory
------
Queries are processed in chunks of ``chunk_size``; for each chunk only a
``chunk_size x num_candidates`` score block (plus boolean masks of the same
shape) is materialised, never the full query x candidate matrix. Ranks are
obtained by counting, not by sorting rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metric_names import (
    CLIP_BENCHMARK_NAMES,
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    MetricName,
    accuracy_metric_name,
    clip_benchmark_names,
    parse_metric_name,
    recall_metric_name,
)

__all__ = [
    "CLIP_BENCHMARK_NAMES",
    "DEFAULT_TIE_RULE",
    "IMAGE_TO_TEXT",
    "TEXT_TO_IMAGE",
    "TIE_RULES",
    "MetricName",
    "accuracy_metric_name",
    "average_template_embeddings",
    "check_tie_rule",
    "clip_benchmark_names",
    "format_metrics_table",
    "parse_metric_name",
    "recall_metric_name",
    "retrieval_recall",
    "zero_shot_classification",
]


#: How candidates with equal scores are ordered (see the module docstring).
TIE_RULES = ("lower-index", "clip-benchmark")
DEFAULT_TIE_RULE = "lower-index"


def check_tie_rule(ties: str) -> str:
    """``ties`` if it is one of :data:`TIE_RULES`, else ``ValueError``."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {list(TIE_RULES)}, got {ties!r}")
    return ties


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_embeddings(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero embedding dimension (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains non-finite values (NaN/Inf) in {bad} row(s)")


def _check_pair(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding dimension mismatch: {a_name} has D={a.shape[1]}, "
            f"{b_name} has D={b.shape[1]}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{a_name} is on {a.device} but {b_name} is on {b.device}; put both on one device"
        )


def _check_index(idx: Tensor, name: str, length: int, upper: int, upper_name: str) -> Tensor:
    if not isinstance(idx, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {idx.dtype}")
    if idx.shape[0] != length:
        raise ValueError(f"{name} has length {idx.shape[0]}, expected {length}")
    idx = idx.long()
    if length > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            bad = ((idx < 0) | (idx >= upper)).nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{name} values must lie in [0, {upper}) ({upper_name}); "
                f"found min={lo}, max={hi} (first offending positions: {bad})"
            )
    return idx


def _check_ks(ks: Sequence[int], name: str = "ks") -> list[int]:
    if isinstance(ks, int):
        ks = (ks,)
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must contain positive integers, got {k!r}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def _normalise(x: Tensor) -> Tensor:
    return F.normalize(x.to(torch.float32), dim=-1)


# --------------------------------------------------------------------------- #
# core: best-positive ranks by counting
# --------------------------------------------------------------------------- #
def _best_positive_ranks(
    queries: Tensor,
    candidates: Tensor,
    pos_query: Tensor,
    pos_cand: Tensor,
    chunk_size: int,
) -> Tensor:
    """0-based rank of each query's best-ranked positive candidate.

    ``(pos_query[j], pos_cand[j])`` lists the positive (query, candidate) pairs;
    every query must have at least one. ``queries``/``candidates`` are normalised
    float32 ``[Q, D]`` / ``[N, D]``. Returns a LongTensor ``[Q]`` on the same device.
    """
    num_q, num_c = queries.shape[0], candidates.shape[0]
    device = queries.device

    order = torch.argsort(pos_query, stable=True)
    pos_query = pos_query[order]
    pos_cand = pos_cand[order]
    counts = torch.bincount(pos_query, minlength=num_q)
    offsets = torch.zeros(num_q + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    offsets_host = offsets.tolist()

    cand_t = candidates.t()
    ranks = torch.empty(num_q, dtype=torch.long, device=device)

    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        n = stop - start
        scores = queries[start:stop] @ cand_t  # [n, N], the only large buffer

        a, b = offsets_host[start], offsets_host[stop]
        pq = pos_query[a:b] - start
        pc = pos_cand[a:b]
        ps = scores[pq, pc]

        # Best positive: highest score, then lowest candidate index (the tie rule).
        best = torch.full((n,), float("-inf"), dtype=scores.dtype, device=device)
        best = best.scatter_reduce(0, pq, ps, reduce="amax", include_self=True)
        is_best = ps == best[pq]
        best_idx = torch.full((n,), num_c, dtype=torch.long, device=device)
        best_idx = best_idx.scatter_reduce(
            0, pq, torch.where(is_best, pc, num_c), reduce="amin", include_self=True
        )

        # Best-positive score from the same score row, so exact ties are exact.
        best_score = scores.gather(1, best_idx[:, None])
        higher = torch.count_nonzero(scores > best_score, dim=1)
        # Ties are few: list them instead of building more [n, N] masks.
        tie_row, tie_col = torch.nonzero(scores == best_score, as_tuple=True)
        before = tie_col < best_idx[tie_row]
        tied_before = torch.bincount(tie_row[before], minlength=n)
        ranks[start:stop] = higher + tied_before
        del scores

    return ranks


def _recall_from_ranks(ranks: Tensor, k: int, num_candidates: int) -> float:
    k_eff = min(k, num_candidates)
    return float((ranks < k_eff).to(torch.float64).mean())


# --------------------------------------------------------------------------- #
# the clip-benchmark tie rule: whatever torch.topk selects
# --------------------------------------------------------------------------- #
def _topk_retrieval_hits(
    images: Tensor,
    texts: Tensor,
    t2i: Tensor,
    ks: list[int],
    chunk_size: int,
    topk_device: torch.device,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """Per-query hits (bool, on the CPU) at each ``k`` for image queries and caption
    queries, selected by ``torch.topk`` on rows of the caption-major score matrix
    ``texts @ images.T`` (its columns for image queries), ``chunk_size`` rows or columns
    at a time, one ``topk`` per ``k`` as CLIP_benchmark calls it."""
    num_images, num_texts = images.shape[0], texts.shape[0]
    t2i_hits = {k: torch.empty(num_texts, dtype=torch.bool) for k in ks}
    i2t_hits = {k: torch.empty(num_images, dtype=torch.bool) for k in ks}
    own_image = t2i.to(topk_device)
    for start in range(0, num_texts, chunk_size):
        stop = min(start + chunk_size, num_texts)
        rows = (texts[start:stop] @ images.t()).to(topk_device)  # [n, I]
        for k in ks:
            top = torch.topk(rows, min(k, num_images), dim=1).indices
            hit = (top == own_image[start:stop, None]).any(dim=1)
            t2i_hits[k][start:stop] = hit.cpu()
        del rows
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        # Columns start:stop of texts @ images.T, read as rows (image queries).
        rows = (texts @ images[start:stop].t()).to(topk_device).t()  # [n, T]
        query = torch.arange(start, stop, device=topk_device)
        for k in ks:
            top = torch.topk(rows, min(k, num_texts), dim=1).indices
            hit = (own_image[top] == query[:, None]).any(dim=1)
            i2t_hits[k][start:stop] = hit.cpu()
        del rows
    return i2t_hits, t2i_hits


def _mean(hits: Tensor) -> float:
    return float(hits.to(torch.float64).mean())


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def retrieval_recall(
    image_embeds: Tensor,
    text_embeds: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    ties: str = DEFAULT_TIE_RULE,
    topk_device: str | torch.device | None = None,
) -> dict[str, float]:
    """Image<->text retrieval recall@k (CLIP-benchmark definitions).

    Args:
        image_embeds: ``[I, D]`` image embeddings.
        text_embeds: ``[T, D]`` caption embeddings (same device as images).
        text_to_image: ``[T]`` integer index of each caption's image, in ``[0, I)``;
            every image needs at least one caption.
        ks: cut-offs; a ``k`` above the number of candidates is clamped to it.
        chunk_size: number of queries scored at once (bounds peak memory to
            ``chunk_size x num_candidates`` scores).
        ties: ``"lower-index"`` (equal scores: the lower candidate index ranks first)
            or ``"clip-benchmark"`` (``torch.topk``'s choice, as CLIP_benchmark); see
            the module docstring.
        topk_device: where ``torch.topk`` runs under ``"clip-benchmark"`` (its choice
            among ties depends on the device); default: the embeddings' device.

    Returns:
        ``{"image_to_text_recall@k": ..., "text_to_image_recall@k": ...}`` for each
        ``k`` (floats in ``[0, 1]``).

    Raises:
        ValueError: on bad shapes, non-finite values, out-of-range indices, or an
            image without captions.
    """
    _check_embeddings(image_embeds, "image_embeds")
    _check_embeddings(text_embeds, "text_embeds")
    _check_pair(image_embeds, "image_embeds", text_embeds, "text_embeds")
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    t2i = _check_index(text_to_image, "text_to_image", num_texts, num_images, "number of images")
    ks_list = _check_ks(ks)
    chunk_size = _check_chunk_size(chunk_size)
    check_tie_rule(ties)

    device = image_embeds.device
    t2i = t2i.to(device)
    counts = torch.bincount(t2i, minlength=num_images)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()
        shown = missing[:10].tolist()
        more = "" if missing.numel() <= 10 else f" (and {missing.numel() - 10} more)"
        raise ValueError(
            f"image(s) {shown}{more} have no caption in text_to_image; "
            "every image needs at least one caption"
        )

    images = _normalise(image_embeds)
    texts = _normalise(text_embeds)
    out: dict[str, float] = {}
    if ties == "clip-benchmark":
        where = torch.device(topk_device) if topk_device is not None else device
        i2t_hits, t2i_hits = _topk_retrieval_hits(images, texts, t2i, ks_list, chunk_size, where)
        for k in ks_list:
            out[recall_metric_name(IMAGE_TO_TEXT, k)] = _mean(i2t_hits[k])
        for k in ks_list:
            out[recall_metric_name(TEXT_TO_IMAGE, k)] = _mean(t2i_hits[k])
        return out
    text_ids = torch.arange(num_texts, device=device)

    # Image queries over texts: positives are all of the image's captions.
    i2t_ranks = _best_positive_ranks(images, texts, t2i, text_ids, chunk_size)
    # Text queries over images: the single positive is the caption's own image.
    t2i_ranks = _best_positive_ranks(texts, images, text_ids, t2i, chunk_size)

    for k in ks_list:
        out[recall_metric_name(IMAGE_TO_TEXT, k)] = _recall_from_ranks(i2t_ranks, k, num_texts)
    for k in ks_list:
        out[recall_metric_name(TEXT_TO_IMAGE, k)] = _recall_from_ranks(t2i_ranks, k, num_images)
    return out


def zero_shot_classification(
    image_embeds: Tensor,
    class_embeds: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
    ties: str = DEFAULT_TIE_RULE,
    topk_device: str | torch.device | None = None,
) -> dict[str, float]:
    """Zero-shot top-k accuracy of images against class (prompt) embeddings.

    Args:
        image_embeds: ``[I, D]`` image embeddings.
        class_embeds: ``[C, D]`` class embeddings (e.g. from
            :func:`average_template_embeddings`).
        labels: ``[I]`` integer class index per image, in ``[0, C)``.
        ks: cut-offs; a ``k`` above ``C`` is clamped to ``C``.
        chunk_size: number of images scored at once.
        ties, topk_device: the tie rule, as for :func:`retrieval_recall`.

    Returns:
        ``{"top{k}_accuracy": ...}`` for each ``k`` (floats in ``[0, 1]``).
    """
    _check_embeddings(image_embeds, "image_embeds")
    _check_embeddings(class_embeds, "class_embeds")
    _check_pair(image_embeds, "image_embeds", class_embeds, "class_embeds")
    num_images, num_classes = image_embeds.shape[0], class_embeds.shape[0]
    lab = _check_index(labels, "labels", num_images, num_classes, "number of classes")
    ks_list = _check_ks(ks)
    chunk_size = _check_chunk_size(chunk_size)
    check_tie_rule(ties)

    device = image_embeds.device
    lab = lab.to(device)
    images = _normalise(image_embeds)
    classes = _normalise(class_embeds)
    if ties == "clip-benchmark":
        # CLIP_benchmark: logits = 100 * image_features @ classifier, one topk for the
        # largest k, hits at k among its first k columns.
        where = torch.device(topk_device) if topk_device is not None else device
        k_max = min(max(ks_list), num_classes)
        hits = {k: torch.empty(num_images, dtype=torch.bool) for k in ks_list}
        for start in range(0, num_images, chunk_size):
            stop = min(start + chunk_size, num_images)
            logits = ((100.0 * images[start:stop]) @ classes.t()).to(where)
            top = torch.topk(logits, k_max, dim=1).indices
            correct = top == lab[start:stop, None].to(where)
            for k in ks_list:
                hits[k][start:stop] = correct[:, : min(k, num_classes)].any(dim=1).cpu()
        return {accuracy_metric_name(k): _mean(hits[k]) for k in ks_list}
    ranks = _best_positive_ranks(
        images, classes, torch.arange(num_images, device=device), lab, chunk_size
    )
    return {accuracy_metric_name(k): _recall_from_ranks(ranks, k, num_classes) for k in ks_list}


def average_template_embeddings(text_embeds: Tensor, num_templates: int | None = None) -> Tensor:
    """CLIP prompt ensembling: normalise each prompt, average per class, renormalise.

    Args:
        text_embeds: either ``[C, P, D]`` (class, template, dim) or ``[C*P, D]``
            laid out class-major (the ``P`` prompts of class 0 first, then class 1, ...).
        num_templates: ``P``; required for the 2-D layout, checked against the
            3-D one if given.

    Returns:
        ``[C, D]`` unit-norm class embeddings, in the input dtype (computed in at
        least float32).
    """
    if not isinstance(text_embeds, Tensor):
        raise ValueError(f"text_embeds must be a torch.Tensor, got {type(text_embeds).__name__}")
    if not text_embeds.is_floating_point():
        raise ValueError(f"text_embeds must be floating-point, got dtype {text_embeds.dtype}")
    if num_templates is not None and (
        isinstance(num_templates, bool) or not isinstance(num_templates, int) or num_templates < 1
    ):
        raise ValueError(f"num_templates must be a positive integer, got {num_templates!r}")

    if text_embeds.dim() == 3:
        x = text_embeds
        if num_templates is not None and x.shape[1] != num_templates:
            raise ValueError(
                f"text_embeds has {x.shape[1]} templates per class but num_templates={num_templates}"
            )
    elif text_embeds.dim() == 2:
        if num_templates is None:
            raise ValueError(
                "2-D text_embeds [C*P, D] needs num_templates=P (or pass a [C, P, D] tensor)"
            )
        rows = text_embeds.shape[0]
        if rows % num_templates != 0:
            raise ValueError(
                f"text_embeds has {rows} rows, not a multiple of num_templates={num_templates}"
            )
        x = text_embeds.reshape(rows // num_templates, num_templates, text_embeds.shape[1])
    else:
        raise ValueError(
            f"text_embeds must be [C, P, D] or [C*P, D], got shape {tuple(text_embeds.shape)}"
        )
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"text_embeds has an empty dimension (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("text_embeds contains non-finite values (NaN/Inf)")

    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = F.normalize(x.to(work), dim=-1)
    mean = F.normalize(x.mean(dim=1), dim=-1)
    return mean.to(text_embeds.dtype)


def format_metrics_table(metrics: dict[str, float]) -> str:
    """Render metrics as an aligned two-column terminal table (values in %, 2 decimals)."""
    header_name, header_value = "Metric", "Value"
    rows = [(str(name), f"{100.0 * float(value):.2f}%") for name, value in metrics.items()]
    name_w = max([len(header_name)] + [len(n) for n, _ in rows])
    value_w = max([len(header_value)] + [len(v) for _, v in rows])
    lines = [
        f"{header_name:<{name_w}}  {header_value:>{value_w}}",
        f"{'-' * name_w}  {'-' * value_w}",
    ]
    lines += [f"{n:<{name_w}}  {v:>{value_w}}" for n, v in rows]
    return "\n".join(lines)
