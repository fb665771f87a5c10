"""GloFND's learned thresholds against the exact quantiles they track, at epoch ends.

The detection counts of ``recording`` say how well the masks match the labels; they do not
say whether GloFND's per-sample thresholds are where its update aims. This callback embeds
the training set with the current model and compares the learned thresholds with each
anchor's exact (1 - alpha) quantile over the whole data set (also on fresh training-mode
draws, in rank units), and compares threshold rules on the pairs of random batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.fnd import masked_quantile

if TYPE_CHECKING:
    from .study import Study


def _similarities(embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2, N, N): image anchors against texts, text anchors against images."""
    image = F.normalize(embeds["images"], dim=-1)
    text = F.normalize(embeds["texts"], dim=-1)
    return torch.stack([image @ text.t(), text @ image.t()])


def rank_figures(
    sims: torch.Tensor,
    thresholds: torch.Tensor,
    negatives: torch.Tensor,
    alpha: float,
    exact: torch.Tensor | None = None,
) -> dict[str, float]:
    """What (2, N) ``thresholds`` filter of the (2, N, N) similarities, in rank units: the
    mean share of negatives above them over alpha, the share of anchors whose own share is
    within [0.5, 2] x alpha, and the F1 of their masks against the exact rule's (each
    anchor's exact (1 - alpha) quantile of the same similarities: ``exact`` where the
    caller has them, several threshold sets being scored on one matrix)."""
    if exact is None:
        exact = masked_quantile(sims, negatives, 1.0 - alpha)
    found = (sims > thresholds.unsqueeze(-1)) & negatives
    target = (sims > exact.unsqueeze(-1)) & negatives
    ratio = found.sum(-1) / negatives.sum(-1).clamp(min=1) / alpha
    hits, detected, true = float((found & target).sum()), float(found.sum()), float(target.sum())
    return {
        "filtered_over_alpha": float(ratio.mean()),
        "within_half_to_double": float(((ratio >= 0.5) & (ratio <= 2.0)).float().mean()),
        "mask_f1": 2.0 * hits / (detected + true) if detected + true > 0 else 1.0,
    }


def side_figures(
    sims: torch.Tensor,
    thresholds: torch.Tensor,
    negatives: torch.Tensor,
    alpha: float,
    exact: torch.Tensor,
) -> list[dict[str, float]]:
    """``rank_figures`` of each side on its own: [image anchors, text anchors]."""
    return [
        rank_figures(sims[s : s + 1], thresholds[s : s + 1], negatives, alpha, exact[s : s + 1])
        for s in range(sims.shape[0])
    ]


def visit_negatives(
    sims: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """(2, N, batch_size - 1): each anchor's similarities to the other members of its batch
    in one random split of the N samples into batches (as an epoch of training visits
    them), ``-inf`` where its batch is the smaller last one."""
    n = sims.shape[1]
    size = min(batch_size, n)
    blocks = -(-n // size)
    order = torch.full((blocks * size,), -1, dtype=torch.long)
    order[:n] = torch.randperm(n, generator=generator)
    members = order.view(blocks, size)
    # Each position's others: every position of its batch but its own.
    pattern = torch.arange(size).expand(size, size)
    pattern = pattern[~torch.eye(size, dtype=torch.bool)].view(size, size - 1)
    others = members[:, pattern]  # (blocks, size, size - 1)
    anchors = members.unsqueeze(-1).expand_as(others)
    kept = (anchors >= 0) & (others >= 0)
    values = sims[:, anchors.clamp(min=0), others.clamp(min=0)]
    values = values.masked_fill(~kept, -math.inf)
    out = torch.full((2, n, size - 1), -math.inf, dtype=sims.dtype)
    rows = members.flatten()
    out[:, rows[rows >= 0]] = values.flatten(1, 2)[:, rows >= 0]
    return out


def local_scale(
    sims: torch.Tensor, negatives: torch.Tensor, alpha: float, exact: torch.Tensor
) -> torch.Tensor:
    """Each anchor's local scale of the tail at its ``exact`` (1 - alpha) quantile: that
    quantile less the one at e x alpha (a factor e in the share filtered is one; 0 where
    the quantile falls on an atom of tied similarities)."""
    return exact - masked_quantile(sims, negatives, 1.0 - math.e * alpha)


def quantile_motion(
    before: torch.Tensor, after: torch.Tensor, local: torch.Tensor
) -> list[dict[str, float]]:
    """How the (2, N) exact quantiles moved from ``before`` to ``after``, per side, in units
    of the median local scale ``local`` (the quantile at alpha less that at e x alpha: the
    scale of the tail there): the mean move, its sd across anchors, and the sd of what
    an affine map of ``before`` to ``after`` (least squares, one per side) leaves. An sd
    of many local scales that no common map removes is movement that only the anchor's
    own visits can show. The median is over anchors with a positive local scale: a
    quantile on an atom of tied similarities (captions repeated word for word) has none.
    A side where no anchor has one reports ``None`` (its tail holds no scale to move in)."""
    out = []
    for b, a, s in zip(before, after, local, strict=True):
        positive = s[s > 0]
        if positive.numel() == 0:
            out.append({"local_scale": 0.0, "mean": None, "sd": None, "sd_after_affine": None})
            continue
        scale = float(positive.median())
        design = torch.stack([torch.ones_like(b), b], dim=-1).double()
        fit = torch.linalg.lstsq(design, a.double().unsqueeze(-1)).solution
        residual = a.double() - (design @ fit).squeeze(-1)
        move = a - b
        out.append(
            {
                "local_scale": scale,
                "mean": float(move.mean()) / scale,
                "sd": float(move.std()) / scale,
                "sd_after_affine": float(residual.std()) / scale,
            }
        )
    return out


class VisitWindows:
    """What an anchor's visits hold: each epoch's draw split into random batches of
    ``batch_size`` (``visit_negatives``), and per anchor the empirical (1 - alpha) quantile
    of the negatives its visits of the K epochs before showed it, pooled, for each K in
    ``windows`` (consecutive epochs only), held for an epoch as ``exact_previous_epoch``
    is."""

    def __init__(self, batch_size: int, alpha: float, windows: tuple[int, ...]) -> None:
        self.batch_size, self.alpha, self.windows = batch_size, alpha, tuple(sorted(windows))
        self._visits: list[tuple[int, torch.Tensor]] = []  # (epoch, negatives), latest first

    def thresholds(self, epoch: int, sims: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """``visits_last_<K>``: the (2, N) thresholds that the visits of epochs ``epoch - K``
        to ``epoch - 1`` give, for every K that the epochs seen allow; then ``epoch``'s
        visits to the (2, N, N) ``sims`` (its batches drawn with ``seed``) are kept."""
        if self._visits and self._visits[0][0] != epoch - 1:
            self._visits = []  # a gap (a resumed run): windows span consecutive epochs only
        out = {}
        for k in self.windows:
            if k > len(self._visits):
                break
            pooled = torch.cat([v for _, v in self._visits[:k]], dim=-1)
            out[f"visits_last_{k}"] = masked_quantile(
                pooled, torch.isfinite(pooled), 1.0 - self.alpha
            )
        visit = visit_negatives(sims, self.batch_size, torch.Generator().manual_seed(seed))
        self._visits = [(epoch, visit), *self._visits][: self.windows[-1]]
        return out


def _prf(tp: float, detected: float, true: float, pairs: float) -> dict[str, float | None]:
    p = tp / detected if detected else None
    r = tp / true if true else None
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1, "detected_fraction": detected / pairs}


class TrainingModeFigures:
    """Every epoch end, in rank units on a fresh training-mode draw (what the rule sees):
    what a detector's thresholds filter there, against the exact rule on the same
    similarities; beside them what the exact quantiles of another draw filter (same epoch:
    the draw-to-draw noise no rule escapes; the previous epoch's, held for an epoch, as a
    rule that sees each sample once per epoch would at best hold them).

    ``detector``: a GloFND detector (its ``state`` holds the thresholds, keyed by dataset
    index = row of ``train``); ``seed``: the run's, from which each epoch's two draws come;
    ``keep_draws``: epochs whose first draw's (2, N, N) similarities are kept in ``draws``
    (for ``draw_replay.py``), and with ``extra_draws`` that many more draws of the same
    model (the second draw among them) in ``other_draws``, (extra_draws, 2, N, N) float16.

    With ``batch_size``, also what the visits themselves hold: each epoch's first draw is
    split into random batches of that size, and ``visits_last_<K>`` is each anchor's
    empirical (1 - alpha) quantile of the negatives of its visits in the K epochs before
    pooled (K in ``windows``), as a rule that kept every negative it was shown for K epochs,
    with no model of the tail, would hold it for the next; ``visits_best`` the K that puts
    most anchors within [0.5, 2] x alpha that epoch (chosen on the figures it reports: an
    optimistic bound of such rules).
    """

    def __init__(
        self,
        adapter,
        detector,
        train,
        alpha: float,
        seed: int,
        keep_draws: set[int] = frozenset(),
        batch_size: int | None = None,
        windows: tuple[int, ...] = (1, 2, 4, 8, 16),
        extra_draws: int = 0,
    ) -> None:
        self.adapter, self.detector, self.alpha, self.seed = adapter, detector, alpha, seed
        self.embedder = ZeroShotEvaluator(train, show_progress=False, batch_size=256)
        self._previous: tuple[int, torch.Tensor] | None = None
        self.records: list[dict[str, Any]] = []
        self.keep_draws = set(keep_draws)
        self.draws: dict[int, torch.Tensor] = {}
        # More draws of the same model at a kept epoch (its second draw first): what a rule
        # sees when every visit brings a fresh draw of a model that does not move.
        self.extra_draws = extra_draws
        self.other_draws: dict[int, torch.Tensor] = {}
        self.visits = None if batch_size is None else VisitWindows(batch_size, alpha, windows)

    def thresholds(self, n: int) -> torch.Tensor:
        """(2, n) the thresholds of the first n samples, as they filter (read without
        ``state_dict``, which folds the state's common shift into its table and so would
        change the run it measures in the last bits)."""
        return self.detector.state.lambdas(torch.arange(n)).t().cpu()

    def record(self, epoch: int, model) -> dict[str, Any]:
        """The figures of the draws at the end of ``epoch`` (appended to ``records``)."""
        seed = self.seed * 100_003 + 2 * epoch  # two distinct draws per epoch
        seen = _similarities(self.embedder.embed(self.adapter, model, training=True, seed=seed))
        if epoch in self.keep_draws:
            self.draws[epoch] = seen.clone()
        n = seen.shape[1]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact = masked_quantile(seen, negatives, 1.0 - self.alpha)
        previous, self._previous = self._previous, (epoch, exact)
        fresh = _similarities(
            self.embedder.embed(self.adapter, model, training=True, seed=seed + 1)
        )
        if epoch in self.keep_draws and self.extra_draws:
            # Seeds far from every epoch's two (seed, seed + 1).
            others = [fresh] + [
                _similarities(
                    self.embedder.embed(
                        self.adapter, model, training=True, seed=seed + 10_000_000 * j
                    )
                )
                for j in range(1, self.extra_draws)
            ]
            self.other_draws[epoch] = torch.stack(others).half()
        state = self.detector.state
        rows = state.rows(torch.arange(n))  # read as ``thresholds`` reads them
        thresholds = {"learned": state.thresholds_of(rows).t().cpu(), "exact_other_draw": exact}
        iterates = state.iterates_of(rows)
        if iterates is not None:  # the pinball rule: what its threshold averages
            thresholds["iterate"] = iterates.t().cpu()
        motion = None
        if previous is not None and previous[0] == epoch - 1:
            thresholds["exact_previous_epoch"] = previous[1]
            local = local_scale(seen, negatives, self.alpha, exact)
            motion = quantile_motion(previous[1], exact, local)
        if self.visits is not None:
            thresholds.update(self.visits.thresholds(epoch, seen, seed))
        fresh_exact = masked_quantile(fresh, negatives, 1.0 - self.alpha)
        figures: dict[str, Any] = {
            name: rank_figures(fresh, thr, negatives, self.alpha, fresh_exact)
            for name, thr in thresholds.items()
        }
        figures["learned"]["sides"] = side_figures(
            fresh, thresholds["learned"], negatives, self.alpha, fresh_exact
        )
        windows = {k: f for k, f in figures.items() if k.startswith("visits_last_")}
        if windows:
            best = max(windows, key=lambda k: windows[k]["within_half_to_double"])
            figures["visits_best"] = {**windows[best], "window": int(best.rsplit("_", 1)[1])}
        if motion is not None:
            figures["motion"] = motion
        self.records.append({"epoch": epoch, **figures})
        return self.records[-1]


class ThresholdSnapshots(TrainerCallback):
    """At chosen epoch ends, with the training set embedded by the current model:

    * GloFND's learned thresholds vs the exact per-anchor (1 - alpha) quantile of the
      similarity to the whole training set (the value GloFND's update tracks);
    * the same-model comparison of threshold rules on the pairs of random batches of the
      training batch size: in-batch (1 - alpha) quantile (``batch_quantile``), exact global
      quantile at alpha, exact global quantile at the alpha that matches the in-batch rule's
      realised detection rate, and GloFND's learned thresholds; plus the learned and exact
      thresholds over the full N x N matrix.
    """

    def __init__(
        self,
        study: Study,
        detector,
        train,
        labels: torch.Tensor,
        alpha: float,
        at_epochs: list[int],
        exact_every_epoch: bool = False,
    ) -> None:
        self.study, self.detector, self.alpha = study, detector, alpha
        self.at = set(at_epochs)
        # The epoch before each snapshot too: its exact quantiles, held for one epoch, are
        # what a rule that refreshes each threshold once per epoch could at best hold.
        self.exact_at = self.at | {e - 1 for e in self.at}
        # With --record, every epoch's exact quantiles are kept for offline replays.
        self.exact_history: dict[int, torch.Tensor] | None = None
        if exact_every_epoch:
            self.exact_at |= set(range(1, study.epochs + 1))
            self.exact_history = {}
        self._previous_exact: tuple[int, torch.Tensor] | None = None
        # The same in training mode (dropout, augmentation): what the rule sees.
        self.seen = TrainingModeFigures(study.adapter, detector, train, alpha, study.seed)
        self.labels = labels
        self.embedder = self.seen.embedder
        self.snapshots: list[dict[str, Any]] = []
        self.training_mode = self.seen.records
        self.arrays: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        self.seen.record(epoch, model)
        if epoch not in self.exact_at:
            return
        sims = _similarities(self.embedder.embed(self.study.adapter, model))  # (2, N, N)
        n = sims.shape[1]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact = masked_quantile(sims, negatives, 1.0 - self.alpha)  # (2, N)
        previous, self._previous_exact = self._previous_exact, (epoch, exact)
        if self.exact_history is not None:
            self.exact_history[epoch] = exact.clone()
        if epoch not in self.at:
            return
        lam = self.seen.thresholds(n)
        truth = (self.labels.unsqueeze(1) == self.labels.unsqueeze(0)) & negatives
        snap: dict[str, Any] = {"epoch": epoch, "full_matrix": {}, "in_batch_pairs": {}}
        for name, thr in (("learned", lam), ("exact", exact)):
            found = (sims > thr.unsqueeze(-1)) & negatives
            snap["full_matrix"][name] = _prf(
                float((found & truth).sum()),
                float(found.sum()),
                2.0 * float(truth.sum()),
                2.0 * n * (n - 1),
            )
        snap["in_batch_pairs"] = self._in_batch(sims, exact, lam, truth)
        diff = (lam - exact).flatten()
        snap["lambda_mean"] = float(lam.mean())
        snap["lambda_percentiles"] = [
            float(v) for v in torch.quantile(lam.flatten(), torch.tensor([0.1, 0.5, 0.9]))
        ]
        snap["exact_mean"] = float(exact.mean())
        snap["exact_percentiles"] = [
            float(v) for v in torch.quantile(exact.flatten(), torch.tensor([0.1, 0.5, 0.9]))
        ]
        snap["lambda_minus_exact_mean"] = float(diff.mean())
        snap["lambda_vs_exact_mae"] = float(diff.abs().mean())
        snap["lambda_vs_exact_corr"] = float(
            np.corrcoef(lam.flatten().numpy(), exact.flatten().numpy())[0, 1]
        )
        if previous is not None and previous[0] == epoch - 1:
            stale = (previous[1] - exact).flatten()
            snap["previous_epoch_exact_mae"] = float(stale.abs().mean())
            snap["previous_epoch_exact_corr"] = float(
                np.corrcoef(previous[1].flatten().numpy(), exact.flatten().numpy())[0, 1]
            )
        self.snapshots.append(snap)
        self.arrays.append(
            {"epoch": epoch, "lambda": lam[0].numpy().copy(), "exact": exact[0].numpy().copy()}
        )

    def _in_batch(self, sims, exact, lam, truth) -> dict[str, dict]:
        n, b = sims.shape[1], self.study.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(len(self.snapshots)))
        batches = [order[i : i + b] for i in range(0, n - b + 1, b)]
        eye = torch.eye(b, dtype=torch.bool)
        neg = ~eye
        rules = ("batch_quantile", "exact_global", "learned_global")
        counts = {r: [0.0, 0.0] for r in rules}  # tp, detected
        true = pairs = 0.0
        for idx in batches:
            sub = sims[:, idx][:, :, idx]
            tb = truth[idx][:, idx].unsqueeze(0).expand(2, -1, -1)
            thresholds = {
                "batch_quantile": masked_quantile(sub, neg, 1.0 - self.alpha),
                "exact_global": exact[:, idx],
                "learned_global": lam[:, idx],
            }
            for rule, thr in thresholds.items():
                found = (sub > thr.unsqueeze(-1)) & neg
                counts[rule][0] += float((found & tb).sum())
                counts[rule][1] += float(found.sum())
            true += float(tb.sum())
            pairs += 2.0 * b * (b - 1)
        out = {r: _prf(tp, det, true, pairs) for r, (tp, det) in counts.items()}
        # The global rule at the budget the in-batch rule actually spends.
        matched = out["batch_quantile"]["detected_fraction"]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact_m = masked_quantile(sims, negatives, 1.0 - matched)
        tp = det = 0.0
        for idx in batches:
            sub = sims[:, idx][:, :, idx]
            tb = truth[idx][:, idx].unsqueeze(0).expand(2, -1, -1)
            found = (sub > exact_m[:, idx].unsqueeze(-1)) & neg
            tp += float((found & tb).sum())
            det += float(found.sum())
        out["exact_global_matched_budget"] = {**_prf(tp, det, true, pairs), "alpha": matched}
        return out
