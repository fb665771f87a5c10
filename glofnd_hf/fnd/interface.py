"""The interface of every false-negative detector, and the words they share.

A detector looks at the similarities of the local anchors to the candidates of the global
batch and says which negatives are false negatives. What to do with them (eliminate or
attract) is the loss's business; how the batch was gathered is the caller's.

Similarities come as a (2, b, B) float tensor: side 0 holds image anchors against all texts,
side 1 text anchors against all images (``SIDES``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

SIDES = ("image", "text")
"""The two sides of every (2, ...) tensor: image anchors, then text anchors."""


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


def nothing_found(start: int, end: int, sim_rows: torch.Tensor) -> None:
    """The false negatives of a detector that found none (``RowDetection``'s default)."""
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


def threshold_summary(threshold: torch.Tensor) -> dict[str, torch.Tensor]:
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
