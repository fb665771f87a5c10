"""False-negative detectors behind one interface.

A detector looks at the similarities of the local anchors to the candidates of the global
batch and says which negatives are false negatives. What to do with them (eliminate or
attract) is the loss's business; how the batch was gathered is the caller's.

Similarities come as a (2, b, B) float tensor: side 0 holds image anchors against all texts,
side 1 text anchors against all images.

Each detector is known to the package by one ``registry.register(DetectorSpec(...))`` next to
its class (the built-in ones at the end of this module and of ``ifnd``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import comm
from .health import TrackingHealth
from .quantiles import masked_quantile
from .registry import DetectorSpec, register
from .table import segment_mean
from .thresholds import LAMBDA, SIDES, GloFNDConfig, ThresholdState


@dataclass
class DetectionBatch:
    """What a detector may know about the batch besides the similarities."""

    anchor_index: torch.Tensor
    """(b,) dataset indices of this process's anchors."""
    candidate_index: torch.Tensor
    """(B,) dataset indices of the global batch, rank after rank (so also every anchor)."""
    negatives: torch.Tensor
    """(b, B) bool: the candidate is a negative of the anchor (not itself, not a duplicate)."""
    epoch: float
    anchor_labels: torch.Tensor | None = None
    candidate_labels: torch.Tensor | None = None


@dataclass
class Detection:
    false_negatives: torch.Tensor | None
    """(2, b, B) bool, a subset of the negatives; None when nothing is detected."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """0-d tensors describing the whole global batch, the same on every rank (what one
    process over the global batch would report); the trainer logs them as they are."""


SimilarityRows = Callable[[int, int], torch.Tensor]
"""``rows(start, end)``: the (2, end - start, B) similarities of local anchors ``start`` to
``end - 1`` against the global batch (computed on demand, never all held at once)."""


@dataclass
class RowDetection:
    """The detection of a batch that is read row chunk by row chunk (the cached loss)."""

    false_negatives: Callable[[int, int, torch.Tensor], torch.Tensor | None]
    """``false_negatives(start, end, sim_rows)``: (2, end - start, B) bool for those local
    anchors, given their similarities (what ``rows(start, end)`` gave); None: nothing."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """As ``Detection.stats``."""

    @classmethod
    def whole(cls, detection: Detection) -> RowDetection:
        """Rows sliced out of a detection of the whole batch."""
        found = detection.false_negatives
        return cls(lambda s, e, _: None if found is None else found[:, s:e], detection.stats)


def _nothing(start: int, end: int, sim_rows: torch.Tensor) -> None:
    return None


class FalseNegativeDetector(ABC):
    """Interface of every detector."""

    name: ClassVar[str]
    requires_labels: ClassVar[bool] = False

    def __init__(self, mask_start_epoch: float = 0.0) -> None:
        self.mask_start_epoch = float(mask_start_epoch)

    @property
    def num_samples(self) -> int | None:
        """Size of the index space the detector keeps state for (None: stateless)."""
        return None

    @abstractmethod
    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        """Update any state from this batch, then return the detected false negatives."""

    def detect_rows(
        self, rows: SimilarityRows, bounds: Sequence[tuple[int, int]], batch: DetectionBatch
    ) -> RowDetection:
        """``detect`` for a batch whose (2, b, B) similarities are read in row chunks:
        ``bounds`` are consecutive ``[start, end)`` covering the b local anchors. The state is
        updated once, as by ``detect``. Default: the chunks put together and ``detect``;
        detectors that decide anchor by anchor override it and never hold the whole matrix.
        """
        if len(bounds) == 1:
            sim = rows(*bounds[0])
        else:
            sim = torch.cat([rows(s, e) for s, e in bounds], dim=1)
        return RowDetection.whole(self.detect(sim, batch))

    def observe(
        self, index: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> None:
        """See the step's normalised embeddings before ``detect`` (feature-bank detectors
        such as IFND use it). Default: nothing."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"detector {self.name!r} keeps no state, got keys {sorted(state)}")

    def to(self, device: torch.device | str) -> FalseNegativeDetector:
        return self

    def finish_epoch(self) -> dict[str, float]:
        """Close the current epoch: summary statistics of it to log (default: none)."""
        return {}

    def config_dict(self) -> dict:
        return {"detector": self.name, "mask_start_epoch": self.mask_start_epoch}

    def masking(self, epoch: float) -> bool:
        return epoch >= self.mask_start_epoch


class RowwiseDetector(FalseNegativeDetector):
    """A detector that decides anchor by anchor: ``detect_rows`` is its implementation and
    ``detect`` reads all rows as one chunk. A subclass that redefines ``detect`` alone is
    taken at its word: its batches are read whole and passed to its ``detect``."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "detect" in cls.__dict__ and "detect_rows" not in cls.__dict__:
            cls.detect_rows = FalseNegativeDetector.detect_rows  # type: ignore[method-assign]

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        b = sim.shape[1]
        detection = self.detect_rows(lambda s, e: sim[:, s:e], [(0, b)], batch)
        return Detection(detection.false_negatives(0, b, sim), detection.stats)

    @abstractmethod
    def detect_rows(
        self, rows: SimilarityRows, bounds: Sequence[tuple[int, int]], batch: DetectionBatch
    ) -> RowDetection: ...


class NoDetector(RowwiseDetector):
    """Plain contrastive learning: every other sample is a negative."""

    name = "none"

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        return RowDetection(_nothing)


class BatchQuantileDetector(RowwiseDetector):
    """The FND baseline: negatives above the anchor's in-batch (1 - alpha) quantile."""

    name = "batch_quantile"

    def __init__(self, alpha: float = 1e-3, mask_start_epoch: float = 0.0) -> None:
        super().__init__(mask_start_epoch)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.alpha = alpha

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        if not self.masking(batch.epoch):
            return RowDetection(_nothing)
        q = 1.0 - self.alpha
        threshold = torch.cat(
            [masked_quantile(rows(s, e), batch.negatives[s:e], q) for s, e in bounds], dim=-1
        )  # (2, b)

        def found(start: int, end: int, sim: torch.Tensor) -> torch.Tensor:
            return (sim > threshold[:, start:end, None]) & batch.negatives[start:end]

        # The statistics cover the global batch's anchors: gather the (2, b) thresholds.
        everyone = comm.all_gather_no_grad(threshold.t().contiguous()).t()
        return RowDetection(found, _threshold_stats(everyone))

    def config_dict(self) -> dict:
        return {**super().config_dict(), "alpha": self.alpha}


class OracleDetector(FalseNegativeDetector):
    """Ground truth: negatives that share the anchor's label (for studies and tests)."""

    name = "oracle"
    requires_labels = True

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        if not self.masking(batch.epoch):
            return Detection(None)
        if batch.anchor_labels is None or batch.candidate_labels is None:
            raise ValueError("the oracle detector needs labels for every sample of the batch")
        same = batch.anchor_labels.unsqueeze(1) == batch.candidate_labels.unsqueeze(0)
        found = same & batch.negatives
        return Detection(found.unsqueeze(0).expand(len(SIDES), -1, -1))

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        return RowDetection.whole(self.detect(_NO_SIMILARITIES, batch))  # labels only


class GloFNDDetector(RowwiseDetector):
    """GloFND: a learned threshold per sample and side, keyed by dataset index.

    Each step first updates the thresholds of the batch's anchors (all ranks apply the same
    update from gathered per-anchor statistics, so the state stays identical everywhere),
    then marks the negatives above the updated thresholds. How a visit moves a threshold is
    the configured update rule's business (``thresholds``).
    """

    name = "glofnd"

    def __init__(
        self,
        num_samples: int,
        config: GloFNDConfig | None = None,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> None:
        config = config or GloFNDConfig()
        super().__init__(config.mask_start_epoch)
        self.config = config
        self.rule = config.rule()
        self.state = ThresholdState(
            num_samples, device=device, pin_memory=pin_memory, rule=self.rule
        )
        self.health = TrackingHealth(
            config.alpha,
            max(config.update_start_epoch, config.mask_start_epoch) + 1.0,
            self._advice,
        )

    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        cfg = self.config
        updated = everyone = None
        before = (None, None)
        if batch.epoch >= cfg.update_start_epoch:
            updated, everyone, before = self._update(rows, bounds, batch)
        # Tracking health is read before the step (masking implies updating).
        finished = self.health.record(batch.epoch, *before, updated)
        device = batch.negatives.device
        if not self.masking(batch.epoch):
            return RowDetection(_nothing, _tensors(finished, device))
        lam = updated  # (2, b)
        if lam is None:
            # The state is the same on every rank: the global batch's thresholds need
            # no communication.
            everyone = self.state.lambdas(batch.candidate_index, device).t()  # (2, B)
            b, start = batch.anchor_index.shape[0], self._local_start(batch)
            lam = everyone[:, start : start + b]

        def false_negatives(start: int, end: int, sim: torch.Tensor) -> torch.Tensor:
            return (sim > lam[:, start:end, None].to(sim.dtype)) & batch.negatives[start:end]

        stats = _threshold_stats(everyone)
        stats.update(_tensors(finished, device))
        return RowDetection(false_negatives, stats)

    def finish_epoch(self) -> dict[str, float]:
        return self.health.finish_epoch()

    @staticmethod
    def _local_start(batch: DetectionBatch) -> int:
        """Where this process's anchors start in the global batch."""
        return comm.rank() * batch.anchor_index.shape[0] if comm.world_size() > 1 else 0

    @torch.no_grad()
    def _update(
        self, rows: SimilarityRows, bounds: Sequence[tuple[int, int]], batch: DetectionBatch
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Threshold step for every anchor of the global batch; returns the (2, b) updated
        thresholds of this process's anchors, the (2, B) ones of the global batch, and per
        side the numbers of this process's negatives above the thresholds before the step
        and of all its negatives, both over anchors visited before (the health figure).

        Every rank reads the state rows of the whole global batch once (its own anchors are
        the slice at its rank), computes the rule's statistics for its own anchors chunk by
        chunk, all-gathers those per-anchor values and applies the same deterministic update.
        """
        distributed = comm.world_size() > 1
        index = batch.candidate_index if distributed else batch.anchor_index
        b = batch.anchor_index.shape[0]
        start = comm.rank() * b if distributed else 0
        table_rows = self.state.rows(index, batch.negatives.device)  # (B, 2, C)
        local_rows = table_rows[start : start + b].transpose(0, 1)  # (2, b, C)
        # The rule's statistics are taken at its point (the threshold, or the iterate that
        # the threshold averages).
        point = local_rows[..., self.rule.point]
        old, seen = local_rows[..., LAMBDA], local_rows[..., -1] > 0  # visits are last
        parts, dtype = [], torch.float32
        filtered = torch.zeros(len(SIDES), device=table_rows.device)
        negatives = torch.zeros(len(SIDES), device=table_rows.device)
        for s, e in bounds:
            sim = rows(s, e)
            dtype = sim.dtype
            chunk = batch.negatives[s:e]
            parts.append(self.rule.statistics(sim, chunk, point[:, s:e].to(dtype)))
            above = ((sim > old[:, s:e, None].to(dtype)) & chunk).sum(-1)  # (2, e - s)
            filtered += (above * seen[:, s:e]).sum(-1)
            negatives += (chunk.sum(-1) * seen[:, s:e]).sum(-1)
        local = torch.cat(parts, dim=1)  # (2, b, k)
        local = local.transpose(0, 1).reshape(b, -1)  # (b, 2k): one row per anchor
        # Every rank gets every anchor's values (O(global batch)) and applies the same update.
        gathered = segment_mean(index, comm.all_gather_no_grad(local.contiguous()))
        stats = gathered.view(index.shape[0], len(SIDES), -1)
        table_rows = self.state.apply_update(index, stats, batch.epoch, table_rows)
        everyone = table_rows[:, :, LAMBDA].t().to(dtype)
        return everyone[:, start : start + b], everyone, (filtered, negatives)

    def _advice(self, kind: str) -> str:
        """Likely cause and the setting to change (a GloFND setting, ``detector_kwargs`` of
        the training arguments), for the health warning."""
        cfg = self.config
        if cfg.update_rule == "pinball":
            return {
                "low": "Thresholds sit above the quantile: the embeddings may move faster "
                "than one visit per epoch can follow (early in training from scratch this "
                f"passes); lower drift_level (now {cfg.drift_level}) to restart the steps "
                "on smaller moves.",
                "high": "Thresholds sit below the quantile: the embeddings may move faster "
                "than one visit per epoch can follow; lower drift_level (now "
                f"{cfg.drift_level}). Where alpha x batch size is well below 1, raise "
                f"tail_size (now {cfg.tail_size}) for a steadier start.",
                "bound": "Many anchors have similarities at +-1 (collapsed or duplicated "
                "embeddings?): check the model's outputs and the data for duplicates.",
            }[kind]
        if cfg.update_rule != "tail":
            return {
                "low": "Adam's step is about lr in similarity units: thresholds "
                "starting at 1.0 need many visits (one per epoch) to come down, and "
                "where the similarities are spread more narrowly than that or move, "
                "they overshoot and stay above the quantile. Use update_rule: "
                f"pinball (or init_quantile, a smaller lr, now {cfg.lr}).",
                "high": "Thresholds lag below a moving quantile: use update_rule: pinball, "
                "or start updates later (update_start_epoch).",
                "bound": "Adam thresholds park at the clamp after one overshoot: use "
                f"update_rule: pinball (or a smaller lr, now {cfg.lr}).",
            }[kind]
        return {
            "low": "The embeddings may move faster than one visit per epoch can follow "
            "(early in training from scratch this passes): raise drift_rate (now "
            f"{cfg.drift_rate}) or step_floor (now {cfg.step_floor}).",
            "high": "Thresholds sit below the quantile: if alpha x batch size is well below "
            f"1, raise tail_size (now {cfg.tail_size}) for a steadier tail "
            f"estimate, or lower step_floor (now {cfg.step_floor}) or averaging (now "
            f"{cfg.averaging}) to average more visits.",
            "bound": "Many anchors have similarities at +-1 (collapsed or duplicated "
            "embeddings?): check the model's outputs and the data for duplicates.",
        }[kind]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state.load_state_dict(state)

    def to(self, device: torch.device | str) -> GloFNDDetector:
        self.state.to(device)
        return self

    def config_dict(self) -> dict:
        cfg = self.config
        out = {
            "detector": self.name,
            "num_samples": self.num_samples,
            "alpha": cfg.alpha,
            "update_rule": cfg.update_rule,
            "update_start_epoch": cfg.update_start_epoch,
            "mask_start_epoch": cfg.mask_start_epoch,
        }
        for name in self.rule.settings:
            value = getattr(cfg, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


_NO_SIMILARITIES = torch.empty(0)
"""What detectors that decide from indices or labels alone get for similarities."""


def _tensors(values: dict[str, float], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, device=device) for k, v in values.items()}


def _threshold_stats(threshold: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and a few percentiles of the (2, B) thresholds of the global batch's anchors.

    Over the batch's anchors (never over N), on the device: no synchronisation.
    """
    threshold = torch.nan_to_num(threshold.detach().float(), nan=1.0)
    # Order statistics of the b values: no quantile kernel, and basic indexing only (an
    # index list would be copied to the device every step).
    ordered = threshold.sort(dim=-1).values
    last = ordered.shape[-1] - 1
    stats = {}
    for s, side in enumerate(SIDES):
        stats[f"lambda_mean_{side}"] = threshold[s].mean()
        for q, name in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
            stats[f"lambda_{name}_{side}"] = ordered[s, round(q * last)]
    return stats


# -- registrations ---------------------------------------------------------------------------
def glofnd_state_bytes(config: GloFNDConfig) -> int:
    """The update rule's threshold table (72 bytes per sample for pinball, 64 for tail, 32 for Adam)."""
    return config.rule().bytes_per_sample()


register(
    DetectorSpec(
        name="none",
        description="no detection: every other sample of the batch is a negative",
        detector_class=NoDetector,
        factory=lambda settings, shared, **_: NoDetector(),
    )
)
register(
    DetectorSpec(
        name="batch_quantile",
        description="the in-batch quantile baseline: negatives above the anchor's in-batch "
        "(1 - alpha) quantile are false negatives",
        detector_class=BatchQuantileDetector,
        factory=lambda settings, shared, **_: BatchQuantileDetector(
            shared.alpha, shared.mask_start_epoch
        ),
    )
)
register(
    DetectorSpec(
        name="oracle",
        description="ground-truth semantic labels mark the false negatives",
        detector_class=OracleDetector,
        factory=lambda settings, shared, **_: OracleDetector(shared.mask_start_epoch),
    )
)
register(
    DetectorSpec(
        name="glofnd",
        description="a learned per-sample similarity threshold at the anchor's "
        "(1 - alpha) quantile over the whole data set; negatives above it are false negatives",
        detector_class=GloFNDDetector,
        factory=lambda config, shared, *, num_samples, device, pin_memory: GloFNDDetector(
            num_samples, config, device=device, pin_memory=pin_memory
        ),
        settings=GloFNDConfig,
        shared_fields=("alpha", "mask_start_epoch"),
        needs_num_samples=True,
        state_bytes=glofnd_state_bytes,
    )
)
