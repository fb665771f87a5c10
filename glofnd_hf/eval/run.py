"""Zero-shot evaluation runs: load a model and an evaluation set, score, write a JSON report.

This is the Python API behind ``glofnd-eval``::

    from glofnd_hf.eval.run import evaluate

    report = evaluate("outputs/run", dataset="glofnd-digits", output="results.json")
    report["metrics"]["text_to_image_recall@1"]

Models go through :func:`glofnd_hf.models.load_dual_encoder`: our training outputs (folders),
Hugging Face CLIP-family checkpoints (folder or Hub id), open_clip architectures with a
``pretrained`` tag, ``hf-hub:ORG/NAME`` and ``local-dir:PATH``. Data (:mod:`.data`): a
``datasets`` dataset (Hub id, ``save_to_disk`` folder or an in-memory ``Dataset``), WebDataset
shards (captions from ``.txt``, ``.text`` or ``.caption`` as in training; samples whose
``.json`` share an image id are one image with several captions), or ``glofnd-digits`` (the
embedded demo's validation split, with digit classification).

Metric names (built and parsed in :mod:`.metrics`, with CLIP_benchmark's):
``image_to_text_recall@k``, ``text_to_image_recall@k``, ``top{k}_accuracy``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..version import __version__
from .data import load_eval_data
from .errors import EvalInputError
from .metrics import DEFAULT_TIE_RULE, check_tie_rule, clip_benchmark_names, format_metrics_table
from .zero_shot import CLASSIFICATION, RETRIEVAL, ZeroShotEvaluator, resolve_tasks

if TYPE_CHECKING:
    from ..model_card import CardInfo

logger = logging.getLogger(__name__)

__all__ = [
    "RESULTS_FORMAT_VERSION",
    "evaluate",
    "format_report",
    "default_device",
    "load_eval_model",
    "save_report",
]

RESULTS_FORMAT_VERSION = 1


# -------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------


def default_device() -> str:
    """Where models run when no device is given: CUDA where there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ready(adapter, device: str | torch.device | None):
    adapter.model.to(torch.device(device or default_device()))
    adapter.model.eval()
    return adapter


def load_eval_model(
    model: str | os.PathLike,
    pretrained: str | None = None,
    family: str = "auto",
    device: str | torch.device | None = None,
    **kwargs: Any,
):
    """A :class:`~glofnd_hf.models.DualEncoderAdapter` in eval mode on ``device``.

    Raises :class:`EvalInputError` naming what was tried for names that resolve to nothing.
    """
    from ..models import load_dual_encoder

    name = str(model)
    if pretrained is None and os.path.isdir(name):
        # A model folder loads directly: the name checks below would import open_clip for
        # nothing (seconds on a small CPU).
        try:
            adapter = load_dual_encoder(name, family=family, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise EvalInputError(f"cannot load a model from the folder {name}: {e}") from e
        return _ready(adapter, device)
    import open_clip

    architectures = open_clip.list_models()
    is_arch = name in architectures or name.replace("/", "-") in architectures
    if pretrained is not None and not is_arch and not name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(name, architectures, n=5, cutoff=0.6)
        hint = f"; close matches: {close}" if close else ""
        raise EvalInputError(
            f"unknown open_clip architecture {name!r} (pretrained={pretrained!r} needs one of "
            f"open_clip.list_models(){hint}). For a Hugging Face model or a folder, leave out "
            "--pretrained"
        )
    try:
        adapter = load_dual_encoder(name, family=family, pretrained=pretrained, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        message = f"cannot load model {name!r}: {e}"
        if not is_arch and "/" not in name and not os.path.exists(name):
            close = difflib.get_close_matches(name, architectures, n=5, cutoff=0.6)
            if close:
                message += f" (close open_clip architecture names: {close})"
        raise EvalInputError(message) from e
    return _ready(adapter, device)


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    *,
    pretrained: str | None = None,
    family: str = "auto",
    dataset: Any = None,
    shards: str | Sequence[str] | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    class_label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    tasks: Sequence[str] | str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    classification_ks: Sequence[int] = (1, 5),
    batch_size: int = 64,
    chunk_size: int = 1024,
    device: str | None = None,
    max_samples: int | None = None,
    image_id_field: str | None = "image_id",
    output: str | os.PathLike | None = None,
    show_progress: bool = True,
    ties: str = DEFAULT_TIE_RULE,
) -> dict[str, Any]:
    """Zero-shot retrieval and/or classification of one model on one evaluation set.

    ``model``: a name or folder for :func:`load_eval_model`, or an already loaded
    ``DualEncoderAdapter`` (used on its current device). Data: see :func:`load_eval_data`.
    ``tasks``: ``"retrieval"``, ``"classification"``, both, or ``None``/``"auto"``
    (retrieval, plus classification when a class label column is known).
    ``ties``: how equal scores rank (:data:`~glofnd_hf.eval.metrics.TIE_RULES`):
    ``"lower-index"`` (default) or ``"clip-benchmark"`` (``torch.topk``'s choice on the model's
    device, which reproduces CLIP_benchmark's numbers); recorded in the report.

    Returns the report (also written to ``output`` as JSON when given)::

        {"format_version": 1, "glofnd_hf_version": ..., "created": ...,
         "task": ["zero_shot_retrieval", ...],
         "model": {"name", "pretrained", "family", "class", "num_parameters"},
         "data": {"kind", "source", "split", "config", "image_column", "caption_column",
                  "class_label_column", "num_classes", "num_templates", "max_samples", ...},
         "ks": [1, 5, 10], "classification_ks": [1, 5], "ties": "lower-index",
         "num_images": I, "num_captions": T,
         "metrics": {"image_to_text_recall@1": ..., ..., "top1_accuracy": ...},
         "metrics_clip_benchmark": {"text_retrieval_recall@1": ..., ..., "acc1": ...},
         "device": "cpu", "timing": {"embed_seconds": ..., "score_seconds": ...}}
    """
    # Long: every option of glofnd-eval is a keyword here, and the docstring gives the report.
    try:
        check_tie_rule(ties)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    if dataset_config is None:
        dataset_config = trained_config(model, dataset)
    data = load_eval_data(
        dataset,
        shards=shards,
        split=split,
        dataset_config=dataset_config,
        image_column=image_column,
        caption_column=caption_column,
        class_label_column=class_label_column,
        class_names=class_names,
        templates=templates,
        image_id_field=image_id_field,
        max_samples=max_samples,
    )
    evaluator = _build_evaluator(
        data,
        tasks,
        ks=ks,
        classification_ks=classification_ks,
        batch_size=batch_size,
        chunk_size=chunk_size,
        show_progress=show_progress,
        ties=ties,
    )
    adapter, model_name = _resolve_model(model, pretrained, family, device)

    start = time.perf_counter()
    embeds = evaluator.embed(adapter)
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.score(embeds)
    timing = {
        "embed_seconds": round(embed_seconds, 4),
        "score_seconds": round(time.perf_counter() - start, 4),
    }

    report = _build_report(evaluator, data["info"], adapter, model_name, pretrained, metrics)
    report["timing"] = timing
    training = training_record(model)
    if training is not None:
        report["training"] = training
    if output is not None:
        save_report(report, output)
    return report


def _build_evaluator(
    data: Mapping[str, Any], tasks: Sequence[str] | str | None, **options: Any
) -> ZeroShotEvaluator:
    """The evaluator of the tasks asked for (or found in the data) on loaded evaluation data;
    what does not fit the data is an ``EvalInputError``."""
    try:
        task_list = resolve_tasks(
            tasks,
            data["caption_column"],
            data["class_label_column"],
            columns=data["dataset"].column_names,
        )
        return ZeroShotEvaluator(
            data["dataset"],
            data["image_column"],
            data["caption_column"] if RETRIEVAL in task_list else None,
            data["class_label_column"] if CLASSIFICATION in task_list else None,
            data["class_names"],
            data["templates"],
            tasks=task_list,
            dataset_name=str(data["info"]["source"]),
            split=data["info"]["split"],
            **options,
        )
    except ValueError as e:
        raise EvalInputError(str(e)) from e


def _resolve_model(
    model: Any, pretrained: str | None, family: str, device: str | None
) -> tuple[Any, str]:
    """An adapter and the name the report gives it: a loaded adapter as it is (on its own
    device), anything else through :func:`load_eval_model`."""
    from ..models import DualEncoderAdapter

    if isinstance(model, DualEncoderAdapter):
        return model, getattr(model, "model_name", None) or type(model.model).__name__
    return load_eval_model(model, pretrained, family, device), str(model)


def _build_report(
    evaluator: ZeroShotEvaluator,
    data_info: Mapping[str, Any],
    adapter: Any,
    model_name: str,
    pretrained: str | None,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The report of :func:`evaluate` (without its timing and training record)."""
    task_list = list(evaluator.tasks)
    retrieval, classification = RETRIEVAL in task_list, CLASSIFICATION in task_list
    info = dict(data_info)
    info.update(
        image_column=evaluator.image_column,
        caption_column=evaluator.caption_column if retrieval else None,
        class_label_column=evaluator.class_label_column if classification else None,
    )
    if classification:
        info.update(
            num_classes=len(evaluator.class_names or []),
            num_templates=len(evaluator.templates),
            templates=evaluator.templates,
        )
    return {
        "format_version": RESULTS_FORMAT_VERSION,
        "glofnd_hf_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": [f"zero_shot_{t}" for t in task_list],
        "model": {
            "name": model_name,
            "pretrained": pretrained,
            "family": adapter.family,
            "class": type(adapter.model).__name__,
            "num_parameters": sum(p.numel() for p in adapter.model.parameters()),
        },
        "data": info,
        "ks": list(evaluator.ks) if retrieval else [],
        "classification_ks": list(evaluator.classification_ks) if classification else [],
        "ties": evaluator.ties,
        "num_images": evaluator.num_images,
        "num_captions": evaluator.num_captions,
        "metrics": metrics,
        "metrics_clip_benchmark": clip_benchmark_names(metrics),
        "device": str(adapter.device),
    }


def _card_info(model: Any) -> CardInfo | None:
    """The ``CardInfo`` of a model folder written by glofnd-hf (its ``glofnd_card.json``);
    None for a loaded model, a name, or a folder without one."""
    from ..model_card import CARD_INFO_FILE, CardInfo

    if not isinstance(model, (str, os.PathLike)) or not (Path(model) / CARD_INFO_FILE).is_file():
        return None
    return CardInfo.load(model)


def training_record(model: Any) -> dict[str, Any] | None:
    """How a model folder written by glofnd-hf was trained (loss, detector and what it does,
    non-default settings), read from its ``glofnd_card.json``; None for anything else."""
    from ..model_card import describe_detector

    info = _card_info(model)
    if info is None or not info.training_recorded:
        return None
    return {
        "loss_type": info.loss_type,
        "detector": info.detector,
        "detector_description": describe_detector(info.detector) if info.detector else None,
        "fn_strategy": info.fn_strategy,
        "non_default_settings": info.non_default_settings,
        "epochs": info.epochs,
        "global_step": info.global_step,
        "glofnd_version": info.glofnd_version,
    }


def trained_config(model: Any, dataset: Any) -> str | None:
    """The configuration of ``dataset`` that a glofnd-hf model folder was evaluated on in
    training (its card's), when ``dataset`` is that card's data set; else None. So that
    ``glofnd-eval --model outputs/demo --dataset glofnd-digits`` scores the demo on the
    configuration it trained on, not the data set's default one."""
    info = _card_info(model)
    if info is None or not isinstance(dataset, (str, os.PathLike)):
        return None
    if info.eval_dataset_config and info.eval_dataset == str(dataset):
        logger.info(
            "evaluating %s in its configuration %r, the one %s was evaluated on in training "
            "(--dataset-config to choose another)",
            dataset,
            info.eval_dataset_config,
            model,
        )
        return info.eval_dataset_config
    return None


def save_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a report as indented JSON (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


def format_report(report: Mapping[str, Any]) -> str:
    """A terminal summary: model, data, sizes and the metrics table."""
    model, data = report["model"], report["data"]
    name = model["name"] + (f" ({model['pretrained']})" if model.get("pretrained") else "")
    source = data["source"] if isinstance(data["source"], str) else ", ".join(data["source"])
    lines = [
        f"model:  {name} [{model['family']}, {model['num_parameters']:,} parameters]",
        f"data:   {source}"
        + (f" [{data['split']}]" if data.get("split") else "")
        + f", {report['num_images']} images, {report['num_captions']} captions"
        + (
            f", {data['num_classes']} classes x {data['num_templates']} templates"
            if data.get("num_classes")
            else ""
        ),
        f"task:   {', '.join(report['task'])}"
        + (
            f" (ties: {report['ties']})"
            if report.get("ties", DEFAULT_TIE_RULE) != DEFAULT_TIE_RULE
            else ""
        ),
    ]
    training = report.get("training")
    if training:
        lines.append(
            f"trained: {training['loss_type']} loss, detector "
            f"{training['detector_description'] or training['detector']}"
        )
    lines += [
        "",
        format_metrics_table(report["metrics"]),
    ]
    return "\n".join(lines)
