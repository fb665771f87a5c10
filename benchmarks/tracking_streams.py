"""Similarity streams with known exact quantiles, for studying threshold rules.

A stream is a set of N image/text embedding pairs that may move with the (fractional) epoch.
Each epoch visits every sample once, in shuffled global batches, and hands each batch's
(2, B, B) similarities to a detector exactly as the loss would. The exact (1 - alpha)
quantile of each anchor's similarity to all N - 1 other candidates is computed in chunks, so
every threshold can be scored against the quantity it is meant to learn.

Kinds (``make_stream``):

* ``fixed``: clustered embeddings that never move (the regime where the reference rule works);
* ``narrow``: the same geometry squeezed towards one direction: every anchor's similarities
  lie in a band of a few hundredths, narrower than the reference's step lr = 0.05;
* ``settling``: starts collapsed (all similarities near 1, as a model from scratch), spreads
  out and rotates into a new neighbour structure, and slows to a stop at the last epoch (as
  under a decaying learning rate);
* ``moving``: spreads and rotates at a steady pace up to the last epoch.

Used by ``threshold_tracking.py`` and by the tests (small N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from glofnd_hf.fnd import BatchQuantileDetector, GloFNDConfig, GloFNDDetector
from glofnd_hf.fnd.detectors import DetectionBatch, FalseNegativeDetector

KINDS = ("fixed", "narrow", "settling", "moving")


@dataclass
class Stream:
    """Embeddings as a function of the fractional epoch ``t``."""

    kind: str
    num_samples: int
    epochs: int
    spread: float
    image0: torch.Tensor
    text0: torch.Tensor
    image1: torch.Tensor
    text1: torch.Tensor
    centre: torch.Tensor

    def geometry(self, t: float) -> tuple[float, float]:
        """(spread, rotation angle) at epoch ``t``."""
        if self.kind in ("fixed", "narrow"):
            return self.spread, 0.0
        x = min(max(t / self.epochs, 0.0), 1.0)
        if self.kind == "settling":
            # Zero speed at both ends: a slow start from collapse and a stop at the last epoch.
            progress = x - math.sin(2 * math.pi * x) / (2 * math.pi)
            return 0.02 + (self.spread - 0.02) * progress, 0.3 * math.pi * progress
        # moving: a steady pace to the end, from an already spread start.
        return 0.3 + (self.spread - 0.3) * x, 1.2 * math.pi * x

    @property
    def moves(self) -> bool:
        return self.kind not in ("fixed", "narrow")

    def embeds(self, t: float, index: torch.Tensor | None = None):
        spread, angle = self.geometry(t)
        rows = slice(None) if index is None else index
        image = math.cos(angle) * self.image0[rows] + math.sin(angle) * self.image1[rows]
        text = math.cos(angle) * self.text0[rows] + math.sin(angle) * self.text1[rows]
        return (
            F.normalize(self.centre + spread * image, dim=-1),
            F.normalize(self.centre + spread * text, dim=-1),
        )


def _clustered(n: int, dim: int, clusters: int, gen: torch.Generator):
    centres = F.normalize(torch.randn(clusters, dim, generator=gen), dim=-1)
    label = torch.randint(0, clusters, (n,), generator=gen)
    x = F.normalize(centres[label] + 0.6 * torch.randn(n, dim, generator=gen), dim=-1)
    image = F.normalize(x + 0.3 * torch.randn(n, dim, generator=gen), dim=-1)
    text = F.normalize(x + 0.3 * torch.randn(n, dim, generator=gen), dim=-1)
    return image, text


def make_stream(
    kind: str,
    num_samples: int,
    epochs: int,
    dim: int = 32,
    clusters: int | None = None,
    seed: int = 0,
) -> Stream:
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; choose from {KINDS}")
    gen = torch.Generator().manual_seed(seed)
    clusters = clusters or max(16, num_samples // 128)
    image0, text0 = _clustered(num_samples, dim, clusters, gen)
    image1, text1 = _clustered(num_samples, dim, clusters, gen)
    centre = F.normalize(torch.randn(dim, generator=gen), dim=0)
    spread = 0.6 if kind == "narrow" else 2.5
    return Stream(kind, num_samples, epochs, spread, image0, text0, image1, text1, centre)


def _similarity_chunks(
    anchors: torch.Tensor, candidates: torch.Tensor, anchor_index: torch.Tensor, chunk: int
):
    """(start, similarities) of each chunk of anchors to every candidate, the anchor's own
    pair set to -inf (it is no negative)."""
    for start in range(0, anchors.shape[0], chunk):
        sim = anchors[start : start + chunk] @ candidates.t()
        rows = torch.arange(sim.shape[0])
        sim[rows, anchor_index[start : start + chunk]] = float("-inf")
        yield start, sim


def exact_quantiles(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_index: torch.Tensor,
    alpha: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """(1 - alpha) quantile (linear interpolation, as ``torch.quantile``) of each anchor's
    similarity to every candidate but its own pair; only the top of each row is kept."""
    n = candidates.shape[0] - 1
    position = (1 - alpha) * (n - 1)
    low = math.floor(position)
    frac = position - low
    from_top = n - 1 - low  # position of the lower neighbour, counted from the top
    out = []
    for _, sim in _similarity_chunks(anchors, candidates, anchor_index, chunk):
        top = sim.topk(from_top + 1, dim=1).values
        v_low, v_high = top[:, from_top], top[:, max(from_top - 1, 0)]
        out.append(v_low + frac * (v_high - v_low))
    return torch.cat(out)


def exact_share_above(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_index: torch.Tensor,
    thresholds: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """Each anchor's share of the data set's negatives above its threshold: what the
    threshold filters on any batch (the stationary benchmark's ``sf(lambda)``)."""
    n = candidates.shape[0] - 1
    out = []
    for start, sim in _similarity_chunks(anchors, candidates, anchor_index, chunk):
        lam = thresholds[start : start + sim.shape[0], None]
        out.append((sim > lam).sum(-1).double() / n)
    return torch.cat(out)


def exact_both(
    stream: Stream, t: float, alpha: float, index: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, 2) exact quantiles [image side, text side] at epoch ``t`` (all samples, or the
    anchors ``index``)."""
    image, text = stream.embeds(t)
    index = torch.arange(stream.num_samples) if index is None else index
    return torch.stack(
        [
            exact_quantiles(image[index], text, index, alpha),
            exact_quantiles(text[index], image, index, alpha),
        ],
        dim=-1,
    )


def share_above_both(stream: Stream, t: float, thresholds: torch.Tensor) -> torch.Tensor:
    """(n, 2) exact shares above the (n, 2) thresholds [image side, text side] at epoch ``t``."""
    image, text = stream.embeds(t)
    index = torch.arange(stream.num_samples)
    return torch.stack(
        [
            exact_share_above(image, text, index, thresholds[:, 0]),
            exact_share_above(text, image, index, thresholds[:, 1]),
        ],
        dim=-1,
    )


# ------------------------------------------------------------------------------------------
# Rules under test
# ------------------------------------------------------------------------------------------
RULES = {
    "reference": dict(update_rule="reference"),
    "adam": dict(update_rule="adam"),
    "adam+init_quantile": dict(update_rule="adam", init_quantile=True),
    "pinball": dict(update_rule="pinball"),
    "tail": dict(update_rule="tail"),
    # The tail rule before its threshold averaged the iterate: the threshold is the iterate.
    "tail (iterate)": dict(update_rule="tail", averaging=1.0),
    "tail+local_step": dict(update_rule="tail", local_step=True),
    "batch_quantile": None,
}


class ThresholdProbe:
    """The thresholds a detector applies, per sample and side, as of its last visit."""

    def __init__(self, name: str, num_samples: int, alpha: float, **overrides) -> None:
        self.name = name
        settings = RULES[name]
        self.detector: FalseNegativeDetector
        if settings is None:
            self.detector = BatchQuantileDetector(alpha)
        else:
            config = GloFNDConfig(alpha=alpha, **{**settings, **overrides})
            self.detector = GloFNDDetector(num_samples, config)
        self.lam = torch.ones(num_samples, 2)

    def detect(self, sim: torch.Tensor, index: torch.Tensor, epoch: float) -> torch.Tensor:
        negatives = index.unsqueeze(0) != index.unsqueeze(1)
        batch = DetectionBatch(
            anchor_index=index, candidate_index=index, negatives=negatives, epoch=epoch
        )
        found = self.detector.detect(sim, batch).false_negatives
        if isinstance(self.detector, GloFNDDetector):
            self.lam[index] = self.detector.state.lambdas(index)
        else:  # the in-batch rule's threshold of this visit, recovered from its definition
            from glofnd_hf.fnd import masked_quantile

            self.lam[index] = masked_quantile(sim, negatives, 1 - self.detector.alpha).t()
        return found


@dataclass
class EpochRecord:
    epoch: int
    median_error: float
    correlation: float
    filtered_over_alpha: float
    at_bound: float
    # The exact share of the data set above each threshold over alpha (what it filters on
    # data it has not stepped on): the mean over anchors and sides, and the share of anchors
    # within [0.5, 2] of alpha.
    share_over_alpha: float | None = None
    within: float | None = None
    precision: float | None = None
    recall: float | None = None
    quantile_movement: float | None = None


@dataclass
class Run:
    stream: str
    rule: str
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def last(self) -> EpochRecord:
        return self.epochs[-1]


def run_stream(
    stream: Stream,
    rule: str,
    alpha: float,
    batch_size: int,
    seed: int = 0,
    score_epochs: set[int] | None = None,
    exact_cache: dict | None = None,
    **overrides,
) -> Run:
    """Visit every sample once per epoch in shuffled batches; score the thresholds against
    the exact quantiles at the end of each epoch in ``score_epochs`` (default: all), and the
    last epoch's detections against the exact rule's masks."""
    n, epochs = stream.num_samples, stream.epochs
    score_epochs = set(range(epochs)) if score_epochs is None else score_epochs | {epochs - 1}
    exact_cache = {} if exact_cache is None else exact_cache
    probe = ThresholdProbe(rule, n, alpha, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    steps = n // batch_size
    run = Run(stream.kind, rule)
    previous_exact = None

    def exact_at(t: float) -> torch.Tensor:
        key = (id(stream), stream.kind, alpha, 0.0 if not stream.moves else t)
        if key not in exact_cache:
            exact_cache[key] = exact_both(stream, t, alpha)
        return exact_cache[key]

    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        filtered = negatives_seen = 0.0
        hits = detected = truth = 0.0
        last_epoch = epoch == epochs - 1
        for step in range(steps):
            index = perm[step * batch_size : (step + 1) * batch_size]
            t = epoch + step / steps
            image, text = stream.embeds(t, index)
            sim = torch.stack([image @ text.t(), text @ image.t()])
            found = probe.detect(sim, index, t)
            negatives = batch_size * (batch_size - 1)
            filtered += 0.0 if found is None else found.sum().item()
            negatives_seen += 2 * negatives
            if last_epoch and found is not None:
                exact = (
                    exact_at(0.0)[index]
                    if not stream.moves
                    else exact_both(stream, t, alpha, index)
                )
                eye = torch.eye(batch_size, dtype=torch.bool)
                should = (sim > exact.t().unsqueeze(-1)) & ~eye
                hits += (found & should).sum().item()
                detected += found.sum().item()
                truth += should.sum().item()
        if epoch not in score_epochs:
            continue
        t_end = epoch + (steps - 1) / steps
        exact = exact_at(t_end)
        lam = probe.lam
        at_bound = (lam.abs() >= 1.0).float().mean().item()
        correlation = torch.corrcoef(torch.stack([lam.flatten(), exact.flatten()]))[0, 1].item()
        record = EpochRecord(
            epoch=epoch,
            median_error=(lam - exact).abs().median().item(),
            correlation=correlation if math.isfinite(correlation) else 0.0,
            filtered_over_alpha=filtered / negatives_seen / alpha,
            at_bound=at_bound,
        )
        share = share_above_both(stream, t_end, lam) / alpha
        record.share_over_alpha = share.mean().item()
        record.within = ((share >= 0.5) & (share <= 2.0)).double().mean().item()
        if stream.moves and previous_exact is not None:
            record.quantile_movement = (exact - previous_exact).abs().median().item()
        previous_exact = exact
        if last_epoch:
            record.precision = hits / detected if detected else None
            record.recall = hits / truth if truth else None
        run.epochs.append(record)
    return run
