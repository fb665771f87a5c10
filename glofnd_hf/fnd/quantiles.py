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


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x.topk(k, dim=-1).values``: the same values in the same order, cheaper on CPU where
    the rows are shorter than 64 k (the tail rule's top-(k+1) at batch 256).

    There CPU ``topk`` selects by ``nth_element``, whose branch mispredictions cost several
    times a pass over the row. Instead: split each row into about sqrt(k * width) groups
    (strided columns, so that one ``amax`` gives every group's maximum), take the k groups
    with the largest maxima and the k largest of their k * width / groups values. Exact:
    any k groups other than a group G hold k values at least as large as G's maximum, so
    a group outside the chosen ones holds nothing that the chosen ones' k largest lack.

    Rows narrower than k (a batch of one, whose only candidate is the anchor itself) are
    padded with ``-inf``, as the callers already fill the places of non-negatives.
    """
    width = x.shape[-1]
    if k > width:
        return torch.nn.functional.pad(x, (0, k - width), value=-math.inf).topk(k, dim=-1).values
    groups = 2 ** round(math.log2(math.sqrt(k * width)))
    per_group = -(-width // groups)
    if x.device.type != "cpu" or 64 * k <= width or groups < k or k * per_group >= width:
        return x.topk(k, dim=-1).values
    if per_group * groups != width:
        x = torch.nn.functional.pad(x, (0, per_group * groups - width), value=-math.inf)
    blocks = x.unflatten(-1, (per_group, groups))  # group j: x[j], x[j + groups], ...
    chosen = blocks.amax(-2).topk(k, dim=-1, sorted=False).indices
    index = chosen.unsqueeze(-2).expand(*chosen.shape[:-1], per_group, k)
    return blocks.gather(-1, index).flatten(-2).topk(k, dim=-1).values


def tail_width(alpha: float, size: int, width: int) -> int:
    """k_max: the most exceedances ``tail_estimate`` uses for rows of ``width`` candidates
    (at least 1: the top k_max + 1 of a one-candidate row are padded, see ``top_values``)."""
    return max(1, min(width - 1, max(size, math.ceil(2 * alpha * width))))


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
    past a row's negatives), from the same selection (``top_values``).
    """
    k_max = tail_width(alpha, size, sim.shape[-1])
    top = top_values(torch.where(negatives, sim, -math.inf), k_max + 1)
    n = negatives.sum(-1).expand(sim.shape[:-1])  # (2, b)
    values = tail_from_top(top, n, alpha, upper)
    if not with_size:
        values = values[:4]
    return (*values, top) if with_top else values


def tail_from_top(
    top: torch.Tensor, n: torch.Tensor, alpha: float, upper: float | None = 1.0
) -> tuple[torch.Tensor, ...]:
    """``tail_estimate``'s (q_hat, beta, top, u, k) from each row's (2, b, k_max + 1) largest
    negatives ``top`` and (2, b) number of negatives ``n`` (integer)."""
    k_max = top.shape[-1] - 1
    k = (n - 1).clamp(min=1, max=k_max)  # rows with fewer negatives use what they have
    u = top.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    head = torch.cumsum(top[..., :k_max].clamp(min=-2.0), dim=-1)  # -inf padding -> finite
    mean_top = head.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)
    k = k.to(top.dtype)  # as the division by the integer k would convert it
    mean_top /= k
    beta = (mean_top - u).clamp(min=1e-6)
    level = k / n.clamp(min=1).to(top.dtype)
    log_ratio = torch.log((level / alpha).clamp(min=1.0))
    if upper is None:
        q_hat = u + beta * log_ratio
    else:
        # Generalised Pareto tail ending at ``upper`` with mean excess beta: shape
        # xi = -beta / (upper - u - beta) <= 0, quantile u + beta (1 - xi) (r^xi - 1) / xi.
        xi = pareto_shape(beta, u, upper)
        x = xi * log_ratio
        expm1_over_x = torch.where(x.abs() < 1e-6, 1.0, torch.expm1(x) / x)
        q_hat = u + beta * (1 - xi) * log_ratio * expm1_over_x
    # One `where` over the four values, NaN for anchors with fewer than two negatives.
    values = torch.stack([q_hat, beta, top[..., 0], u], dim=-1)
    values = torch.where((n >= 2).unsqueeze(-1), values, math.nan)
    return (*values.unbind(-1), k)


def pareto_shape(beta: torch.Tensor, u: torch.Tensor, upper: float = 1.0) -> torch.Tensor:
    """Shape ``xi <= 0`` of the generalised Pareto tail above ``u`` that has mean excess
    ``beta`` and ends at ``upper`` (``tail_from_top``'s tail; scale ``beta (1 - xi)``)."""
    return -beta / (upper - u - beta).clamp(min=1e-6)


def tail_unit(
    q_hat: torch.Tensor, beta: torch.Tensor, u: torch.Tensor, upper: float = 1.0
) -> torch.Tensor:
    """alpha over the density of ``tail_from_top``'s tail at its quantile ``q_hat``: the
    unit of a Newton step on the pinball loss.

    ``beta (1 - xi) + xi (q_hat - u)``, which is ``-xi (upper - q_hat)``: ``beta`` far below
    the bound (the exponential tail), smaller near it, where the same share of the
    negatives is packed into less similarity.
    """
    xi = pareto_shape(beta, u, upper)
    return (beta * (1.0 - xi) + xi * (q_hat - u)).clamp(min=1e-6)
