"""What the update rules read from one batch: the pinball gradient, and the per-anchor tail
statistics of the pinball and tail rules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quantiles import tail_from_top, tail_unit, tail_width, top_values
from .config import GloFNDConfig


def pinball_gradient(
    sim: torch.Tensor,
    negatives: torch.Tensor,
    lam: torch.Tensor,
    alpha: float,
    above: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2, b) ``alpha - fraction of negatives above lambda``; 0 for anchors without
    negatives (they carry no information). ``sim``: (2, b, B); ``lam``: (2, b); ``above``
    and ``count``: the counts of negatives above ``lam`` and of all negatives
    (``negatives.sum(-1)``) when the caller has them."""
    if count is None:
        count = negatives.sum(-1)
    if above is None:
        above = exceedances(sim, negatives, lam)
    grad = alpha - above.to(sim.dtype) / count.clamp(min=1).to(sim.dtype)
    return torch.where(count > 0, grad, 0.0)


def exceedances(sim: torch.Tensor, negatives: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(2, b) number of each anchor's negatives above its threshold."""
    return ((sim > lam.unsqueeze(-1)) & negatives).sum(-1)


@dataclass
class BatchTail:
    """What the pinball and tail rules read from one batch, per (2, b) anchor: the pinball
    gradient at ``lam``, the batch's tail fit (``tail_from_top``) and the step unit."""

    n: torch.Tensor  # number of negatives (integer)
    ordered: torch.Tensor  # the k_max + 1 largest negatives, descending
    above: torch.Tensor  # negatives above lam
    grad: torch.Tensor
    q_hat: torch.Tensor
    beta: torch.Tensor
    top: torch.Tensor
    kth: torch.Tensor  # u, the (k+1)-th largest
    noise: torch.Tensor  # q_hat's variance in units of beta^2
    unit: torch.Tensor  # the fitted tail's alpha / density at q_hat

    @classmethod
    def of(
        cls, sim: torch.Tensor, negatives: torch.Tensor, lam: torch.Tensor, cfg: GloFNDConfig
    ) -> BatchTail:
        count = negatives.sum(-1)  # (b,): every count below is taken once, here
        n = count.expand(lam.shape)
        # Non-negatives at -inf: they are never among the top nor above a threshold.
        filled = torch.where(negatives, sim, -math.inf)
        ordered = top_values(filled, tail_width(cfg.alpha, cfg.tail_size, sim.shape[-1]) + 1)
        above = exceedances_from_top(filled, ordered, lam)
        grad = pinball_gradient(sim, negatives, lam, cfg.alpha, above, count)
        q_hat, beta, top, kth, k = tail_from_top(ordered, n, cfg.alpha)
        # Variance of q_hat = u + beta * L in units of beta^2 for an exponential tail fitted
        # to k exceedances: u and beta each carry about 1/k, and beta's is multiplied by L^2.
        extrapolation = ((q_hat - kth) / beta).clamp(min=0.0)
        noise = (1.0 + extrapolation * extrapolation) / k
        unit = tail_unit(q_hat, beta, kth)
        return cls(n, ordered, above, grad, q_hat, beta, top, kth, noise, unit)


def exceedances_from_top(
    filled: torch.Tensor, top: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """``exceedances`` from the similarities ``filled`` (-inf at non-negatives) and their
    top values ``top`` (descending, from ``top_values``).

    Wherever lambda is at or above the smallest of ``top``, every value above lambda is
    among them: count there (O(k) per anchor). Only anchors whose lambda lies below the
    batch's k + 1 largest (far under their quantile: k + 1 > 2 alpha B) need a pass over the
    row; on CPU just those rows are counted, elsewhere (no host round trip) all of them.
    """
    lam = lam.unsqueeze(-1)
    above = (top > lam).sum(-1)
    # Where the top ends above lambda (or in NaN, which topk ranks highest), values above
    # lambda may lie past it.
    within = top[..., -1:] <= lam
    if filled.device.type != "cpu":
        return torch.where(within.squeeze(-1), above, (filled > lam).sum(-1))
    if not bool(within.all()):
        beyond = ~within.squeeze(-1)
        above[beyond] = (filled[beyond] > lam[beyond]).sum(-1)
    return above
