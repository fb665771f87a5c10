"""Is a detector's threshold tracking its target? Per-epoch health, global over ranks.

Two numbers per anchor side and epoch tell whether learned thresholds follow the (1 - alpha)
quantile they are meant to learn: the filtered fraction of the negatives over alpha, read
with the thresholds as they were before the step (what they filter on data they have not
yet stepped on: a threshold stepped on the batch it is then read on looks better than it
is), 1 when they track, far below when they sit above the quantile, far above when below;
and the share of visited thresholds at the clamp [-1, 1] (thresholds parked there learn
nothing).
Counts accumulate on the device (no host sync per step); an epoch is closed with one
all-reduce, when the next epoch starts or when the caller says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from . import comm
from .interface import SIDES

logger = logging.getLogger(__name__)

# Counter layout: filtered, negatives, visited, at a bound (2 sides each).
FILTERED, NEGATIVES, VISITED, AT_BOUND = slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)
RATIO_RANGE = (0.5, 2.0)
MAX_AT_BOUND = 0.2
CHANCE = 0.01
"""A filtered share outside ``RATIO_RANGE`` warns only where a count at the range's edge
would fall this far out with probability under this (Poisson): an epoch of a small data
set at a small alpha expects a handful of exceedances, and 0 or 2 x of a handful is chance."""


class TrackingHealth:
    """Accumulates one epoch of tracking statistics and warns, at most once per epoch, when
    an epoch starting at or after ``first_checked_epoch`` (the warm-up is over) filters
    outside ``RATIO_RANGE`` x alpha or has more than ``MAX_AT_BOUND`` of its visited
    thresholds at a bound.

    ``advice(kind)`` names the likely cause and the setting to change for ``kind`` in
    ("low", "high", "bound"); it belongs to the detector, which knows its rule.
    """

    def __init__(
        self,
        alpha: float,
        first_checked_epoch: float,
        advice: Callable[[str], str],
    ) -> None:
        self.alpha = alpha
        self.first_checked_epoch = first_checked_epoch
        self.advice = advice
        self.epoch: int | None = None
        self.counts: torch.Tensor | None = None

    def record(
        self,
        epoch: float,
        filtered: torch.Tensor | None,
        negatives: torch.Tensor | None,
        thresholds: torch.Tensor | None,
        stepped: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Add one step: ``filtered`` (2,) the numbers of negatives of each side above the
        thresholds as they were before the step, of ``negatives`` (2,) negatives (None when
        not counted), ``thresholds`` (2, b) just updated (None when not updating), and
        ``stepped`` (2, b) those of them that the step moved (None: all). A threshold the
        rule left alone (a row without negatives to step on) is no visit: it is not counted
        at the bound, where an unvisited threshold starts.
        Returns the summary of the previous epoch when this step starts a new one."""
        summary = {}
        current = math.floor(epoch)
        if self.epoch is not None and current != self.epoch:
            summary = self.finish_epoch()
        self.epoch = current
        if thresholds is None:  # nothing updated, nothing to count (the same on every rank)
            return summary
        counts = torch.zeros(8, device=thresholds.device)
        if filtered is not None and negatives is not None:
            counts[FILTERED] = filtered.float()
            counts[NEGATIVES] = negatives.float()
        at_bound = thresholds.abs() >= 1.0
        if stepped is None:
            counts[VISITED] = float(thresholds.shape[-1])
        else:
            counts[VISITED] = stepped.sum(-1).float()
            at_bound = at_bound & stepped
        counts[AT_BOUND] = at_bound.sum(-1).float()
        self.counts = counts if self.counts is None else self.counts + counts
        return summary

    def finish_epoch(self) -> dict[str, float]:
        """Close the epoch being recorded: its statistics (global over ranks; empty when
        nothing was recorded), and a warning when they are out of range."""
        if self.counts is None or self.epoch is None:
            return {}
        counts = comm.all_reduce_sum(self.counts).tolist()
        epoch, self.counts = self.epoch, None
        summary: dict[str, float] = {}
        for s, side in enumerate(SIDES):
            if counts[NEGATIVES.start + s] > 0:
                ratio = counts[FILTERED.start + s] / counts[NEGATIVES.start + s] / self.alpha
                summary[f"tracking_filtered_over_alpha_{side}"] = ratio
            if counts[VISITED.start + s] > 0:
                share = counts[AT_BOUND.start + s] / counts[VISITED.start + s]
                summary[f"tracking_at_bound_{side}"] = share
        if summary and epoch >= self.first_checked_epoch:
            self._warn(epoch, summary, counts)
        return summary

    def _warn(self, epoch: int, summary: dict[str, float], counts: list[float]) -> None:
        problems, kinds = [], []
        for s, side in enumerate(SIDES):
            ratio = summary.get(f"tracking_filtered_over_alpha_{side}")
            share = summary.get(f"tracking_at_bound_{side}")
            if ratio is not None and not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
                kind = "low" if ratio < RATIO_RANGE[0] else "high"
                expected = self.alpha * counts[NEGATIVES.start + s]
                if _beyond_chance(counts[FILTERED.start + s], expected, kind):
                    problems.append(f"{side} anchors filtered {ratio:.2f} x alpha")
                    kinds.append(kind)
            if share is not None and share > MAX_AT_BOUND:
                problems.append(f"{share:.0%} of the visited {side} thresholds sit at the clamp")
                kinds.append("bound")
        if not problems or comm.rank() != 0:
            return
        advice = " ".join(self.advice(kind) for kind in dict.fromkeys(kinds))
        logger.warning(
            "false-negative thresholds do not track the (1 - alpha) quantile between epoch "
            "%d and %d (alpha %g): %s. %s",
            epoch,
            epoch + 1,
            self.alpha,
            "; ".join(problems),
            advice,
        )


def _beyond_chance(filtered: float, expected: float, kind: str) -> bool:
    """Whether ``filtered`` exceedances, where a threshold at the quantile expects
    ``expected``, lie beyond ``RATIO_RANGE`` by more than chance: the Poisson probability of
    a count at least as far out, at the range's edge, is under ``CHANCE``."""
    low = kind == "low"
    k = torch.tensor(float(round(filtered)), dtype=torch.float64)
    edge = torch.tensor(RATIO_RANGE[0 if low else 1] * expected, dtype=torch.float64)
    # P(X <= k) below the range; P(X >= k) above it, where k >= 1 (the share is above 2 alpha)
    tail = torch.special.gammaincc(k + 1.0, edge) if low else torch.special.gammainc(k, edge)
    return bool(tail < CHANCE)
