"""False-negative detection study: none / batch_quantile / glofnd / ifnd / oracle.

Trains the same tiny CLIP (``build_tiny_hf_clip``, same seed, same data order) with each
detector on two labelled image-caption sets whose true false negatives are known:

* ``digits``: the embedded coloured-digits demo pairs (``semantic_label`` = digit + ink,
  background, position, scale: 240 classes, ~6 train pairs each, a false-negative share of
  ~0.35 % of the data per anchor);
* ``shapes``: rendered shapes generated here (6 shapes x 6 colours x 2 sizes = 72 classes,
  ~42 train pairs each, ~1.4 % per anchor) with nuisances the captions do not mention
  (position, rotation, background grey level, colour jitter).

Per epoch it records, for every step, the detector's false-negative masks against the label
oracle (pairs of the global batch, both anchor sides): precision, recall, F1 (counts summed
over the epoch's steps), the realised filtered fraction (the loss's own
``filtered_fraction_*``, after its keep-one-negative fallback) and, for IFND, the wall time of
each clustering round. For GloFND it also embeds the training set at a few points and compares
the learned thresholds with the exact per-anchor (1 - alpha) quantile over the whole data set.
At the end: zero-shot retrieval (R@1, R@5 both directions; also a class-aware R@1 that accepts
any same-class item) and classification on the validation split with ``ZeroShotEvaluator``.

    .venv/bin/python benchmarks/fn_study.py            # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/fn_study.py --quick    # ~1 minute smoke run

Writes ``benchmarks/results/fn_study.json``, ``fn_f1.png`` and ``fn_lambda.png``
(``--quick`` writes ``fn_study_quick.json`` etc. instead, never overwriting the full
results; ``--suffix`` names other variants, e.g. ``--seed 1 --suffix _seed1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glofnd_hf.args import GloFNDTrainingArguments  # noqa: E402
from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES, load_digits_pairs  # noqa: E402
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator  # noqa: E402
from glofnd_hf.fnd import GloFNDConfig, masked_quantile  # noqa: E402
from glofnd_hf.fnd.detectors import Detection, DetectionBatch, FalseNegativeDetector  # noqa: E402
from glofnd_hf.fnd.ifnd_config import IFNDConfig  # noqa: E402
from glofnd_hf.fnd.thresholds import UPDATE_RULES  # noqa: E402
from glofnd_hf.losses import ClipLoss  # noqa: E402
from glofnd_hf.models import build_tiny_hf_clip  # noqa: E402
from glofnd_hf.trainer import GloFNDTrainer  # noqa: E402

DETECTORS = ("none", "batch_quantile", "glofnd", "ifnd", "oracle")
SIDES = ("image", "text")

# ----------------------------------------------------------------------------------------
# The generated shapes data set
# ----------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 70, 225),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SIZES = {"small": 0.22, "large": 0.4}  # radius as a fraction of the canvas side
SHAPE_CAPTIONS = (
    "a {size} {colour} {shape}.",
    "a picture of a {colour} {shape}, {size}.",
    "{size} {shape} painted {colour}.",
    "the {shape} is {colour} and {size}.",
    "an image showing a {size} {colour} {shape}.",
)
SHAPE_TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "an image of a {}.")


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    def rotate(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        return rotate(
            [(-r * 0.8, -r * 0.8), (r * 0.8, -r * 0.8), (r * 0.8, r * 0.8), (-r * 0.8, r * 0.8)]
        )
    if shape == "triangle":
        return rotate(
            [
                (r * math.cos(a), r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        )
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "cross":
        w = r * 0.35
        return rotate(
            [
                (-w, -r),
                (w, -r),
                (w, -w),
                (r, -w),
                (r, w),
                (w, w),
                (w, r),
                (-w, r),
                (-w, w),
                (-r, w),
                (-r, -w),
                (-w, -w),
            ]
        )
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return rotate(pts)
    raise ValueError(shape)


def _render_shape(
    shape: str, colour, size: float, rng: np.random.Generator, side: int
) -> Image.Image:
    scale = 4  # draw large, downsample: anti-aliased edges
    big = side * scale
    grey = int(rng.integers(0, 256))
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    r = size * big
    margin = r + 0.04 * big
    cx, cy = rng.uniform(margin, big - margin, size=2)
    jitter = rng.integers(-25, 26, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
    if shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    else:
        angle = float(rng.uniform(-0.3, 0.3))
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)
    return canvas.resize((side, side), Image.Resampling.LANCZOS)


def load_shapes_pairs(
    per_class: int = 50, val_per_class: int = 8, seed: int = 0, image_size: int = 32
) -> datasets.DatasetDict:
    """Shapes x colours x sizes (72 semantic classes), ``per_class`` pairs each, captioned
    from shape, colour and size only. Columns as the digits pairs: image, caption,
    semantic_label, object (shape x colour: the 36 zero-shot classes), dataset_index."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"train": [], "validation": []}
    n_col, n_size = len(COLOURS), len(SIZES)
    for s, shape in enumerate(SHAPES):
        for c, (colour, rgb) in enumerate(COLOURS.items()):
            for z, (size_name, size) in enumerate(SIZES.items()):
                label = (s * n_col + c) * n_size + z
                for i in range(per_class):
                    template = SHAPE_CAPTIONS[int(rng.integers(len(SHAPE_CAPTIONS)))]
                    row = {
                        "image": _render_shape(shape, rgb, size, rng, image_size),
                        "caption": template.format(size=size_name, colour=colour, shape=shape),
                        "semantic_label": label,
                        "object": s * n_col + c,
                    }
                    rows["validation" if i < val_per_class else "train"].append(row)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "semantic_label": datasets.Value("int64"),
            "object": datasets.Value("int64"),
            "dataset_index": datasets.Value("int64"),
        }
    )
    out = {}
    for split, items in rows.items():
        order = rng.permutation(len(items))
        cols: dict[str, list] = {k: [] for k in features}
        for new, old in enumerate(order.tolist()):
            for key, value in items[old].items():
                cols[key].append(value)
            cols["dataset_index"].append(new)
        out[split] = datasets.Dataset.from_dict(cols, features=features)
    return datasets.DatasetDict(out)


def shape_class_names() -> list[str]:
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------
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


def _similarities(embeds: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2, N, N): image anchors against texts, text anchors against images."""
    image = F.normalize(embeds["images"], dim=-1)
    text = F.normalize(embeds["texts"], dim=-1)
    return torch.stack([image @ text.t(), text @ image.t()])


def rank_figures(
    sims: torch.Tensor, thresholds: torch.Tensor, negatives: torch.Tensor, alpha: float
) -> dict[str, float]:
    """What (2, N) ``thresholds`` filter of the (2, N, N) similarities, in rank units: the
    mean share of negatives above them over alpha, the share of anchors whose own share is
    within [0.5, 2] x alpha, and the F1 of their masks against the exact rule's (each
    anchor's exact (1 - alpha) quantile of the same similarities)."""
    exact = masked_quantile(sims, negatives, 1.0 - alpha)
    found = (sims > thresholds.unsqueeze(-1)) & negatives
    target = (sims > exact.unsqueeze(-1)) & negatives
    ratio = found.sum(-1) / negatives.sum(-1).clamp(min=1) / alpha
    hits, detected, true = float((found & target).sum()), float(found.sum()), float(target.sum())
    return {
        "filtered_over_alpha": float(ratio.mean()),
        "within_half_to_double": float(((ratio >= 0.5) & (ratio <= 2.0)).float().mean()),
        "mask_f1": 2.0 * hits / (detected + true) if detected + true > 0 else 1.0,
    }


def _prf(tp: float, detected: float, true: float, pairs: float) -> dict[str, float | None]:
    p = tp / detected if detected else None
    r = tp / true if true else None
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else 0.0
    return {"precision": p, "recall": r, "f1": f1, "detected_fraction": detected / pairs}


class ThresholdSnapshots(TrainerCallback):
    """At chosen epoch ends, with the training set embedded by the current model:

    * GloFND's learned thresholds vs the exact per-anchor (1 - alpha) quantile of the
      similarity to the whole training set (the value GloFND's update tracks);
    * the same-model comparison of threshold rules on the pairs of random batches of the
      training batch size: in-batch (1 - alpha) quantile (``batch_quantile``), exact global
      quantile at alpha, exact global quantile at the alpha that matches the in-batch rule's
      realised detection rate, and GloFND's learned thresholds; plus the learned and exact
      thresholds over the full N x N matrix.
    """

    def __init__(
        self,
        study: Study,
        detector,
        train,
        labels: torch.Tensor,
        alpha: float,
        at_epochs: list[int],
        exact_every_epoch: bool = False,
    ) -> None:
        self.study, self.detector, self.alpha = study, detector, alpha
        self.at = set(at_epochs)
        # The epoch before each snapshot too: its exact quantiles, held for one epoch, are
        # what a rule that refreshes each threshold once per epoch could at best hold.
        self.exact_at = self.at | {e - 1 for e in self.at}
        # With --record, every epoch's exact quantiles are kept for offline replays.
        self.exact_history: dict[int, torch.Tensor] | None = None
        if exact_every_epoch:
            self.exact_at |= set(range(1, study.epochs + 1))
            self.exact_history = {}
        self._previous_exact: tuple[int, torch.Tensor] | None = None
        # The same in training mode (dropout, augmentation): what the rule sees.
        self._previous_seen: tuple[int, torch.Tensor] | None = None
        self.labels = labels
        self.embedder = ZeroShotEvaluator(train, show_progress=False, batch_size=256)
        self.snapshots: list[dict[str, Any]] = []
        self.training_mode: list[dict[str, Any]] = []
        self.arrays: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch or 0)
        self._training_mode(epoch, model)
        if epoch not in self.exact_at:
            return
        sims = _similarities(self.embedder.embed(self.study.adapter, model))  # (2, N, N)
        n = sims.shape[1]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact = masked_quantile(sims, negatives, 1.0 - self.alpha)  # (2, N)
        previous, self._previous_exact = self._previous_exact, (epoch, exact)
        if self.exact_history is not None:
            self.exact_history[epoch] = exact.clone()
        if epoch not in self.at:
            return
        lam = self._thresholds(n)
        truth = (self.labels.unsqueeze(1) == self.labels.unsqueeze(0)) & negatives
        snap: dict[str, Any] = {"epoch": epoch, "full_matrix": {}, "in_batch_pairs": {}}
        for name, thr in (("learned", lam), ("exact", exact)):
            found = (sims > thr.unsqueeze(-1)) & negatives
            snap["full_matrix"][name] = _prf(
                float((found & truth).sum()),
                float(found.sum()),
                2.0 * float(truth.sum()),
                2.0 * n * (n - 1),
            )
        snap["in_batch_pairs"] = self._in_batch(sims, exact, lam, truth)
        diff = (lam - exact).flatten()
        snap["lambda_mean"] = float(lam.mean())
        snap["lambda_percentiles"] = [
            float(v) for v in torch.quantile(lam.flatten(), torch.tensor([0.1, 0.5, 0.9]))
        ]
        snap["exact_mean"] = float(exact.mean())
        snap["exact_percentiles"] = [
            float(v) for v in torch.quantile(exact.flatten(), torch.tensor([0.1, 0.5, 0.9]))
        ]
        snap["lambda_minus_exact_mean"] = float(diff.mean())
        snap["lambda_vs_exact_mae"] = float(diff.abs().mean())
        snap["lambda_vs_exact_corr"] = float(
            np.corrcoef(lam.flatten().numpy(), exact.flatten().numpy())[0, 1]
        )
        if previous is not None and previous[0] == epoch - 1:
            stale = (previous[1] - exact).flatten()
            snap["previous_epoch_exact_mae"] = float(stale.abs().mean())
            snap["previous_epoch_exact_corr"] = float(
                np.corrcoef(previous[1].flatten().numpy(), exact.flatten().numpy())[0, 1]
            )
        self.snapshots.append(snap)
        self.arrays.append(
            {"epoch": epoch, "lambda": lam[0].numpy().copy(), "exact": exact[0].numpy().copy()}
        )

    def _thresholds(self, n: int) -> torch.Tensor:
        """(2, n) GloFND's thresholds of the first n samples, as they filter (read without
        ``state_dict``, which folds the state's common shift into its table and so would
        change the run it measures in the last bits)."""
        return self.detector.state.lambdas(torch.arange(n)).t().cpu()

    def _training_mode(self, epoch: int, model) -> None:
        """Every epoch end, in rank units on a fresh training-mode draw (what the rule
        sees): what the thresholds filter there, against the exact rule on the same
        similarities; beside them what the exact quantiles of another draw filter (same
        epoch: the draw-to-draw noise no rule escapes; the previous epoch's, held for an
        epoch, as a rule that sees each sample once per epoch would at best hold them)."""
        adapter = self.study.adapter
        seed = self.study.seed * 100_003 + 2 * epoch  # two distinct draws per epoch
        seen = _similarities(self.embedder.embed(adapter, model, training=True, seed=seed))
        n = seen.shape[1]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact = masked_quantile(seen, negatives, 1.0 - self.alpha)
        previous, self._previous_seen = self._previous_seen, (epoch, exact)
        fresh = _similarities(self.embedder.embed(adapter, model, training=True, seed=seed + 1))
        lam = self._thresholds(n)
        thresholds = {"learned": lam, "exact_other_draw": exact}
        if previous is not None and previous[0] == epoch - 1:
            thresholds["exact_previous_epoch"] = previous[1]
        figures = {
            name: rank_figures(fresh, thr, negatives, self.alpha)
            for name, thr in thresholds.items()
        }
        self.training_mode.append({"epoch": epoch, **figures})

    def _in_batch(self, sims, exact, lam, truth) -> dict[str, dict]:
        n, b = sims.shape[1], self.study.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(len(self.snapshots)))
        batches = [order[i : i + b] for i in range(0, n - b + 1, b)]
        eye = torch.eye(b, dtype=torch.bool)
        neg = ~eye
        rules = ("batch_quantile", "exact_global", "learned_global")
        counts = {r: [0.0, 0.0] for r in rules}  # tp, detected
        true = pairs = 0.0
        for idx in batches:
            sub = sims[:, idx][:, :, idx]
            tb = truth[idx][:, idx].unsqueeze(0).expand(2, -1, -1)
            thresholds = {
                "batch_quantile": masked_quantile(sub, neg, 1.0 - self.alpha),
                "exact_global": exact[:, idx],
                "learned_global": lam[:, idx],
            }
            for rule, thr in thresholds.items():
                found = (sub > thr.unsqueeze(-1)) & neg
                counts[rule][0] += float((found & tb).sum())
                counts[rule][1] += float(found.sum())
            true += float(tb.sum())
            pairs += 2.0 * b * (b - 1)
        out = {r: _prf(tp, det, true, pairs) for r, (tp, det) in counts.items()}
        # The global rule at the budget the in-batch rule actually spends.
        matched = out["batch_quantile"]["detected_fraction"]
        negatives = ~torch.eye(n, dtype=torch.bool)
        exact_m = masked_quantile(sims, negatives, 1.0 - matched)
        tp = det = 0.0
        for idx in batches:
            sub = sims[:, idx][:, :, idx]
            tb = truth[idx][:, idx].unsqueeze(0).expand(2, -1, -1)
            found = (sub > exact_m[:, idx].unsqueeze(-1)) & neg
            tp += float((found & tb).sum())
            det += float(found.sum())
        out["exact_global_matched_budget"] = {**_prf(tp, det, true, pairs), "alpha": matched}
        return out


# ----------------------------------------------------------------------------------------
# One data set, one detector
# ----------------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    train: Any
    validation: Any
    class_label_column: str
    class_names: list[str]
    templates: list[str]
    alpha: float
    epochs: int
    mask_start: float
    update_start: float
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 30
    seed: int = 0
    glofnd_lr: float = 0.05
    glofnd_clip_grad_mult: float | None = None
    glofnd_update_rule: str = GloFNDConfig().update_rule
    adapter: Any = None

    def texts(self) -> list[str]:
        texts = list(self.train["caption"]) + list(self.validation["caption"])
        return texts + [t.format(c) for c in self.class_names for t in self.templates]

    def ifnd_config(self) -> IFNDConfig:
        return IFNDConfig(
            num_clusters=(),
            cluster_every=1.0,
            start_epoch=self.mask_start,
            accept_warmup_epochs=max(self.epochs - 1 - self.mask_start, 1.0),
            seed=self.seed,
        )

    def detector_kwargs(self, detector_name: str) -> dict[str, Any]:
        """The study's settings of the detectors that have their own."""
        if detector_name == "glofnd":
            return {
                "lr": self.glofnd_lr,
                "clip_grad_mult": self.glofnd_clip_grad_mult,
                "update_rule": self.glofnd_update_rule,
                "init_quantile": True,  # Adam rules only: the tail rule always starts there
                "update_start_epoch": self.update_start,
            }
        if detector_name == "ifnd":
            return asdict(self.ifnd_config())
        return {}


def run_one(
    study: Study,
    detector_name: str,
    out_dir: str,
    record: str | None = None,
    threshold_snapshots: bool = True,
) -> dict[str, Any]:
    """One training run; with ``record`` (a directory) GloFND's run also saves every batch's
    similarities and every epoch's exact quantiles there (``replay_thresholds.py``);
    ``threshold_snapshots=False`` skips GloFND's threshold snapshots (embedding the training set)."""
    torch.manual_seed(study.seed)
    study.adapter = build_tiny_hf_clip(seed=study.seed, texts=study.texts())
    args = GloFNDTrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=study.batch_size,
        num_train_epochs=study.epochs,
        learning_rate=study.lr,
        weight_decay=0.1,
        warmup_steps=study.warmup_steps,
        lr_scheduler_type="cosine",
        logging_strategy="epoch",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=study.seed,
        data_seed=study.seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        detector=detector_name,
        fn_alpha=study.alpha,
        fn_start_epoch=study.mask_start,
        detector_kwargs=study.detector_kwargs(detector_name),
        temperature_init=0.07,
    )
    inner = args.detector_spec().build(
        args.detector_settings(), args.shared_detector_settings(), num_samples=len(study.train)
    )
    recorder = RecordingDetector(inner)
    record = record if detector_name == "glofnd" else None
    if record is not None:
        recorder.batches = []
    loss = StudyClipLoss(recorder, "eliminate")
    callbacks = []
    snapshots = None
    if detector_name == "glofnd" and (threshold_snapshots or record is not None):
        mid = round((study.mask_start + study.epochs) / 2)
        at = sorted({math.ceil(study.mask_start), mid, study.epochs})
        labels = torch.tensor(study.train.with_format(None)["semantic_label"])
        snapshots = ThresholdSnapshots(
            study, inner, study.train, labels, study.alpha, at, exact_every_epoch=bool(record)
        )
        callbacks.append(snapshots)
    trainer = GloFNDTrainer(
        study.adapter,
        args,
        train_dataset=study.train,
        loss=loss,
        label_column="semantic_label",
        callbacks=callbacks,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    evaluator = ZeroShotEvaluator(
        study.validation,
        class_label_column=study.class_label_column,
        class_names=study.class_names,
        templates=study.templates,
        ks=(1, 5),
        batch_size=256,
        show_progress=False,
    )
    embeds = evaluator.embed(study.adapter, trainer.model)
    zero_shot = evaluator.score(embeds)
    zero_shot.update(class_aware_recall(embeds, study.validation))
    per_epoch = [{"epoch": e, **recorder.epochs[e].summary()} for e in sorted(recorder.epochs)]
    result: dict[str, Any] = {
        "per_epoch": per_epoch,
        "final": per_epoch[-1],
        "zero_shot": zero_shot,
        "train_seconds": round(train_seconds, 2),
        # Detection quality over the masking period (all epochs from the mask start on).
        "masking_period": _pooled(recorder, study.mask_start),
    }
    if recorder.ifnd_rounds:
        seconds = [r["seconds"] for r in recorder.ifnd_rounds]
        result["ifnd_rounds"] = {
            "count": len(seconds),
            "mean_seconds": float(np.mean(seconds)),
            "max_seconds": float(np.max(seconds)),
            "k": list(inner.num_clusters),
        }
    if snapshots is not None:
        result["threshold_snapshots"] = snapshots.snapshots
        result["training_mode"] = snapshots.training_mode
        result["_arrays"] = snapshots.arrays
    if record is not None:  # GloFND's run: its snapshots hold every epoch's exact quantiles
        Path(record).mkdir(parents=True, exist_ok=True)
        path = Path(record) / f"{study.name}_seed{study.seed}.pt"
        torch.save(
            {
                "alpha": study.alpha,
                "num_samples": len(study.train),
                "epochs": study.epochs,
                "mask_start": study.mask_start,
                "batches": recorder.batches,
                "exact": snapshots.exact_history,
                "detector": inner.config_dict(),
            },
            path,
        )
        result["record"] = str(path)
    return result


def _pooled(recorder: RecordingDetector, start: float) -> dict[str, float | None]:
    total = EpochCounts()
    for e, c in recorder.epochs.items():
        if e >= math.floor(start):
            for key in ("tp", "fp", "fn", "detected", "negatives", "true_fn"):
                setattr(total, key, getattr(total, key) + getattr(c, key))
            total.filtered += c.filtered
    out = total.summary()
    out.pop("loss")
    return out


def class_aware_recall(embeds: dict[str, torch.Tensor], data) -> dict[str, float]:
    """R@1 where any item of the query's semantic class counts as a hit (both directions)."""
    labels = torch.tensor(data.with_format(None)["semantic_label"])
    image = F.normalize(embeds["images"], dim=-1)
    text = F.normalize(embeds["texts"], dim=-1)
    sims = image @ text.t()
    i2t = (labels[sims.argmax(1)] == labels).float().mean()
    t2i = (labels[sims.argmax(0)] == labels).float().mean()
    return {"image_to_text_class_r@1": float(i2t), "text_to_image_class_r@1": float(t2i)}


# ----------------------------------------------------------------------------------------
# IFND clustering cost (O(N) per round)
# ----------------------------------------------------------------------------------------
def ifnd_round_scaling(sizes: list[int], dim: int = 64, k: int = 100) -> list[dict[str, float]]:
    from glofnd_hf.fnd.ifnd import IFNDDetector

    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        centres = F.normalize(torch.randn(k, dim, generator=gen), dim=-1)
        x = centres[torch.randint(k, (n,), generator=gen)] + 0.3 * torch.randn(
            n, dim, generator=gen
        )
        det = IFNDDetector(
            n,
            IFNDConfig(
                num_clusters=(k,), start_epoch=0.0, accept_warmup_epochs=0.0, bank_warmup_epochs=0.0
            ),
        )
        det.observe(torch.arange(n), x, x)
        index = torch.arange(8)
        det.detect(
            torch.zeros(2, 8, 8),
            DetectionBatch(
                index,
                index,
                torch.ones(8, 8, dtype=torch.bool) & ~torch.eye(8, dtype=torch.bool),
                0.0,
            ),
        )
        rows.append(
            {
                "num_samples": n,
                "dim": dim,
                "k": k,
                "seconds": round(det.round_seconds, 3),
                "algorithm": "MiniBatchKMeans" if n > det.config.minibatch_threshold else "KMeans",
            }
        )
    return rows


# ----------------------------------------------------------------------------------------
# Plots and main
# ----------------------------------------------------------------------------------------
COLOURS_PLOT = {
    "none": "#888888",
    "batch_quantile": "#d62728",
    "glofnd": "#1f77b4",
    "ifnd": "#2ca02c",
    "oracle": "#000000",
}


def plot_f1(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(len(names), 3, figsize=(12, 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        runs = results["datasets"][name]["runs"]
        start = results["datasets"][name]["settings"]["mask_start"]
        for col, metric in enumerate(("precision", "recall", "f1")):
            ax = axes[row, col]
            for det, run in runs.items():
                if det in ("none",):
                    continue
                xs = [p["epoch"] for p in run["per_epoch"] if p[metric] is not None]
                ys = [p[metric] for p in run["per_epoch"] if p[metric] is not None]
                style = "--" if det == "oracle" else "-"
                ax.plot(xs, ys, style, color=COLOURS_PLOT[det], label=det, marker=".")
            ax.axvline(start, color="#bbbbbb", lw=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{name}: {metric}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.suptitle("False negatives detected in the batch vs the label oracle (both sides)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lambda(results: dict[str, Any], arrays: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in arrays if arrays[n]]
    if not names:
        return
    cols = max(len(arrays[n]) for n in names)
    fig, axes = plt.subplots(
        len(names), cols, figsize=(3.6 * cols, 3.0 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        alpha = results["datasets"][name]["settings"]["alpha"]
        for col, snap in enumerate(arrays[name]):
            ax = axes[row, col]
            lo = float(min(snap["lambda"].min(), snap["exact"].min()))
            hi = float(max(snap["lambda"].max(), snap["exact"].max()))
            bins = np.linspace(lo, hi, 40)
            ax.hist(
                snap["exact"],
                bins=bins,
                alpha=0.5,
                color="#ff7f0e",
                label=f"exact (1-{alpha:g}) quantile",
            )
            ax.hist(snap["lambda"], bins=bins, alpha=0.5, color="#1f77b4", label="GloFND lambda")
            ax.set_title(f"{name}, end of epoch {snap['epoch']} (image side)", fontsize=9)
            ax.set_xlabel("threshold")
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_studies(
    quick: bool,
    seed: int,
    only: list[str],
    glofnd_lr: float = 0.05,
    glofnd_clip_grad_mult: float | None = None,
    glofnd_update_rule: str = GloFNDConfig().update_rule,
) -> list[Study]:
    """The pinball and tail rules learn from the first epoch; the Adam rules start two epochs
    before masking (the reference's practice of a late start)."""
    studies = []
    rule = dict(
        glofnd_lr=glofnd_lr,
        glofnd_clip_grad_mult=glofnd_clip_grad_mult,
        glofnd_update_rule=glofnd_update_rule,
    )
    late_start = glofnd_update_rule in ("adam", "reference")
    if "digits" in only:
        digits = load_digits_pairs(seed=seed)
        train, val = digits["train"], digits["validation"]
        epochs, mask, update = (20, 6.0, 4.0 * late_start) if not quick else (3, 1.0, 0.0)
        if quick:
            # A subset: let the trainer number the rows again (index space = 512).
            train = train.select(range(512)).remove_columns("dataset_index")
            val = val.select(range(128))
        studies.append(
            Study(
                "digits",
                train,
                val,
                "digit",
                list(DIGIT_NAMES),
                list(CLASSIFICATION_TEMPLATES),
                alpha=0.005,
                epochs=epochs,
                mask_start=mask,
                update_start=update,
                seed=seed,
                **rule,
            )
        )
    if "shapes" in only:
        shapes = load_shapes_pairs(
            per_class=50 if not quick else 12, val_per_class=8 if not quick else 3, seed=seed
        )
        epochs, mask, update = (12, 4.0, 2.0 * late_start) if not quick else (3, 1.0, 0.0)
        studies.append(
            Study(
                "shapes",
                shapes["train"],
                shapes["validation"],
                "object",
                shape_class_names(),
                list(SHAPE_TEMPLATES),
                alpha=0.01,
                epochs=epochs,
                mask_start=mask,
                update_start=update,
                seed=seed,
                **rule,
            )
        )
    return studies


_STUDY_CACHE: dict[tuple, Study] = {}


def _job(
    quick: bool,
    seed: int,
    dataset: str,
    detector: str,
    threads: int,
    glofnd_lr: float,
    glofnd_clip: float | None,
    glofnd_rule: str,
    record: str | None,
    tmp: str,
) -> tuple[str, str, dict[str, Any], dict[str, Any], float]:
    """One (data set, detector) run; in a worker process when ``--jobs`` > 1."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    key = (quick, seed, dataset, glofnd_lr, glofnd_clip, glofnd_rule)
    if key not in _STUDY_CACHE:
        _STUDY_CACHE[key] = build_studies(
            quick, seed, [dataset], glofnd_lr, glofnd_clip, glofnd_rule
        )[0]
    study = _STUDY_CACHE[key]
    settings = {
        k: v
        for k, v in asdict(study).items()
        if k not in ("train", "validation", "adapter", "class_names", "templates")
    }
    settings.update(
        num_train=len(study.train),
        num_validation=len(study.validation),
        num_semantic_classes=len(set(study.train["semantic_label"])),
        ifnd=asdict(study.ifnd_config()),
    )
    t0 = time.perf_counter()
    run = run_one(study, detector, os.path.join(tmp, f"{dataset}_{detector}"), record)
    return dataset, detector, settings, run, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1-minute smoke run")
    parser.add_argument("--datasets", default="digits,shapes")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel, one process each (default: 2 cores)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (more than one per core slows CPU "
        "training down badly when the cores are shared)",
    )
    parser.add_argument(
        "--glofnd-lr",
        type=float,
        default=0.05,
        help="GloFND threshold learning rate (the reference default 0.05)",
    )
    parser.add_argument(
        "--glofnd-update-rule",
        default=GloFNDConfig().update_rule,
        choices=UPDATE_RULES,
        help="GloFND's threshold rule (Adam rules start 2 epochs before masking)",
    )
    parser.add_argument(
        "--glofnd-clip-grad-mult",
        type=float,
        default=None,
        help="clip GloFND's threshold gradient to +-mult x alpha (default: off)",
    )
    parser.add_argument(
        "--suffix",
        default=None,
        help="appended to the output file names (default: '_quick' with --quick)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="save GloFND's batches and every epoch's exact quantiles to DIR, for "
        "benchmarks/replay_thresholds.py (about 40 MB per data set)",
    )
    parser.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    parser.add_argument(
        "--merge",
        nargs=2,
        metavar=("BASE", "NEW"),
        help="replace BASE's runs of the detectors NEW holds (e.g. GloFND re-run "
        "with another rule; the other detectors' runs do not depend on "
        "it), write fn_study{suffix}.json and its F1 plot, and stop",
    )
    opts = parser.parse_args(argv)
    if opts.merge:
        merged = merge_results(*(json.loads(Path(p).read_text()) for p in opts.merge))
        out = Path(opts.out)
        with open(out / f"fn_study{opts.suffix or ''}.json", "w") as f:
            json.dump(merged, f, indent=1)
        plot_f1(merged, out / f"fn_f1{opts.suffix or ''}.png")
        print(markdown_table(merged))
        return merged
    if opts.table:
        with open(opts.table) as f:
            print(markdown_table(json.load(f)))
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = opts.suffix if opts.suffix is not None else ("_quick" if opts.quick else "")
    stem = f"fn_study{suffix}"
    detectors = [d for d in opts.detectors.split(",") if d]
    names = [d for d in opts.datasets.split(",") if d]
    unknown = sorted(set(detectors) - set(DETECTORS)) + sorted(set(names) - {"digits", "shapes"})
    if unknown:
        parser.error(f"unknown detectors or data sets {unknown}")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "description": "tiny HF CLIP from scratch, CLIP InfoNCE, eliminate; same seed and data "
        "order for every detector; precision/recall/F1 of the detected false "
        "negatives vs same semantic_label, pairs of the batch, both sides",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads_per_run": opts.threads,
            "jobs": opts.jobs,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "datasets": {name: {"settings": None, "runs": {}} for name in names},
    }
    arrays: dict[str, list] = {}
    done: dict[tuple[str, str], tuple] = {}

    def report(item) -> None:
        dataset, det, settings, run, seconds = item
        results["datasets"][dataset]["settings"] = settings
        arrays[dataset] = run.pop("_arrays", arrays.get(dataset, []))
        done[(dataset, det)] = run
        fin, zs = run["masking_period"], run["zero_shot"]
        print(
            f"[{dataset}] {det:15s} P={_fmt(fin['precision'])} R={_fmt(fin['recall'])} "
            f"F1={_fmt(fin['f1'])} filtered={fin['filtered_fraction']:.4f} "
            f"i2t@1={zs['image_to_text_recall@1']:.3f} "
            f"t2i@1={zs['text_to_image_recall@1']:.3f} top1={zs['top1_accuracy']:.3f} "
            f"({seconds:.0f} s)",
            flush=True,
        )

    tasks = [
        (
            opts.quick,
            opts.seed,
            name,
            det,
            opts.threads,
            opts.glofnd_lr,
            opts.glofnd_clip_grad_mult,
            opts.glofnd_update_rule,
            opts.record,
        )
        for name in names
        for det in detectors
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if opts.jobs <= 1:
            for task in tasks:
                report(_job(*task, tmp))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(opts.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_job, *task, tmp) for task in tasks]
                for future in as_completed(futures):
                    report(future.result())
    for name in names:  # fixed order in the file, whatever order the runs finished in
        results["datasets"][name]["runs"] = {d: done[(name, d)] for d in detectors}
    torch.set_num_threads(opts.threads)
    results["ifnd_round_scaling"] = ifnd_round_scaling(
        [10_000] if opts.quick else [10_000, 100_000, 400_000]
    )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    with open(out / f"{stem}.json", "w") as f:
        json.dump(results, f, indent=1)
    plot_f1(results, out / f"fn_f1{suffix}.png")
    plot_lambda(results, arrays, out / f"fn_lambda{suffix}.png")
    print(markdown_table(results))
    print(f"wrote {out / (stem + '.json')} in {results['total_seconds']} s")
    return results


def merge_results(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the runs (and the settings) of every detector ``new`` holds replaced."""
    merged = json.loads(json.dumps(base))
    for name, data in new["datasets"].items():
        merged["datasets"][name]["settings"] = data["settings"]
        merged["datasets"][name]["runs"].update(data["runs"])
    merged["merged_from"] = {
        "base": base.get("environment"),
        "new": new.get("environment"),
        "replaced": sorted({d for data in new["datasets"].values() for d in data["runs"]}),
    }
    return merged


def markdown_table(results: dict[str, Any]) -> str:
    """The study's summary table (final epoch detection, final zero-shot scores)."""
    lines = []
    for name, entry in results["datasets"].items():
        s = entry["settings"]
        lines += [
            f"**{name}** (N = {s['num_train']}, {s['num_semantic_classes']} semantic classes, "
            f"{s['epochs']} epochs, masking from epoch {s['mask_start']:g}, alpha = {s['alpha']:g})",
            "",
            "| detector | P | R | F1 | filtered | true FN share | I→T R@1 | I→T R@5 | T→I R@1 "
            "| T→I R@5 | class-aware R@1 I→T / T→I | top-1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for det, run in entry["runs"].items():
            f, z = run["final"], run["zero_shot"]
            lines.append(
                f"| {det} | {_fmt(f['precision'])} | {_fmt(f['recall'])} | {_fmt(f['f1'])} "
                f"| {100 * f['filtered_fraction']:.2f} % | {100 * f['true_fn_fraction']:.2f} % "
                f"| {z['image_to_text_recall@1']:.3f} | {z['image_to_text_recall@5']:.3f} "
                f"| {z['text_to_image_recall@1']:.3f} | {z['text_to_image_recall@5']:.3f} "
                f"| {z['image_to_text_class_r@1']:.3f} / {z['text_to_image_class_r@1']:.3f} "
                f"| {z['top1_accuracy']:.3f} |"
            )
        lines.append("")
        lines += training_mode_table(entry["runs"].get("glofnd", {}))
    return "\n".join(lines)


def training_mode_table(run: dict[str, Any]) -> list[str]:
    """GloFND's thresholds in rank units on fresh training-mode similarities, each snapshot
    beside the exact quantiles of another draw (same epoch; previous epoch)."""
    snaps = run.get("training_mode", [])
    if not snaps:
        return []
    names = ("learned", "exact_other_draw", "exact_previous_epoch")
    lines = [
        "GloFND in training mode (filtered / alpha, share of anchors within [0.5, 2] x alpha, "
        "mask F1 against the exact rule on the same similarities):",
        "",
        "| epoch | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for snap in snaps:
        cells = []
        for name in names:
            f = snap.get(name)
            cells.append(
                "n/a"
                if f is None
                else f"{f['filtered_over_alpha']:.2f} / {100 * f['within_half_to_double']:.0f} % "
                f"/ {f['mask_f1']:.2f}"
            )
        lines.append(f"| {snap['epoch']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
