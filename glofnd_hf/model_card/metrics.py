"""Zero-shot metrics in a card: which metric names are ours, their labels and Hub results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..metric_names import parse_metric_name
from .descriptions import hub_dataset_type

__all__ = ["clip_benchmark_name", "eval_results_from_metrics", "normalize_eval_metrics"]


def clip_benchmark_name(name: str) -> str | None:
    """CLIP_benchmark's name of one of our metrics, None when it has none."""
    parsed = parse_metric_name(name)
    return None if parsed is None else parsed.clip_benchmark_name


def normalize_eval_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Our zero-shot metrics out of a metrics dict: ``eval_`` prefixes stripped; runtime,
    loss, epoch and ``eval_before_*`` (scores before training) left out."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if key.startswith("eval_before_"):
            continue
        name = key[len("eval_") :] if key.startswith("eval_") else key
        if parse_metric_name(name) is not None and isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def eval_results_from_metrics(
    metrics: Mapping[str, float],
    dataset: str | None = None,
    split: str | None = None,
    *,
    config: str | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
):
    """``huggingface_hub.EvalResult`` entries (model-index) for our zero-shot metrics.

    ``dataset``: the Hub id of the evaluation data (``dataset.type``, and ``dataset.name``
    unless ``dataset_name`` is given); ``dataset_type`` overrides the type; ``split`` and
    ``config`` are recorded as ``dataset.split`` / ``dataset.config``.

    ``EvalResult`` requires ``dataset.type``, the Hub id of the data (the Hub links it and
    compares models by it). Data that is not on the Hub (a local folder, shards, the embedded
    digits) has none: then there are no entries (an empty list), and the card reports the
    results in its text only."""
    from huggingface_hub import EvalResult

    dataset_type = hub_dataset_type(dataset_type) or hub_dataset_type(dataset)
    if dataset_type is None:
        return []
    dataset_name = dataset_name or dataset or dataset_type
    results = []
    for name, value in normalize_eval_metrics(metrics).items():
        parsed = parse_metric_name(name)
        retrieval = parsed.is_retrieval
        results.append(
            EvalResult(
                task_type="zero-shot-retrieval" if retrieval else "zero-shot-image-classification",
                task_name="Zero-shot image-text retrieval"
                if retrieval
                else "Zero-shot image classification",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=split,
                dataset_config=config,
                metric_type=name,
                metric_name=parsed.label,
                metric_value=round(float(value), 6),
                metric_config=parsed.clip_benchmark_name,
            )
        )
    return results
