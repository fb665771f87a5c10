"""False-negative detectors behind one interface.

A detector looks at the similarities of the local anchors to the candidates of the global
batch and says which negatives are false negatives. What to do with them (eliminate or
attract) is the loss's business; how the batch was gathered is the caller's.

Similarities come as a (2, b, B) float tensor: side 0 holds image anchors against all texts,
side 1 text anchors against all images.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from . import comm
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


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q`` quantile of ``values[..., mask]`` with linear interpolation (as
    ``torch.quantile``), for rows with different numbers of valid entries. NaN where a row
    has none. ``values``: (..., b, B); ``mask``: broadcastable bool."""
    mask = mask.expand_as(values)
    width = values.shape[-1]
    count = mask.sum(-1)
    filled = values.masked_fill(~mask, float("-inf"))
    position = q * (count - 1).clamp(min=0)  # among the valid entries, ascending
    low, high = position.floor().long(), position.ceil().long()
    frac = (position - low).to(values.dtype)
    if q >= 0.5:
        # High quantiles (the detectors' case) need only the top of each row: topk, no sort.
        k = min(width, math.ceil((1.0 - q) * (width - 1)) + 2)
        top = filled.topk(k, dim=-1).values  # descending; valid entries first
        low, high = (count - 1 - low).clamp(0, k - 1), (count - 1 - high).clamp(0, k - 1)
        ordered = top
    else:
        ordered = filled.sort(dim=-1).values  # valid entries in the last `count` positions
        low, high = (width - count + low).clamp(0, width - 1), (width - count + high).clamp(
            0, width - 1
        )
    v_low = ordered.gather(-1, low.unsqueeze(-1)).squeeze(-1)
    v_high = ordered.gather(-1, high.unsqueeze(-1)).squeeze(-1)
    result = v_low + frac * (v_high - v_low)
    return torch.where(count > 0, result, torch.full_like(result, float("nan")))


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

    def config_dict(self) -> dict:
        return {"detector": self.name, "mask_start_epoch": self.mask_start_epoch}

    def masking(self, epoch: float) -> bool:
        return epoch >= self.mask_start_epoch


class NoDetector(FalseNegativeDetector):
    """Plain contrastive learning: every other sample is a negative."""

    name = "none"

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        return Detection(None)


class BatchQuantileDetector(FalseNegativeDetector):
    """The FND baseline: negatives above the anchor's in-batch (1 - alpha) quantile."""

    name = "batch_quantile"

    def __init__(self, alpha: float = 1e-3, mask_start_epoch: float = 0.0) -> None:
        super().__init__(mask_start_epoch)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.alpha = alpha

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        if not self.masking(batch.epoch):
            return Detection(None)
        threshold = masked_quantile(sim, batch.negatives, 1.0 - self.alpha)
        found = (sim > threshold.unsqueeze(-1)) & batch.negatives
        return Detection(found, _threshold_stats(threshold))

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


class GloFNDDetector(FalseNegativeDetector):
    """GloFND: a learned threshold per sample and side, keyed by dataset index.

    Each step first updates the thresholds of the batch's anchors (all ranks apply the same
    update from gathered per-anchor gradients, so the state stays identical everywhere), then
    marks the negatives above the updated thresholds.
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
        self.state = ThresholdState(num_samples, device=device, pin_memory=pin_memory)

    @property
    def num_samples(self) -> int:
        return self.state.num_samples

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        cfg = self.config
        updated = self._update(sim, batch) if batch.epoch >= cfg.update_start_epoch else None
        if not self.masking(batch.epoch):
            return Detection(None)
        lam = updated if updated is not None else self.state.lambdas(
            batch.anchor_index, sim.device).t()  # (2, b)
        found = (sim > lam.unsqueeze(-1).to(sim.dtype)) & batch.negatives
        return Detection(found, _threshold_stats(lam))

    @torch.no_grad()
    def _update(self, sim: torch.Tensor, batch: DetectionBatch) -> torch.Tensor:
        """Threshold step for every anchor of the global batch; returns the (2, b) updated
        thresholds of this process's anchors.

        Every rank reads the rows of the whole global batch once (its own anchors are the
        slice at its rank), computes the pinball gradients of its own anchors, all-gathers
        those per-anchor values and applies the same deterministic update.
        """
        cfg = self.config
        distributed = comm.world_size() > 1
        index = batch.candidate_index if distributed else batch.anchor_index
        b = batch.anchor_index.shape[0]
        start = comm.rank() * b if distributed else 0
        rows = self.state.table.gather(index, sim.device)  # (B, 2, 4), read once
        lam = rows[start:start + b, :, LAMBDA].t().to(sim.dtype)  # (2, b)
        negatives = batch.negatives
        count = negatives.sum(-1).clamp(min=1).to(sim.dtype)  # (b,)
        above = ((sim > lam.unsqueeze(-1)) & negatives).sum(-1)
        grad = cfg.alpha - above.to(sim.dtype) / count  # (2, b)
        # Anchors without any negative carry no information: zero gradient.
        grad = torch.where(negatives.any(-1), grad, torch.zeros_like(grad))
        values = [grad]
        if cfg.init_quantile:
            q = masked_quantile(sim, negatives, 1.0 - cfg.alpha)
            values.append(torch.where(torch.isnan(q), lam, q))
        local = torch.cat(values, dim=0).t().to(torch.float32)  # (b, 2 or 4)
        # Every rank gets every anchor's values (O(global batch)) and applies the same update.
        gathered = segment_mean(index, comm.all_gather_no_grad(local.contiguous()))
        quantile = gathered[:, 2:4] if cfg.init_quantile else None
        rows = self.state.apply_update(index, gathered[:, :2], quantile, cfg, batch.epoch, rows)
        return rows[start:start + b, :, LAMBDA].t().to(sim.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state.load_state_dict(state)

    def to(self, device: torch.device | str) -> GloFNDDetector:
        self.state.to(device)
        return self

    def config_dict(self) -> dict:
        cfg = self.config
        return {
            "detector": self.name, "num_samples": self.num_samples, "alpha": cfg.alpha,
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
            "clip_grad_mult": cfg.clip_grad_mult, "init_quantile": cfg.init_quantile,
            "update_start_epoch": cfg.update_start_epoch, "mask_start_epoch": cfg.mask_start_epoch,
            "bias_correction": cfg.bias_correction,
        }


def _threshold_stats(threshold: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and a few percentiles of the (2, b) thresholds of this batch's anchors.

    Over the b local anchors only (never over N), on the device: no synchronisation.
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


DetectorFactory = Callable[..., FalseNegativeDetector]
_REGISTRY: dict[str, DetectorFactory] = {}


def register_detector(name: str) -> Callable[[DetectorFactory], DetectorFactory]:
    """Register a factory ``f(*, num_samples, config, device, pin_memory, options) -> detector``."""

    def decorate(factory: DetectorFactory) -> DetectorFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_detectors() -> list[str]:
    return sorted(_REGISTRY)


def build_detector(
    name: str,
    *,
    num_samples: int | None = None,
    config: GloFNDConfig | None = None,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
    options: Mapping[str, Any] | None = None,
) -> FalseNegativeDetector:
    """Detector by name; ``config`` carries alpha and the start epochs for every detector,
    ``options`` the settings of one detector (e.g. IFND's clustering)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown detector {name!r}; choose from {available_detectors()}")
    return _REGISTRY[name](
        num_samples=num_samples, config=config or GloFNDConfig(), device=device,
        pin_memory=pin_memory, options=dict(options or {}),
    )


@register_detector("none")
def _build_none(**_: object) -> FalseNegativeDetector:
    return NoDetector()


@register_detector("batch_quantile")
def _build_batch_quantile(*, config: GloFNDConfig, **_: object) -> FalseNegativeDetector:
    return BatchQuantileDetector(config.alpha, config.mask_start_epoch)


@register_detector("oracle")
def _build_oracle(*, config: GloFNDConfig, **_: object) -> FalseNegativeDetector:
    return OracleDetector(config.mask_start_epoch)


@register_detector("glofnd")
def _build_glofnd(
    *, num_samples: int | None, config: GloFNDConfig, device, pin_memory: bool, **_: object
) -> FalseNegativeDetector:
    if num_samples is None:
        raise ValueError("the glofnd detector needs num_samples (the size of the index space)")
    return GloFNDDetector(num_samples, config, device=device, pin_memory=pin_memory)
