"""Which pairs of a step are positives, negatives and detected false negatives.

The masks of any rows of the batch (all of them, or one row chunk of the cached loss) come
from one ``StepMasks``, built once per step from the batch's indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..fnd.interface import SIDES, DetectionBatch, RowDetection

Strategy = Literal["eliminate", "attract"]


@dataclass
class Masks:
    """(b, B) / (2, b, B) boolean masks for one step (True = member of the set)."""

    positive_column: torch.Tensor  # (b,) column of each anchor's own pair
    own: torch.Tensor  # (b, B) the anchor's own pair
    negatives: torch.Tensor  # (b, B) true negatives as far as indices tell
    false_negatives: torch.Tensor | None  # (2, b, B) detected, subset of negatives
    candidate_index: torch.Tensor | None = None  # (B,) dataset indices of the global batch

    def kept_negatives(self, strategy: Strategy) -> torch.Tensor:
        """(2, b, B) the negatives that stay in the denominator."""
        if self.false_negatives is None or strategy == "attract":
            return self.negatives.expand(len(SIDES), -1, -1)
        return self.negatives & ~self.false_negatives

    def positives(self, strategy: Strategy) -> torch.Tensor:
        """(2, b, B) the pairs counted as positives."""
        if self.false_negatives is None or strategy == "eliminate":
            return self.own.expand(len(SIDES), -1, -1)
        return self.own | self.false_negatives


@dataclass
class StepMasks:
    """One step's batch as the detector sees it, and the masks of any rows of it."""

    batch: DetectionBatch
    positive_column: torch.Tensor  # (b,) column of each local anchor's own pair
    candidate_index: torch.Tensor | None  # (B,) dataset indices of the global batch

    def masks(
        self, start: int, end: int, sim: torch.Tensor, detection: RowDetection | None
    ) -> tuple[Masks, torch.Tensor]:
        """The masks of local anchors ``[start, end)`` (``sim``: their similarities) and
        their counts: detected false negatives of each side, negatives, and anchors of each
        side whose negatives were all detected (5 values, float)."""
        negatives = self.batch.negatives[start:end]
        own = torch.zeros_like(negatives)
        own[torch.arange(end - start, device=own.device), self.positive_column[start:end]] = True
        found = None if detection is None else detection.false_negatives(start, end, sim)
        n_neg = negatives.sum().float().reshape(1)
        if found is None:
            counts = torch.cat([n_neg.new_zeros(2), n_neg, n_neg.new_zeros(2)])
        else:
            found, fallback = keep_one_negative(negatives, found)
            counts = torch.cat([found.sum(dim=(-1, -2)).float(), n_neg, fallback.sum(-1).float()])
        masks = Masks(self.positive_column[start:end], own, negatives, found, self.candidate_index)
        return masks, counts


def keep_one_negative(
    negatives: torch.Tensor, false_negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows where every negative was detected fall back to the unmasked row, so no anchor is
    left without negatives (which would make the global loss 0/0)."""
    all_filtered = negatives.any(-1) & ~(negatives & ~false_negatives).any(-1)  # (2, b)
    kept = false_negatives & ~all_filtered.unsqueeze(-1)
    return kept, all_filtered
