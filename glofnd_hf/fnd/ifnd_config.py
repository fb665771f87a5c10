"""Settings of the IFND detector (what each one does: ``ifnd``'s module docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .setting_types import setting

BANK_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
KMEANS_CHOICES = ("auto", "sklearn", "torch")
ASSUMED_EMBED_WIDTH = 1024
"""Embedding width assumed when sizing the feature bank before the first step."""


@dataclass
class IFNDConfig:
    """Settings of the IFND detector."""

    # -- clustering rounds ------------------------------------------------------------------
    num_clusters: int | tuple[int, ...] = setting(
        (),
        "k of each k-means granularity. Empty: one granularity with k = round(1 / alpha) "
        "(balanced clusters then hold a fraction alpha of the data, the budget of GloFND).",
    )
    cluster_every: float = setting(1.0, "Epochs between clustering rounds.")
    start_epoch: float | None = setting(
        None, "First round and start of masking; None: the shared mask start epoch."
    )
    bank_warmup_epochs: float = setting(
        1.0, "Epochs of observed features the bank needs before the first round."
    )
    # -- acceptance -------------------------------------------------------------------------
    accept_warmup_epochs: float = setting(
        10.0, "Epochs over which the accepted fraction grows linearly from 0 to 1 (0: all at once)."
    )
    accept_scope: Literal["global", "cluster"] = setting(
        "global", "Rank confidences over the whole data set (global) or within each cluster."
    )
    confidence: Literal["centroid", "margin"] = setting(
        "centroid",
        "Confidence of an assignment: cosine to the centroid (centroid) or the gap "
        "between the two nearest centroid distances (margin).",
    )
    combine: Literal["all", "any"] = setting(
        "all",
        "With several granularities a pair is a false negative when it shares the "
        "pseudo-label at every one (all: precision first) or at some (any: recall first).",
    )
    # -- the feature bank -------------------------------------------------------------------
    features: Literal["mean", "image", "text", "concat"] = setting(
        "mean",
        "What represents a sample: the normalised mean of its image and text "
        "embeddings, one of them, or both concatenated (twice the memory).",
    )
    bank_dtype: Literal["float16", "float32", "bfloat16"] = setting(
        "float16", "Storage type of the feature bank."
    )
    # -- k-means ----------------------------------------------------------------------------
    kmeans: Literal["auto", "sklearn", "torch"] = setting(
        "auto",
        "k-means implementation: scikit-learn's on one process (every sample's features "
        "there), or torch's over rows split across processes (k-means++ seeded on a sample "
        "every process agrees on, Lloyd iterations with exact all-reduced sums, acceptance "
        "ranks from a histogram of confidences: rank_bins); auto: sklearn with "
        "state_sharding replicated, torch with sharded (which needs it).",
    )
    rank_bins: int = setting(
        65536,
        "kmeans torch: histogram bins of the confidences per granularity for the acceptance "
        "ranks (accept_scope cluster: shared by the k clusters, at least 16 each).",
    )
    kmeans_iters: int = setting(50, "k-means iterations per round.")
    kmeans_n_init: int = setting(1, "k-means restarts per round (the lowest inertia wins).")
    kmeans_algorithm: Literal["auto", "kmeans", "minibatch"] = setting(
        "auto",
        "kmeans sklearn: scikit-learn's KMeans, MiniBatchKMeans, or auto (MiniBatchKMeans "
        "above minibatch_threshold samples).",
    )
    minibatch_threshold: int = setting(
        200_000, "auto uses MiniBatchKMeans above this many samples."
    )
    minibatch_size: int = setting(4096, "Batch size of MiniBatchKMeans.")
    seed: int | None = setting(
        None, "k-means seed; None: the training seed (0 outside the Trainer)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_clusters, int):
            self.num_clusters = (self.num_clusters,)
        self.num_clusters = tuple(int(k) for k in self.num_clusters)
        if any(k < 2 for k in self.num_clusters):
            raise ValueError(f"every num_clusters entry must be >= 2, got {self.num_clusters}")
        if len(set(self.num_clusters)) != len(self.num_clusters):
            raise ValueError(f"num_clusters has repeated entries: {self.num_clusters}")
        if not self.cluster_every > 0:
            raise ValueError(f"cluster_every must be positive, got {self.cluster_every}")
        if self.start_epoch is not None and self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")
        if not self.accept_warmup_epochs >= 0:
            raise ValueError(f"accept_warmup_epochs must be >= 0, got {self.accept_warmup_epochs}")
        if not self.bank_warmup_epochs >= 0:
            raise ValueError(f"bank_warmup_epochs must be >= 0, got {self.bank_warmup_epochs}")
        choices = {
            "accept_scope": ("global", "cluster"),
            "confidence": ("centroid", "margin"),
            "combine": ("all", "any"),
            "features": ("mean", "image", "text", "concat"),
            "bank_dtype": tuple(BANK_DTYPES),
            "kmeans_algorithm": ("auto", "kmeans", "minibatch"),
            "kmeans": KMEANS_CHOICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "kmeans_iters",
            "kmeans_n_init",
            "minibatch_threshold",
            "minibatch_size",
            "rank_bins",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def kmeans_for(self, sharding: str) -> str:
        """The k-means that runs (``sklearn`` or ``torch``) with the state held ``sharding``;
        raises ValueError for sklearn with a sharded state (no process holds every row)."""
        if self.kmeans == "auto":
            return "torch" if sharding == "sharded" else "sklearn"
        if self.kmeans == "sklearn" and sharding == "sharded":
            raise ValueError(
                "ifnd with state_sharding: sharded clusters with kmeans: torch (scikit-learn "
                "needs every sample's features on one process): set kmeans to torch or auto"
            )
        return self.kmeans

    def check_sharding(self, sharding: str) -> None:
        """Raise ValueError where these settings cannot run with the state ``sharding``."""
        self.kmeans_for(sharding)

    def bytes_per_sample(self, embed_width: int | None = None) -> int:
        """Per-sample state: the feature bank (of ``embed_width`` per embedding, where the
        model says it; else ``ASSUMED_EMBED_WIDTH``), the seen flag, and per granularity a
        label, a confidence and an acceptance rank."""
        width = (embed_width or ASSUMED_EMBED_WIDTH) * (2 if self.features == "concat" else 1)
        bank = width * BANK_DTYPES[self.bank_dtype].itemsize
        return bank + 1 + 12 * max(1, len(self.num_clusters))
