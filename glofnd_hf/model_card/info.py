"""The card's inputs (:class:`CardInfo`), collected from a trainer or from a saved folder."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..hub_ids import is_hub_repo_id
from ..models import OPEN_CLIP_CONFIG_NAME, TINY_MODEL_NAMES, family_of_folder
from ..version import __version__
from .descriptions import (
    LOCAL_EVAL_DATASET_NAME,
    describe_dataset,
    eval_dataset_id,
    hub_dataset_type,
    hub_datasets,
    is_local_path,
)
from .metrics import normalize_eval_metrics
from .settings import hyperparameters, non_default_settings

__all__ = [
    "BASE_MODEL_ORIGINS",
    "CARD_INFO_FILE",
    "MODEL_KINDS",
    "CardInfo",
    "base_model_origin",
    "card_info_from_folder",
    "card_info_from_trainer",
    "eval_dataset_fields",
    "model_kind_of_adapter",
    "model_kind_of_folder",
    "resolve_base_model",
]

CARD_INFO_FILE = "glofnd_card.json"
#: How a model scores an image against labels, which decides its usage snippet and its tag:
#: ``clip`` (a softmax over the labels) or ``siglip`` (a sigmoid per label, with a bias).
MODEL_KINDS = ("clip", "siglip")
#: Where the weights training started from came from, when no Hub id names them: ``local``
#: (a folder or checkpoint file of the training machine), ``other`` (pretrained weights that
#: are not on the Hub, e.g. an open_clip tag served from a URL), ``scratch``.
BASE_MODEL_ORIGINS = ("hub", "local", "other", "scratch")


@dataclasses.dataclass
class CardInfo:
    """Everything a card is rendered from (JSON-serialisable, saved as ``glofnd_card.json``)."""

    family: str  # a model family's name (``glofnd_hf.models.family_names()``)
    model_name: str | None = None
    repo_id: str | None = None  # the Hub repository (usage snippet); None: a placeholder
    base_model: str | None = None
    base_model_origin: str | None = None  # one of BASE_MODEL_ORIGINS; None: not recorded
    model_kind: str | None = None  # one of MODEL_KINDS; None (older cards): clip
    text_length: int | None = None  # tokens the text tower was trained on (SigLIP's padding)
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
    eval_dataset: str | None = None  # a Hub dataset id (or glofnd-digits), never a path
    eval_split: str | None = None
    eval_dataset_config: str | None = None
    eval_dataset_name: str | None = None  # how the card names the data (default: eval_dataset)
    # model-index dataset.type: a Hub dataset id (default: eval_dataset when it is one); data
    # that is not on the Hub has none, and its results stay out of the model-index
    eval_dataset_type: str | None = None
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


def _names_hub_model(name: str | None) -> bool:
    """An ``ORG/NAME`` Hub id that is not also a local path."""
    return is_hub_repo_id(name) and not os.path.exists(name)


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
        repo = name[len("hf-hub:") :].strip("/")
        return repo if _names_hub_model(repo) else None
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
        return hub if _names_hub_model(hub) else None
    return name if _names_hub_model(name) else None


def base_model_origin(model_name_or_path: str | None, pretrained: str | None = None) -> str | None:
    """Where the starting weights of ``model_name_or_path`` / ``pretrained`` came from (one of
    :data:`BASE_MODEL_ORIGINS`), None when it cannot tell. Never a path: a card says "a local
    model" for a folder or checkpoint of the training machine."""
    if not model_name_or_path:
        return None
    name = str(model_name_or_path)
    if resolve_base_model(name, pretrained) is not None:
        return "hub"
    if name.startswith("local-dir:") or os.path.exists(name):
        return "local"
    if pretrained is not None:
        return "local" if os.path.exists(pretrained) or is_local_path(pretrained) else "other"
    if name in TINY_MODEL_NAMES or _is_open_clip_architecture(name):
        return "scratch"  # built from its config, randomly initialised
    return "local" if is_local_path(name) else None


def _is_open_clip_architecture(name: str) -> bool:
    try:
        import open_clip

        known = set(open_clip.list_models())
    except Exception:  # noqa: BLE001 - open_clip unusable: cannot tell
        return False
    return name in known or name.replace("/", "-") in known


def model_kind_of_adapter(adapter: Any) -> str:
    """``siglip`` for a model scored by a sigmoid with a bias (transformers' ``siglip*``
    model types, any model with a ``logit_bias``), else ``clip``."""
    model_type = str(getattr(getattr(adapter.model, "config", None), "model_type", "") or "")
    bias = getattr(adapter, "logit_bias_parameter", lambda: None)()
    return "siglip" if "siglip" in model_type or bias is not None else "clip"


def model_kind_of_folder(folder: str | os.PathLike) -> str:
    """:func:`model_kind_of_adapter` for a saved folder, from its config files alone
    (``config.json``'s ``model_type``, ``open_clip_config.json``'s ``init_logit_bias``)."""
    folder = Path(folder)
    for name in (OPEN_CLIP_CONFIG_NAME, "config.json"):
        try:
            config = json.loads((folder / name).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if name == OPEN_CLIP_CONFIG_NAME:
            cfg = config.get("model_cfg") or {}
            return "siglip" if cfg.get("init_logit_bias") is not None else "clip"
        return "siglip" if "siglip" in str(config.get("model_type", "")) else "clip"
    return "clip"


def eval_dataset_fields(
    dataset: str | None,
    name: str | None = None,
    dataset_type: str | None = None,
    what: str = "evaluation data set",
) -> dict[str, str | None]:
    """``eval_dataset`` / ``eval_dataset_name`` / ``eval_dataset_type`` of a card for the
    evaluation data ``dataset``: a Hub id is kept; a local path (or shards) is dropped with a
    warning, and the data is called :data:`LOCAL_EVAL_DATASET_NAME` unless ``name`` says what
    it is. ``eval_dataset_type`` is only ever a Hub dataset id (``dataset_type`` when it is
    one: the Hub id of the data a local copy holds); anything else is dropped (``local``, as
    older versions recorded, included), so that data not on the Hub has no type."""
    kept = eval_dataset_id(dataset, what)
    if dataset and kept is None:
        name = name or LOCAL_EVAL_DATASET_NAME
    return {
        "eval_dataset": kept,
        "eval_dataset_name": name,
        "eval_dataset_type": hub_dataset_type(dataset_type),
    }


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
    eval_dataset_config: str | None = None,
    eval_dataset_name: str | None = None,
    eval_dataset_type: str | None = None,
    eval_step: int | None = None,
    tags: Sequence[str] | None = None,
) -> CardInfo:
    """The card's inputs from a ``GloFNDTrainer`` (``adapter``, ``args``, ``num_samples``,
    ``contrastive_loss``, ``state``). ``base_model`` defaults to what
    ``model_name_or_path``/``pretrained`` or the model's own ``name_or_path`` resolve to."""

    adapter, args = trainer.adapter, trainer.args
    base_model, origin = _base_model(adapter, base_model, model_name_or_path, pretrained)
    eval_dataset, eval_split = _evaluation_source(trainer, eval_dataset, eval_split)
    state = getattr(trainer, "state", None)
    epoch = getattr(state, "epoch", None)
    step = getattr(state, "global_step", None)
    num_pairs = _num_pairs(getattr(trainer, "train_dataset", None))
    datasets = [d for d in (datasets or []) if d]
    if train_data_description is None:
        train_data_description = _describe_training_data(datasets, num_pairs)
    loss = getattr(trainer, "contrastive_loss", None)
    loss_config = None
    if loss is not None and hasattr(loss, "config_dict"):
        loss_config = json.loads(json.dumps(loss.config_dict(), default=str))
    if repo_id is None and getattr(args, "push_to_hub", False):
        # A run that pushes names its card after the repo, not after the local folder.
        repo_id = getattr(trainer, "hub_model_id", None) or getattr(args, "hub_model_id", None)
        model_name = model_name or repo_id
    return CardInfo(
        family=adapter.family,
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        base_model_origin=origin,
        model_kind=model_kind_of_adapter(adapter),
        text_length=_text_length(adapter),
        datasets=hub_datasets(datasets),
        train_data_description=train_data_description,
        license=license,
        architecture=adapter.architecture_description(),
        tags=list(tags or []),
        training_recorded=True,
        loss_type=getattr(args, "loss_type", None),
        detector=getattr(args, "detector", None),
        fn_strategy=getattr(args, "fn_strategy", None),
        non_default_settings=json.loads(json.dumps(non_default_settings(args), default=str)),
        loss_config=loss_config,
        hyperparameters=hyperparameters(args),
        num_samples=getattr(trainer, "num_samples", None),
        num_train_pairs=num_pairs,
        epochs=round(float(epoch), 4) if epoch else None,
        global_step=int(step) if step else None,
        eval_metrics=normalize_eval_metrics(eval_metrics),
        eval_split=eval_split,
        eval_dataset_config=eval_dataset_config,
        **eval_dataset_fields(eval_dataset, eval_dataset_name, eval_dataset_type),
        eval_step=eval_step
        if eval_step is not None
        else (int(step) if step and eval_metrics else None),
        glofnd_version=__version__,
    )


def _num_pairs(train: Any) -> int | None:
    try:
        return len(train) if train is not None else None
    except TypeError:  # a stream
        return None


def _base_model(
    adapter: Any, base_model: str | None, model_name_or_path: str | None, pretrained: str | None
) -> tuple[str | None, str | None]:
    """The base model's Hub id (as given, else resolved) and its origin
    (:func:`base_model_origin`; from the model's own ``source_name`` when no name is given)."""
    if base_model is not None:
        return base_model, "hub"
    if model_name_or_path is not None:
        return (
            resolve_base_model(model_name_or_path, pretrained),
            base_model_origin(model_name_or_path, pretrained),
        )
    source = adapter.source_name()
    origin = base_model_origin(source)
    # an architecture name alone: its pretrained tag is unknown
    return resolve_base_model(source), None if origin == "scratch" else origin


def _text_length(adapter: Any) -> int | None:
    try:
        return int(adapter.context_length)
    except (AttributeError, TypeError, ValueError):
        return None


def _evaluation_source(
    trainer: Any, eval_dataset: str | None, eval_split: str | None
) -> tuple[str | None, str | None]:
    """The evaluation set's name and split: as given, else as the trainer's evaluator (or
    its dataset) records them."""
    evaluator = getattr(trainer, "evaluator", None)
    eval_data = getattr(evaluator, "dataset", None)
    if eval_dataset is None:
        eval_dataset = getattr(evaluator, "dataset_name", None) or getattr(
            getattr(eval_data, "info", None), "dataset_name", None
        )
    if eval_split is None:
        eval_split = getattr(evaluator, "split", None)
        if eval_split is None and getattr(eval_data, "split", None) is not None:
            eval_split = str(eval_data.split)
    return eval_dataset, eval_split


def _describe_training_data(datasets: Sequence[str], num_pairs: int | None) -> str:
    if datasets:
        text = "Trained on " + ", ".join(describe_dataset(d) for d in datasets) + "."
    else:
        text = "Trained on an image-caption data set."
    if num_pairs:
        text += f" {num_pairs:,} image-caption pairs."
    return text


def card_info_from_folder(
    folder: str | os.PathLike, eval_report: Mapping[str, Any] | None = None, **overrides: Any
) -> CardInfo:
    """The card's inputs for a saved model folder: ``glofnd_card.json`` when present, else
    what the folder shows (family, ``zero_shot_results.json`` of ``glofnd-train``).
    ``eval_report``: a ``glofnd-eval`` JSON report whose metrics replace the recorded ones.
    ``overrides``: :class:`CardInfo` fields (e.g. ``repo_id``, ``license``)."""

    folder = Path(folder)
    family = family_of_folder(folder)
    if (folder / CARD_INFO_FILE).is_file():
        info = CardInfo.load(folder)
    else:
        info = CardInfo(family=family, glofnd_version=__version__)
        results = folder / "zero_shot_results.json"
        if results.is_file():
            data = json.loads(results.read_text("utf-8"))
            info.eval_metrics = normalize_eval_metrics(data.get("after") or {})
    info.family = family
    info.model_kind = model_kind_of_folder(folder)  # the folder's own config decides
    if eval_report is not None:
        info.eval_metrics = normalize_eval_metrics(eval_report.get("metrics"))
        data = eval_report.get("data", {})
        source = data.get("source")
        if data.get("kind") == "webdataset" or not isinstance(source, str):
            source = f"shards {source!r}"  # never a Hub dataset: named neutrally
        fields = eval_dataset_fields(source, None, None, what="evaluation data of the report")
        for key, value in fields.items():
            setattr(info, key, value)
        info.eval_split = data.get("split")
        info.eval_dataset_config = data.get("config")
        info.eval_step = None
    for key, value in overrides.items():
        if not hasattr(info, key):
            raise TypeError(f"unknown model card field {key!r}")
        if key == "datasets" and value is not None:
            value = hub_datasets(value)
        elif key == "eval_dataset" and value is not None:
            for field, kept in eval_dataset_fields(value).items():
                if field == "eval_dataset" or overrides.get(field) is None:
                    setattr(info, field, kept)
            continue
        elif key == "eval_metrics" and value is not None:
            value = normalize_eval_metrics(value)
        elif key == "base_model" and value is not None:
            info.base_model_origin = "hub"
        if value is not None:
            setattr(info, key, value)
    return info
