"""The baselines behind the detector interface: no detection, the in-batch quantile (FND)
and the label oracle, each registered next to its class."""

from __future__ import annotations

import torch

from . import comm
from .interface import (
    SIDES,
    Detection,
    DetectionBatch,
    FalseNegativeDetector,
    RowDetection,
    RowwiseDetector,
    nothing_found,
    threshold_summary,
)
from .quantiles import masked_quantile
from .registry import DetectorSpec, register

_NO_SIMILARITIES = torch.empty(0)
"""What detectors that decide from indices or labels alone get for similarities."""


class NoDetector(RowwiseDetector):
    """Plain contrastive learning: every other sample is a negative."""

    name = "none"

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        return RowDetection(nothing_found)


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
            return RowDetection(nothing_found)
        q = 1.0 - self.alpha
        threshold = torch.cat(
            [masked_quantile(rows(s, e), batch.negatives[s:e], q) for s, e in bounds], dim=-1
        )  # (2, b)

        def found(start: int, end: int, sim: torch.Tensor) -> torch.Tensor:
            return (sim > threshold[:, start:end, None]) & batch.negatives[start:end]

        # The statistics cover the global batch's anchors: gather the (2, b) thresholds.
        everyone = comm.all_gather_no_grad(threshold.t().contiguous()).t()
        return RowDetection(found, threshold_summary(everyone))

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
