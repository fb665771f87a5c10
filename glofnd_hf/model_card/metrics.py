"""Zero-shot metrics in a card: which metric names are ours, their labels and Hub results."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..data.hf import DIGITS_DATASET
from ..eval.run import clip_benchmark_names

__all__ = ["clip_benchmark_name", "eval_results_from_metrics", "normalize_eval_metrics"]

_METRIC_RE = re.compile(r"(image_to_text|text_to_image)_recall@(\d+)|top(\d+)_accuracy")


def _metric_label(name: str) -> str | None:
    """Readable label of one of our zero-shot metric names, None for any other name (the one
    place here that parses metric names)."""
    m = _METRIC_RE.fullmatch(name)
    if m is None:
        return None
    if m.group(1):
        direction = "Image-to-text" if m.group(1) == "image_to_text" else "Text-to-image"
        return f"{direction} recall@{m.group(2)}"
    return f"Top-{m.group(3)} accuracy"


def clip_benchmark_name(name: str) -> str | None:
    """CLIP_benchmark's name of one of our metrics, None when it has none."""
    return next(iter(clip_benchmark_names({name: 0.0})), None)


def normalize_eval_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Our zero-shot metrics out of a metrics dict: ``eval_`` prefixes stripped; runtime,
    loss, epoch and ``eval_before_*`` (scores before training) left out."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if key.startswith("eval_before_"):
            continue
        name = key[len("eval_"):] if key.startswith("eval_") else key
        if _metric_label(name) is not None and isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def eval_results_from_metrics(
    metrics: Mapping[str, float],
    dataset: str | None = None,
    split: str | None = None,
):
    """``huggingface_hub.EvalResult`` entries (model-index) for our zero-shot metrics."""
    from huggingface_hub import EvalResult

    dataset_type = dataset or "unknown"
    dataset_name = dataset or "evaluation data"
    if dataset == DIGITS_DATASET:
        dataset_name = "glofnd coloured digits"
    results = []
    for name, value in normalize_eval_metrics(metrics).items():
        retrieval = "recall" in name
        results.append(EvalResult(
            task_type="zero-shot-retrieval" if retrieval else "zero-shot-image-classification",
            task_name="Zero-shot image-text retrieval" if retrieval
            else "Zero-shot image classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=name,
            metric_name=_metric_label(name) or name,
            metric_value=round(float(value), 6),
            metric_config=clip_benchmark_name(name),
        ))
    return results
