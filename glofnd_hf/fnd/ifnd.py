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
  Memory: N x D x 2 bytes in float16 (D x 4 in float32), plus 12 bytes per sample and
  granularity (label, confidence, acceptance rank) and a seen flag.
* **Clustering round.** scikit-learn's ``KMeans`` (``MiniBatchKMeans`` above
  ``minibatch_threshold`` samples) on the samples seen so far; the cost is
  O(N x k x D x iterations), linear in N. Samples are then assigned to the nearest final
  centroid in torch; the confidence is the cosine similarity to the assigned centroid
  (``confidence="centroid"``) or the gap between the distances to the second-nearest and the
  nearest centroid (``"margin"``). The round runs on rank 0 and its result is broadcast, so
  every rank holds the same labels; the bank is the same on every rank because ``observe``
  gathers the (index, embedding) pairs of the global batch. ``kmeans="torch"`` runs the
  torch k-means of ``kmeans_torch`` instead (k-means++ seeded on a sample, histogram ranks).
* **Sharded state** (``state_sharding: sharded``, docs/sharded-state.md). The bank, the
  seen flags and the assignments are per-sample tables (``ifnd_state.IFNDTables``) split as
  GloFND's thresholds are: row i on process i % world. ``observe`` still gathers the global
  batch, and each process writes the rows it owns; ``detect`` reads the global batch's labels
  and ranks with one all-reduce of (B, G, 3) floats; a round is the torch k-means on every
  process over its own rows (O(k x D) exchanged per iteration). The results are those of
  one process running the torch k-means over every row, bit for bit.
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
from .clustering import broadcast_from_first_rank, sklearn_round
from .ifnd_config import BANK_DTYPES, IFNDConfig
from .ifnd_state import (
    CONFIDENCE,
    LABEL,
    RANK,
    SCALARS,
    IFNDTables,
    Table,
    check_scalars,
    check_state,
)
from .interface import SIDES, Detection, DetectionBatch, FalseNegativeDetector, RowDetection
from .kmeans_torch import Collectives, cluster_rows
from .registry import DetectorSpec, SharedSettings, register
from .table import StateSharding, segment_mean

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
        sharding: StateSharding = "replicated",
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
        self.kmeans = config.kmeans_for(sharding)
        self.sharding: StateSharding = sharding
        self.seed = 0 if config.seed is None else int(config.seed)
        self.num_clusters = tuple(num_clusters)
        self.start_epoch = start
        self._num_samples = int(num_samples)
        self.device = torch.device(device)
        self.dtype = BANK_DTYPES[config.bank_dtype]
        # Sharded: each process holds the rows it owns (fnd.table.ShardedPerSampleTable).
        self.tables = IFNDTables(
            self._num_samples, self.num_clusters, self.dtype, self.device, pin_memory, sharding
        )
        self.last_round_epoch = math.nan
        self.first_epoch = math.nan  # epoch of the first step with an observed bank
        self.rounds = 0
        self.round_seconds = 0.0
        self._observed = False

    # -- the interface ----------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self._num_samples

    # Every sample's values (sharded: gathered from every process, a collective; for tests
    # and small data).
    @property
    def bank(self) -> Table | None:
        """The feature bank's table (None before the first ``observe``)."""
        return self.tables.bank

    @property
    def seen(self) -> torch.Tensor:
        return self.tables.every_seen()

    @property
    def labels(self) -> torch.Tensor:
        return self.tables.every_column(LABEL).to(torch.int32)

    @property
    def confidence(self) -> torch.Tensor:
        return self.tables.every_column(CONFIDENCE)

    @property
    def accept_rank(self) -> torch.Tensor:
        return self.tables.every_column(RANK)

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
        """Write the global batch's embeddings into the bank (gathered over ranks; each
        process writes the rows it holds). Call it once per training step, before
        ``detect``."""
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
        if self.tables.bank is None:
            self.tables.allocate_bank(feats.shape[1])
        elif feats.shape[1] != self.tables.bank.row_shape[0]:
            raise ValueError(
                f"embedding width changed: bank holds {self.tables.bank.row_shape[0]}, "
                f"got {feats.shape[1]}"
            )
        # Duplicated indices in one batch get their mean, written identically by every copy.
        feats = F.normalize(segment_mean(index, feats), dim=-1)
        self.tables.write(index, feats)
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
        # (b, G, 3) and (B, G, 3): label, confidence, rank (sharded: one all-reduce).
        anchors, everyone = self.tables.read(batch.anchor_index, batch.candidate_index, device)
        found = self._same_accepted_label(anchors, everyone, frac) & batch.negatives
        # Over the global batch's anchors (the same on every rank).
        accepted = self._accepted(everyone, frac)
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

    def _accepted(self, rows: torch.Tensor, frac: float) -> torch.Tensor:
        """(n,) of (n, G, 3) rows: accepted at every granularity ("all") or at some ("any")."""
        ok = rows[:, :, RANK] <= frac
        return ok.all(1) if self.config.combine == "all" else ok.any(1)

    def _same_accepted_label(
        self, anchors: torch.Tensor, candidates: torch.Tensor, frac: float
    ) -> torch.Tensor:
        """(b, B) bool: accepted pairs sharing the pseudo-label (all / any granularity)."""
        la, lc = anchors[:, :, LABEL].t(), candidates[:, :, LABEL].t()  # labels: exact floats
        aa, ac = (anchors[:, :, RANK] <= frac).t(), (candidates[:, :, RANK] <= frac).t()
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
        if self.sharding == "sharded":  # every process clusters the rows it holds
            labels, confidence, rank, seen = self._cluster_rows(
                self.tables.local_index(), Collectives(self.tables.split)
            )
        else:  # rank 0 clusters every row, the others take its result
            if comm.rank() == 0:
                labels, confidence, rank, seen = self._cluster_local()
            else:
                labels = torch.empty(g, n, dtype=torch.int32)
                confidence = torch.empty(g, n, dtype=torch.float32)
                rank = torch.empty(g, n, dtype=torch.float32)
                seen = int(self.tables.seen.data.sum())  # the same bank on every rank
            if comm.world_size() > 1:
                labels, confidence, rank = (
                    broadcast_from_first_rank(t) for t in (labels, confidence, rank)
                )
        self.tables.set_local(labels, confidence, rank)
        self.rounds += 1
        self.last_round_epoch = float(epoch)
        self.round_seconds = time.perf_counter() - start
        logger.info(
            "ifnd: clustering round %d at epoch %.3f over %d samples (k=%s, %s) took %.2f s",
            self.rounds,
            epoch,
            seen,
            list(self.num_clusters),
            self.kmeans,
            self.round_seconds,
        )

    def _seeds(self) -> list[int]:
        return [self.seed + 7919 * self.rounds + level for level in range(len(self.num_clusters))]

    def _cluster_rows(
        self, index: torch.Tensor, group: Collectives
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The torch k-means over the rows held here (every row when replicated)."""
        bank, seen = self.tables.bank.data, self.tables.seen.data
        labels, confidence, rank, total = cluster_rows(
            bank, index, seen, self.num_clusters, self._seeds(), self.config, group
        )
        if total < max(self.num_clusters):
            logger.warning("ifnd: only %d samples seen, clustering with k <= %d", total, total)
        return labels.to(torch.int32), confidence, rank, total

    def _cluster_local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """k-means of the seen part of every row at every granularity (on the host)."""
        if self.kmeans == "torch":
            out = self._cluster_rows(self.tables.local_index(), Collectives(False))
            return (*(t.cpu() for t in out[:3]), out[3])
        return sklearn_round(
            self.tables.bank.data,
            self.tables.seen.data,
            self.num_clusters,
            self._seeds(),
            self.config,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def _scalars(self) -> dict[str, torch.Tensor]:
        return {
            "num_clusters": torch.tensor(self.num_clusters, dtype=torch.int64),
            "last_round_epoch": torch.tensor([self.last_round_epoch], dtype=torch.float64),
            "first_epoch": torch.tensor([self.first_epoch], dtype=torch.float64),
            "rounds": torch.tensor([self.rounds], dtype=torch.int64),
            "round_seconds": torch.tensor([self.round_seconds], dtype=torch.float64),
        }

    def _set_scalars(self, state: dict[str, torch.Tensor]) -> None:
        self.last_round_epoch = float(state["last_round_epoch"][0])
        self.first_epoch = float(state["first_epoch"][0])
        self.rounds = int(state["rounds"][0])
        self.round_seconds = float(state["round_seconds"][0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every sample's state (sharded: gathered from every process, a collective)."""
        return {**self.tables.state_dict(), **self._scalars()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.tables.state_dict()) | set(SCALARS)
        if set(state) != expected:
            raise ValueError(
                f"ifnd state keys differ: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        check_state(state, self._num_samples, self.num_clusters)
        self.tables.load(state)
        self._set_scalars(state)
        self._observed = bool(state["seen"].any())

    def shard_tables(self) -> dict:
        """Per-sample tables by name (per-process checkpoints, ``glofnd_hf.state_shards``):
        ``bank``, ``seen`` and ``assignments`` (label, confidence, rank per granularity)."""
        return self.tables.shard_tables()

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        self.tables.check_shard_rows(name, rows)

    def shard_extras(self) -> dict[str, torch.Tensor]:
        """What is not per sample (the same on every process): the schedule's scalars, the
        bank's width and whether anything was observed, stored with every shard."""
        bank = self.tables.bank
        width = 0 if bank is None else bank.row_shape[0]
        return {
            **self._scalars(),
            "bank_width": torch.tensor([width], dtype=torch.int64),
            "observed": torch.tensor([int(self._observed)], dtype=torch.int64),
        }

    def load_shard_extras(self, extras: dict[str, torch.Tensor]) -> None:
        """Take :meth:`shard_extras` of a checkpoint, checked first, before the tables' rows
        (the bank gets the stored width: ``IFNDTables.fit_bank``)."""
        expected = set(SCALARS) | {"bank_width", "observed"}
        if set(extras) != expected:
            raise ValueError(
                f"ifnd shard extras differ: missing {sorted(expected - set(extras))}, "
                f"unexpected {sorted(set(extras) - expected)}"
            )
        check_scalars(extras, self.num_clusters)
        self.tables.fit_bank(int(extras["bank_width"][0]))
        self._set_scalars(extras)
        self._observed = bool(int(extras["observed"][0]))

    def to(self, device: torch.device | str) -> IFNDDetector:
        self.device = torch.device(device)
        self.tables.to(self.device)
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


def ifnd_state_bytes(config: IFNDConfig, embed_width: int | None = None) -> int:
    return config.bytes_per_sample(embed_width)


def build_ifnd(
    config: IFNDConfig,
    shared: SharedSettings,
    *,
    num_samples: int,
    device: torch.device | str,
    pin_memory: bool,
    sharding: StateSharding = "replicated",
) -> IFNDDetector:
    """The start epoch defaults to the shared masking start, the seed to the shared (training)
    seed, the number of clusters to round(1 / alpha)."""
    if config.start_epoch is None:
        config = replace(config, start_epoch=float(shared.mask_start_epoch))
    if config.seed is None:
        config = replace(config, seed=shared.seed)
    return IFNDDetector(
        num_samples,
        config,
        alpha=shared.alpha,
        device=device,
        pin_memory=pin_memory,
        sharding=sharding,
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
        shardable=True,
    )
)
