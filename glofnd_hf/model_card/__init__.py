"""Model cards for GloFND-trained models (``README.md`` with Hub metadata).

The card is rendered from the packaged template ``template.md`` (read with
``importlib.resources``) with ``huggingface_hub.ModelCard.from_template``. Its metadata holds
``library_name`` (``transformers`` or ``open_clip``), ``pipeline_tag:
zero-shot-image-classification``, tags, ``base_model`` (when fine-tuned from a Hub model),
``datasets``, ``license`` and a ``model-index`` with the zero-shot results
(``huggingface_hub.EvalResult``, our metric names). The text describes the loss and detector,
the GloFND settings that differ from the defaults of
:class:`~glofnd_hf.args.GloFNDTrainingArguments`, N and the epochs, a usage snippet and the
BibTeX of GloFND, CLIP and (for the global losses) FastCLIP / SogCLR.

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
    is_local_path,
)
from .info import (
    CARD_INFO_FILE,
    CardInfo,
    card_info_from_folder,
    card_info_from_trainer,
    default_settings,
    eval_dataset_fields,
    non_default_settings,
    resolve_base_model,
)
from .metrics import eval_results_from_metrics, normalize_eval_metrics
from .render import card_is_unedited, read_template, render_model_card, template_path, write_card

__all__ = [
    "CARD_INFO_FILE",
    "CITATIONS",
    "LOCAL_EVAL_DATASET_NAME",
    "LOCAL_EVAL_DATASET_TYPE",
    "CardInfo",
    "ModelCardCallback",
    "card_info_from_folder",
    "card_info_from_trainer",
    "card_is_unedited",
    "default_settings",
    "describe_detector",
    "eval_dataset_fields",
    "eval_results_from_metrics",
    "is_local_path",
    "model_card_callback",
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
