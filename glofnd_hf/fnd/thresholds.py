"""GloFND's per-sample thresholds: the state, the update rules and their persistence.

For every sample and each anchor side (image anchors, text anchors) GloFND keeps a threshold
``lambda`` that should track the (1 - alpha) quantile of the anchor's similarity to the whole
data set. Each visit (about once per epoch) sees the anchor's similarities to one global batch
and takes a stochastic step on the pinball loss, whose gradient is

    g = alpha - mean_{j in negatives} 1[s_ij > lambda]

Three rules turn ``g`` into a step:

``pinball`` (default)
    Stochastic Newton steps on the pinball loss, ``x -= age^-gain_decay * unit * g / alpha``
    on an *iterate* ``x``, with ``unit / alpha`` the inverse density at the quantile of the
    tail fitted to earlier batches' top similarities (so the step is sized whatever the
    spread; it is taken from earlier visits only, so it does not depend on this batch's
    gradient). No caps, no pull towards another estimate: the mean step is zero exactly
    where the share of negatives above ``x`` is alpha, for any tail shape. The weight
    decays with the anchor's *age* (visits' worth of evidence), so where nothing moves the
    error shrinks with visits; the threshold that detects is a running mean of the iterates
    weighted by age and taken in rank units (of ``exp(-x / unit)``, the iterates' shares in
    the local tail), so it filters what the iterates filter on average. The first visit
    starts at the batch's tail estimate ``q_hat`` (see ``tail``) with an age equal to its
    worth in visits of pinball evidence. Drift restarts the age (to ``restart_age``):
    per anchor, a running mean of the clipped z-scores of ``q_hat`` against the running
    mean of the earlier ones (the *centre*), measured against their own scatter; per side, a
    t-test of the batch's mean innovation ``q_hat - centre`` across its anchors (embeddings
    that move together); and a run of visits without any negative above the iterate that
    had more than ``drift_level^2 / 2`` expected. Detected drift also carries the iterate,
    the threshold and the centre along by the centre's move; a common shift moves every
    other anchor too, by the share of an epoch that the batch is (the part of the shift,
    seen since the anchors' last visit, that accrued during this step), through a per-side
    offset that the state keeps and folds into the table when it is saved. A batch's
    exceedances count at most ``alpha n + 3 sqrt(alpha n) + 1`` (rarely reached at the
    quantile), so a batch far above the iterate cannot throw it to the clamp; such a batch
    lifts the iterate instead to leave no more than that many of its negatives above it.
``tail``
    A Robbins-Monro step ``lambda -= w_t * unit * g / alpha``, with
    ``w_t = max(1 / t, step_floor)`` for the anchor's t-th visit and ``unit / alpha`` the
    inverse density at the quantile of the tail fitted to the batch's top similarities (a
    running mean over visits), so that this is a Newton step whatever the spread of the
    similarities. The tail is a generalised Pareto one ending at 1 with the batch's mean
    excess ``beta`` (the *tail scale*): ``unit`` is ``beta`` for a tail far below 1 (an
    exponential one) and smaller near 1, where the same share of the negatives is packed
    into less similarity. The first visit starts at the batch's tail estimate of the
    quantile ``q_hat`` (exceedances over the batch's top-k, extrapolated to alpha). A step
    does not cross the batch's own evidence: going down, no further than its (k+1)-th
    largest negative; going up, no further than its top negative. With
    ``local_step``, where the similarities near the threshold are denser than that tail
    implies (a plateau of near-duplicates), the step shrinks to ``alpha / density``, the
    inverse of a running mean of the batches' local density around the threshold, and a
    step up passes no more than about ``step_floor`` of the batch's excess exceedances
    (``m - alpha n`` of the ``m`` above the threshold). The threshold is then
    held near a *centre*, a running mean of the visits' q_hat whose gain rises from about
    0.3 towards 1 when the estimates move by more than their own noise (a test kept per
    anchor): the offset ``x = lambda - centre`` is shrunk to ``x * c^2 / (x^2 + c^2)`` with
    ``c = band * beta``. Small offsets pass, so visits average; large ones (a threshold left
    behind when the embeddings moved faster than one visit per epoch can follow) are pulled
    back instead of leaving the threshold parked at a bound. These steps move an *iterate*;
    the threshold that detects is its running mean with gain ``averaging`` (Polyak
    averaging), whose lag behind the iterate is shrunk the same way, so it averages the
    iterate's noise but follows a quantile that moves by more than about a tail scale.
``adam`` / ``reference``
    Adam on ``g`` with learning rate ``lr`` (the reference implementation). ``reference``
    corrects Adam's bias with ``t = epoch + 1`` exactly as the reference code does; ``adam``
    with each sample's own step count. Adam's normalised step is about ``lr`` in similarity
    units whatever the spread of the similarities: where the band of similarities is
    narrower than ``lr`` or moves, the thresholds overshoot and park at the clamp.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .interface import SIDES
from .quantiles import masked_quantile, tail_from_top, tail_unit, tail_width, top_values
from .setting_types import setting
from .table import COUNT, FINITE, NON_NEGATIVE, PerSampleTable, ValueRange, check_state_tensor

LAMBDA = 0  # every rule keeps the threshold in column 0 and the visit count last
UpdateRule = Literal["pinball", "tail", "adam", "reference"]
UPDATE_RULES: tuple[str, ...] = ("pinball", "tail", "adam", "reference")
THRESHOLD_RANGE = ValueRange(-1.0, 1.0)  # thresholds are cosine similarities (clamped)
# The tail rule's density window around the threshold, +- this many tail scales: narrow
# enough to see a plateau of near-duplicates, wide enough to hold a few batch negatives.
DENSITY_WINDOW = 0.25


@dataclass
class GloFNDConfig:
    """Settings of the GloFND detector: the threshold update and its schedule."""

    alpha: float = setting(
        1e-3,
        "Fraction of the data set taken as false negatives of each "
        "anchor (shared by every detector).",
    )
    update_rule: UpdateRule = setting(
        "pinball",
        "How thresholds learn: pinball (Newton steps on the pinball loss whose weight "
        "decays with visits and restarts when the embeddings move: rests at the quantile for "
        "any tail shape), tail (constant-gain steps sized by each anchor's fitted tail, the "
        "previous default; filters about 2.5 x alpha at alpha x batch 0.1), adam (Adam, per-sample bias correction), reference (Adam "
        "exactly as the GloFND reference code, bias correction with t = epoch + 1).",
    )
    # -- the tail rule --------------------------------------------------------------------
    tail_size: int = setting(
        8,
        "pinball and tail rules: k, the batch's top-k negatives of each anchor "
        "estimate its tail (raised to 2 x alpha x batch when larger).",
    )
    band: float = setting(
        1.0,
        "tail rule: offsets from the batch's own quantile estimate "
        "beyond about band x tail scale are pulled back to it (smaller: "
        "follows drift faster; larger: averages more).",
    )
    step_floor: float = setting(
        0.5,
        "tail rule: smallest step weight; the 1/t decay stops here so thresholds follow drift. "
        "With local_step, a step up passes at most about this share of a batch's excess "
        "exceedances.",
    )
    local_step: bool = setting(
        False,
        "tail rule: size steps by the local density of similarities at the threshold where "
        "that is denser than the tail implies (a plateau of near-duplicates), and cap a step "
        "up at about step_floor of a batch's excess exceedances, instead of steps in the "
        "fitted tail's unit capped at the batch's top negative. Measured: no better than "
        "the default in the training study, worse in the demo (docs/threshold-tracking.md).",
    )
    averaging: float = setting(
        0.5,
        "tail rule: the threshold is a running mean, with this gain, of the Robbins-Monro "
        "iterate that takes the steps (Polyak averaging: smaller averages more visits and "
        "lags drift more; 1: the iterate itself).",
    )
    drift_rate: float = setting(
        0.3,
        "pinball and tail rules: rate of the running test that tells moving embeddings from batch noise "
        "(larger: reacts to drift sooner, averages less).",
    )
    # -- the pinball rule ----------------------------------------------------------------
    gain_decay: float = setting(
        0.7,
        "pinball rule: the step weight decays as 1 / age^gain_decay with the visits since the "
        "last detected drift (in (0.5, 1]; 1 is the classic 1/t, smaller forgets the start "
        "faster and is robust to a misjudged density; the threshold averages the steps).",
    )
    drift_level: float = setting(
        4.0,
        "pinball rule: how many standard deviations the running test of the batches' tail "
        "estimates against their mean must reach to count as drift, which restarts the "
        "step weight (smaller: follows moving embeddings sooner, restarts on noise more).",
    )
    restart_age: float = setting(
        2.0,
        "pinball rule: the age (visits' worth of evidence) kept when drift is detected.",
    )
    # -- the Adam rules -------------------------------------------------------------------
    lr: float = setting(0.05, "adam/reference rules: learning rate of the thresholds.")
    betas: tuple[float, float] = setting((0.9, 0.98), "adam/reference rules: Adam's betas.")
    eps: float = setting(1e-8, "adam/reference rules: Adam's epsilon.")
    clip_grad_mult: float | None = setting(
        None,
        "adam/reference rules: clip the threshold gradient to +-clip_grad_mult x alpha "
        "(None: no clipping).",
    )
    init_quantile: bool = setting(
        False,
        "adam/reference rules: on an anchor's first visit set its threshold to the "
        "in-batch (1 - alpha) quantile instead of taking a step (the tail rule always starts "
        "from the batch's estimate).",
    )
    # -- schedule -------------------------------------------------------------------------
    update_start_epoch: float = setting(0.0, "Epoch from which the thresholds learn.")
    mask_start_epoch: float = setting(
        0.0,
        "Epoch from which detected false negatives are acted on (shared by every "
        "detector; not before update_start_epoch).",
    )

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(
                f"update_rule must be one of {list(UPDATE_RULES)}, got {self.update_rule!r}"
            )
        if (
            isinstance(self.tail_size, bool)
            or int(self.tail_size) != self.tail_size
            or self.tail_size < 1
        ):
            raise ValueError(f"tail_size must be a positive integer, got {self.tail_size}")
        self.tail_size = int(self.tail_size)
        if not self.band > 0:
            raise ValueError(f"band must be positive, got {self.band}")
        if not 0.0 < self.step_floor <= 1.0:
            raise ValueError(f"step_floor must lie in (0, 1], got {self.step_floor}")
        if not 0.0 < self.averaging <= 1.0:
            raise ValueError(f"averaging must lie in (0, 1], got {self.averaging}")
        if not 0.0 < self.drift_rate <= 1.0:
            raise ValueError(f"drift_rate must lie in (0, 1], got {self.drift_rate}")
        if not 0.5 < self.gain_decay <= 1.0:
            raise ValueError(f"gain_decay must lie in (0.5, 1], got {self.gain_decay}")
        if not self.drift_level > 0:
            raise ValueError(f"drift_level must be positive, got {self.drift_level}")
        if not self.restart_age >= 1.0:
            raise ValueError(f"restart_age must be at least 1, got {self.restart_age}")
        if self.lr <= 0:
            raise ValueError(f"threshold lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.clip_grad_mult is not None and self.clip_grad_mult <= 0:
            raise ValueError(f"clip_grad_mult must be positive or None, got {self.clip_grad_mult}")
        if self.mask_start_epoch < self.update_start_epoch:
            raise ValueError(
                f"mask_start_epoch ({self.mask_start_epoch}) must not precede "
                f"update_start_epoch ({self.update_start_epoch})"
            )

    def rule(self) -> ThresholdRule:
        if self.update_rule == "pinball":
            return PinballRule(self)
        return TailRule(self) if self.update_rule == "tail" else AdamRule(self)


# ------------------------------------------------------------------------------------------
# Per-anchor statistics of one batch
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# Update rules
# ------------------------------------------------------------------------------------------
class ThresholdRule(ABC):
    """How one visit's batch statistics move an anchor's state row.

    ``statistics`` runs on each rank for its own anchors; the caller all-gathers the
    per-anchor values (O(global batch)) and every rank applies ``step`` to the same rows.
    """

    columns: ClassVar[tuple[str, ...]]
    settings: ClassVar[tuple[str, ...]]
    """The ``GloFNDConfig`` fields this rule reads (reported in the detector's config)."""
    point: ClassVar[int] = LAMBDA
    """The column at which a visit's statistics are taken (the threshold itself, or the
    iterate that a threshold averages)."""
    fill: ClassVar[tuple[float, ...]]
    valid: ClassVar[tuple[ValueRange, ...]]
    """Valid values of each column (checked when a stored state is loaded)."""
    num_statistics: ClassVar[int]
    frame: ClassVar[tuple[int, ...]] = ()
    """Columns in similarity units that move with the side's *common shift* (``update``):
    every anchor's, visited in this batch or not."""

    def __init__(self, config: GloFNDConfig) -> None:
        self.config = config

    @classmethod
    def bytes_per_sample(cls) -> int:
        """Per-sample state of both sides: one float32 per column."""
        return len(SIDES) * len(cls.columns) * 4

    def upgrade(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stored state of an earlier version of this rule, completed to today's columns
        (the state as it is when nothing is missing)."""
        return state

    @abstractmethod
    def statistics(
        self, sim: torch.Tensor, negatives: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """(2, b, num_statistics) float32 values of this visit for the (2, b) anchors."""

    @abstractmethod
    def step(self, rows: torch.Tensor, stats: torch.Tensor, epoch: float) -> torch.Tensor:
        """New (n, 2, len(columns)) rows from the old rows and (n, 2, num_statistics)
        statistics; a pure function of its inputs."""

    def update(
        self, rows: torch.Tensor, stats: torch.Tensor, epoch: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``step``'s new rows, and the (2,) shift of the ``frame`` columns of every other
        anchor that this batch shows (the embeddings moved together), or None."""
        return self.step(rows, stats, epoch), None


@dataclass
class _BatchTail:
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
    ) -> _BatchTail:
        count = negatives.sum(-1)  # (b,): every count below is taken once, here
        n = count.expand(lam.shape)
        # Non-negatives at -inf: they are never among the top nor above a threshold.
        filled = torch.where(negatives, sim, -math.inf)
        ordered = top_values(filled, tail_width(cfg.alpha, cfg.tail_size, sim.shape[-1]) + 1)
        above = _exceedances_from_top(filled, ordered, lam)
        grad = pinball_gradient(sim, negatives, lam, cfg.alpha, above, count)
        q_hat, beta, top, kth, k = tail_from_top(ordered, n, cfg.alpha)
        # Variance of q_hat = u + beta * L in units of beta^2 for an exponential tail fitted
        # to k exceedances: u and beta each carry about 1/k, and beta's is multiplied by L^2.
        extrapolation = ((q_hat - kth) / beta).clamp(min=0.0)
        noise = (1.0 + extrapolation * extrapolation) / k
        unit = tail_unit(q_hat, beta, kth)
        return cls(n, ordered, above, grad, q_hat, beta, top, kth, noise, unit)


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
        batch = _BatchTail.of(sim, negatives, lam, cfg)
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


class PinballRule(ThresholdRule):
    """Newton steps on the pinball loss with decaying gains, restarted by a drift test on
    the batches' tail estimates, which also carry the threshold along when it moves; the
    threshold averages the steps (Polyak-Ruppert)."""

    columns = ("lambda", "iterate", "unit", "centre", "scatter", "drift", "calm", "age", "visits")
    settings = ("tail_size", "gain_decay", "drift_level", "drift_rate", "restart_age")
    point = columns.index("iterate")
    frame = (columns.index("lambda"), columns.index("iterate"), columns.index("centre"))
    fill = (1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    valid = (
        THRESHOLD_RANGE,
        THRESHOLD_RANGE,
        NON_NEGATIVE,
        FINITE,
        NON_NEGATIVE,
        FINITE,
        NON_NEGATIVE,
        NON_NEGATIVE,
        COUNT,
    )
    # pinball gradient at the iterate, q_hat, step unit, q_hat's relative variance, number
    # of negatives, and the batch's floor (``_exceedance_limit``)
    num_statistics = 6

    def upgrade(self, state):
        # A state of the tail rule (the default before this one) continues under this rule:
        # threshold, iterate, step unit, centre and visits carry over; the estimates' scatter
        # starts at the tail model's (about 1 in squared units), with a few visits' age.
        if any(f"{side}.scatter" in state for side in SIDES) or not all(
            f"{side}.{column}" in state
            for side in SIDES
            for column in ("lambda", "iterate", "unit", "centre", "visits")
        ):
            return state
        new = {}
        for side in SIDES:
            visits = state[f"{side}.visits"]
            for column in ("lambda", "iterate", "unit", "centre", "visits"):
                new[f"{side}.{column}"] = state[f"{side}.{column}"]
            new[f"{side}.scatter"] = torch.where(visits > 0, 1.0, 0.0).to(visits.dtype)
            new[f"{side}.drift"] = torch.zeros_like(visits)
            new[f"{side}.calm"] = torch.zeros_like(visits)
            new[f"{side}.age"] = visits.clamp(max=4.0)
        return new

    def statistics(self, sim, negatives, lam):
        batch = _BatchTail.of(sim, negatives, lam, self.config)
        # The floor: the largest value with at most the limit of the batch's negatives above
        # it (its (limit + 1)-th largest; the smallest kept where the top holds fewer).
        limit = _exceedance_limit(self.config.alpha, batch.n.to(torch.float32))
        rank = limit.floor().long().clamp(max=batch.ordered.shape[-1] - 1)
        floor = batch.ordered.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
        floor = torch.nan_to_num(floor, nan=-math.inf)  # a NaN similarity lifts nothing
        return torch.stack(
            [batch.grad, batch.q_hat, batch.unit, batch.noise, batch.n.to(sim.dtype), floor],
            dim=-1,
        ).to(torch.float32)

    def _common_shift(
        self, rows: torch.Tensor, stats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(2,) the batch's common shift per side since its anchors' last visit, and whether
        it was detected.

        Embeddings that move together (a model in training) shift every anchor's tail a
        little, which no single anchor's noisy estimate shows but the mean of the batch's
        innovations ``q_hat - centre`` does. Under no drift each innovation has mean zero
        (the centre is a weighted mean of the same anchor's earlier estimates), so a t-test
        of their mean across the batch's anchors needs no noise model.
        """
        centre, visits = rows[..., self.columns.index("centre")], rows[..., -1]
        q_hat = stats[..., 1].to(torch.float32)
        seen = ((visits > 0) & torch.isfinite(q_hat)).to(torch.float32)
        count = seen.sum(0)
        values = torch.nan_to_num(q_hat - centre) * seen
        mean = values.sum(0) / count.clamp(min=1.0)
        variance = (values.square().sum(0) - count * mean.square()) / (count - 1.0).clamp(min=1.0)
        t = mean * count.sqrt() / variance.clamp(min=1e-24).sqrt()
        detected = (count >= 8) & (t.abs() > self.config.drift_level)
        return torch.where(detected, mean, 0.0), detected

    def _bounded(self, grad: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The pinball gradient with the exceedances cut at ``_exceedance_limit``: one
        batch far above the iterate (the model moved since the last visit) would step
        m / (alpha n) units, tens, to the clamp."""
        excess = _exceedance_limit(self.config.alpha, n) - self.config.alpha * n
        return torch.maximum(grad, -excess / n.clamp(min=1.0))

    def step(self, rows, stats, epoch):
        return self.update(rows, stats, epoch)[0]

    def update(self, rows, stats, epoch):
        cfg = self.config
        lam, iterate, unit, centre, scatter, drift, calm, age, visits = rows.unbind(-1)
        grad, q_hat, batch_unit, noise, n, floor = stats.to(torch.float32).unbind(-1)
        bounded = self._bounded(grad, n)
        # More of the batch's negatives above the iterate than the limit: the floor applies.
        floor = torch.where(bounded > grad, floor, -math.inf)
        grad = bounded
        first = visits == 0
        # Drift test: the batch's tail estimate against the running mean of the earlier
        # ones (the centre), in units of their own running scatter about it (measured, not
        # the tail model's: lumpy tails make the estimates far noisier than the model
        # says). Each z-score is clipped, so one outlier cannot raise the alarm: a running
        # mean of z beyond drift_level times its spread under no drift needs several
        # visits in a row that all lie far to one side, and restarts the age.
        innovation = q_hat - centre
        spread = unit * scatter.sqrt()
        z = (innovation / spread.clamp(min=1e-12)).clamp(-3.0, 3.0)
        rate = cfg.drift_rate
        new_drift = drift + rate * (z - drift)
        # The scatter is measured, so the test waits for a few visits' worth of it.
        alarm = (visits >= 5) & (new_drift.abs() > cfg.drift_level * math.sqrt(rate / (2.0 - rate)))
        common_shift, common = self._common_shift(rows, stats)
        # Too high a threshold shows as a run of visits without any negative above it:
        # `calm` is the number expected over the current run (alpha n per visit), and a run
        # that expected more than drift_level^2 / 2 of them (8 by default; no exceedance has
        # probability e^-calm) restarts the age. The step is then chosen from past visits only, so the
        # mean step's zero does not move.
        calm = torch.where(grad < cfg.alpha, 0.0, calm + cfg.alpha * n)
        quiet = calm > 0.5 * cfg.drift_level**2
        calm = torch.where(quiet, 0.0, calm)
        restart = alarm | common | quiet
        age = torch.where(restart, age.clamp(max=cfg.restart_age), age) + 1.0
        # While the tail moves, the centre follows it at once (and the test stays raised
        # until the estimates fall back about it); between, it averages them. A common
        # shift moves every centre by the batch's mean innovation. The scatter
        # (in squared units, so that it follows a tail that widens) learns from quiet
        # visits only.
        new_centre = torch.where(
            alarm, q_hat, centre + common_shift + (innovation - common_shift) / age
        )
        relative = (innovation / unit.clamp(min=1e-12)).square()
        new_scatter = torch.where(
            restart, scatter, scatter + (torch.minimum(relative, 9.0 * scatter) - scatter) / age
        )
        # Detected drift carries threshold and iterate along with the centre; between,
        # the centre's averaging is not passed on (it would add the estimates' noise, and
        # the tail model's bias, to a rule that rests at the pinball gradient's zero).
        shift = torch.where(restart, new_centre - centre, 0.0)
        # The step is sized by the earlier visits' unit: this batch's own unit grows with
        # its top negatives, so it is larger exactly when the gradient points up, which
        # would move the resting point.
        gain = age.pow(-cfg.gain_decay)
        new_it = (iterate + shift - gain * unit * (grad / cfg.alpha)).clamp(-1.0, 1.0)
        # Where the batch counts more than the limit above the iterate (at the quantile,
        # with probability under 1e-3), the visit lifts the iterate to leave no more than
        # the limit of its negatives above it: an iterate stranded far below, with a tail
        # unit too small to climb back in a few steps (embeddings that collapsed and
        # spread again), returns at once, and the threshold follows at its averaging
        # pace. (Lifting the threshold too biased it upwards on i.i.d. streams: late
        # 0.94-0.97 x alpha at alpha x B = 5, spread ratio 0.95-1.2.)
        new_it = torch.maximum(new_it, floor)
        new_unit = unit + (batch_unit - unit) / age
        # Polyak-Ruppert averaging weighted by age (the late iterates count more, so the
        # start is forgotten sooner than by a plain mean), in rank units: the mean of the
        # iterates' shares above them, exp(-x / unit) in the local exponential tail, not of
        # the similarities. The iterates' mean share is alpha where the pinball gradient is
        # zero on average; a plain mean of similarities filters less than that (the share
        # is convex in the threshold).
        base = lam + shift
        weight = 2.0 / (age + 1.0)
        offset = (new_it - base) / new_unit.clamp(min=1e-6)
        new_lam = base - new_unit * torch.log1p(weight * torch.expm1(-offset.clamp(max=30.0)))
        # First visit: everything starts at the batch's tail estimate, whose age is its
        # weight in visits of pinball evidence (the ratio of a visit's pinball variance,
        # about 1 / (alpha n) in squared tail units, to the estimate's).
        start_age = (1.0 / (cfg.alpha * n * noise).clamp(min=1e-6)).clamp(min=1.0, max=100.0)
        new = torch.stack(
            [
                torch.where(first, q_hat, new_lam).clamp(-1.0, 1.0),
                torch.where(first, q_hat, new_it).clamp(-1.0, 1.0),
                torch.where(first, batch_unit, new_unit),
                torch.where(first, q_hat, new_centre),
                torch.where(first, noise, new_scatter),
                torch.where(first, 0.0, new_drift),
                torch.where(first, 0.0, calm),
                torch.where(first, start_age, age),
                visits + 1.0,
            ],
            dim=-1,
        )
        return torch.where(torch.isfinite(q_hat).unsqueeze(-1), new, rows), common_shift


def _exceedance_limit(alpha: float, n: torch.Tensor) -> torch.Tensor:
    """Most exceedances a batch of ``n`` negatives counts for one anchor: a few standard
    deviations of the count at the quantile (Poisson, alpha n) above its mean, which a
    batch at the quantile exceeds with probability under 1e-3."""
    expected = alpha * n
    return expected + 3.0 * expected.sqrt() + 1.0


def _shrink(offset: torch.Tensor, width_sq: torch.Tensor) -> torch.Tensor:
    """``offset`` where it is small against ``width``, ``width^2 / offset`` where large."""
    return offset * width_sq / (offset * offset + width_sq)


def _exceedances_from_top(
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


class AdamRule(ThresholdRule):
    """Adam on the pinball gradient (the GloFND reference's rule)."""

    columns = ("lambda", "exp_avg", "exp_avg_sq", "visits")
    settings = ("lr", "betas", "eps", "clip_grad_mult", "init_quantile")
    fill = (1.0, 0.0, 0.0, 0.0)
    valid = (THRESHOLD_RANGE, FINITE, NON_NEGATIVE, COUNT)

    def __init__(self, config: GloFNDConfig) -> None:
        super().__init__(config)
        # The pinball gradient, and the in-batch quantile where a first visit starts there.
        self.num_statistics = 2 if config.init_quantile else 1

    def statistics(self, sim, negatives, lam):
        cfg = self.config
        values = [pinball_gradient(sim, negatives, lam, cfg.alpha)]
        if cfg.init_quantile:
            q = masked_quantile(sim, negatives, 1.0 - cfg.alpha)
            values.append(torch.where(torch.isnan(q), lam, q))
        return torch.stack(values, dim=-1).to(torch.float32)

    def step(self, rows, stats, epoch):
        quantile = stats[..., 1] if self.config.init_quantile else None
        return adam_step(rows, stats[..., 0], quantile, self.config, epoch)


def adam_step(
    rows: torch.Tensor,
    grad: torch.Tensor,
    quantile: torch.Tensor | None,
    config: GloFNDConfig,
    epoch: float,
) -> torch.Tensor:
    """New (n, 2, 4) Adam rows [lambda, m, v, visits] after one step on the (n, 2)
    gradients; ``quantile`` is used on a first visit when ``config.init_quantile`` is set."""
    lam, m, v, visits = rows.unbind(-1)
    beta1, beta2 = config.betas
    g = grad.to(torch.float32)
    if config.clip_grad_mult is not None:
        bound = config.clip_grad_mult * config.alpha
        g = g.clamp(-bound, bound)
    new_m = beta1 * m + (1 - beta1) * g
    new_v = beta2 * v + (1 - beta2) * g * g
    new_visits = visits + 1
    if config.update_rule == "reference":
        t_epoch = math.floor(epoch) + 1
        bc1 = torch.full_like(lam, 1 - beta1**t_epoch)
        bc2 = torch.full_like(lam, 1 - beta2**t_epoch)
    else:
        # Adam steps taken so far: visits, less the initialising visit when there is one.
        t = (new_visits - float(config.init_quantile)).clamp(min=1.0)
        bc1 = 1 - torch.pow(beta1, t)
        bc2 = 1 - torch.pow(beta2, t)
    step = config.lr * (new_m / bc1) / (torch.sqrt(new_v / bc2) + config.eps)
    new_lam = (lam - step).clamp(-1.0, 1.0)
    if config.init_quantile and quantile is not None:
        first = visits == 0
        new_lam = torch.where(first, quantile.to(torch.float32).clamp(-1.0, 1.0), new_lam)
        new_m = torch.where(first, m, new_m)
        new_v = torch.where(first, v, new_v)
    return torch.stack([new_lam, new_m, new_v, new_visits], dim=-1)


# ------------------------------------------------------------------------------------------
# The state
# ------------------------------------------------------------------------------------------
class ThresholdState:
    """Thresholds and the rule's per-sample quantities of both sides for ``num_samples``.

    Stored as one (N, 2, C) float32 table (side x the rule's columns) so that a step reads
    and writes every quantity of the touched anchors with a single gather and a single
    scatter: 72 bytes per sample with the pinball rule, 64 with tail, 32 with Adam. Host memory is fine for
    large N.
    """

    def __init__(
        self,
        num_samples: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        rule: ThresholdRule | None = None,
    ) -> None:
        self.rule = rule or GloFNDConfig().rule()
        self.columns = self.rule.columns
        self.table = PerSampleTable(
            num_samples,
            (len(SIDES), len(self.columns)),
            fill=list(self.rule.fill),
            device=device,
            pin_memory=pin_memory,
        )
        # The sides' accumulated common shift (the rule's ``frame`` columns of the table are
        # stored relative to it), so that a shift of every anchor's tail moves every
        # threshold in O(1), not only those of the batch that showed it. Folded into the
        # table whenever the state is read out whole (``state_dict``).
        self.frame = torch.zeros(len(SIDES))
        self._frame_columns = list(self.rule.frame)
        ranges = [self.rule.valid[c] for c in self._frame_columns]
        self._frame_range = (
            torch.tensor([r.low for r in ranges]),
            torch.tensor([r.high for r in ranges]),
        )

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def bytes_per_sample(self) -> int:
        return self.rule.bytes_per_sample()

    def to(self, device: torch.device | str) -> ThresholdState:
        self.table.to(device)
        return self

    def rows(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The (len(index), 2, C) state rows of ``index``, in similarity units."""
        return self._shifted(self.table.gather(index, device), 1.0)

    def lambdas(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Thresholds of ``index`` as a (len(index), 2) tensor [image side, text side]."""
        return self.rows(index, device)[..., LAMBDA]

    def _shifted(self, rows: torch.Tensor, sign: float) -> torch.Tensor:
        """``rows`` with the frame added to (sign 1) or taken from (-1) its frame columns."""
        if not self._frame_columns:
            return rows
        self.frame = self.frame.to(rows.device)
        shift = torch.zeros(rows.shape[-2:], dtype=rows.dtype, device=rows.device)
        shift[:, self._frame_columns] = sign * self.frame.to(rows.dtype).unsqueeze(-1)
        rows = rows + shift
        if sign > 0:  # a shifted threshold stays a similarity
            rows[..., self._frame_columns] = self._in_range(rows[..., self._frame_columns])
        return rows

    def _in_range(self, values: torch.Tensor) -> torch.Tensor:
        low, high = (bound.to(values.device, values.dtype) for bound in self._frame_range)
        return torch.maximum(torch.minimum(values, high), low)

    def _fold_frame(self) -> None:
        if self._frame_columns and bool(self.frame.ne(0).any()):
            data = self.table.data
            columns = data[..., self._frame_columns]
            shift = self.frame.to(data.device, data.dtype).unsqueeze(-1)
            data[..., self._frame_columns] = self._in_range(columns + shift)
        self.frame = torch.zeros_like(self.frame)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, one per side and quantity, storable with safetensors:
        the thresholds as they filter (the common shift is folded into the table first)."""
        self._fold_frame()
        return {
            f"{side}.{column}": self.table.data[:, s, c].contiguous().cpu()
            for s, side in enumerate(SIDES)
            for c, column in enumerate(self.columns)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict`, every entry checked first (nothing is changed when one
        is bad): shape (N,), dtype float32, values in the rule's column ranges."""
        state = self.rule.upgrade(state)
        expected = {f"{side}.{column}" for side in SIDES for column in self.columns}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise ValueError(
                f"threshold state keys do not match: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)} (the state holds "
                f"{', '.join(self.columns)} per side for update_rule "
                f"{self.rule.config.update_rule!r}: was it saved with another rule?)"
            )
        for side in SIDES:
            for column, valid in zip(self.columns, self.rule.valid, strict=True):
                check_state_tensor(
                    f"{side}.{column}", state[f"{side}.{column}"], (self.num_samples,), valid=valid
                )
        for s, side in enumerate(SIDES):
            for c, column in enumerate(self.columns):
                self.table.data[:, s, c].copy_(state[f"{side}.{column}"])
        self.frame = torch.zeros_like(self.frame)

    def apply_update(
        self,
        index: torch.Tensor,
        stats: torch.Tensor,
        epoch: float,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One threshold step for the anchors ``index``; returns their new (n, 2, C) rows.
        ``stats``: (n, 2, num_statistics), equal for repeated indices (``segment_mean``);
        ``rows``: their current rows when the caller has already read them."""
        if rows is None:
            rows = self.rows(index, stats.device)
        rows, shift = self.rule.update(rows, stats, epoch)
        if shift is not None:
            # The shift accrued since the batch's anchors' last visit, about an epoch ago;
            # every other anchor moves by the share of it that accrued during this step
            # (the share of an epoch that one batch is), so that anchors visited since are
            # not moved twice.
            share = min(1.0, index.numel() / self.num_samples)
            self.frame = self.frame.to(shift.device) + share * shift
        self.table.scatter(index, self._shifted(rows, -1.0))
        return rows
