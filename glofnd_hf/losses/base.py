"""The part every bimodal contrastive loss shares: checks, gathering, similarities, masks.

A loss sees the local anchors of this process against the candidates of the global batch
(gathered with gradients, rank after rank), asks its detector for false negatives, and turns
the masks into a loss. Subclasses implement only ``_loss``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..fnd import comm
from ..fnd.detectors import DetectionBatch, FalseNegativeDetector, NoDetector, RowDetection
from ..fnd.interface import SIDES
from ..fnd.table import StateError, gather_together
from .masks import Masks, StepMasks, Strategy
from .rows import RowSimilarities, chunk_bounds

__all__ = ["BimodalContrastiveLoss", "LossOutput", "Masks", "Strategy"]


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """0-d tensors on the loss's device; reading them (``.item()``) is left to the logger."""


class BimodalContrastiveLoss(ABC):
    """Base of the CLIP, global contrastive and sigmoid losses.

    Call it with L2-normalisable embeddings of this process's pairs, the (exponentiated)
    logit scale, the pairs' dataset indices and the current (fractional) epoch. A loss that
    sets ``uses_logit_bias`` (the sigmoid loss) also needs the model's ``logit_bias``; the
    others ignore one.
    """

    uses_logit_bias: ClassVar[bool] = False
    keeps_anchor_state: ClassVar[bool] = False
    """Whether ``_anchor_values`` and ``_update_anchor_state`` are implemented (per-sample
    state that the loss updates from each anchor, like the global loss's u)."""

    def __init__(
        self,
        detector: FalseNegativeDetector | None = None,
        strategy: Strategy = "eliminate",
        check_inputs: bool = True,
    ) -> None:
        if strategy not in ("eliminate", "attract"):
            raise ValueError(f"strategy must be 'eliminate' or 'attract', got {strategy!r}")
        self.detector = detector if detector is not None else NoDetector()
        self.strategy: Strategy = strategy
        self.check_inputs = check_inputs

    # -- what subclasses provide ---------------------------------------------------------
    @abstractmethod
    def _loss(
        self,
        sim: torch.Tensor,
        logit_scale: torch.Tensor,
        masks: Masks,
        epoch: float,
    ) -> LossOutput:
        """Loss from (2, b, B) similarities (with gradient) and the step's masks, a mean over
        the b anchors. A loss with ``uses_logit_bias`` also gets ``logit_bias=`` (0-d, with
        gradient); one that ``keeps_anchor_state`` may get ``anchor_state=`` (see
        ``_anchor_values``).
        """

    def _anchor_values(
        self, sim: torch.Tensor, logit_scale: torch.Tensor, masks: Masks
    ) -> torch.Tensor:
        """(2, b) per-anchor values, without gradient, that a loss with
        ``keeps_anchor_state`` folds into its per-sample state before its loss (the global
        loss's g).

        When the loss is computed in row chunks, these are computed for every chunk first,
        ``_update_anchor_state`` folds them in once, and each chunk's ``_loss`` gets its
        rows of the result as ``anchor_state``; without ``anchor_state`` ``_loss`` updates
        the state itself."""
        raise NotImplementedError(f"{type(self).__name__} keeps no per-anchor state")

    def _update_anchor_state(
        self, values: torch.Tensor, candidate_index: torch.Tensor, epoch: float
    ) -> torch.Tensor:
        """Fold the (2, b) ``values`` of this process's anchors into the per-sample state
        (once per global batch) and return what ``_loss`` reads of it for those anchors."""
        raise NotImplementedError(f"{type(self).__name__} keeps no per-anchor state")

    def _objective(
        self, sim: torch.Tensor, logit_scale: torch.Tensor, masks: Masks, **logit_bias
    ) -> LossOutput:
        """The loss of one batch that reads and writes no per-sample state (``evaluate``).
        Default: ``_loss``, right for losses that keep none; stateful losses override it."""
        return self._loss(sim, logit_scale, masks, 0.0, **logit_bias)

    @property
    def num_samples(self) -> int | None:
        """Size of the index space of any per-sample state (loss or detector)."""
        return self.detector.num_samples

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"detector.{k}": v for k, v in self.detector.state_dict().items()}

    def shard_tables(self) -> dict:
        """The per-sample tables of the loss and its detector by name (``detector.*``), for
        per-process checkpoints (``glofnd_hf.state_shards``); a detector without
        ``shard_tables`` has none."""
        tables = getattr(self.detector, "shard_tables", None)
        return {} if tables is None else {f"detector.{k}": v for k, v in tables().items()}

    def _tables_read_per_step(self) -> list:
        """The per-sample tables a step reads at the global batch's indices (before writing
        any): the detector's ``tables_read_per_step``, where it has one."""
        tables = getattr(self.detector, "tables_read_per_step", None)
        return [] if tables is None else list(tables())

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        """Raise ``StateError`` (naming the entry) unless stored ``rows`` of the table
        ``name`` of :meth:`shard_tables` hold valid values."""
        prefix = "detector."
        check = getattr(self.detector, "check_shard_rows", None)
        if not name.startswith(prefix) or check is None:
            raise ValueError(f"unexpected per-sample table {name!r}")
        try:
            check(name[len(prefix) :], rows)
        except StateError as err:
            raise err.within(prefix) from err

    def shard_extras(self) -> dict[str, torch.Tensor]:
        """The detector's state that is not per sample, stored with every shard of a
        per-process checkpoint (``detector.*``; IFND's schedule), none for most."""
        extras = getattr(self.detector, "shard_extras", None)
        return {} if extras is None else {f"detector.{k}": v for k, v in extras().items()}

    def load_shard_extras(self, extras: dict[str, torch.Tensor]) -> None:
        """Take a checkpoint's :meth:`shard_extras` (checked first; before the tables)."""
        prefix = "detector."
        load = getattr(self.detector, "load_shard_extras", None)
        unknown = [k for k in extras if not k.startswith(prefix) or load is None]
        if unknown:
            raise ValueError(f"unexpected shard entries {unknown}")
        if load is not None:
            load({k[len(prefix) :]: v for k, v in extras.items()})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "detector."
        unknown = [k for k in state if not k.startswith(prefix)]
        if unknown:
            raise ValueError(f"unexpected loss state keys {unknown}")
        try:
            self.detector.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})
        except StateError as err:  # name the entry as it is stored
            raise err.within(prefix) from err

    def to(self, device: torch.device | str) -> BimodalContrastiveLoss:
        self.detector.to(device)
        return self

    def finish_epoch(self) -> dict[str, float]:
        """Close the current epoch: its summary statistics (the detector's tracking health),
        global over ranks. Call it on every rank at the end of each epoch."""
        return self.detector.finish_epoch()

    def config_dict(self) -> dict:
        return {
            "loss": type(self).__name__,
            "strategy": self.strategy,
            **self.detector.config_dict(),
        }

    # -- the shared pipeline -------------------------------------------------------------
    def __call__(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float,
        index: torch.Tensor | None = None,
        epoch: float = 0.0,
        labels: torch.Tensor | None = None,
        logit_bias: torch.Tensor | float | None = None,
    ) -> LossOutput:
        logit_scale = torch.as_tensor(logit_scale, device=image_embeds.device)
        self._check_shapes(image_embeds, text_embeds, logit_scale, index, labels)
        dtype = torch.promote_types(image_embeds.dtype, torch.float32)
        bias = self._bias_argument(logit_bias, image_embeds.device, dtype)
        # Similarities and every threshold comparison in float32 (float64 if given),
        # whatever autocast does around us.
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            image, text, sim = self._similarities(image_embeds, text_embeds, dtype)
            if self.check_inputs:
                self._check_values(image_embeds, text_embeds, logit_scale, index, sim)
            step = self._start_step(image, text, sim.shape[2], index, epoch, labels)
            b = sim.shape[1]
            detection = self.detector.detect_rows(lambda s, e: sim[:, s:e], [(0, b)], step.batch)
            masks, counts = step.masks(0, b, sim, detection)
            out = self._loss(sim, logit_scale.to(dtype), masks, epoch, **bias)
        # Every statistic is one of the global batch, the same on every rank: the loss's
        # local means and the mask counts cross ranks together (one small all-reduce), the
        # detector's are global already.
        out.stats = self._global_stats(out.stats, counts, masks.false_negatives is not None)
        out.stats.update(detection.stats)
        return out

    def backward_by_rows(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor | None = None,
        epoch: float = 0.0,
        labels: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        *,
        rows_per_chunk: int,
    ) -> LossOutput:
        """The loss of the batch and its backward, ``rows_per_chunk`` local anchors at a time.

        The same value, statistics, per-sample state and gradients as calling the loss and
        back-propagating it (to float rounding), but the (2, b, B) similarities and masks are
        never held whole: each row chunk's are computed, used and freed (the cached loss's
        memory floor). The detector reads the rows chunk by chunk and updates its state once;
        a loss with per-sample state (the global loss) folds in all anchors' values once
        before the chunks' losses. Gradients accumulate into the inputs' ``.grad`` (or flow
        on into whatever computed them); the returned loss is detached.
        """
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
        logit_scale = torch.as_tensor(logit_scale, device=image_embeds.device)
        self._check_shapes(image_embeds, text_embeds, logit_scale, index, labels)
        dtype = torch.promote_types(image_embeds.dtype, torch.float32)
        bias = self._bias_argument(logit_bias, image_embeds.device, dtype)
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            if self.check_inputs:
                self._check_values(image_embeds, text_embeds, logit_scale, index)
            rows = RowSimilarities(image_embeds, text_embeds, dtype)
            scale = rows.leaf(logit_scale.to(dtype))
            bias_leaf = {k: rows.leaf(v) for k, v in bias.items()}
            step = self._start_step(rows.image, rows.text, rows.width, index, epoch, labels)
            b = image_embeds.shape[0]
            bounds = chunk_bounds(b, rows_per_chunk)
            with torch.no_grad():
                detection = self.detector.detect_rows(rows, bounds, step.batch)
            extra = {}
            state = self._chunked_anchor_state(rows, bounds, step, detection, scale, epoch)
            total: dict[str, torch.Tensor] = {}
            loss_value = torch.zeros((), dtype=dtype, device=image_embeds.device)
            counts, detected = None, False
            for s, e in bounds:
                sim = rows(s, e)
                masks, chunk_counts = step.masks(s, e, sim, detection)
                if state is not None:
                    extra = {"anchor_state": state[:, s:e]}
                out = self._loss(sim, scale, masks, epoch, **bias_leaf, **extra)
                weight = (e - s) / b  # each chunk's loss is a mean over its anchors
                if out.loss.requires_grad:
                    (out.loss * weight).backward()
                loss_value += out.loss.detach() * weight
                for k, v in out.stats.items():
                    total[k] = total.get(k, 0.0) + v.detach() * weight
                counts = chunk_counts if counts is None else counts + chunk_counts
                detected = masks.false_negatives is not None
                del sim, masks, out
            rows.backward()
        stats = self._global_stats(total, counts, detected)
        stats.update(detection.stats)
        return LossOutput(loss_value, stats)

    def _chunked_anchor_state(
        self,
        rows: RowSimilarities,
        bounds: Sequence[tuple[int, int]],
        step: StepMasks,
        detection: RowDetection,
        logit_scale: torch.Tensor,
        epoch: float,
    ) -> torch.Tensor | None:
        """A stateful loss's per-anchor state, updated once from every chunk's values."""
        if not self.keeps_anchor_state:
            return None
        parts = []
        with torch.no_grad():
            for s, e in bounds:
                sim = rows(s, e)
                masks, _ = step.masks(s, e, sim, detection)
                parts.append(self._anchor_values(sim, logit_scale, masks))
            return self._update_anchor_state(torch.cat(parts, dim=1), step.candidate_index, epoch)

    @torch.no_grad()
    def evaluate(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float,
        index: torch.Tensor | None = None,
        logit_bias: torch.Tensor | float | None = None,
    ) -> LossOutput:
        """The loss on a batch of another split (``eval_loss``), touching no per-sample state.

        No detector runs (its state is keyed by training indices and must not move), and a
        global loss estimates its objective from the batch alone instead of reading u.
        ``index`` only tells duplicates of a pair apart; it is not checked against N.
        """
        logit_scale = torch.as_tensor(logit_scale, device=image_embeds.device)
        self._check_embeddings(image_embeds, text_embeds, logit_scale)
        dtype = torch.promote_types(image_embeds.dtype, torch.float32)
        bias = self._bias_argument(logit_bias, image_embeds.device, dtype)
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            image, text, sim = self._similarities(image_embeds, text_embeds, dtype)
            step = self._start_step(image, text, sim.shape[2], index, 0.0, None, observe=False)
            masks, _ = step.masks(0, sim.shape[1], sim, None)
            return self._objective(sim, logit_scale.to(dtype), masks, **bias)

    def _bias_argument(
        self, logit_bias: torch.Tensor | float | None, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """``{"logit_bias": 0-d tensor}`` for a loss that uses one, else ``{}``."""
        if not self.uses_logit_bias:
            return {}
        if logit_bias is None:
            raise ValueError(
                f"{type(self).__name__} needs the model's logit_bias (a SigLIP-style model)"
            )
        bias = torch.as_tensor(logit_bias, device=device)
        if bias.numel() != 1:
            raise ValueError(f"logit_bias must be a scalar, got shape {tuple(bias.shape)}")
        return {"logit_bias": bias.reshape(()).to(dtype)}

    @staticmethod
    def _similarities(
        image_embeds: torch.Tensor, text_embeds: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised local embeddings and the (2, b, B) similarities to the global batch."""
        image = F.normalize(image_embeds.to(dtype), dim=-1)
        text = F.normalize(text_embeds.to(dtype), dim=-1)
        if comm.world_size() == 1:
            # One matmul: the text side is the transpose of the image side.
            image_side = image @ text.t()
            return image, text, torch.stack([image_side, image_side.t()])  # (2, b, B)
        all_image = comm.all_gather_with_grad(image)
        all_text = comm.all_gather_with_grad(text)
        return image, text, torch.stack([image @ all_text.t(), text @ all_image.t()])

    def _start_step(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        width: int,
        index: torch.Tensor | None,
        epoch: float,
        labels: torch.Tensor | None,
        observe: bool = True,
    ) -> StepMasks:
        """What the detector may know of the batch besides similarities, and (``observe``)
        the normalised local embeddings shown to it (feature-bank detectors keep them)."""
        b, device = image.shape[0], image.device
        positive_column = comm.rank() * b + torch.arange(b, device=device)
        if index is None:
            anchor_index = candidate_index = None
            negatives = torch.ones(b, width, dtype=torch.bool, device=device)
            negatives[torch.arange(b, device=device), positive_column] = False
        else:
            anchor_index = index.to(device)
            candidate_index = comm.all_gather_no_grad(anchor_index)
            # A candidate with the anchor's own index (its pair, or a duplicate of it) is
            # neither a negative nor a false negative.
            negatives = candidate_index.unsqueeze(0) != anchor_index.unsqueeze(1)
            if observe:
                self.detector.observe(anchor_index, image.detach(), text.detach())
            # Sharded state: the step's reads of its per-sample tables in one collective.
            gather_together(self._tables_read_per_step(), candidate_index, device)
        candidate_labels = None if labels is None else comm.all_gather_no_grad(labels.to(device))
        batch = DetectionBatch(
            anchor_index=anchor_index,
            candidate_index=candidate_index,
            negatives=negatives,
            epoch=float(epoch),
            anchor_labels=None if labels is None else labels.to(device),
            candidate_labels=candidate_labels,
        )
        return StepMasks(batch, positive_column, candidate_index)

    @staticmethod
    def _global_stats(
        loss_stats: dict[str, torch.Tensor], counts: torch.Tensor, detected: bool
    ) -> dict[str, torch.Tensor]:
        """The loss's statistics (means over this process's anchors) as means over the global
        batch, and the mask statistics over the global batch from the step's ``counts``
        (``StepMasks.masks``): ``filtered_fraction_<side>`` (detected false negatives / negatives,
        global totals) and, when ``detected`` (the detector marked false negatives),
        ``all_filtered_anchors_<side>`` (anchors whose negatives were all detected, counted
        over the global batch). One all-reduce of a few numbers when distributed, none alone.
        """
        device = counts.device
        names = list(loss_stats)
        parts = [
            torch.as_tensor(v, device=device).detach().float().reshape(())
            for v in loss_stats.values()
        ]
        values = torch.cat([torch.stack(parts), counts]) if parts else counts
        world = comm.world_size()
        if world > 1:
            values = comm.all_reduce_sum(values)
            # Every rank holds b anchors: the mean of the ranks' means is the global mean.
            values[: len(names)] /= world
        stats = dict(zip(names, values[: len(names)].unbind(), strict=True))
        n_sides = len(SIDES)
        counts = values[len(names) :]
        n_neg = counts[n_sides].clamp(min=1)
        for s, side in enumerate(SIDES):
            stats[f"filtered_fraction_{side}"] = counts[s] / n_neg
            if detected:
                stats[f"all_filtered_anchors_{side}"] = counts[n_sides + 1 + s]
        return stats

    # -- input checks --------------------------------------------------------------------
    def _check_shapes(self, image, text, logit_scale, index, labels) -> None:
        self._check_embeddings(image, text, logit_scale)
        needs_index = self.num_samples is not None
        if index is None and needs_index:
            raise ValueError(f"{type(self).__name__} keeps per-sample state: pass dataset indices")
        if index is not None:
            if index.dim() != 1 or index.shape[0] != image.shape[0]:
                raise ValueError(
                    f"index must have shape ({image.shape[0]},) (one dataset index per pair), "
                    f"got {tuple(index.shape)}"
                )
            if index.dtype.is_floating_point or index.dtype == torch.bool:
                raise ValueError(f"index must be an integer tensor, got {index.dtype}")
        if labels is not None and (labels.dim() != 1 or labels.shape[0] != image.shape[0]):
            raise ValueError(
                f"labels must have shape ({image.shape[0]},), got {tuple(labels.shape)}"
            )
        if self.detector.requires_labels and labels is None:
            raise ValueError(f"detector {self.detector.name!r} needs labels for every pair")

    @staticmethod
    def _check_embeddings(image, text, logit_scale) -> None:
        if image.dim() != 2 or text.dim() != 2:
            raise ValueError(
                f"embeddings must be 2-D (batch, dim); got image {tuple(image.shape)} and "
                f"text {tuple(text.shape)}"
            )
        if image.shape != text.shape:
            raise ValueError(
                f"image and text embeddings must have the same shape (batch size and dim); got "
                f"{tuple(image.shape)} and {tuple(text.shape)}"
            )
        if image.shape[0] == 0:
            raise ValueError("empty batch")
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")

    def _check_values(self, image, text, logit_scale, index, sim=None) -> None:
        """One combined check, one host synchronisation, before any state is touched.
        Without ``sim`` (row chunks) the similarities are finite if the embeddings are."""
        flags = [
            ~torch.isfinite(image).all(),
            ~torch.isfinite(text).all(),
            ~torch.isfinite(logit_scale).all(),
            torch.zeros((), dtype=torch.bool, device=image.device)
            if sim is None
            else ~torch.isfinite(sim).all(),
        ]
        n = self.num_samples
        if index is not None and n is not None:
            flags.append(((index < 0) | (index >= n)).any().to(image.device))
        bad = torch.stack(flags).tolist()
        names = ["image embeddings", "text embeddings", "logit_scale", "similarities"]
        for name, is_bad in zip(names, bad[:4], strict=True):
            if is_bad:
                raise ValueError(f"non-finite values in the {name}")
        if len(bad) > 4 and bad[4]:
            lo, hi = int(index.min()), int(index.max())
            raise ValueError(
                f"dataset index out of range [0, {n}): batch holds indices from {lo} to {hi}; "
                f"num_samples must exceed the largest dataset index"
            )
