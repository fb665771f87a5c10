"""GloFND: a learned threshold per sample and side, keyed by dataset index, at the anchor's
(1 - alpha) quantile of similarity over the whole data set (Balmaseda et al., ICML 2025).
How a visit moves a threshold is the update rule's business (``thresholds``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import comm
from .health import TrackingHealth
from .interface import (
    SIDES,
    DetectionBatch,
    RowDetection,
    RowwiseDetector,
    SimilarityRows,
    nothing_found,
    threshold_summary,
)
from .registry import DetectorSpec, register
from .table import StateSharding, segment_mean
from .thresholds import GloFNDConfig, ThresholdState


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
        sharding: StateSharding = "replicated",
    ) -> None:
        config = config or GloFNDConfig()
        super().__init__(config.mask_start_epoch)
        self.config = config
        self.rule = config.rule()
        self.state = ThresholdState(
            num_samples, device=device, pin_memory=pin_memory, rule=self.rule, sharding=sharding
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
        updated = everyone = stepped = None
        before = (None, None)
        if batch.epoch >= cfg.update_start_epoch:
            updated, everyone, before, stepped = self._update(rows, bounds, batch)
        # Tracking health is read before the step (masking implies updating).
        finished = self.health.record(batch.epoch, *before, updated, stepped)
        device = batch.negatives.device
        if not self.masking(batch.epoch):
            return RowDetection(nothing_found, _tensors(finished, device))
        lam = updated  # (2, b)
        if lam is None:
            # The state is the same on every rank: the global batch's thresholds need
            # no communication.
            everyone = self.state.lambdas(batch.candidate_index, device).t()  # (2, B)
            b, start = batch.anchor_index.shape[0], self._local_start(batch)
            lam = everyone[:, start : start + b]

        def false_negatives(start: int, end: int, sim: torch.Tensor) -> torch.Tensor:
            return (sim > lam[:, start:end, None].to(sim.dtype)) & batch.negatives[start:end]

        stats = threshold_summary(everyone)
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
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Threshold step for every anchor of the global batch; returns the (2, b) updated
        thresholds of this process's anchors, the (2, B) ones of the global batch, per
        side the numbers of this process's negatives above the thresholds before the step
        and of all its negatives, both over anchors visited before (the health figure), and
        whether the rule stepped each of the (2, b) thresholds (it skips a row without the
        negatives its step needs, such as the one anchor of a batch of one).

        Every rank reads the state rows of the whole global batch once (its own anchors are
        the slice at its rank), computes the rule's statistics for its own anchors chunk by
        chunk, all-gathers those per-anchor values and applies the same deterministic update.
        """
        distributed = comm.world_size() > 1
        index = batch.candidate_index if distributed else batch.anchor_index
        b = batch.anchor_index.shape[0]
        start = comm.rank() * b if distributed else 0
        table_rows = self.state.rows(index, batch.negatives.device)  # (B, 2, C)
        local_rows = table_rows[start : start + b]  # (b, 2, C)
        old = self.state.thresholds_of(local_rows).t()  # (2, b)
        seen = self.state.visited(local_rows).t()
        parts, dtype = [], torch.float32
        filtered = torch.zeros(len(SIDES), device=table_rows.device)
        negatives = torch.zeros(len(SIDES), device=table_rows.device)
        for s, e in bounds:
            sim = rows(s, e)
            dtype = sim.dtype
            chunk = batch.negatives[s:e]
            parts.append(self.state.statistics(local_rows[s:e], sim, chunk))
            above = ((sim > old[:, s:e, None].to(dtype)) & chunk).sum(-1)  # (2, e - s)
            filtered += (above * seen[:, s:e]).sum(-1)
            negatives += (chunk.sum(-1) * seen[:, s:e]).sum(-1)
        local = torch.cat(parts, dim=1)  # (2, b, k)
        local = local.transpose(0, 1).reshape(b, -1)  # (b, 2k): one row per anchor
        # Every rank gets every anchor's values (O(global batch)) and applies the same update.
        gathered = segment_mean(index, comm.all_gather_no_grad(local.contiguous()))
        stats = gathered.view(index.shape[0], len(SIDES), -1)
        new_rows = self.state.update(index, stats, batch.epoch, table_rows)
        stepped = self.state.visits(new_rows[start : start + b]) > self.state.visits(local_rows)
        everyone = self.state.thresholds_of(new_rows).t().to(dtype)
        return everyone[:, start : start + b], everyone, (filtered, negatives), stepped.t()

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

    def shard_tables(self) -> dict:
        """Per-sample tables by name (per-process checkpoints, ``glofnd_hf.state_shards``)."""
        return self.state.shard_tables()

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        self.state.check_shard_rows(name, rows)

    def shard_extras(self) -> dict[str, torch.Tensor]:
        """The update rule's per-side quantities (the same on every process), stored with
        every shard of a per-process checkpoint; none for most rules."""
        return self.state.side_state()

    def load_shard_extras(self, extras: dict[str, torch.Tensor]) -> None:
        """Take :meth:`shard_extras` of a checkpoint (checked first; a checkpoint written
        before the rule kept them has none, and they start afresh)."""
        expected = set(self.state.side_keys())
        if set(extras) - expected:
            raise ValueError(
                f"glofnd shard extras hold {sorted(set(extras) - expected)}; the "
                f"{self.config.update_rule} rule keeps {sorted(expected) or 'none'}"
            )
        self.state.load_side_state(extras)

    def tables_read_per_step(self) -> list:
        """The table every step reads at the global batch's indices (the loss may read it
        together with its own: ``fnd.table.gather_together``)."""
        return [self.state.table]

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


def _tensors(values: dict[str, float], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, device=device) for k, v in values.items()}


def glofnd_state_bytes(config: GloFNDConfig) -> int:
    """The update rule's threshold table (72 bytes per sample for pinball, 64 for tail, 32 for Adam)."""
    return config.rule().bytes_per_sample()


register(
    DetectorSpec(
        name="glofnd",
        description="a learned per-sample similarity threshold at the anchor's "
        "(1 - alpha) quantile over the whole data set; negatives above it are false negatives",
        detector_class=GloFNDDetector,
        factory=lambda config, shared, *, num_samples, device, pin_memory, sharding="replicated": (
            GloFNDDetector(
                num_samples, config, device=device, pin_memory=pin_memory, sharding=sharding
            )
        ),
        settings=GloFNDConfig,
        shared_fields=("alpha", "mask_start_epoch"),
        needs_num_samples=True,
        state_bytes=glofnd_state_bytes,
        shardable=True,
    )
)
