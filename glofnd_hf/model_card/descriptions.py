"""What a card says in words: objectives, detectors, datasets, and the papers it cites."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

from ..data.digits import DIGITS_DATASET
from ..fnd import registry
from ..hub_ids import is_hub_repo_id
from ..losses import registry as loss_registry

__all__ = [
    "CITATIONS",
    "citations_for",
    "describe_dataset",
    "describe_detector",
    "describe_fn_strategy",
    "describe_objective",
    "eval_dataset_id",
    "hub_dataset_type",
    "hub_datasets",
    "is_local_path",
    "LOCAL_EVAL_DATASET_NAME",
    "LOCAL_EVAL_DATASET_TYPE",
]

#: How a card names evaluation data that lives only on the machine that evaluated it (a
#: local folder, shards).
LOCAL_EVAL_DATASET_NAME = "local evaluation data"
#: The model-index ``dataset.type`` older versions wrote for such data. It is no Hub dataset
#: id: cards no longer write it (data that is not on the Hub has no model-index entry).
LOCAL_EVAL_DATASET_TYPE = "local"

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
}


_FN_STRATEGIES = {
    "eliminate": "detected false negatives are removed from the negatives",
    "attract": "detected false negatives are used as extra positives",
}


def describe_objective(loss_type: str | None, missing: str = "a contrastive loss") -> str:
    """The training objective in words, from the loss registry (the loss type itself for one
    this version does not know, ``missing`` when none was recorded)."""
    spec = _loss_spec(loss_type)
    return spec.objective if spec else loss_type or missing


def describe_detector(name: str) -> str:
    """What the false-negative detector ``name`` does, in one sentence (from the registry, so
    a newly registered detector is described without any edit here)."""
    try:
        return f"{name}: {registry.get(name).description}"
    except ValueError:  # a card written by a version that had other detectors
        return name


def describe_fn_strategy(strategy: str) -> str:
    """What happens to the detected false negatives (``fn_strategy``)."""
    return _FN_STRATEGIES.get(strategy, strategy)


def citations_for(
    loss_type: str | None, detector: str | None, training_recorded: bool
) -> list[dict[str, str]]:
    """The papers the card cites: GloFND and CLIP always, then the loss's own (its
    registration's ``citations``: FastCLIP and SogCLR for the global losses, SigLIP for the
    sigmoid loss)."""
    glofnd = dict(CITATIONS["glofnd"])
    if training_recorded and detector != "glofnd":
        glofnd["what"] = "GloFND (the method of glofnd-hf, the training library)"
    citations = [glofnd, CITATIONS["clip"]]
    spec = _loss_spec(loss_type)
    own = spec.citations if spec else ()
    return citations + [{"what": c.what, "bibtex": c.bibtex} for c in own]


def _loss_spec(loss_type: str | None) -> loss_registry.LossSpec | None:
    """The registration of ``loss_type``; None for none recorded, or for a loss this version
    does not know (a card written by a version that had other losses)."""
    try:
        return loss_registry.get(loss_type or "")
    except ValueError:
        return None


def is_local_path(name: str) -> bool:
    """``name`` is (or can only be) a path on this machine, not a Hub id: it exists, or it is
    absolute, starts with ``.`` or ``~``, or has more than one ``/`` (a URL included)."""
    name = str(name)
    if os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")):
        return True
    return name.count("/") > 1 or "\\" in name or "://" in name


def eval_dataset_id(name: str | None, what: str = "evaluation data set") -> str | None:
    """``name`` as the card may record it (a Hub dataset id, or the embedded digits), or None
    with a warning when it is a local path (or shards): a card never holds one. The card
    then names the data :data:`LOCAL_EVAL_DATASET_NAME`."""
    if not name:
        return None
    name = str(name)
    if name == DIGITS_DATASET or (
        not is_local_path(name) and is_hub_repo_id(name, require_namespace=False)
    ):
        return name
    warnings.warn(
        f"the {what} {name!r} is not a Hub dataset id (a local path or shards): the model "
        "card calls it "
        f"{LOCAL_EVAL_DATASET_NAME!r} (pass the Hub id, or name it with glofnd-push "
        "--dataset-name NAME --dataset-type HUB_ID)",
        UserWarning,
        stacklevel=3,
    )
    return None


def hub_dataset_type(name: str | None) -> str | None:
    """``name`` when it can be a model-index ``dataset.type`` (a Hub dataset id), else None:
    no local path, not the embedded digits, not :data:`LOCAL_EVAL_DATASET_TYPE`."""
    if not name or name in (DIGITS_DATASET, LOCAL_EVAL_DATASET_TYPE):
        return None
    return str(name) if hub_datasets([name]) else None


def hub_datasets(names: Iterable[str | None]) -> list[str]:
    """Dataset names usable as Hub metadata (no local folders, no embedded demo data)."""
    out = []
    for name in names:
        if not name or name == DIGITS_DATASET or is_local_path(str(name)):
            continue
        if is_hub_repo_id(str(name), require_namespace=False) and name not in out:
            out.append(str(name))
    return out


def describe_dataset(name: str | None) -> str:
    """A data set as the card's text names it (a link for Hub datasets)."""
    if name == DIGITS_DATASET:
        return (
            "the embedded coloured-digits demo pairs (`glofnd-digits`: scikit-learn's "
            "handwritten digits rendered in colour and captioned)"
        )
    if not name:
        return "an image-caption data set"
    if hub_datasets([name]):
        return f"[{name}](https://huggingface.co/datasets/{name})"
    if is_local_path(name):
        return "a local image-caption data set"  # never a path of the training machine
    return f"`{name}`"
