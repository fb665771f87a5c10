"""Zero-shot evaluation runs: load a model and an evaluation set, score, write a JSON report.

This is the Python API behind ``glofnd-eval``::

    from glofnd_hf.eval.run import evaluate

    report = evaluate("outputs/run", dataset="glofnd-digits", output="results.json")
    report["metrics"]["text_to_image_recall@1"]

Models go through :func:`glofnd_hf.models.load_dual_encoder`: our training outputs (folders),
Hugging Face CLIP-family checkpoints (folder or Hub id), open_clip architectures with a
``pretrained`` tag, ``hf-hub:ORG/NAME`` and ``local-dir:PATH``. Data: a ``datasets`` dataset
(Hub id, ``save_to_disk`` folder or an in-memory ``Dataset``), WebDataset shards (captions from
``.txt``; samples whose ``.json`` share an image id are one image with several captions), or
``glofnd-digits`` (the embedded demo's validation split, with digit classification).

Metric names (see :data:`CLIP_BENCHMARK_NAMES` for CLIP_benchmark's):
``image_to_text_recall@k``, ``text_to_image_recall@k``, ``top{k}_accuracy``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.hf import DIGITS_DATASET
from .metrics import format_metrics_table
from .zero_shot import CLASSIFICATION, RETRIEVAL, TASKS, ZeroShotEvaluator

__all__ = [
    "CLIP_BENCHMARK_NAMES",
    "EvalInputError",
    "RESULTS_FORMAT_VERSION",
    "clip_benchmark_names",
    "evaluate",
    "format_report",
    "load_eval_data",
    "load_eval_model",
    "load_shards_for_eval",
    "save_report",
]

RESULTS_FORMAT_VERSION = 1
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_KEY = "txt"
DEFAULT_SPLITS = ("test", "validation")


class EvalInputError(ValueError):
    """A model name, dataset, column or caption the evaluation cannot use (message says why)."""


# -------------------------------------------------------------------------------------------
# metric names
# -------------------------------------------------------------------------------------------

#: Our metric name pattern -> CLIP_benchmark's. Our image-to-text retrieval (image queries,
#: captions retrieved) is CLIP_benchmark's *text* retrieval, and vice versa.
CLIP_BENCHMARK_NAMES = {
    r"image_to_text_recall@(\d+)": r"text_retrieval_recall@\1",
    r"text_to_image_recall@(\d+)": r"image_retrieval_recall@\1",
    r"top(\d+)_accuracy": r"acc\1",
}


def clip_benchmark_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """The same metrics under CLIP_benchmark's names (unknown names are left out)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        for pattern, replacement in CLIP_BENCHMARK_NAMES.items():
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, replacement, name)] = value
                break
    return out


# -------------------------------------------------------------------------------------------
# models
# -------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    import open_clip

    from ..models import load_dual_encoder

    name = str(model)
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
    adapter.model.to(torch.device(device or _default_device()))
    adapter.model.eval()
    return adapter


# -------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------


def _list_of_strings_feature():
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return list_type(datasets.Value("string"))


def load_shards_for_eval(
    shards: str | Sequence[str],
    *,
    image_id_field: str | None = "image_id",
    label_field: str | None = None,
    caption_key: str = SHARD_CAPTION_KEY,
):
    """Read WebDataset shards into an in-memory ``datasets.Dataset`` for evaluation.

    Columns: ``image`` (the encoded bytes, ``datasets.Image``), ``caption`` (list of str) and,
    with ``label_field``, ``label`` (read from each sample's ``.json``). Samples whose ``.json``
    holds the same ``image_id_field`` value are one image with several captions (the image of
    the first such sample is kept); samples without it are one image each. Every sample needs
    a non-empty ``.txt`` caption and an image (``jpg``/``jpeg``/``png``/``webp``).
    """
    import datasets

    from ..data.shards import _is_local, _local_path, expand_shards, iter_tar_samples

    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    missing = [u for u in urls if _is_local(u) and not os.path.exists(_local_path(u))]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]!r}"
        )
    errors: list[str] = []

    def on_error(url: str, key: str | None, exc: Exception) -> None:
        errors.append(f"shard {url!r} near key {key!r}: {type(exc).__name__}: {exc}")

    slot_of: dict[Any, int] = {}
    images: list[dict[str, Any]] = []
    captions: list[list[str]] = []
    labels: list[Any] = []
    for url in urls:
        for sample in iter_tar_samples(url, on_error):
            where = f"sample {sample['__key__']!r} of shard {url!r}"
            raw = sample.get(caption_key)
            caption = raw.decode("utf-8", errors="replace").strip() if raw is not None else ""
            if not caption:
                raise EvalInputError(f"{where} has no caption (empty or missing .{caption_key})")
            meta: dict[str, Any] = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise EvalInputError(f"{where} has an unreadable .json: {e}") from e
                if not isinstance(meta, dict):
                    meta = {}
            image_id = meta.get(image_id_field) if image_id_field else None
            group = ("id", json.dumps(image_id, sort_keys=True)) if image_id is not None else (
                "sample", url, sample["__key__"])
            if group in slot_of:
                captions[slot_of[group]].append(caption)
                continue
            image = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
            if image is None:
                raise EvalInputError(
                    f"{where} has no image (looked for {', '.join(SHARD_IMAGE_KEYS)})"
                )
            if label_field is not None:
                if label_field not in meta:
                    raise EvalInputError(f"{where}: its .json has no label field {label_field!r}")
                labels.append(meta[label_field])
            slot_of[group] = len(images)
            images.append({"bytes": image, "path": None})
            captions.append([caption])
    if errors:
        raise EvalInputError("could not read the shards: " + "; ".join(errors[:3]))
    if not images:
        raise EvalInputError(f"shards {shards!r} hold no samples")
    columns: dict[str, list] = {"image": images, "caption": captions}
    features = {"image": datasets.Image(), "caption": _list_of_strings_feature()}
    if label_field is not None:
        columns["label"] = labels
        kind = "string" if all(isinstance(v, str) for v in labels) else "int64"
        features["label"] = datasets.Value(kind)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _pick_split(data: Any, name: str, split: str | None):
    import datasets

    if not isinstance(data, (datasets.DatasetDict, dict)):
        return data, split
    splits = list(data)
    if split is not None:
        if split not in data:
            raise EvalInputError(f"dataset {name!r} has no split {split!r}; it has {splits}")
        return data[split], split
    for candidate in DEFAULT_SPLITS:
        if candidate in data:
            return data[candidate], candidate
    if len(splits) == 1:
        return data[splits[0]], splits[0]
    raise EvalInputError(f"dataset {name!r} has splits {splits}: choose one with --split")


def load_eval_data(
    dataset: Any = None,
    *,
    shards: str | Sequence[str] | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str | None = "caption",
    class_label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_id_field: str | None = "image_id",
    max_samples: int | None = None,
) -> dict[str, Any]:
    """The evaluation set and what describes it.

    Returns ``{"dataset": datasets.Dataset, "info": {...}}`` plus the effective
    ``image_column`` / ``caption_column`` / ``class_label_column`` / ``class_names`` /
    ``templates`` (``glofnd-digits`` fills in digit classification; shards use ``image`` /
    ``caption`` / ``label``). ``split`` defaults to ``test``, else ``validation``, else the only
    split (``validation`` for ``glofnd-digits``).
    """
    import datasets

    if (dataset is None) == (shards is None):
        raise EvalInputError("give exactly one of a dataset (--dataset) or shards (--shards)")
    info: dict[str, Any] = {"config": dataset_config}
    if shards is not None:
        data = load_shards_for_eval(shards, image_id_field=image_id_field,
                                    label_field=class_label_column)
        info.update(kind="webdataset", source=shards if isinstance(shards, str) else list(shards),
                    split=None, image_id_field=image_id_field)
        image_column, caption_column = "image", "caption"
        class_label_column = "label" if class_label_column else None
    elif isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "in-memory"
        data, split = _pick_split(dataset, name, split)
        info.update(kind="datasets", source=name, split=split or _split_name(data))
    else:
        name = str(dataset)
        if name == DIGITS_DATASET:
            from ..data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES

            split = split or "validation"
            class_label_column = class_label_column or "digit"
            class_names = class_names or list(DIGIT_NAMES)
            templates = templates or list(CLASSIFICATION_TEMPLATES)
            kind = DIGITS_DATASET
        else:
            kind = "datasets"
        try:
            if kind == "datasets" and split is not None and not os.path.isdir(name):
                # Hub dataset: fetch only the split that is evaluated.
                loaded = datasets.load_dataset(name, dataset_config, split=split)
            else:
                from ..data.hf import load_image_text_dataset

                loaded = load_image_text_dataset(name, dataset_config, None)
        except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
            raise EvalInputError(
                f"cannot load dataset {name!r} (a Hub dataset id, a folder written by "
                f"save_to_disk, or {DIGITS_DATASET!r}): {type(e).__name__}: {e}"
            ) from e
        data, split = _pick_split(loaded, name, split)
        info.update(kind=kind, source=name, split=split)
    if max_samples is not None:
        if max_samples < 1:
            raise EvalInputError(f"max_samples must be positive, got {max_samples}")
        data = data.select(range(min(max_samples, len(data))))
    info["max_samples"] = max_samples
    return {
        "dataset": data, "info": info, "image_column": image_column,
        "caption_column": caption_column, "class_label_column": class_label_column,
        "class_names": list(class_names) if class_names else None,
        "templates": list(templates) if templates else None,
    }


def _split_name(data: Any) -> str | None:
    split = getattr(data, "split", None)
    return str(split) if split is not None else None


def _resolve_tasks(tasks: Sequence[str] | str | None, data: Mapping[str, Any]) -> list[str]:
    if tasks is not None and not isinstance(tasks, str):
        tasks = list(tasks)
    if tasks in (None, "auto", ["auto"]):
        columns = data["dataset"].column_names
        has_classification = bool(data["class_label_column"])
        out = [] if (has_classification and data["caption_column"] not in columns) else [RETRIEVAL]
        return out + ([CLASSIFICATION] if has_classification else [])
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if "both" in tasks:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalInputError(f"unknown task(s) {unknown}; choose from {list(TASKS)}, both, auto")
    return [t for t in TASKS if t in tasks]


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
) -> dict[str, Any]:
    """Zero-shot retrieval and/or classification of one model on one evaluation set.

    ``model``: a name or folder for :func:`load_eval_model`, or an already loaded
    ``DualEncoderAdapter`` (used on its current device). Data: see :func:`load_eval_data`.
    ``tasks``: ``"retrieval"``, ``"classification"``, both, or ``None``/``"auto"``
    (retrieval, plus classification when a class label column is known).

    Returns the report (also written to ``output`` as JSON when given)::

        {"format_version": 1, "glofnd_hf_version": ..., "created": ...,
         "task": ["zero_shot_retrieval", ...],
         "model": {"name", "pretrained", "family", "class", "num_parameters"},
         "data": {"kind", "source", "split", "config", "image_column", "caption_column",
                  "class_label_column", "num_classes", "num_templates", "max_samples", ...},
         "ks": [1, 5, 10], "classification_ks": [1, 5],
         "num_images": I, "num_captions": T,
         "metrics": {"image_to_text_recall@1": ..., ..., "top1_accuracy": ...},
         "metrics_clip_benchmark": {"text_retrieval_recall@1": ..., ..., "acc1": ...},
         "device": "cpu", "timing": {"embed_seconds": ..., "score_seconds": ...}}
    """
    from .. import __version__
    from ..models import DualEncoderAdapter

    data = load_eval_data(
        dataset, shards=shards, split=split, dataset_config=dataset_config,
        image_column=image_column, caption_column=caption_column,
        class_label_column=class_label_column, class_names=class_names, templates=templates,
        image_id_field=image_id_field, max_samples=max_samples,
    )
    task_list = _resolve_tasks(tasks, data)
    try:
        evaluator = ZeroShotEvaluator(
            data["dataset"], data["image_column"],
            data["caption_column"] if RETRIEVAL in task_list else None,
            data["class_label_column"] if CLASSIFICATION in task_list else None,
            data["class_names"], data["templates"], ks=ks, batch_size=batch_size,
            show_progress=show_progress, tasks=task_list, classification_ks=classification_ks,
            chunk_size=chunk_size, dataset_name=str(data["info"]["source"]),
            split=data["info"]["split"],
        )
    except ValueError as e:
        raise EvalInputError(str(e)) from e

    if isinstance(model, DualEncoderAdapter):
        adapter, model_name = model, getattr(model, "model_name", None) or type(model.model).__name__
    else:
        adapter, model_name = load_eval_model(model, pretrained, family, device), str(model)

    start = time.perf_counter()
    embeds = evaluator.embed(adapter)
    embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.score(embeds)
    score_seconds = time.perf_counter() - start

    info = dict(data["info"])
    info.update(
        image_column=evaluator.image_column,
        caption_column=evaluator.caption_column if RETRIEVAL in task_list else None,
        class_label_column=evaluator.class_label_column if CLASSIFICATION in task_list else None,
    )
    if CLASSIFICATION in task_list:
        info.update(num_classes=len(evaluator.class_names or []),
                    num_templates=len(evaluator.templates), templates=evaluator.templates)
    report: dict[str, Any] = {
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
        "ks": list(evaluator.ks) if RETRIEVAL in task_list else [],
        "classification_ks": list(evaluator.classification_ks)
        if CLASSIFICATION in task_list else [],
        "num_images": evaluator.num_images,
        "num_captions": evaluator.num_captions,
        "metrics": metrics,
        "metrics_clip_benchmark": clip_benchmark_names(metrics),
        "device": str(adapter.device),
        "timing": {"embed_seconds": round(embed_seconds, 4),
                   "score_seconds": round(score_seconds, 4)},
    }
    if output is not None:
        save_report(report, output)
    return report


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
        f"data:   {source}" + (f" [{data['split']}]" if data.get("split") else "")
        + f", {report['num_images']} images, {report['num_captions']} captions"
        + (f", {data['num_classes']} classes x {data['num_templates']} templates"
           if data.get("num_classes") else ""),
        f"task:   {', '.join(report['task'])}",
        "",
        format_metrics_table(report["metrics"]),
    ]
    return "\n".join(lines)
