"""The tail rule (the default before ``pinball``): Newton steps in units of each anchor's
fitted tail, kept near a running mean of the batches' own estimates."""

from __future__ import annotations

import math

import torch

from ..interface import SIDES
from ..table import COUNT, NON_NEGATIVE
from .batch import BatchTail
from .config import RULES, THRESHOLD_RANGE, ThresholdRule

# The tail rule's density window around the threshold, +- this many tail scales: narrow
# enough to see a plateau of near-duplicates, wide enough to hold a few batch negatives.
DENSITY_WINDOW = 0.25


class TailRule(ThresholdRule):
    """Newton steps in units of the fitted tail's inverse density at the quantile, kept
    near a running mean of the batches' own estimates that follows drift and averages
    noise; the threshold averages the stepping iterate."""

    columns = ("lambda", "iterate", "scale", "unit", "centre", "innovation", "density", "visits")
    settings = ("tail_size", "band", "step_floor", "drift_rate", "averaging", "local_step")
    point = columns.index("iterate")  # the iterate takes the steps; the threshold averages it
    fill = (1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    valid = (
        THRESHOLD_RANGE,
        THRESHOLD_RANGE,
        NON_NEGATIVE,
        NON_NEGATIVE,
        THRESHOLD_RANGE,
        NON_NEGATIVE,
        NON_NEGATIVE,
        COUNT,
    )
    # pinball gradient, q_hat, beta, step unit, highest step up, (k+1)-th largest, q_hat's
    # relative variance, local density at lambda
    num_statistics = 8

    def upgrade(self, state):
        # Checkpoints of 0.2.0.dev0 have lambda, scale and visits only: the centre starts at
        # the threshold, with no evidence of drift. Those without a density (before the
        # local step) start from the exponential tail's alpha / scale, as a first visit does.
        # Those without an iterate (before the averaged threshold) step from the threshold;
        # those without a step unit (before it was the fitted tail's) in tail scales.
        new = {}
        for side in SIDES:
            lam = state.get(f"{side}.lambda")
            if lam is not None and f"{side}.iterate" not in state:
                new[f"{side}.iterate"] = lam.clone()
            if lam is not None and f"{side}.centre" not in state:
                new[f"{side}.centre"] = lam.clone()
            if lam is not None and f"{side}.innovation" not in state:
                new[f"{side}.innovation"] = torch.ones_like(lam)
            scale = state.get(f"{side}.scale")
            if scale is not None and f"{side}.unit" not in state:
                new[f"{side}.unit"] = scale.clone()
            if scale is not None and f"{side}.density" not in state:
                positive = scale > 0
                new[f"{side}.density"] = torch.where(
                    positive, self.config.alpha / torch.where(positive, scale, 1.0), 0.0
                ).to(scale.dtype)
        return {**state, **new}

    def statistics(self, sim, negatives, lam):
        cfg = self.config
        batch = BatchTail.of(sim, negatives, lam, cfg)
        grad, q_hat, beta, kth, noise = batch.grad, batch.q_hat, batch.beta, batch.kth, batch.noise
        ordered, above, top = batch.ordered, batch.above, batch.top
        # The step unit: the fitted tail's alpha / density at q_hat. A step in units of
        # beta near the bound overshoots downwards more than a step up (capped at the
        # batch's top negative) can repair, and the threshold settles below the quantile.
        unit = batch.unit
        n = batch.n.to(sim.dtype)
        density = _local_density(ordered, lam, beta, n)
        # Highest step up: the batch's top negative, or with local_step the r-th largest
        # with r = (1 - w) m + w alpha n, so that a step of weight w = step_floor passes at
        # most about w of the batch's excess m - alpha n (r = 1 where m <= 1).
        # Near-duplicates above the threshold then stay detected in their own batch
        # instead of being stepped over all at once.
        up_cap = top
        if cfg.local_step:
            w = cfg.step_floor
            r = torch.ceil((1.0 - w) * above.to(sim.dtype) + w * cfg.alpha * n)
            r = torch.minimum(r.clamp(min=1.0), n.clamp(min=1.0)).clamp(max=ordered.shape[-1])
            up_cap = ordered.gather(-1, r.long().unsqueeze(-1) - 1).squeeze(-1)
            up_cap = torch.where(torch.isfinite(q_hat), up_cap, q_hat)
        return torch.stack([grad, q_hat, beta, unit, up_cap, kth, noise, density], dim=-1).to(
            torch.float32
        )

    def step(self, rows, stats, epoch):
        cfg = self.config
        lam, iterate, scale, unit, centre, innovation, density, visits = rows.unbind(-1)
        stats = stats.to(torch.float32)
        grad, q_hat, beta, batch_unit, up_cap, kth, noise, local_density = stats.unbind(-1)
        first = visits == 0
        visit = visits + 1.0
        weight = torch.clamp(1.0 / visit, min=cfg.step_floor)
        new_scale = torch.where(first, beta, scale + weight * (beta - scale))
        new_unit = torch.where(first, batch_unit, unit + weight * (batch_unit - unit))
        # The density's running mean starts at the fitted tail's alpha / unit (the first
        # visit's threshold, 1.0, says nothing about the density at the quantile).
        new_density = torch.where(
            first, cfg.alpha / batch_unit, density + weight * (local_density - density)
        )
        # Step unit: the inverse density at the threshold, alpha / density, where the
        # similarities there are denser than the fitted tail implies (a plateau), else the
        # tail's. A step sized by the tail there would jump across the plateau and let in
        # or drop many samples at once.
        step_unit = new_unit
        if cfg.local_step:
            step_unit = torch.minimum(new_unit, cfg.alpha / new_density.clamp(min=1e-30))
        # The centre: a running mean of the batch estimates q_hat whose gain 1 - 1/innovation
        # (at least 1/t) follows a test of drift against noise. `innovation` is an
        # exponential mean of the squared innovation (q_hat - centre) over q_hat's own
        # noise: near 1 while the embeddings stand still (the gain stays small, about 0.3 as
        # the test is itself noisy, so visits average), far above 1 after they moved (the
        # gain nears 1, the centre forgets).
        delta = q_hat - centre
        ratio = delta * delta / (noise * beta * beta).clamp(min=1e-12)
        new_innovation = innovation + cfg.drift_rate * (ratio - innovation)
        gain = torch.maximum(1.0 / visit, 1.0 - 1.0 / new_innovation.clamp(min=1.0))
        new_centre = torch.where(first, q_hat, centre + gain * delta)
        new_innovation = torch.where(first, torch.ones_like(innovation), new_innovation)
        new_it = iterate - weight * step_unit * (grad / cfg.alpha)
        # A step does not cross the batch's own evidence: down no further than the (k+1)-th
        # largest negative (where the batch already holds > 2 alpha of its negatives), up
        # no further than `up_cap` (past about w of the batch's excess exceedances). This
        # binds where a lumpy tail (near-duplicates) makes a full step jump past the
        # quantile, to the clamp or over every exceedance of the batch.
        new_it = torch.minimum(
            torch.maximum(new_it, torch.minimum(iterate, kth)), torch.maximum(iterate, up_cap)
        )
        # Pull towards the centre, the more the further off: offsets x well inside
        # band * scale pass almost unchanged, far ones (a stale iterate after the
        # embeddings moved) shrink like (band * scale)^2 / x.
        width_sq = (cfg.band * new_scale) ** 2
        new_it = new_centre + _shrink(new_it - new_centre, width_sq)
        new_it = torch.where(first, q_hat, new_it).clamp(-1.0, 1.0)
        # The threshold is a running mean of the iterate (Polyak averaging): with less than
        # one expected false negative per batch, the iterate's noise (steps of w tail
        # scales) exceeds the spread of the quantiles across anchors. A running mean lags a
        # moving quantile, so the threshold first moves with the batch's common drift (the
        # mean step of its iterates per side: noise averages out over the batch, a shift
        # of all similarities does not), and its remaining lag is shrunk like the offset
        # above, so that it follows a quantile that jumps by more than about the band.
        stepped = torch.isfinite(q_hat) & ~first
        moves = torch.where(stepped, new_it - iterate, torch.zeros_like(new_it))
        drift = moves.sum(0) / stepped.sum(0).clamp(min=1)  # (2,)
        lag = _shrink(lam + drift - new_it, width_sq)
        new_lam = torch.where(first, q_hat, new_it + (1.0 - cfg.averaging) * lag)
        new = torch.stack(
            [
                new_lam.clamp(-1.0, 1.0),
                new_it,
                new_scale,
                new_unit,
                new_centre.clamp(-1.0, 1.0),
                new_innovation,
                new_density,
                visit,
            ],
            dim=-1,
        )
        # Anchors without a tail estimate (fewer than two negatives) keep their row.
        return torch.where(torch.isfinite(q_hat).unsqueeze(-1), new, rows)


def _shrink(offset: torch.Tensor, width_sq: torch.Tensor) -> torch.Tensor:
    """``offset`` where it is small against ``width``, ``width^2 / offset`` where large."""
    return offset * width_sq / (offset * offset + width_sq)


def _local_density(
    ordered: torch.Tensor, lam: torch.Tensor, beta: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """(2, b) the batch's negatives within +-h = DENSITY_WINDOW * beta of lambda, per unit
    similarity and negative.

    For an exponential tail of scale beta the window holds alpha n 2 sinh(DENSITY_WINDOW) of
    them in expectation at the quantile, so the estimate is alpha / beta there: the step is
    then the tail scale's. Counted among the top k + 1 (``ordered``; O(k) per anchor, not
    O(B)): the window reaches below them only when lambda sits below the batch's k-th
    largest, far under the quantile, where a step as large as the tail scale is wanted.
    """
    h = (DENSITY_WINDOW * beta).clamp(min=1e-6)
    near = ((ordered - lam.unsqueeze(-1)).abs() <= h.unsqueeze(-1)).sum(-1)
    calibration = math.sinh(DENSITY_WINDOW) / DENSITY_WINDOW
    return near.to(ordered.dtype) / (n.clamp(min=1.0) * 2.0 * h * calibration)


RULES["tail"] = TailRule
