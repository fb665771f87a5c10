"""Save models in their family's Hub layout with a model card, and push folders to the Hub.

* Hugging Face models: ``save_pretrained`` of model and processor, loadable with
  ``AutoModel`` / ``AutoProcessor`` / ``pipeline("zero-shot-image-classification")``.
* open_clip models: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ tokenizer
  files), loadable with ``open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`` once
  uploaded (``"local-dir:PATH"`` before).

The access token comes from huggingface_hub's usual sources (``HF_TOKEN``, the token saved by
``hf auth login``) unless passed explicitly; it is never printed or written by this module.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hub_ids import check_hub_repo_id
from .model_card import (
    CardInfo,
    card_info_from_folder,
    card_is_unedited,
    hub_dataset_type,
    is_local_path,
    model_kind_of_adapter,
    normalize_eval_metrics,
    write_card,
)
from .models import OPEN_CLIP_CONFIG_NAME, DualEncoderAdapter, family_of_adapter
from .secret_args import find_secrets, known_tokens
from .version import __version__

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "TRAINING_STATE_PATTERNS",
    "ALWAYS_IGNORED_PATTERNS",
    "SecretInUploadError",
    "check_no_secrets",
    "files_to_upload",
    "ignore_patterns_for",
    "push_to_hub",
    "save_for_hub",
]

DEFAULT_COMMIT_MESSAGE = "Upload GloFND-trained model"

#: Files a training checkpoint holds that a final model does not need.
TRAINING_STATE_PATTERNS = (
    "glofnd_state.safetensors",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "global_step*/**",
    "zero_to_fp32.py",
    "latest",
)
#: Never uploaded: nested checkpoints, logs, local caches, VCS metadata.
ALWAYS_IGNORED_PATTERNS = (
    "checkpoint-*/**",
    "runs/**",
    ".cache/**",
    ".git/**",
    "**/.DS_Store",
    "*.lock",
    "*.tmp",  # a half-written file left by a crash (state files are written via a .tmp)
)
# open_clip folders written by GloFNDTrainer also hold the Trainer's own copy of the weights
# (used by resume_from_checkpoint); the Hub layout is open_clip_model.safetensors.
_OPEN_CLIP_TRAINER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def save_for_hub(
    adapter: DualEncoderAdapter,
    output_dir: str | os.PathLike,
    card: CardInfo | None = None,
    **card_fields: Any,
) -> Path:
    """Save ``adapter``'s model in its family's Hub layout and write the model card.

    ``card``: the card's inputs (e.g. from :func:`glofnd_hf.model_card.card_info_from_trainer`);
    without it a card is made from ``card_fields`` (:class:`~glofnd_hf.model_card.CardInfo`
    fields such as ``repo_id``, ``base_model``, ``datasets``, ``license``, ``eval_metrics``,
    ``eval_dataset``, ``eval_split``). Returns the folder.
    """
    output_dir = Path(output_dir)
    adapter.save(output_dir, **family_of_adapter(adapter).release_save_kwargs)
    if card is None:
        fields = {
            "glofnd_version": __version__,
            "architecture": adapter.architecture_description(),
            "model_kind": model_kind_of_adapter(adapter),
            "text_length": getattr(adapter, "context_length", None),
            **card_fields,
        }
        if fields.get("base_model") and "base_model_origin" not in fields:
            fields["base_model_origin"] = "hub"
        if "eval_metrics" in fields:
            fields["eval_metrics"] = normalize_eval_metrics(fields["eval_metrics"])
        card = CardInfo(family=adapter.family, **fields)
    elif card_fields:
        card = dataclasses.replace(card, **card_fields)
    write_card(card, output_dir)
    return output_dir


def ignore_patterns_for(
    folder: str | os.PathLike, include_training_state: bool = False
) -> list[str]:
    """``ignore_patterns`` for ``upload_folder`` of a model folder."""
    patterns = list(ALWAYS_IGNORED_PATTERNS)
    if not include_training_state:
        patterns += TRAINING_STATE_PATTERNS
        if (Path(folder) / OPEN_CLIP_CONFIG_NAME).is_file():
            patterns += _OPEN_CLIP_TRAINER_WEIGHTS
    return patterns


def files_to_upload(
    folder: str | os.PathLike,
    ignore_patterns: Sequence[str],
    allow_patterns: Sequence[str] | None = None,
) -> list[str]:
    """Relative paths (``/``-separated) of the files ``upload_folder`` would send."""
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(
        filter_repo_objects(
            paths, allow_patterns=allow_patterns, ignore_patterns=list(ignore_patterns)
        )
    )


class SecretInUploadError(ValueError):
    """A file to upload holds an access token (nothing was uploaded)."""


def check_no_secrets(
    folder: str | os.PathLike, files: Sequence[str], token: str | None = None
) -> None:
    """Raise :class:`SecretInUploadError` naming the first of ``files`` (relative to
    ``folder``) that holds an access token: pickled training arguments with ``hub_token``
    set (written by older versions), a Hugging Face token, or this session's token."""
    tokens = known_tokens([token])
    flagged = [
        (name, found) for name in files if (found := find_secrets(Path(folder) / name, tokens))
    ]
    if flagged:
        name, found = flagged[0]
        others = f" (and {len(flagged) - 1} more file(s))" if len(flagged) > 1 else ""
        raise SecretInUploadError(
            f"refusing to upload {name}{others}: it holds {' and '.join(found)}. Nothing was "
            f"uploaded; delete or fix the file (an old training_args.bin: leave out "
            f"--include-training-state)"
        )


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    include_training_state: bool = False,
    render_card: bool | None = None,
    card_fields: dict[str, Any] | None = None,
    eval_report: dict[str, Any] | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    verbose: bool = True,
) -> str:
    """Create ``repo_id`` (if needed) and upload the model folder ``output_dir``.

    The model card (``README.md``) is rendered when missing or when it is our unedited card,
    always with ``render_card=True``, never with ``render_card=False``; its title, model-index
    name and usage snippets then name ``repo_id``. Its inputs come from ``glofnd_card.json``
    when present, and ``card_fields`` / ``eval_report`` add to them (``eval_dataset_name`` /
    ``eval_dataset_type`` name the evaluation data in the model-index; a local path never
    goes into a card). The card is rendered into a staging folder and uploaded from there:
    the local folder is updated (``README.md``, ``glofnd_card.json``) only after a successful
    upload, so a failed push leaves it as it was. Training-only files
    (:data:`TRAINING_STATE_PATTERNS`, and the Trainer's weight copy in open_clip folders) stay
    local unless ``include_training_state``; no file that holds an access token is uploaded
    (:class:`SecretInUploadError`, before anything is sent).
    ``token``: None uses huggingface_hub's usual sources. Returns the commit URL.
    """
    # Long: the docstring is the upload's contract; the body is one staged commit.
    from huggingface_hub import CommitOperationAdd, HfApi

    check_hub_repo_id(repo_id)
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    readme = folder / "README.md"
    if render_card is None:
        # Missing, or ours and unedited (then it gets the repo id in its usage snippet).
        render_card = not readme.is_file() or card_is_unedited(folder)
    dataset_type = (card_fields or {}).get("eval_dataset_type")
    if dataset_type and is_local_path(dataset_type):
        raise ValueError(
            f"the evaluation dataset type {dataset_type!r} is a local path: give the Hub id of "
            "the data set, which the card's model-index records"
        )
    if dataset_type and hub_dataset_type(dataset_type) is None:
        raise ValueError(
            f"the evaluation dataset type {dataset_type!r} is not a Hub dataset id: the "
            "card's model-index records the data set's Hub id (data that is not on the Hub "
            "has none: leave it out, and the results stay in the card's text)"
        )
    with tempfile.TemporaryDirectory(prefix="glofnd-push-") as staging:
        staged: dict[str, Path] = {}  # path in the repo -> staged file (the rendered card)
        if render_card:
            fields = {"repo_id": repo_id, "model_name": repo_id, **(card_fields or {})}
            info = card_info_from_folder(folder, eval_report=eval_report, **fields)
            write_card(info, staging)
            staged = {p.name: p for p in Path(staging).iterdir() if p.is_file()}
        else:
            card_info_from_folder(folder)  # checks that the folder holds a model
        ignore = ignore_patterns_for(folder, include_training_state)
        files = sorted(set(files_to_upload(folder, ignore)) | set(staged))
        check_no_secrets(folder, [f for f in files if f not in staged], token)
        check_no_secrets(staging, list(staged), token)
        if verbose:
            print(f"uploading {len(files)} file(s) from {folder} to {repo_id}: {', '.join(files)}")
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(staged.get(f, folder / f)))
            for f in files
        ]
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
        for name, path in staged.items():  # the push succeeded: the folder shows what was sent
            temporary = folder / f".{name}.glofnd-tmp"
            shutil.copyfile(path, temporary)
            os.replace(temporary, folder / name)
    if verbose and staged:
        print(f"wrote the model card {readme}")
    url = str(getattr(commit, "commit_url", None) or getattr(repo_url, "url", None) or repo_url)
    if verbose:
        print(f"pushed to {getattr(repo_url, 'url', repo_id)} ({url})")
    return url
