"""Scoring a detector against the label oracle while it trains.

The study needs, per epoch, how the detector's false-negative masks compare with the true
ones (same ``semantic_label``) and what the loss actually filtered. ``RecordingDetector``
wraps any registered detector and counts its masks; ``StudyClipLoss`` hands each step's
embeddings to the detector (IFND's feature bank) and records the realised filtered fraction
and the loss, into the same per-epoch ``EpochCounts``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from glofnd_hf.fnd.interface import SIDES, Detection, DetectionBatch, FalseNegativeDetector
from glofnd_hf.losses import ClipLoss


@dataclass
class EpochCounts:
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    detected: float = 0.0
    negatives: float = 0.0
    true_fn: float = 0.0
    filtered: list = field(default_factory=list)  # realised filtered fraction per step
    loss: list = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp > 0 else None
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn > 0 else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        elif recall is not None:
            f1 = 0.0  # nothing detected
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "detected_fraction": self.detected / max(self.negatives, 1.0),
            "filtered_fraction": float(np.mean(self.filtered)) if self.filtered else 0.0,
            "true_fn_fraction": self.true_fn / max(self.negatives, 1.0),
            "loss": float(np.mean(self.loss)) if self.loss else None,
        }


class RecordingDetector(FalseNegativeDetector):
    """Wraps a detector; scores its masks against ``batch.anchor_labels``/``candidate_labels``
    (both sides), bucketed by the integer epoch."""

    name = "recording"

    def __init__(self, inner: FalseNegativeDetector) -> None:
        super().__init__(inner.mask_start_epoch)
        self.inner = inner
        self.requires_labels = inner.requires_labels
        self.epochs: dict[int, EpochCounts] = {}
        self.ifnd_rounds: list[dict[str, float]] = []
        # With --record: every batch the detector saw (indices, similarities, epoch), so
        # that threshold rules can be replayed offline on the same stream.
        self.batches: list[dict[str, Any]] | None = None

    @property
    def num_samples(self):
        return self.inner.num_samples

    def counts(self, epoch: float) -> EpochCounts:
        return self.epochs.setdefault(math.floor(epoch + 1e-9), EpochCounts())

    def observe(self, index, image_embeds, text_embeds) -> None:
        if hasattr(self.inner, "observe"):
            self.inner.observe(index, image_embeds, text_embeds)

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        if self.batches is not None:
            self.batches.append(
                {
                    "index": batch.anchor_index.clone(),
                    "negatives": batch.negatives.clone(),
                    "sim": sim.detach().clone(),
                    "epoch": batch.epoch,
                }
            )
        out = self.inner.detect(sim, batch)
        c = self.counts(batch.epoch)
        truth = batch.anchor_labels.unsqueeze(1) == batch.candidate_labels.unsqueeze(0)
        truth = (truth & batch.negatives).unsqueeze(0).expand(len(SIDES), -1, -1)
        found = out.false_negatives
        if found is None:
            found = torch.zeros_like(truth)
        c.tp += float((found & truth).sum())
        c.fp += float((found & ~truth).sum())
        c.fn += float((~found & truth).sum())
        c.detected += float(found.sum())
        c.negatives += float(batch.negatives.sum()) * len(SIDES)
        c.true_fn += float(truth.sum())
        rounds = out.stats.get("ifnd_rounds")
        if rounds is not None and int(rounds) > len(self.ifnd_rounds):
            self.ifnd_rounds.append(
                {"epoch": batch.epoch, "seconds": float(out.stats["ifnd_cluster_seconds"])}
            )
        return out

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def to(self, device):
        self.inner.to(device)
        return self

    def config_dict(self):
        return self.inner.config_dict()


class StudyClipLoss(ClipLoss):
    """CLIP loss that hands the step's embeddings to the detector (the IFND feature bank)
    and records the realised filtered fraction. Observing twice (should the base loss call
    ``observe`` too) writes the same rows twice: harmless."""

    def __call__(
        self, image_embeds, text_embeds, logit_scale, index=None, epoch=0.0, labels=None, **kwargs
    ):
        if index is not None:
            self.detector.observe(index, image_embeds, text_embeds)
        out = super().__call__(
            image_embeds, text_embeds, logit_scale, index, epoch, labels, **kwargs
        )
        c = self.detector.counts(epoch)
        c.filtered.append(float(sum(out.stats[f"filtered_fraction_{s}"] for s in SIDES)) / 2)
        c.loss.append(float(out.loss.detach()))
        return out


def pooled(recorder: RecordingDetector, start: float) -> dict[str, float | None]:
    """Detection quality pooled over the epochs from ``start`` on (the masking period)."""
    total = EpochCounts()
    for e, c in recorder.epochs.items():
        if e >= math.floor(start):
            for key in ("tp", "fp", "fn", "detected", "negatives", "true_fn"):
                setattr(total, key, getattr(total, key) + getattr(c, key))
            total.filtered += c.filtered
    out = total.summary()
    out.pop("loss")
    return out
