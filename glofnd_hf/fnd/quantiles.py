"""Per-anchor quantiles of one batch's similarities (torch only)."""

from __future__ import annotations

import math

import torch


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q`` quantile of ``values[..., mask]`` with linear interpolation (as
    ``torch.quantile``), for rows with different numbers of valid entries. NaN where a row
    has none. ``values``: (..., b, B); ``mask``: broadcastable bool."""
    mask = mask.expand_as(values)
    width = values.shape[-1]
    count = mask.sum(-1)
    filled = values.masked_fill(~mask, float("-inf"))
    position = q * (count - 1).clamp(min=0)  # among the valid entries, ascending
    low, high = position.floor().long(), position.ceil().long()
    frac = (position - low).to(values.dtype)
    if q >= 0.5:
        # High quantiles (the detectors' case) need only the top of each row: topk, no sort.
        k = min(width, math.ceil((1.0 - q) * (width - 1)) + 2)
        top = filled.topk(k, dim=-1).values  # descending; valid entries first
        low, high = (count - 1 - low).clamp(0, k - 1), (count - 1 - high).clamp(0, k - 1)
        ordered = top
    else:
        ordered = filled.sort(dim=-1).values  # valid entries in the last `count` positions
        low, high = (
            (width - count + low).clamp(0, width - 1),
            (width - count + high).clamp(0, width - 1),
        )
    v_low = ordered.gather(-1, low.unsqueeze(-1)).squeeze(-1)
    v_high = ordered.gather(-1, high.unsqueeze(-1)).squeeze(-1)
    result = v_low + frac * (v_high - v_low)
    return torch.where(count > 0, result, torch.full_like(result, float("nan")))


def tail_estimate(
    sim: torch.Tensor,
    negatives: torch.Tensor,
    alpha: float,
    size: int,
    upper: float | None = 1.0,
    with_size: bool = False,
    with_top: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per anchor, the batch's estimate of the (1 - alpha) quantile and the tail scale,
    and the top negative and the (k+1)-th largest ``u`` that the estimate starts from.

    Peaks over threshold: with ``u`` the (k+1)-th largest of the anchor's n negatives and
    ``beta`` the mean excess of the top k over ``u``, an exponential tail above ``u`` puts the
    quantile at ``u + beta * log(k / (n * alpha))``. This works where the batch holds fewer
    than one expected false negative (alpha * B < 1, the paper's setting), where an in-batch
    quantile is just the batch maximum. Similarities are bounded (``upper``: 1 for cosine
    similarity), and near the bound an exponential tail would extrapolate past it: the tail
    is a generalised Pareto that ends at ``upper`` and has the observed mean excess, which
    is the exponential one when the top lies far below the bound (``upper=None``: always
    exponential). Returns (2, b) tensors (q_hat, beta, top, u), and the number k of
    exceedances used when ``with_size``; NaN for anchors with fewer than two negatives. With
    ``with_top`` also the (2, b, k_max + 1) largest negatives in descending order (``-inf``
    past a row's negatives), from the same ``topk``.
    """
    width = sim.shape[-1]
    n = negatives.sum(-1).expand(sim.shape[:-1])  # (2, b)
    k_max = max(1, min(width - 1, max(size, math.ceil(2 * alpha * width))))
    top = sim.masked_fill(~negatives, float("-inf")).topk(k_max + 1, dim=-1).values
    k = (n - 1).clamp(min=1, max=k_max)  # rows with fewer negatives use what they have
    u = top.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    head = torch.cumsum(top[..., :k_max].clamp(min=-2.0), dim=-1)  # -inf padding -> finite
    mean_top = head.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1) / k
    beta = (mean_top - u).clamp(min=1e-6)
    level = k.to(sim.dtype) / n.clamp(min=1).to(sim.dtype)
    log_ratio = torch.log((level / alpha).clamp(min=1.0))
    if upper is None:
        q_hat = u + beta * log_ratio
    else:
        # Generalised Pareto tail ending at ``upper`` with mean excess beta: shape
        # xi = -beta / (upper - u - beta) <= 0, quantile u + beta (1 - xi) (r^xi - 1) / xi.
        xi = -beta / (upper - u - beta).clamp(min=1e-6)
        x = xi * log_ratio
        expm1_over_x = torch.where(x.abs() < 1e-6, torch.ones_like(x), torch.expm1(x) / x)
        q_hat = u + beta * (1 - xi) * log_ratio * expm1_over_x
    valid = n >= 2
    nan = torch.full_like(q_hat, float("nan"))
    values = tuple(torch.where(valid, x, nan) for x in (q_hat, beta, top[..., 0], u))
    if with_size:
        values = (*values, k.to(sim.dtype))
    return (*values, top) if with_top else values
