"""Rendering a card: the template (package data), :func:`render_model_card`, writing it."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..models import ModelFamily, get_family
from .descriptions import (
    citations_for,
    describe_dataset,
    describe_detector,
    describe_fn_strategy,
    describe_objective,
)
from .info import CARD_INFO_FILE, CardInfo, eval_dataset_fields
from .metrics import clip_benchmark_name, eval_results_from_metrics

__all__ = [
    "BASE_MODEL_WORDS",
    "BASE_TAGS",
    "KIND_TAGS",
    "PIPELINE_TAG",
    "TEMPLATE_ENV",
    "TEMPLATE_FILE",
    "card_is_unedited",
    "read_template",
    "render_model_card",
    "template_path",
    "write_card",
]

BASE_TAGS = ("glofnd", "contrastive-learning", "zero-shot-image-classification")
#: The tag naming the model's kind (:data:`~glofnd_hf.model_card.info.MODEL_KINDS`), added to
#: :data:`BASE_TAGS` and the family's tags.
KIND_TAGS = {"clip": "clip", "siglip": "siglip"}
#: SigLIP's text length (transformers' zero-shot pipeline pads SigLIP text to it).
SIGLIP_TEXT_LENGTH = 64
#: The card's words for a base model that is no Hub id (``CardInfo.base_model_origin``).
BASE_MODEL_WORDS = {
    "local": "a local model (its weights are not on the Hub)",
    "other": "pretrained weights that are not on the Hub",
    "scratch": "none (trained from scratch)",
}
PIPELINE_TAG = "zero-shot-image-classification"
#: The template file, package data of this package (``glofnd_hf/model_card/template.md``).
TEMPLATE_FILE = "template.md"
#: Environment variable naming a template file to use instead of the packaged one.
TEMPLATE_ENV = "GLOFND_CARD_TEMPLATE"


def template_path() -> Path:
    """The packaged default template (copy it to write your own; pass that as ``template``)."""
    return Path(str(resources.files(__package__).joinpath(TEMPLATE_FILE)))


def read_template(template: str | os.PathLike | None = None) -> str:
    """The template's text: ``template`` when given, else the file named by
    ``$GLOFND_CARD_TEMPLATE``, else the packaged default (read with ``importlib.resources``)."""
    override = template if template is not None else os.environ.get(TEMPLATE_ENV)
    if override:
        return Path(override).read_text(encoding="utf-8")
    return resources.files(__package__).joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _model_ref(info: CardInfo) -> str:
    """How the usage snippets name the model (a placeholder until the repo id is known; local
    paths are never written into a card)."""
    repo = info.repo_id or "ORG/NAME"
    family = _family(info)
    return f"{family.hub_prefix}{repo}" if family else repo


def _model_kind(info: CardInfo) -> str:
    """``clip`` or ``siglip``; a card without one (older versions) is a CLIP's."""
    return info.model_kind if info.model_kind in KIND_TAGS else "clip"


def _base_model_words(info: CardInfo) -> str:
    """The model-details row's base model in words (no link: the template links a Hub id)."""
    if info.base_model:
        return info.base_model
    words = BASE_MODEL_WORDS.get(info.base_model_origin or "")
    return words or "not recorded"


def _family(info: CardInfo) -> ModelFamily | None:
    """The card's model family, None for one this version does not know (an older card)."""
    try:
        return get_family(info.family)
    except ValueError:
        return None


def render_model_card(info: CardInfo, template: str | os.PathLike | None = None):
    """A ``huggingface_hub.ModelCard`` for ``info``; ``template``: a template file to use
    instead of the packaged one (see :func:`read_template`)."""
    from huggingface_hub import ModelCard

    model_name = (
        info.model_name
        or (info.repo_id.split("/")[-1] if info.repo_id else None)
        or ("glofnd-model")
    )
    family = _family(info)
    # A card never names a local path: one recorded by an older version is dropped here.
    dataset = eval_dataset_fields(info.eval_dataset, info.eval_dataset_name, info.eval_dataset_type)
    eval_rows = [
        {
            "name": name,
            "percent": f"{100 * value:.2f}%",
            "clip_benchmark": clip_benchmark_name(name) or "-",
        }
        for name, value in info.eval_metrics.items()
    ]
    epochs = info.epochs
    if epochs is not None and float(epochs).is_integer():
        epochs = int(epochs)
    eval_description = (
        describe_dataset(dataset["eval_dataset"])
        if dataset["eval_dataset"] or not dataset["eval_dataset_name"]
        else f"`{dataset['eval_dataset_name']}`"
    )
    settings = [
        {"name": r["name"], "value": _fmt(r["value"]), "default": _fmt(r["default"])}
        for r in info.non_default_settings
    ]
    card_data = _card_data(info, model_name, family, dataset)
    return ModelCard.from_template(
        card_data,
        template_str=read_template(template),
        model_name=model_name,
        glofnd_version=info.glofnd_version or "",
        summary=_summary(info),
        family_description=family.layout if family else info.family,
        architecture=info.architecture or "not recorded",
        objective=describe_objective(info.loss_type, missing="not recorded"),
        detector_description=_detector_description(info),
        model_ref=_model_ref(info),
        model_kind=_model_kind(info),
        text_length=info.text_length or SIGLIP_TEXT_LENGTH,
        base_model_words=_base_model_words(info),
        in_model_index=bool(card_data.eval_results),
        repo_id=info.repo_id,
        eval_split=info.eval_split,
        eval_config=info.eval_dataset_config,
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
        citations=citations_for(info.loss_type, info.detector, info.training_recorded),
    )


def _card_data(
    info: CardInfo, model_name: str, family: ModelFamily | None, dataset: dict[str, Any]
):
    """The card's metadata (its YAML header): library, tags and the model-index."""
    from huggingface_hub import ModelCardData

    tags = list(BASE_TAGS) + [KIND_TAGS[_model_kind(info)]] + (list(family.tags) if family else [])
    if info.detector:
        tags.append(f"fnd-{info.detector.replace('_', '-')}")
    tags += [t for t in info.tags if t not in tags]
    eval_results = (
        eval_results_from_metrics(
            info.eval_metrics,
            dataset["eval_dataset"],
            info.eval_split,
            config=info.eval_dataset_config,
            dataset_name=dataset["eval_dataset_name"],
            dataset_type=dataset["eval_dataset_type"],
        )
        or None
    )
    return ModelCardData(
        model_name=model_name,
        base_model=info.base_model,
        datasets=info.datasets or None,
        license=info.license,
        library_name=family.library_name if family else info.family,
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        eval_results=eval_results,
    )


def _summary(info: CardInfo) -> str:
    """The card's first sentence: where the model came from and how it was trained."""
    if info.base_model:
        start = f"fine-tuned from [{info.base_model}](https://huggingface.co/{info.base_model})"
    elif info.base_model_origin == "local":
        start = "fine-tuned from a local model"
    elif info.base_model_origin == "other":
        start = "fine-tuned from pretrained weights that are not on the Hub"
    elif info.base_model_origin == "scratch":
        start = "trained from scratch"
    else:
        start = "trained"
    style = "SigLIP" if _model_kind(info) == "siglip" else "CLIP"
    if not info.training_recorded:
        return f"A {style}-style image-text dual encoder {start} with glofnd-hf."
    # By name, so that any registered detector reads right (describe_detector says more).
    detection = (
        "no false-negative detection"
        if info.detector == "none"
        else f"the `{info.detector}` false-negative detector"
    )
    return (
        f"A {style}-style image-text dual encoder {start} with "
        f"{describe_objective(info.loss_type)} and {detection}, using glofnd-hf."
    )


def _detector_description(info: CardInfo) -> str:
    description = describe_detector(info.detector) if info.detector else "not recorded"
    if info.detector not in (None, "none") and info.fn_strategy:
        description += f"; {describe_fn_strategy(info.fn_strategy)}"
    return description


def write_card(
    info: CardInfo, folder: str | os.PathLike, template: str | os.PathLike | None = None
) -> Path:
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
