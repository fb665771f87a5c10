"""One study setting (``Study``) and one training run of it with one detector (``run_one``).

This is what the study's runner and ``fn_value.py`` share: the same tiny CLIP
(``build_tiny_hf_clip``, same seed, same data order) trained with a registered detector, its
masks scored against the labels while it trains, then zero-shot retrieval and
classification on the validation split.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from glofnd_hf.args import GloFNDTrainingArguments
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.fnd import GloFNDConfig, registry
from glofnd_hf.fnd.ifnd_config import IFNDConfig
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import GloFNDTrainer

from .recording import RecordingDetector, StudyClipLoss, pooled
from .snapshots import ThresholdSnapshots


def _study_order(name: str) -> tuple[int, str]:
    """The baseline without detection first, the label oracle (the ceiling) last."""
    return {"none": 0, "oracle": 2}.get(name, 1), name


DETECTORS = tuple(sorted(registry.names(), key=_study_order))
"""The registered detectors, in the order the study runs and reports them."""


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
        "masking_period": pooled(recorder, study.mask_start),
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


def class_aware_recall(embeds: dict[str, torch.Tensor], data) -> dict[str, float]:
    """R@1 where any item of the query's semantic class counts as a hit (both directions)."""
    labels = torch.tensor(data.with_format(None)["semantic_label"])
    image = F.normalize(embeds["images"], dim=-1)
    text = F.normalize(embeds["texts"], dim=-1)
    sims = image @ text.t()
    i2t = (labels[sims.argmax(1)] == labels).float().mean()
    t2i = (labels[sims.argmax(0)] == labels).float().mean()
    return {"image_to_text_class_r@1": float(i2t), "text_to_image_class_r@1": float(t2i)}
