"""Model cards for GloFND-trained models (``README.md`` with Hub metadata).

The card is rendered from ``model_cards/glofnd_model_card_template.md`` with
``huggingface_hub.ModelCard.from_template``. Its metadata holds ``library_name``
(``transformers`` or ``open_clip``), ``pipeline_tag: zero-shot-image-classification``, tags,
``base_model`` (when fine-tuned from a Hub model), ``datasets``, ``license`` and a
``model-index`` with the zero-shot results (``huggingface_hub.EvalResult``, our metric names).
The text describes the loss and detector, the GloFND settings that differ from the defaults of
:class:`~glofnd_hf.args.GloFNDTrainingArguments`, N and the epochs, a usage snippet and the
BibTeX of GloFND, CLIP and (for the global losses) FastCLIP / SogCLR.

* :func:`write_model_card` writes the card of a final model from a trainer;
* :class:`ModelCardCallback` writes one into every checkpoint folder and collects eval metrics;
* :func:`card_info_from_folder` rebuilds what is known from a saved folder (``glofnd-push``).

Besides ``README.md`` the card's inputs are saved as ``glofnd_card.json`` so the card can be
rendered again (e.g. with the repository id in the usage snippet).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .data.hf import DIGITS_DATASET

__all__ = [
    "CARD_INFO_FILE",
    "CITATIONS",
    "CardInfo",
    "ModelCardCallback",
    "card_info_from_folder",
    "card_is_unedited",
    "card_info_from_trainer",
    "eval_results_from_metrics",
    "model_card_callback",
    "non_default_settings",
    "normalize_eval_metrics",
    "render_model_card",
    "resolve_base_model",
    "set_model_card_info",
    "template_path",
    "write_card",
    "write_model_card",
]

CARD_INFO_FILE = "glofnd_card.json"
TEMPLATE_NAME = "glofnd_model_card_template.md"
BASE_TAGS = ("glofnd", "clip", "contrastive-learning", "zero-shot-image-classification")
PIPELINE_TAG = "zero-shot-image-classification"
LIBRARY_NAMES = {"hf": "transformers", "open_clip": "open_clip"}

# Fields of GloFNDTrainingArguments that are not method settings (or are reported elsewhere).
_NOT_SETTINGS = {"num_samples", "state_device", "check_inputs", "remove_unused_columns"}

_METRIC_RE = re.compile(r"(image_to_text|text_to_image)_recall@(\d+)|top(\d+)_accuracy")

CITATIONS: dict[str, dict[str, str]] = {
    "glofnd": {
        "what": "GloFND (the false-negative detection used in training)",
        "bibtex": """@inproceedings{balmaseda2025glofnd,
  title         = {Discovering Global False Negatives On the Fly for Self-supervised Contrastive Learning},
  author        = {Balmaseda, Vicente and Wang, Bokun and Lin, Ching-Long and Yang, Tianbao},
  booktitle     = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  year          = {2025},
  eprint        = {2502.20612},
  archivePrefix = {arXiv}
}""",
    },
    "clip": {
        "what": "CLIP",
        "bibtex": """@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  year      = {2021}
}""",
    },
    "fastclip": {
        "what": "FastCLIP (the global contrastive loss and temperature scheme)",
        "bibtex": """@article{wei2024fastclip,
  title         = {FastCLIP: A Suite of Optimization Techniques to Accelerate CLIP Training with Limited Resources},
  author        = {Wei, Xiyuan and Ye, Fanjiang and Yonay, Ori and Chen, Xingyu and Sun, Baixi and Tao, Dingwen and Yang, Tianbao},
  journal       = {arXiv preprint arXiv:2407.01445},
  year          = {2024},
  eprint        = {2407.01445},
  archivePrefix = {arXiv}
}""",
    },
    "sogclr": {
        "what": "SogCLR (the global contrastive loss with a fixed temperature)",
        "bibtex": """@inproceedings{yuan2022sogclr,
  title     = {Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does Not Harm Performance},
  author    = {Yuan, Zhuoning and Wu, Yuexin and Qiu, Zi-Hao and Du, Xianzhi and Zhang, Lijun and Zhou, Denny and Yang, Tianbao},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning (ICML)},
  year      = {2022}
}""",
    },
}

_OBJECTIVES = {
    "clip": "CLIP InfoNCE (symmetric image-to-text and text-to-image cross-entropy over the "
    "global batch)",
    "sogclr": "SogCLR global contrastive loss (moving-average estimate of each sample's "
    "negative term over the whole data set, fixed temperature)",
    "fastclip": "FastCLIP global contrastive loss (moving-average estimate of each sample's "
    "negative term, multiplied by the temperature)",
}

_DETECTORS = {
    "none": "none: every other sample of the batch is a negative",
    "glofnd": "GloFND: a learned per-sample similarity threshold at the anchor's (1 - alpha) "
    "quantile over the whole data set; negatives above it are false negatives",
    "batch_quantile": "in-batch quantile baseline: negatives above the anchor's in-batch "
    "(1 - alpha) quantile are false negatives",
    "oracle": "oracle: ground-truth semantic labels mark the false negatives",
}


# -------------------------------------------------------------------------------------------
# the card's inputs
# -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CardInfo:
    """Everything a card is rendered from (JSON-serialisable, saved as ``glofnd_card.json``)."""

    family: str  # "hf" or "open_clip"
    model_name: str | None = None
    repo_id: str | None = None  # the Hub repository (usage snippet); None: a placeholder
    base_model: str | None = None
    datasets: list[str] = dataclasses.field(default_factory=list)
    train_data_description: str | None = None
    license: str | None = None
    architecture: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    training_recorded: bool = False
    loss_type: str | None = None
    detector: str | None = None
    fn_strategy: str | None = None
    non_default_settings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    loss_config: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_samples: int | None = None
    num_train_pairs: int | None = None
    epochs: float | None = None
    global_step: int | None = None
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_dataset: str | None = None
    eval_split: str | None = None
    eval_step: int | None = None
    glofnd_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CardInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / CARD_INFO_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CardInfo:
        return cls.from_dict(json.loads((Path(folder) / CARD_INFO_FILE).read_text("utf-8")))


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not (
        os.path.exists(name)
    )


def resolve_base_model(model_name_or_path: str | None, pretrained: str | None = None) -> str | None:
    """The Hub id a model was initialised from, or None (from scratch, local weights, unknown).

    ``hf-hub:ORG/NAME`` -> ``ORG/NAME``; an open_clip architecture with a pretrained tag -> the
    tag's Hub repository (``open_clip.get_pretrained_cfg(...)["hf_hub"]``); ``ORG/NAME`` that is
    not a local path -> itself.
    """
    if not model_name_or_path:
        return None
    name = str(model_name_or_path)
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):].strip("/")
        return repo if _looks_like_hub_id(repo) else None
    if name.startswith("local-dir:") or os.path.exists(name):
        return None
    if pretrained is not None:
        if os.path.exists(pretrained):
            return None
        try:
            import open_clip

            hub = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub", "")
        except Exception:  # noqa: BLE001 - unknown architecture/tag: no base model to name
            hub = ""
        hub = hub.strip("/")
        return hub if _looks_like_hub_id(hub) else None
    return name if _looks_like_hub_id(name) else None


def _hub_datasets(names: Iterable[str | None]) -> list[str]:
    """Dataset names usable as Hub metadata (no local folders, no embedded demo data)."""
    out = []
    for name in names:
        if not name or name == DIGITS_DATASET or os.path.exists(str(name)):
            continue
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name)) and name not in out:
            out.append(str(name))
    return out


def _describe_dataset(name: str | None) -> str:
    if name == DIGITS_DATASET:
        return ("the embedded coloured-digits demo pairs (`glofnd-digits`: scikit-learn's "
                "handwritten digits rendered in colour and captioned)")
    if not name:
        return "an image-caption data set"
    if _hub_datasets([name]):
        return f"[{name}](https://huggingface.co/datasets/{name})"
    return f"`{name}`"


@functools.lru_cache(maxsize=1)
def _default_arguments() -> dict[str, Any]:
    """What a default ``GloFNDTrainingArguments()`` holds in its GloFND/loss fields.

    Read from the dataclass fields: building an instance sets up devices, which resets
    accelerate's state (fatal in the middle of training). ``__post_init__`` only validates these
    fields, so the values are the same (a test checks this).
    """
    out = {}
    for f in _setting_fields():
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _setting_fields() -> list[dataclasses.Field]:
    from transformers import TrainingArguments

    from .args import GloFNDTrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(GloFNDTrainingArguments)
            if f.name not in base and f.name not in _NOT_SETTINGS]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def non_default_settings(args: Any) -> list[dict[str, Any]]:
    """GloFND and loss settings of ``args`` that differ from a default
    ``GloFNDTrainingArguments()``: ``[{"name", "value", "default"}, ...]`` in field order."""
    defaults = _default_arguments()
    rows = []
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if not _same(value, default):
            rows.append({"name": name, "value": value, "default": default})
    return rows


def _hyperparameters(args: Any) -> dict[str, Any]:
    world = int(getattr(args, "world_size", 1) or 1)
    accum = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    per_device = int(getattr(args, "per_device_train_batch_size", 0) or 0)
    out: dict[str, Any] = {
        "learning_rate": getattr(args, "learning_rate", None),
        "per_device_train_batch_size": per_device,
        "global_batch_size": per_device * world * accum,
        "gradient_accumulation_steps": accum,
        "num_processes": world,
        "num_train_epochs": getattr(args, "num_train_epochs", None),
        "max_steps": getattr(args, "max_steps", None),
        "lr_scheduler_type": str(getattr(getattr(args, "lr_scheduler_type", None), "value",
                                         getattr(args, "lr_scheduler_type", None))),
        "warmup_steps": getattr(args, "warmup_steps", None),
        "weight_decay": getattr(args, "weight_decay", None),
        "optim": str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", None))),
        "mixed_precision": "bf16" if getattr(args, "bf16", False) else (
            "fp16" if getattr(args, "fp16", False) else "no"),
        "seed": getattr(args, "seed", None),
    }
    if out["max_steps"] and out["max_steps"] > 0:
        out.pop("num_train_epochs")  # max_steps decides
    else:
        out.pop("max_steps")
    return {k: v for k, v in out.items() if v is not None}


def _architecture(adapter: Any) -> str:
    model = adapter.model
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e6:.1f}M parameters" if params >= 1e5 else f"{params:,} parameters"
    if adapter.family == "hf":
        kind = getattr(getattr(model, "config", None), "model_type", None)
        return f"`{type(model).__name__}`" + (f" ({kind})" if kind else "") + f", {size}"
    name = getattr(adapter, "model_name", None)
    embed = (getattr(adapter, "model_cfg", None) or {}).get("embed_dim")
    return (f"open_clip `{type(model).__name__}`" + (f" `{name}`" if name else "")
            + (f", embedding dim {embed}" if embed else "") + f", {size}")


def normalize_eval_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Our zero-shot metrics out of a metrics dict: ``eval_`` prefixes stripped; runtime,
    loss, epoch and ``eval_before_*`` (scores before training) left out."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if key.startswith("eval_before_"):
            continue
        name = key[len("eval_"):] if key.startswith("eval_") else key
        if _METRIC_RE.fullmatch(name) and isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _metric_label(name: str) -> str:
    m = _METRIC_RE.fullmatch(name)
    if m is None:
        return name
    if m.group(1):
        direction = "Image-to-text" if m.group(1) == "image_to_text" else "Text-to-image"
        return f"{direction} recall@{m.group(2)}"
    return f"Top-{m.group(3)} accuracy"


def eval_results_from_metrics(
    metrics: Mapping[str, float],
    dataset: str | None = None,
    split: str | None = None,
):
    """``huggingface_hub.EvalResult`` entries (model-index) for our zero-shot metrics."""
    from huggingface_hub import EvalResult

    from .eval.run import clip_benchmark_names

    dataset_type = dataset or "unknown"
    dataset_name = dataset or "evaluation data"
    if dataset == DIGITS_DATASET:
        dataset_name = "glofnd coloured digits"
    results = []
    for name, value in normalize_eval_metrics(metrics).items():
        retrieval = "recall" in name
        alias = clip_benchmark_names({name: value})
        results.append(EvalResult(
            task_type="zero-shot-retrieval" if retrieval else "zero-shot-image-classification",
            task_name="Zero-shot image-text retrieval" if retrieval
            else "Zero-shot image classification",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=name,
            metric_name=_metric_label(name),
            metric_value=round(float(value), 6),
            metric_config=next(iter(alias), None),
        ))
    return results


# -------------------------------------------------------------------------------------------
# building the card's inputs
# -------------------------------------------------------------------------------------------


def card_info_from_trainer(
    trainer: Any,
    eval_metrics: Mapping[str, Any] | None = None,
    *,
    model_name_or_path: str | None = None,
    pretrained: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    train_data_description: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    eval_dataset: str | None = None,
    eval_split: str | None = None,
    eval_step: int | None = None,
    tags: Sequence[str] | None = None,
) -> CardInfo:
    """The card's inputs from a ``GloFNDTrainer`` (``adapter``, ``args``, ``num_samples``,
    ``contrastive_loss``, ``state``). ``base_model`` defaults to what
    ``model_name_or_path``/``pretrained`` or the model's own ``name_or_path`` resolve to."""
    from . import __version__

    adapter, args = trainer.adapter, trainer.args
    if base_model is None:
        base_model = resolve_base_model(model_name_or_path, pretrained)
    if base_model is None and model_name_or_path is None:
        if adapter.family == "hf":
            base_model = resolve_base_model(getattr(adapter.model, "name_or_path", None))
        else:
            base_model = resolve_base_model(getattr(adapter, "model_name", None))
    evaluator = getattr(trainer, "evaluator", None)
    eval_data = getattr(evaluator, "dataset", None)
    if eval_dataset is None:
        eval_dataset = getattr(evaluator, "dataset_name", None) or getattr(
            getattr(eval_data, "info", None), "dataset_name", None)
    if eval_split is None:
        eval_split = getattr(evaluator, "split", None)
        if eval_split is None and getattr(eval_data, "split", None) is not None:
            eval_split = str(eval_data.split)
    state = getattr(trainer, "state", None)
    epoch = getattr(state, "epoch", None)
    step = getattr(state, "global_step", None)
    train = getattr(trainer, "train_dataset", None)
    try:
        num_pairs = len(train) if train is not None else None
    except TypeError:
        num_pairs = None
    datasets = [d for d in (datasets or []) if d]
    if train_data_description is None:
        if datasets:
            train_data_description = "Trained on " + ", ".join(
                _describe_dataset(d) for d in datasets) + "."
        else:
            train_data_description = "Trained on an image-caption data set."
        if num_pairs:
            train_data_description += f" {num_pairs:,} image-caption pairs."
    loss = getattr(trainer, "contrastive_loss", None)
    loss_config = None
    if loss is not None and hasattr(loss, "config_dict"):
        loss_config = json.loads(json.dumps(loss.config_dict(), default=str))
    return CardInfo(
        family=adapter.family,
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        datasets=_hub_datasets(datasets),
        train_data_description=train_data_description,
        license=license,
        architecture=_architecture(adapter),
        tags=list(tags or []),
        training_recorded=True,
        loss_type=getattr(args, "loss_type", None),
        detector=getattr(args, "detector", None),
        fn_strategy=getattr(args, "fn_strategy", None),
        non_default_settings=json.loads(json.dumps(non_default_settings(args), default=str)),
        loss_config=loss_config,
        hyperparameters=_hyperparameters(args),
        num_samples=getattr(trainer, "num_samples", None),
        num_train_pairs=num_pairs,
        epochs=round(float(epoch), 4) if epoch else None,
        global_step=int(step) if step else None,
        eval_metrics=normalize_eval_metrics(eval_metrics),
        eval_dataset=eval_dataset,
        eval_split=eval_split,
        eval_step=eval_step if eval_step is not None else (int(step) if step and eval_metrics
                                                             else None),
        glofnd_version=__version__,
    )


def _family_of_folder(folder: Path) -> str:
    from .models import OPEN_CLIP_CONFIG_NAME

    if (folder / OPEN_CLIP_CONFIG_NAME).is_file():
        return "open_clip"
    if (folder / "config.json").is_file():
        return "hf"
    raise ValueError(
        f"{str(folder)!r} holds no model: expected config.json (Hugging Face) or "
        f"{OPEN_CLIP_CONFIG_NAME} (open_clip)"
    )


def card_info_from_folder(
    folder: str | os.PathLike, eval_report: Mapping[str, Any] | None = None, **overrides: Any
) -> CardInfo:
    """The card's inputs for a saved model folder: ``glofnd_card.json`` when present, else
    what the folder shows (family, ``zero_shot_results.json`` of ``glofnd-train``).
    ``eval_report``: a ``glofnd-eval`` JSON report whose metrics replace the recorded ones.
    ``overrides``: :class:`CardInfo` fields (e.g. ``repo_id``, ``license``)."""
    from . import __version__

    folder = Path(folder)
    family = _family_of_folder(folder)
    if (folder / CARD_INFO_FILE).is_file():
        info = CardInfo.load(folder)
    else:
        info = CardInfo(family=family, glofnd_version=__version__)
        results = folder / "zero_shot_results.json"
        if results.is_file():
            data = json.loads(results.read_text("utf-8"))
            info.eval_metrics = normalize_eval_metrics(data.get("after") or {})
    info.family = family
    if eval_report is not None:
        info.eval_metrics = normalize_eval_metrics(eval_report.get("metrics"))
        source = eval_report.get("data", {}).get("source")
        info.eval_dataset = source if isinstance(source, str) else "webdataset shards"
        info.eval_split = eval_report.get("data", {}).get("split")
        info.eval_step = None
    for key, value in overrides.items():
        if not hasattr(info, key):
            raise TypeError(f"unknown model card field {key!r}")
        if key == "datasets" and value is not None:
            value = _hub_datasets(value)
        elif key == "eval_metrics" and value is not None:
            value = normalize_eval_metrics(value)
        if value is not None:
            setattr(info, key, value)
    return info


# -------------------------------------------------------------------------------------------
# rendering
# -------------------------------------------------------------------------------------------


def template_path() -> Path:
    """``model_cards/glofnd_model_card_template.md`` of the source tree (``GLOFND_CARD_TEMPLATE``
    overrides)."""
    override = os.environ.get("GLOFND_CARD_TEMPLATE")
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [
        here.parent / "model_cards" / TEMPLATE_NAME,  # source tree / editable install
        Path(sys.prefix) / "share" / "glofnd_hf" / "model_cards" / TEMPLATE_NAME,  # wheel
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model card template {TEMPLATE_NAME} not found (looked in {[str(c) for c in candidates]}); "
        "set GLOFND_CARD_TEMPLATE to its path"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _model_ref(info: CardInfo) -> str:
    """How the usage snippets name the model (a placeholder until the repo id is known; local
    paths are never written into a card)."""
    repo = info.repo_id or "ORG/NAME"
    return f"hf-hub:{repo}" if info.family == "open_clip" else repo


def render_model_card(info: CardInfo, template: str | os.PathLike | None = None):
    """A ``huggingface_hub.ModelCard`` for ``info``."""
    from huggingface_hub import ModelCard, ModelCardData

    model_name = info.model_name or (info.repo_id.split("/")[-1] if info.repo_id else None) or (
        "glofnd-model")
    library_name = LIBRARY_NAMES.get(info.family, info.family)
    tags = list(BASE_TAGS) + (["open_clip"] if info.family == "open_clip" else [])
    if info.detector:
        tags.append(f"fnd-{info.detector.replace('_', '-')}")
    tags += [t for t in info.tags if t not in tags]
    eval_results = eval_results_from_metrics(info.eval_metrics, info.eval_dataset,
                                             info.eval_split) or None
    card_data = ModelCardData(
        model_name=model_name,
        base_model=info.base_model,
        datasets=info.datasets or None,
        license=info.license,
        library_name=library_name,
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        eval_results=eval_results,
    )
    glofnd = dict(CITATIONS["glofnd"])
    if info.training_recorded and info.detector != "glofnd":
        glofnd["what"] = "GloFND (the method of glofnd-hf, the training library)"
    citations = [glofnd, CITATIONS["clip"]]
    if info.loss_type in ("fastclip", "sogclr"):
        citations.append(CITATIONS["fastclip"])
    if info.loss_type == "sogclr":
        citations.append(CITATIONS["sogclr"])

    from .eval.run import clip_benchmark_names

    eval_rows = [
        {"name": name, "percent": f"{100 * value:.2f}%",
         "clip_benchmark": next(iter(clip_benchmark_names({name: value})), "-")}
        for name, value in info.eval_metrics.items()
    ]
    family_description = ("Hugging Face transformers (`AutoModel` / `AutoProcessor`)"
                          if info.family == "hf" else "open_clip (`open_clip_config.json` + "
                          "`open_clip_model.safetensors`)")
    start = f"fine-tuned from [{info.base_model}](https://huggingface.co/{info.base_model})" if (
        info.base_model) else "trained"
    if info.training_recorded:
        objective = _OBJECTIVES.get(info.loss_type or "", info.loss_type or "a contrastive loss")
        detection = {"glofnd": "GloFND false-negative detection",
                     "none": "no false-negative detection",
                     "batch_quantile": "in-batch quantile false-negative detection",
                     "oracle": "oracle (label-based) false-negative detection"}.get(
            info.detector or "", f"{info.detector} false-negative detection")
        summary = (f"A CLIP-style image-text dual encoder {start} with {objective} and "
                   f"{detection}, using glofnd-hf.")
    else:
        summary = f"A CLIP-style image-text dual encoder {start} with glofnd-hf."
    epochs = info.epochs
    if epochs is not None and float(epochs).is_integer():
        epochs = int(epochs)
    strategy = {"eliminate": "detected false negatives are removed from the negatives",
                "attract": "detected false negatives are used as extra positives"}
    detector_description = _DETECTORS.get(info.detector or "", info.detector or "not recorded")
    if info.detector not in (None, "none") and info.fn_strategy:
        detector_description += f"; {strategy.get(info.fn_strategy, info.fn_strategy)}"
    eval_description = _describe_dataset(info.eval_dataset)
    settings = [{"name": r["name"], "value": _fmt(r["value"]), "default": _fmt(r["default"])}
                for r in info.non_default_settings]
    path = Path(template) if template is not None else template_path()
    return ModelCard.from_template(
        card_data,
        template_path=str(path),
        model_name=model_name,
        glofnd_version=info.glofnd_version or "",
        summary=summary,
        family_description=family_description,
        architecture=info.architecture or "not recorded",
        objective=_OBJECTIVES.get(info.loss_type or "", info.loss_type or "not recorded"),
        detector_description=detector_description,
        model_ref=_model_ref(info),
        repo_id=info.repo_id,
        eval_split=info.eval_split,
        training_recorded=info.training_recorded,
        train_data_description=info.train_data_description
        or "The training data were not recorded with this model.",
        num_samples=info.num_samples,
        epochs=epochs,
        global_step=info.global_step,
        non_default_settings=settings,
        loss_config=json.dumps(info.loss_config, indent=2) if info.loss_config else None,
        hyperparameters={k: _fmt(v) for k, v in info.hyperparameters.items()},
        eval_rows=eval_rows,
        eval_dataset_description=eval_description,
        eval_step=info.eval_step,
        citations=citations,
    )


def write_card(info: CardInfo, folder: str | os.PathLike,
               template: str | os.PathLike | None = None) -> Path:
    """Render ``info`` into ``folder/README.md`` and save it as ``folder/glofnd_card.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = render_model_card(info, template)
    path = folder / "README.md"
    card.save(str(path))
    info.save(folder)
    return path


def card_is_unedited(folder: str | os.PathLike) -> bool:
    """True when ``folder/README.md`` is exactly what ``glofnd_card.json`` renders to, i.e. a
    card we wrote and nobody edited since (safe to render again, e.g. with the repo id)."""
    folder = Path(folder)
    readme = folder / "README.md"
    if not readme.is_file() or not (folder / CARD_INFO_FILE).is_file():
        return False
    try:
        expected = str(render_model_card(CardInfo.load(folder)))
    except Exception:  # noqa: BLE001 - unreadable card inputs: treat the card as edited
        return False
    return readme.read_text(encoding="utf-8") == expected


# -------------------------------------------------------------------------------------------
# trainer integration
# -------------------------------------------------------------------------------------------


class ModelCardCallback(TrainerCallback):
    """Writes ``README.md`` (and ``glofnd_card.json``) into every checkpoint folder.

    Collects the latest zero-shot metrics in ``on_evaluate``; a checkpoint's card lists them
    only when they were computed at the checkpoint's step (the Trainer evaluates before saving
    when both fall on the same step). ``card_kwargs`` go to :func:`card_info_from_trainer`
    (``model_name_or_path``, ``pretrained``, ``datasets``, ``license``, ...); change them later
    with :func:`set_model_card_info`.
    """

    def __init__(self, trainer: Any, **card_kwargs: Any) -> None:
        self.trainer = trainer
        self.card_kwargs = dict(card_kwargs)
        self.eval_metrics: dict[str, float] = {}
        self.eval_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        found = normalize_eval_metrics(metrics)
        if found:
            self.eval_metrics = found
            self.eval_step = state.global_step

    def metrics_at(self, step: int | None) -> dict[str, float]:
        return dict(self.eval_metrics) if self.eval_metrics and self.eval_step == step else {}

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            return
        info = card_info_from_trainer(self.trainer, self.metrics_at(state.global_step),
                                      **self.card_kwargs)
        info.model_name = info.model_name or f"{Path(args.output_dir).name}-{folder.name}"
        write_card(info, folder)


def model_card_callback(trainer: Any) -> ModelCardCallback | None:
    """The trainer's :class:`ModelCardCallback`, if it has one."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(callback, ModelCardCallback):
            return callback
    return None


def set_model_card_info(trainer: Any, **card_kwargs: Any) -> ModelCardCallback:
    """Set card inputs (``model_name_or_path``, ``pretrained``, ``datasets``, ``license``, ...)
    for the trainer's checkpoint cards and :func:`write_model_card`; adds the callback if
    missing."""
    callback = model_card_callback(trainer)
    if callback is None:
        callback = ModelCardCallback(trainer)
        trainer.add_callback(callback)
    callback.card_kwargs.update({k: v for k, v in card_kwargs.items() if v is not None})
    return callback


def write_model_card(
    trainer: Any,
    output_dir: str | os.PathLike,
    eval_metrics: Mapping[str, Any] | None = None,
    **card_kwargs: Any,
) -> Path | None:
    """Write ``README.md`` + ``glofnd_card.json`` for the final model in ``output_dir``.

    ``eval_metrics``: the evaluator's metrics (``eval_`` prefixes are fine); default: the
    metrics the trainer's :class:`ModelCardCallback` collected at the current step.
    ``card_kwargs``: see :func:`card_info_from_trainer` (they extend those given to
    :func:`set_model_card_info`). Only the main process writes; returns the card's path there.
    """
    is_main = getattr(trainer, "is_world_process_zero", None)
    if callable(is_main) and not is_main():
        return None
    callback = model_card_callback(trainer)
    kwargs = dict(callback.card_kwargs) if callback is not None else {}
    kwargs.update({k: v for k, v in card_kwargs.items() if v is not None})
    if eval_metrics is None and callback is not None:
        eval_metrics = callback.metrics_at(getattr(trainer.state, "global_step", None))
    info = card_info_from_trainer(trainer, eval_metrics, **kwargs)
    info.model_name = info.model_name or Path(os.path.abspath(output_dir)).name
    return write_card(info, output_dir)
