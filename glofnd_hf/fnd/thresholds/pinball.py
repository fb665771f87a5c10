"""The pinball rule (the default): stochastic Newton steps on the pinball loss whose gains
decay with visits and restart on detected drift; the threshold averages the steps."""

from __future__ import annotations

import math

import torch

from ..interface import SIDES
from ..table import COUNT, FINITE, NON_NEGATIVE
from .batch import BatchTail
from .config import RULES, THRESHOLD_RANGE, ThresholdRule


class PinballRule(ThresholdRule):
    """Newton steps on the pinball loss with decaying gains, restarted by a drift test on
    the batches' tail estimates, which also carry the threshold along when it moves; the
    threshold averages the steps (Polyak-Ruppert)."""

    columns = ("lambda", "iterate", "unit", "centre", "scatter", "drift", "calm", "age", "visits")
    settings = (
        "tail_size",
        "gain_decay",
        "drift_level",
        "drift_rate",
        "restart_age",
        "common_test",
    )
    # Per side, for ``common_test: across``: the last batch's mean innovation in tail units,
    # the running null variance of it, the batches counted, the running mean of its z-scores.
    side_columns = ("common_last", "common_null", "common_batches", "common_z")
    side_fill = (0.0, 0.0, 0.0, 0.0)
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
        FINITE,  # calm: >= 0 a quiet run's expected count, < 0 a busy run's statistic
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
        batch = BatchTail.of(sim, negatives, lam, self.config)
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
        self, rows: torch.Tensor, stats: torch.Tensor, tests: torch.Tensor, sides: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(2,) the batch's common shift per side since its anchors' last visit, whether
        it was detected, and the new per-side values (``common_test: across``).

        Embeddings that move together (a model in training) shift every anchor's tail a
        little, which no single anchor's noisy estimate shows but the mean of the batch's
        innovations ``q_hat - centre`` does. Under no drift each innovation has mean zero
        (the centre is a weighted mean of the same anchor's earlier estimates), so a t-test
        of their mean across the batch's anchors needs no noise model. Its level rises with
        the anchors' mean count of ``tests`` (``_alarm_level``): on still data the skewed
        innovations (extrapolated tail estimates) made it fire several times as often as a
        t-test's level says, and each false alarm restarts every anchor of the batch.
        """
        centre, visits = rows[..., self.columns.index("centre")], rows[..., -1]
        q_hat = stats[..., 1].to(torch.float32)
        seen = ((visits > 0) & torch.isfinite(q_hat)).to(torch.float32)
        count = seen.sum(0)
        values = torch.nan_to_num(q_hat - centre) * seen
        mean = values.sum(0) / count.clamp(min=1.0)
        variance = (values.square().sum(0) - count * mean.square()) / (count - 1.0).clamp(min=1.0)
        t = mean * count.sqrt() / variance.clamp(min=1e-24).sqrt()
        mean_tests = (tests * seen).sum(0) / count.clamp(min=1.0)
        level = self._alarm_level(mean_tests)
        if self.config.common_test == "within":
            detected = (count >= 8) & (t.abs() > (2.0 * level).sqrt())
            return torch.where(detected, mean, 0.0), detected, sides
        unit = (rows[..., self.columns.index("unit")] * seen).sum(0) / count.clamp(min=1.0)
        unit = unit.clamp(min=1e-12)
        within = variance / count.clamp(min=1.0) / unit.square()
        detected, sides = _across_batches(
            mean / unit, within, count >= 8, sides, level, self.config.drift_rate
        )
        return torch.where(detected, mean, 0.0), detected, sides

    def _bounded(self, grad: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The pinball gradient with the exceedances cut at ``_exceedance_limit``: one
        batch far above the iterate (the model moved since the last visit) would step
        m / (alpha n) units, tens, to the clamp."""
        excess = _exceedance_limit(self.config.alpha, n) - self.config.alpha * n
        return torch.maximum(grad, -excess / n.clamp(min=1.0))

    def step(self, rows, stats, epoch):
        return self.update(rows, stats, epoch)[0]

    def update(self, rows, stats, epoch, sides=None):
        cfg = self.config
        if sides is None:
            sides = self.side_start(rows.device)
        lam, iterate, unit, centre, scatter, drift, calm, age, visits = rows.unbind(-1)
        grad, q_hat, batch_unit, noise, n, floor = stats.to(torch.float32).unbind(-1)
        bounded = self._bounded(grad, n)
        # More of the batch's negatives above the iterate than the limit: the floor applies.
        floor = torch.where(bounded > grad, floor, -math.inf)
        grad = bounded
        first = visits == 0
        innovation = q_hat - centre
        # Tests run since the last restart: the age after one, the visits before any (a
        # start's age is its estimate's worth in visits, not a count of tests).
        tests = torch.minimum(age, visits)
        level = self._alarm_level(tests)
        new_drift, alarm = self._drift_alarm(innovation, unit, scatter, drift, visits, level)
        common_shift, common, sides = self._common_shift(rows, stats, tests, sides)
        calm, run_alarm = self._run_test(calm, grad, n, level)
        restart = alarm | common | run_alarm
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
        new_it = self._pinball_step(iterate + shift, unit, grad, age, floor)
        new_unit = unit + (batch_unit - unit) / age
        new_lam = _rank_average(lam + shift, new_it, new_unit, age)
        if cfg.common_test == "across":
            # Between restarts, which here are rare on still tails, the threshold averages
            # the iterates; a restart says the past is stale, so the average starts over
            # (averaging shares, a threshold far below sheds only the weight of its excess
            # share per visit: it trailed a tail that rose all through training).
            new_lam = torch.where(restart, new_it, new_lam)
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
        # Anchors without a tail fit (fewer than two negatives: a batch of one or two
        # samples) keep their row: no step, no visit counted (docs/threshold-tracking.md).
        return torch.where(torch.isfinite(q_hat).unsqueeze(-1), new, rows), common_shift, sides

    def _drift_alarm(
        self,
        innovation: torch.Tensor,
        unit: torch.Tensor,
        scatter: torch.Tensor,
        drift: torch.Tensor,
        visits: torch.Tensor,
        level: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each anchor's drift test: the new running mean of its clipped z-scores, and
        whether it raises the alarm (which restarts the age and moves the centre at once).

        The batch's tail estimate is measured against the running mean of the earlier ones
        (the centre), in units of their own running scatter about it (measured, not the
        tail model's: lumpy tails make the estimates far noisier than the model says). Each
        z-score is clipped, so one outlier cannot raise the alarm: a running mean of z
        beyond drift_level times its spread under no drift needs several visits in a row
        that all lie far to one side; its level is ``_alarm_level``'s, as a z-score.
        """
        cfg = self.config
        spread = unit * scatter.sqrt()
        z = (innovation / spread.clamp(min=1e-12)).clamp(-3.0, 3.0)
        rate = cfg.drift_rate
        new_drift = drift + rate * (z - drift)
        # The scatter is measured, so the test waits for a few visits' worth of it.
        z_level = (2.0 * level).sqrt() * math.sqrt(rate / (2.0 - rate))
        alarm = (visits >= 5) & (new_drift.abs() > z_level)
        return new_drift, alarm

    def _run_test(
        self, calm: torch.Tensor, grad: torch.Tensor, n: torch.Tensor, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two runs that say a threshold stands on the wrong side of a quantile that
        moved, in one signed column: ``calm`` >= 0 counts a quiet run, < 0 holds minus a busy
        run's statistic; returns the new column and whether either raises the alarm (which
        restarts the age and the column).

        * **quiet** (too high): the number of exceedances expected over a run of visits
          without any negative above the iterate (alpha n per visit). A run that expected
          more than the level (``_alarm_level``: 8 by default; no exceedance has probability
          e^-8) raises the alarm.
        * **busy** (too low, a quantile that keeps rising): a Poisson CUSUM of each visit's
          exceedances ``m`` against ``alpha n``, the log-likelihood ratio of a rate
          ``BUSY_FACTOR`` (3) times alpha against alpha, ``S = max(0, S + m log 3 - 2 alpha
          n)``, beyond the same level. At the quantile its mean step is negative (-0.9
          alpha n); at three times alpha it climbs 1.3 alpha n a visit. The decaying gains
          alone trail a quantile that rises every epoch (the SigLIP demo filtered 3-9 x alpha
          late in training); a restart brings the gain back.

        Either way the step is then chosen from past visits only, so the mean step's zero
        does not move.
        """
        cfg = self.config
        expected = cfg.alpha * n
        above = ((cfg.alpha - grad) * n).clamp(min=0.0)  # exceedances over the iterate
        busy = (-calm).clamp(min=0.0) + above * math.log(BUSY_FACTOR)
        busy = (busy - (BUSY_FACTOR - 1.0) * expected).clamp(min=0.0)
        quiet = torch.where(grad < cfg.alpha, 0.0, calm.clamp(min=0.0) + expected)
        alarm = (busy > level) | (quiet > level)
        calm = torch.where(busy > 0.0, -busy, quiet)
        return torch.where(alarm, 0.0, calm), alarm

    def _alarm_level(self, tests: torch.Tensor) -> torch.Tensor:
        """The level, in log-odds, that every drift test of an anchor tested ``tests``
        times since its last restart must pass: ``drift_level^2 / 2`` (8 by default; a
        z-score test passes it at ``sqrt(2 level)``), plus ``SPENDING x log(tests /
        SPENDING_AGE)`` from the ``SPENDING_AGE``-th test on.

        A test with a fixed level raises false alarms at a fixed rate per visit (about 1e-4
        here), so on data that never moves an anchor restarts every so many thousand visits
        and its error stops shrinking at about the error of that age: a tracker, not a
        consistent estimator (the sd across anchors of lambda - q at visits 150-200 was
        0.8-1.1 x that at 40-60 in 11 of 24 test cells at alpha x B >= 0.5). With the level
        raised by 2 log(tests / 10), a false alarm at the t-th test has probability about
        p (10 / t)^2, whose sum over a life is finite: an anchor on still data restarts
        finitely often, and then its error shrinks as the gains say. The first 10 tests keep
        the fixed level: a young anchor's restart is cheap, and it helps a start far off the
        quantile (a lumpy tail) come down sooner. A real drift is still caught, later the
        longer the anchor was quiet: after 100 quiet tests a run test needs 12.6 expected
        exceedances, not 8.
        """
        spent = SPENDING * torch.log((tests / SPENDING_AGE).clamp(min=1.0))
        return 0.5 * self.config.drift_level**2 + spent

    def _pinball_step(
        self,
        start: torch.Tensor,
        unit: torch.Tensor,
        grad: torch.Tensor,
        age: torch.Tensor,
        floor: torch.Tensor,
    ) -> torch.Tensor:
        """The iterate after one Newton step on the pinball loss from ``start`` (the iterate
        carried along by any detected drift), lifted to the batch's ``floor``.

        The step is sized by the earlier visits' ``unit``: this batch's own unit grows with
        its top negatives, so it is larger exactly when the gradient points up, which would
        move the resting point. Where the batch counts more than the limit above the
        iterate (at the quantile, with probability under 1e-3), the visit lifts the iterate
        to leave no more than the limit of its negatives above it: an iterate stranded far
        below, with a tail unit too small to climb back in a few steps (embeddings that
        collapsed and spread again), returns at once, and the threshold follows at its
        averaging pace. (Lifting the threshold too biased it upwards on i.i.d. streams:
        late 0.94-0.97 x alpha at alpha x B = 5, spread ratio 0.95-1.2.)
        """
        gain = age.pow(-self.config.gain_decay)
        new_it = (start - gain * unit * (grad / self.config.alpha)).clamp(-1.0, 1.0)
        return torch.maximum(new_it, floor)


def _across_batches(
    mean: torch.Tensor,
    within: torch.Tensor,
    counted: torch.Tensor,
    sides: torch.Tensor,
    level: torch.Tensor,
    rate: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The common test against the spread of successive batches' means (``common_test:
    across``): whether each side's (2,) ``mean`` innovation (in tail units; ``within`` its
    variance as the batch's own spread says, ``counted`` whether enough anchors were
    seen) shows a shift, and the new (2, 4) ``sides``.

    A batch's anchors share their negatives, so its mean innovation carries the batch's
    make-up (a few samples similar to many anchors lift every tail), which the spread
    within the batch does not show: on a real model's tails held still it was 70-90 times
    what that spread says. Half the squared difference of successive batches' means
    estimates the variance that matters (a mean that moves slowly cancels), clipped at 9
    times the running value so that one jump does not blind the test. A shift is
    detected, after ``WARMUP_BATCHES``, where one batch's z-score passes the level
    (``sqrt(2 level)``: a sudden shift) or their running mean (rate ``drift_rate``, each
    clipped at 3) passes it as the per-anchor test's does (a shift that persists)."""
    last, null, batches, running = sides.unbind(-1)
    squared = 0.5 * (mean - last).square()
    squared = torch.where(null > 0, torch.minimum(squared, 9.0 * null), squared)
    weight = 1.0 / batches.clamp(min=1.0, max=NULL_WINDOW)
    null = torch.where(counted & (batches >= 1), null + weight * (squared - null), null)
    scale = torch.maximum(null, within).clamp(min=1e-24).sqrt()
    z = mean / scale
    running = torch.where(counted, running + rate * (z.clamp(-3.0, 3.0) - running), running)
    z_level = (2.0 * level).sqrt()
    ready = counted & (batches >= WARMUP_BATCHES)
    detected = ready & (
        (z.abs() > z_level) | (running.abs() > z_level * math.sqrt(rate / (2.0 - rate)))
    )
    batches = batches + counted.to(batches.dtype)
    last = torch.where(counted, mean, last)
    return detected, torch.stack([last, null, batches, running], dim=-1)


WARMUP_BATCHES = 10.0
"""Batches of a side counted before ``common_test: across`` tests (its null is measured)."""
NULL_WINDOW = 50.0
"""The most batches the running null variance of ``common_test: across`` averages."""


SPENDING = 2.0
"""How fast the drift tests' levels rise with the tests an anchor has run (``_alarm_level``)."""
SPENDING_AGE = 10.0
"""The number of tests from which the levels rise (``_alarm_level``)."""


BUSY_FACTOR = 3.0
"""The over-filtering (times alpha) the busy-run test is tuned to detect."""


def _rank_average(
    base: torch.Tensor, iterate: torch.Tensor, unit: torch.Tensor, age: torch.Tensor
) -> torch.Tensor:
    """The threshold ``base`` (carried along by any detected drift) averaged with the new
    ``iterate``: Polyak-Ruppert averaging weighted by ``age`` (the late iterates count
    more, so the start is forgotten sooner than by a plain mean), in rank units.

    It averages the iterates' shares above them, exp(-x / unit) in the local exponential
    tail, not the similarities. The iterates' mean share is alpha where the pinball
    gradient is zero on average; a plain mean of similarities filters less than that (the
    share is convex in the threshold).
    """
    weight = 2.0 / (age + 1.0)
    offset = (iterate - base) / unit.clamp(min=1e-6)
    return base - unit * torch.log1p(weight * torch.expm1(-offset.clamp(max=30.0)))


def _exceedance_limit(alpha: float, n: torch.Tensor) -> torch.Tensor:
    """Most exceedances a batch of ``n`` negatives counts for one anchor: a few standard
    deviations of the count at the quantile (Poisson, alpha n) above its mean, which a
    batch at the quantile exceeds with probability under 1e-3."""
    expected = alpha * n
    return expected + 3.0 * expected.sqrt() + 1.0


RULES["pinball"] = PinballRule
