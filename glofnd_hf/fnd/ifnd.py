"""IFND: incremental false-negative detection by clustering (Chen et al., arXiv 2106.03719).

The baseline the GloFND paper compares with. Every ``cluster_every`` epochs the embeddings of
the whole data set are clustered with k-means at one or several granularities; each sample
gets a pseudo-label and a confidence per granularity. Only the most confident fraction of the
samples is *accepted*, and that fraction grows linearly from 0 to 1 over
``accept_warmup_epochs`` (the "incremental" part: trust the clustering more as the embedding
space gets more semantic). Two samples that are both accepted and share a pseudo-label are
false negatives of each other.

How this implementation is put together (and where it departs from the paper):

* **Feature bank.** The detector sees similarities only, so it keeps its own bank of
  L2-normalised embeddings keyed by dataset index, refreshed from the training forward passes
  through :meth:`IFNDDetector.observe` (which the loss calls with the step's embeddings). The
  paper re-embeds the data set before each clustering round; the bank instead holds each
  sample's embedding from its latest visit, so a round costs no extra forward pass but sees
  features up to one epoch old. By default a sample is represented by the normalised mean of
  its image and text embeddings (``features="mean"``): one pseudo-label per *pair*, used for
  both anchor sides. ``"image"``, ``"text"`` or ``"concat"`` (both, each scaled by 1/sqrt 2,
  so the inner product is the mean of the two cosines; twice the memory) are the options.
  Memory: N x D x 2 bytes in float16 (D x 4 in float32), plus 8 bytes per sample and
  granularity for labels and acceptance ranks.
* **Clustering round.** scikit-learn's ``KMeans`` (``MiniBatchKMeans`` above
  ``minibatch_threshold`` samples) on the samples seen so far; the cost is
  O(N x k x D x iterations), linear in N. Samples are then assigned to the nearest final
  centroid in torch; the confidence is the cosine similarity to the assigned centroid
  (``confidence="centroid"``) or the gap between the distances to the second-nearest and the
  nearest centroid (``"margin"``). The round runs on rank 0 and its result is broadcast, so
  every rank holds the same labels; the bank is the same on every rank because ``observe``
  gathers the (index, embedding) pairs of the global batch.
* **Acceptance.** At the end of a round every sample gets an acceptance rank in (0, 1]: its
  position in the confidence order (most confident first) divided by the number ranked, over
  the whole data set (``accept_scope="global"``) or within its own cluster (``"cluster"``:
  every cluster contributes the same fraction). A sample is accepted at epoch e when its rank
  is at most ``accept_fraction(e) = clamp((e - start_epoch) / accept_warmup_epochs, 0, 1)``, so
  the accepted set grows with every step, between rounds too, at O(batch) cost.
* **Several granularities.** ``combine="all"`` (default): a pair is a false negative when both
  samples are accepted and share the pseudo-label at every granularity (the intersection,
  precision first). ``"any"``: at some granularity (the union, recall first).
* **Schedule.** Rounds happen on the grid ``start_epoch + r * cluster_every``, once the bank
  has been filled for ``bank_warmup_epochs`` (default one epoch: every sample seen once).
  Masking starts with the first round (acceptance 0 at ``start_epoch``, so the first
  detections come a little after it).

Per step the detector costs O(b x B) (label comparisons) plus O(B x D) bank writes; the O(N)
work happens only in the rounds, whose wall time is reported as ``ifnd_cluster_seconds``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from . import comm
from .clustering import (
    acceptance_rank,
    assign_to_centers,
    broadcast_from_first_rank,
    kmeans_centers,
)
from .ifnd_config import BANK_DTYPES, IFNDConfig
from .interface import SIDES, Detection, DetectionBatch, FalseNegativeDetector, RowDetection
from .registry import DetectorSpec, SharedSettings, register
from .table import COUNT, NON_NEGATIVE, StateError, ValueRange, check_state_tensor, segment_mean

logger = logging.getLogger(__name__)


class IFNDDetector(FalseNegativeDetector):
    """False negatives = accepted samples sharing a k-means pseudo-label (IFND)."""

    name = "ifnd"

    def __init__(
        self,
        num_samples: int,
        config: IFNDConfig | None = None,
        alpha: float | None = None,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> None:
        config = config or IFNDConfig()
        if num_samples is None or int(num_samples) <= 0:
            raise ValueError(f"ifnd needs a positive num_samples, got {num_samples}")
        num_clusters = config.num_clusters
        if not num_clusters:
            if alpha is None:
                raise ValueError("set IFNDConfig.num_clusters, or pass alpha to derive k = 1/alpha")
            num_clusters = (max(2, round(1.0 / alpha)),)
        start = 0.0 if config.start_epoch is None else float(config.start_epoch)
        super().__init__(start)
        self.config = config
        self.seed = 0 if config.seed is None else int(config.seed)
        self.num_clusters = tuple(num_clusters)
        self.start_epoch = start
        self._num_samples = int(num_samples)
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self.dtype = BANK_DTYPES[config.bank_dtype]
        g, n = len(self.num_clusters), self._num_samples
        self.bank: torch.Tensor | None = None  # (N, D), allocated on the first observe
        self.seen = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.labels = torch.full((g, n), -1, dtype=torch.int32, device=self.device)
        self.confidence = torch.full((g, n), float("nan"), dtype=torch.float32, device=self.device)
        self.accept_rank = torch.full((g, n), math.inf, dtype=torch.float32, device=self.device)
        self.last_round_epoch = math.nan
        self.first_epoch = math.nan  # epoch of the first step with an observed bank
        self.rounds = 0
        self.round_seconds = 0.0
        self._observed = False

    # -- the interface ----------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._num_samples

    def accept_fraction(self, epoch: float) -> float:
        """Fraction of the most confident samples accepted at ``epoch`` (0 before the start)."""
        if epoch < self.start_epoch:
            return 0.0
        warmup = self.config.accept_warmup_epochs
        if warmup == 0:
            return 1.0
        return float(min(1.0, max(0.0, (epoch - self.start_epoch) / warmup)))

    @torch.no_grad()
    def observe(
        self, index: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> None:
        """Write this process's embeddings into the bank (gathered over ranks, so every rank
        keeps the same bank). Call it once per training step, before ``detect``."""
        if (
            index.dim() != 1
            or image_embeds.shape[0] != index.shape[0]
            or (image_embeds.shape != text_embeds.shape)
        ):
            raise ValueError(
                f"observe needs index (b,) and two (b, D) embeddings, got {tuple(index.shape)}, "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        feats = self._features(image_embeds.detach().float(), text_embeds.detach().float())
        # Gathered on the embeddings' device (NCCL needs accelerator tensors).
        index = index.detach().to(feats.device, torch.long)
        index = comm.all_gather_no_grad(index.contiguous())
        feats = comm.all_gather_no_grad(feats.contiguous())
        if self.bank is None:
            self.bank = torch.zeros(
                self._num_samples, feats.shape[1], dtype=self.dtype, device=self.device
            )
            if self.pin_memory and self.device.type == "cpu" and torch.cuda.is_available():
                self.bank = self.bank.pin_memory()
        elif feats.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"embedding width changed: bank holds {self.bank.shape[1]}, got {feats.shape[1]}"
            )
        # Duplicated indices in one batch get their mean, written identically by every copy.
        feats = F.normalize(segment_mean(index, feats), dim=-1)
        target = index.to(self.device)
        self.bank.index_copy_(0, target, feats.to(self.device, self.dtype))
        self.seen[target] = True
        self._observed = True

    def detect(self, sim: torch.Tensor, batch: DetectionBatch) -> Detection:
        return self._detect(batch, batch.negatives.device)

    def detect_rows(self, rows, bounds, batch) -> RowDetection:
        # Pseudo-labels decide, not similarities: nothing to read row by row.
        return RowDetection.whole(self._detect(batch, batch.negatives.device))

    @torch.no_grad()
    def _detect(self, batch: DetectionBatch, device: torch.device) -> Detection:
        if batch.anchor_index is None or batch.candidate_index is None:
            raise ValueError("the ifnd detector needs the dataset indices of the batch")
        epoch = float(batch.epoch)
        if self._observed and math.isnan(self.first_epoch):
            self.first_epoch = epoch
        if epoch >= self.start_epoch and not self._observed and self.rounds == 0:
            raise RuntimeError(
                "the ifnd detector has not observed any embeddings: the loss must call "
                "detector.observe(index, image_embeds, text_embeds) every training step"
            )
        if self._round_due(epoch):
            self._cluster(epoch)
        frac = self.accept_fraction(epoch)
        stats = self._stats(frac, device)
        if not self.masking(epoch) or self.rounds == 0 or frac <= 0.0:
            return Detection(None, stats)
        found = self._same_accepted_label(batch.anchor_index, batch.candidate_index, frac)
        found = found.to(device) & batch.negatives
        # Over the global batch's anchors (the tables are the same on every rank).
        accepted = self._accepted(batch.candidate_index, frac)
        stats["ifnd_accepted_anchors"] = accepted.float().mean()
        return Detection(found.unsqueeze(0).expand(len(SIDES), -1, -1), stats)

    # -- pieces ------------------------------------------------------------------------------
    def _features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        mode = self.config.features
        if mode == "image":
            return image
        if mode == "text":
            return text
        if mode == "concat":
            return torch.cat([image, text], dim=-1) / math.sqrt(2.0)
        return F.normalize(image + text, dim=-1)

    def _slot(self, epoch: float) -> int:
        return math.floor((epoch - self.start_epoch) / self.config.cluster_every + 1e-9)

    def _round_due(self, epoch: float) -> bool:
        if epoch < self.start_epoch or not self._observed or math.isnan(self.first_epoch):
            return False
        if epoch < self.first_epoch + self.config.bank_warmup_epochs - 1e-9:
            return False
        if self.rounds == 0 or math.isnan(self.last_round_epoch):
            return True
        return self._slot(epoch) > self._slot(self.last_round_epoch)

    def _lookup(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(G, len(index)) rows of a (G, N) table, on the device of ``index``."""
        return table.index_select(1, index.to(table.device)).to(index.device)

    def _accepted(self, index: torch.Tensor, frac: float) -> torch.Tensor:
        """(len(index),) accepted at every granularity ("all") or at some ("any")."""
        ok = self._lookup(self.accept_rank, index) <= frac
        return ok.all(0) if self.config.combine == "all" else ok.any(0)

    def _same_accepted_label(
        self, anchor_index: torch.Tensor, candidate_index: torch.Tensor, frac: float
    ) -> torch.Tensor:
        """(b, B) bool: accepted pairs sharing the pseudo-label (all / any granularity)."""
        la, lc = self._lookup(self.labels, anchor_index), self._lookup(self.labels, candidate_index)
        aa = self._lookup(self.accept_rank, anchor_index) <= frac
        ac = self._lookup(self.accept_rank, candidate_index) <= frac
        result = None
        for g in range(len(self.num_clusters)):
            same = (
                (la[g].unsqueeze(1) == lc[g].unsqueeze(0)) & aa[g].unsqueeze(1) & ac[g].unsqueeze(0)
            )
            if result is None:
                result = same
            elif self.config.combine == "all":
                result = result & same
            else:
                result = result | same
        return result

    def _stats(self, frac: float, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "ifnd_accept_fraction": torch.tensor(frac, device=device),
            "ifnd_rounds": torch.tensor(float(self.rounds), device=device),
            "ifnd_cluster_seconds": torch.tensor(self.round_seconds, device=device),
        }

    # -- the clustering round ----------------------------------------------------------------
    @torch.no_grad()
    def _cluster(self, epoch: float) -> None:
        start = time.perf_counter()
        g, n = len(self.num_clusters), self._num_samples
        if comm.rank() == 0:
            labels, confidence, rank = self._cluster_local()
        else:
            labels = torch.empty(g, n, dtype=torch.int32)
            confidence = torch.empty(g, n, dtype=torch.float32)
            rank = torch.empty(g, n, dtype=torch.float32)
        if comm.world_size() > 1:
            labels, confidence, rank = (
                broadcast_from_first_rank(t) for t in (labels, confidence, rank)
            )
        self.labels = labels.to(self.device)
        self.confidence = confidence.to(self.device)
        self.accept_rank = rank.to(self.device)
        self.rounds += 1
        self.last_round_epoch = float(epoch)
        self.round_seconds = time.perf_counter() - start
        logger.info(
            "ifnd: clustering round %d at epoch %.3f over %d samples (k=%s) took %.2f s",
            self.rounds,
            epoch,
            int(self.seen.sum()),
            list(self.num_clusters),
            self.round_seconds,
        )

    def _cluster_local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k-means of the seen part of the bank at every granularity (on the host)."""
        g, n = len(self.num_clusters), self._num_samples
        labels = torch.full((g, n), -1, dtype=torch.int32)
        confidence = torch.full((g, n), float("nan"), dtype=torch.float32)
        rank = torch.full((g, n), math.inf, dtype=torch.float32)
        members = self.seen.nonzero().squeeze(1).cpu()
        if members.numel() < 2:
            return labels, confidence, rank
        x = self.bank.index_select(0, members.to(self.bank.device)).float().cpu()
        x = F.normalize(x, dim=-1)
        x_np = x.numpy()
        for level, k in enumerate(self.num_clusters):
            k_eff = min(k, members.numel())
            if k_eff < k:
                logger.warning(
                    "ifnd: only %d samples seen, clustering with k=%d instead of %d",
                    members.numel(),
                    k_eff,
                    k,
                )
            seed = self.seed + 7919 * self.rounds + level
            centers = kmeans_centers(x_np, k_eff, seed, self.config)
            lab, conf = assign_to_centers(
                x, torch.from_numpy(centers).float(), self.config.confidence
            )
            labels[level, members] = lab.to(torch.int32)
            confidence[level, members] = conf
            rank[level, members] = acceptance_rank(lab, conf, self.config.accept_scope)
        return labels, confidence, rank

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        bank = (
            self.bank
            if self.bank is not None
            else torch.zeros(self._num_samples, 0, dtype=self.dtype)
        )
        return {
            "bank": bank.detach().cpu().clone(),
            "seen": self.seen.cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "confidence": self.confidence.cpu().clone(),
            "accept_rank": self.accept_rank.cpu().clone(),
            "num_clusters": torch.tensor(self.num_clusters, dtype=torch.int64),
            "last_round_epoch": torch.tensor([self.last_round_epoch], dtype=torch.float64),
            "first_epoch": torch.tensor([self.first_epoch], dtype=torch.float64),
            "rounds": torch.tensor([self.rounds], dtype=torch.int64),
            "round_seconds": torch.tensor([self.round_seconds], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"ifnd state keys differ: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        self._check_state(state)
        bank = state["bank"]
        self.bank = None if bank.shape[1] == 0 else bank.to(self.device, self.dtype).clone()
        self.seen = state["seen"].to(self.device, torch.bool).clone()
        self.labels = state["labels"].to(self.device, torch.int32).clone()
        self.confidence = state["confidence"].to(self.device, torch.float32).clone()
        self.accept_rank = state["accept_rank"].to(self.device, torch.float32).clone()
        self.last_round_epoch = float(state["last_round_epoch"][0])
        self.first_epoch = float(state["first_epoch"][0])
        self.rounds = int(state["rounds"][0])
        self.round_seconds = float(state["round_seconds"][0])
        self._observed = bool(self.seen.any())

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Every entry of a stored state: shape, dtype and values (nothing is cast)."""
        n, g = self._num_samples, len(self.num_clusters)
        scalar = (1,)
        check_state_tensor("num_clusters", state["num_clusters"], None, torch.int64, None)
        if tuple(state["num_clusters"].tolist()) != self.num_clusters:
            raise ValueError(
                f"checkpoint clustered with k={state['num_clusters'].tolist()}, the configuration "
                f"says {list(self.num_clusters)}"
            )
        bank = state["bank"]
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or bank.shape[0] != n:
            shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else None
            raise StateError("bank", f"has shape {shape}, expected ({n}, D)")
        check_state_tensor("bank", bank, None, tuple(BANK_DTYPES.values()))
        check_state_tensor("seen", state["seen"], (n,), torch.bool, None)
        labels = state["labels"]
        check_state_tensor("labels", labels, (g, n), torch.int32, ValueRange(low=-1, integer=True))
        for level, k in enumerate(self.num_clusters):
            check_state_tensor(
                f"labels[{level}]", labels[level], (n,), torch.int32, ValueRange(-1, k - 1, True)
            )
        check_state_tensor("confidence", state["confidence"], (g, n), torch.float32, None)
        check_state_tensor("accept_rank", state["accept_rank"], (g, n), torch.float32, None)
        # A sample without a label (never clustered) has NaN confidence and infinite rank.
        labelled = labels >= 0
        confidence = torch.where(labelled, state["confidence"], 0.0)
        rank = torch.where(labelled, state["accept_rank"], 1.0)
        check_state_tensor("confidence", confidence, (g, n), torch.float32)
        check_state_tensor("accept_rank", rank, (g, n), torch.float32, ValueRange(0.0, 1.0))
        rounds = state["rounds"]
        check_state_tensor("rounds", rounds, scalar, torch.int64, COUNT)
        check_state_tensor(
            "round_seconds", state["round_seconds"], scalar, torch.float64, NON_NEGATIVE
        )
        epoch = ValueRange(low=0.0, nan_ok=True)
        check_state_tensor("first_epoch", state["first_epoch"], scalar, torch.float64, epoch)
        check_state_tensor(
            "last_round_epoch", state["last_round_epoch"], scalar, torch.float64, epoch
        )

    def to(self, device: torch.device | str) -> IFNDDetector:
        self.device = torch.device(device)
        if self.bank is not None:
            self.bank = self.bank.to(self.device)
        self.seen = self.seen.to(self.device)
        self.labels = self.labels.to(self.device)
        self.confidence = self.confidence.to(self.device)
        self.accept_rank = self.accept_rank.to(self.device)
        return self

    def config_dict(self) -> dict:
        cfg = asdict(self.config)
        cfg["num_clusters"] = list(self.num_clusters)
        cfg["start_epoch"] = self.start_epoch
        cfg["seed"] = self.seed
        return {
            "detector": self.name,
            "num_samples": self.num_samples,
            "mask_start_epoch": self.mask_start_epoch,
            **cfg,
        }


def ifnd_state_bytes(config: IFNDConfig) -> int:
    return config.bytes_per_sample()


def build_ifnd(
    config: IFNDConfig,
    shared: SharedSettings,
    *,
    num_samples: int,
    device: torch.device | str,
    pin_memory: bool,
) -> IFNDDetector:
    """The start epoch defaults to the shared masking start, the seed to the shared (training)
    seed, the number of clusters to round(1 / alpha)."""
    if config.start_epoch is None:
        config = replace(config, start_epoch=float(shared.mask_start_epoch))
    if config.seed is None:
        config = replace(config, seed=shared.seed)
    return IFNDDetector(
        num_samples, config, alpha=shared.alpha, device=device, pin_memory=pin_memory
    )


register(
    DetectorSpec(
        name="ifnd",
        description="samples that share a k-means pseudo-label (clustering every few "
        "epochs, confident samples first) are false negatives of each other",
        detector_class=IFNDDetector,
        factory=build_ifnd,
        settings=IFNDConfig,
        needs_num_samples=True,
        state_bytes=ifnd_state_bytes,
    )
)
