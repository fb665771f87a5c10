"""Model cards for GloFND-trained models (``README.md`` with Hub metadata).

The card is rendered from the packaged template ``template.md`` (read with
``importlib.resources``) with ``huggingface_hub.ModelCard.from_template``. Its metadata holds
``library_name`` (``transformers`` or ``open_clip``), ``pipeline_tag:
zero-shot-image-classification``, tags (``clip`` or ``siglip`` by how the model scores),
``base_model`` (when fine-tuned from a Hub model), ``datasets``, ``license`` and a
``model-index`` with the zero-shot results (``huggingface_hub.EvalResult``, our metric names)
when the evaluation data is on the Hub. The text describes the loss and detector, the GloFND
settings that differ from the defaults of :class:`~glofnd_hf.args.GloFNDTrainingArguments`, N
and the epochs, usage snippets that score as the model's library does (a softmax for CLIP, a
sigmoid with the bias for SigLIP) and the BibTeX of GloFND, CLIP and the loss's own papers.

* ``info``: :class:`CardInfo`, the card's inputs, from a trainer (:func:`card_info_from_trainer`)
  or a saved folder (:func:`card_info_from_folder`, used by ``glofnd-push``);
* ``render``: :func:`render_model_card`, :func:`write_card` and the template;
* ``callback``: :class:`ModelCardCallback` writes a card into every checkpoint folder and
  collects eval metrics; :func:`write_model_card` writes the card of a final model;
* ``descriptions`` (objectives, detectors, datasets, citations) and ``metrics`` (our metric
  names in the card and the model-index).

Besides ``README.md`` the card's inputs are saved as ``glofnd_card.json`` so the card can be
rendered again (e.g. with the repository id in the usage snippet).
"""

from .callback import ModelCardCallback, model_card_callback, set_model_card_info, write_model_card
from .descriptions import (
    CITATIONS,
    LOCAL_EVAL_DATASET_NAME,
    LOCAL_EVAL_DATASET_TYPE,
    describe_detector,
    hub_dataset_type,
    is_local_path,
)
from .info import (
    BASE_MODEL_ORIGINS,
    CARD_INFO_FILE,
    MODEL_KINDS,
    CardInfo,
    base_model_origin,
    card_info_from_folder,
    card_info_from_trainer,
    eval_dataset_fields,
    model_kind_of_adapter,
    model_kind_of_folder,
    resolve_base_model,
)
from .metrics import eval_results_from_metrics, normalize_eval_metrics
from .render import card_is_unedited, read_template, render_model_card, template_path, write_card
from .settings import default_settings, non_default_settings

__all__ = [
    "BASE_MODEL_ORIGINS",
    "CARD_INFO_FILE",
    "CITATIONS",
    "LOCAL_EVAL_DATASET_NAME",
    "LOCAL_EVAL_DATASET_TYPE",
    "MODEL_KINDS",
    "CardInfo",
    "base_model_origin",
    "ModelCardCallback",
    "card_info_from_folder",
    "card_info_from_trainer",
    "card_is_unedited",
    "default_settings",
    "describe_detector",
    "eval_dataset_fields",
    "eval_results_from_metrics",
    "hub_dataset_type",
    "is_local_path",
    "model_card_callback",
    "model_kind_of_adapter",
    "model_kind_of_folder",
    "non_default_settings",
    "normalize_eval_metrics",
    "read_template",
    "render_model_card",
    "resolve_base_model",
    "set_model_card_info",
    "template_path",
    "write_card",
    "write_model_card",
]
