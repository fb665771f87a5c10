"""Save models in their family's Hub layout with a model card, and push folders to the Hub.

* Hugging Face models: ``save_pretrained`` of model and processor, loadable with
  ``AutoModel`` / ``AutoProcessor`` / ``pipeline("zero-shot-image-classification")``.
* open_clip models: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ tokenizer
  files), loadable with ``open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`` once
  uploaded (``"local-dir:PATH"`` before).

A push sends an allow-list (:func:`plan_upload`: the model's own files, ``include`` globs,
the training state on request; never dotfiles), scans it for secrets first
(:func:`find_upload_secrets`) and prints what it left out.

The access token comes from huggingface_hub's usual sources (``HF_TOKEN``, the token saved by
``hf auth login``) unless passed explicitly; it is never printed or written by this module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hub_ids import check_hub_repo_id
from .model_card import (
    CARD_INFO_FILE,
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
from .models.tiny_siglip import PORTABLE_TOKENIZER_CLASS
from .secret_args import find_secrets, known_tokens
from .version import __version__

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "MODEL_FILE_PATTERNS",
    "TRAINING_STATE_PATTERNS",
    "ALWAYS_IGNORED_PATTERNS",
    "SecretInUploadError",
    "UploadPlan",
    "check_no_secrets",
    "find_upload_secrets",
    "plan_upload",
    "push_to_hub",
    "save_for_hub",
    "without_local_paths",
]

DEFAULT_COMMIT_MESSAGE = "Upload GloFND-trained model"

#: Files a training checkpoint holds that a final model does not need.
TRAINING_STATE_PATTERNS = (
    "glofnd_state*.safetensors",  # one file, or one per process (state_sharding: sharded)
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "shard_stream.json",
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
#: What a push uploads from the top of a model folder (the allow-list): weights, configs,
#: processor and tokenizer files of both families, the card and its inputs, glofnd-train's
#: metrics. Anything else only when named with ``include`` (``glofnd-push --include``).
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
    "config.json",
    "generation_config.json",
    "open_clip_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece: spiece.model, tokenizer.model, sentencepiece.bpe.model
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    CARD_INFO_FILE,
    "zero_shot_results.json",
)
# Uploaded JSON files read by a library: kept byte for byte (others lose local paths).
_LIBRARY_JSON = {p for p in MODEL_FILE_PATTERNS if p.endswith(".json") and "*" not in p}
_LIBRARY_JSON -= {"zero_shot_results.json"}


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
    if (config := _portable_tokenizer_config(output_dir)) is not None:
        _write_json(output_dir / "tokenizer_config.json", config)  # loads with 4.x too
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


@dataclasses.dataclass
class UploadPlan:
    """What a push sends (``files``, relative ``/``-separated paths) and what it leaves
    out (``skipped``: path -> why, folders with many skipped files summarised)."""

    files: list[str]
    skipped: dict[str, str]

    def skipped_lines(self) -> list[str]:
        return [f"{path} ({why})" for path, why in self.skipped.items()]


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.rstrip("/") + "/*") for p in patterns
    )


def _is_eval_report(path: Path) -> bool:
    """A ``glofnd-eval`` JSON report (``metrics`` and ``data``, as ``glofnd_hf.eval`` writes)."""
    if path.suffix != ".json" or path.stat().st_size > 16 << 20:
        return False
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "metrics" in data and "data" in data


def _why_skipped(folder: Path, path: str, include: Sequence[str], training_state: bool) -> str:
    """Why ``path`` stays local, '' when it is uploaded."""
    if any(part.startswith(".") for part in path.split("/")):
        return "a dotfile or dot-folder: never uploaded"
    if _matches(path, ALWAYS_IGNORED_PATTERNS):
        return "nested checkpoint, logs or temporary file: never uploaded"
    state = list(TRAINING_STATE_PATTERNS)
    if (folder / OPEN_CLIP_CONFIG_NAME).is_file():
        state += _OPEN_CLIP_TRAINER_WEIGHTS
    if _matches(path, state):
        return "" if training_state else "training state: --include-training-state uploads it"
    if ("/" not in path and _matches(path, MODEL_FILE_PATTERNS)) or _matches(path, include):
        return ""
    if _is_eval_report(folder / path):
        return (
            "a glofnd-eval report: --eval-results puts its metrics into the card; "
            "--include uploads it without local paths"
        )
    return "not part of the model: --include GLOB uploads it"


def plan_upload(
    folder: str | os.PathLike,
    include: Sequence[str] = (),
    include_training_state: bool = False,
) -> UploadPlan:
    """The files of ``folder`` a push sends: those of :data:`MODEL_FILE_PATTERNS` at its
    top, those matching an ``include`` glob (relative to the folder; a folder's name takes
    its files), and the training state (:data:`TRAINING_STATE_PATTERNS`, the Trainer's
    weight copy in open_clip folders) with ``include_training_state``. Never: dotfiles and
    dot-folders (``.env``, ``.git/``), nested checkpoints, logs, temporary files."""
    folder = Path(folder)
    files, skipped = [], {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        path = p.relative_to(folder).as_posix()
        why = _why_skipped(folder, path, include, include_training_state)
        if why:
            skipped[path] = why
        else:
            files.append(path)
    return UploadPlan(files, _summarise(skipped))


def _summarise(skipped: dict[str, str]) -> dict[str, str]:
    """Files of one top folder skipped for one reason: the folder, with the count."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path, why in skipped.items():
        top = path.split("/", 1)[0] + "/" if "/" in path else path
        groups.setdefault((top, why), []).append(path)
    out = {}
    for (top, why), paths in groups.items():
        if len(paths) == 1:
            out[paths[0]] = why
        else:
            out[top] = f"{len(paths)} files, {why}"
    return out


#: Secrets recognised in any file (a Hugging Face token is found by ``find_secrets``).
_SECRET_PATTERNS = {
    "an AWS access key id": rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "a private key": rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    "a GitHub token": rb"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "a Slack token": rb"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "an API key (sk-...)": rb"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}",
}
#: ``NAME=value`` / ``"name": "value"`` with a credential's name (``WANDB_API_KEY``,
#: ``*_TOKEN``, ``*_SECRET``, ``password``...) and a key-like value, in text files. A
#: tokenizer's special tokens (``eos_token``...) are not credentials.
_ASSIGNMENT_RE = re.compile(
    rb"""(?i)(?<![A-Za-z0-9])([A-Za-z0-9_.-]*(?:api_?key|token|secret|secret_key|password|"""
    rb"""passwd|access_key|private_key|auth_key|credentials?))["']?\s*[:=]\s*["']?"""
    rb"""([A-Za-z0-9_\-.+/=]{12,})"""
)
_SPECIAL_TOKEN_NAME = re.compile(
    rb"(?i)(^|[_.-])(pad|bos|eos|unk|sep|cls|mask|special|start|end|image|audio|video)_?token$"
)
_TEXT_SUFFIXES = {"", ".env", ".txt", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".cfg",
                  ".ini", ".md", ".py", ".sh", ".csv", ".log", ".conf"}  # fmt: skip


def find_upload_secrets(path: str | os.PathLike, tokens: Sequence[str] = ()) -> list[str]:
    """What in the file at ``path`` is a secret (empty: nothing found): what
    :func:`~glofnd_hf.secret_args.find_secrets` finds (pickled credentials, Hugging Face and
    session tokens), AWS access keys, private keys, GitHub / Slack / ``sk-`` API keys in any
    file, and credential assignments (``WANDB_API_KEY=...``, ``"aws_secret_access_key":
    "..."``) in text files. Values are never part of the answer."""
    path = Path(path)
    found = find_secrets(path, tokens)
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # weight files are scanned by their first 64 MiB here
    found += [what for what, pattern in _SECRET_PATTERNS.items() if re.search(pattern, data)]
    if path.suffix.lower() in _TEXT_SUFFIXES and b"\0" not in data[:8192]:
        names = sorted(
            {
                m.group(1).decode("ascii", "replace")
                for m in _ASSIGNMENT_RE.finditer(data)
                if not _SPECIAL_TOKEN_NAME.search(m.group(1))
            }
        )
        found += [f"a value of {name}" for name in names]
    return found


_LOCAL_PATH_RE = re.compile(
    r"local-dir:[^\s'\"]+|(?<![\w/.~:-])(?:~|[A-Za-z]:)?[/\\](?![/\\])[^\s'\"]+"
)
LOCAL_PATH_PLACEHOLDER = "<local path>"


def without_local_paths(value: Any) -> Any:
    """``value`` (parsed JSON) with every absolute local path in its strings and keys
    replaced by ``<local path>`` (URLs are kept)."""
    if isinstance(value, str):
        return _LOCAL_PATH_RE.sub(LOCAL_PATH_PLACEHOLDER, value)
    if isinstance(value, dict):
        return {without_local_paths(k): without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    return value


def _stage_without_local_paths(folder: Path, name: str, staging: Path) -> Path | None:
    """A copy of the JSON file ``name`` without local paths, in ``staging``; None when it
    has none (or is no JSON)."""
    try:
        data = json.loads((folder / name).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    clean = without_local_paths(data)
    return None if clean == data else _write_json(staging / "scrubbed" / name, clean)


def _portable_tokenizer_config(folder: Path) -> dict[str, Any] | None:
    """``folder/tokenizer_config.json`` when it names transformers 5's ``TokenizersBackend``
    (which 4.x cannot load), naming ``PreTrainedTokenizerFast`` instead (the same class in
    5.x); None when it needs no change."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") != "TokenizersBackend":
        return None
    return {**config, "tokenizer_class": PORTABLE_TOKENIZER_CLASS}


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class SecretInUploadError(ValueError):
    """A file to upload holds an access token (nothing was uploaded)."""


def check_no_secrets(
    folder: str | os.PathLike, files: Sequence[str], token: str | None = None
) -> None:
    """Raise :class:`SecretInUploadError` naming the first of ``files`` (relative to
    ``folder``) that holds a secret :func:`find_upload_secrets` recognises: pickled training
    arguments with ``hub_token`` set (written by older versions), a Hugging Face token or
    this session's, other services' keys, credential assignments in text files."""
    tokens = known_tokens([token])
    flagged = [
        (name, found)
        for name in files
        if (found := find_upload_secrets(Path(folder) / name, tokens))
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
    include: Sequence[str] = (),
    render_card: bool | None = None,
    card_fields: dict[str, Any] | None = None,
    eval_report: dict[str, Any] | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    verbose: bool = True,
    path_in_repo: str = "",
) -> str:
    """Create ``repo_id`` (if needed) and upload the model folder ``output_dir`` (to
    ``path_in_repo``, a folder of the repo; its top by default).

    The model card (``README.md``) is rendered when missing or when it is our unedited card,
    always with ``render_card=True``, never with ``render_card=False``; its title, model-index
    name and usage snippets then name ``repo_id``. Its inputs come from ``glofnd_card.json``
    when present, and ``card_fields`` / ``eval_report`` add to them (``eval_dataset_name`` /
    ``eval_dataset_type`` name the evaluation data; a local path never goes into a card). The
    card is rendered into a staging folder and uploaded from there: the local folder is
    updated (``README.md``, ``glofnd_card.json``) only after a successful upload, so a failed
    push leaves it as it was.

    What is sent is :func:`plan_upload`'s allow-list: the model's files, ``include`` globs,
    and the training state with ``include_training_state``; never dotfiles or dot-folders.
    What stays local is printed. JSON files other than the libraries' own configs go without
    absolute local paths (:func:`without_local_paths`), and a ``tokenizer_config.json``
    naming transformers 5's ``TokenizersBackend`` names ``PreTrainedTokenizerFast`` (loadable
    by 4.x too). No file holding a secret is uploaded (:class:`SecretInUploadError`, before
    anything is sent). ``token``: None uses huggingface_hub's usual sources. Returns the
    commit URL.
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
    _check_dataset_type((card_fields or {}).get("eval_dataset_type"))
    with tempfile.TemporaryDirectory(prefix="glofnd-push-") as staging_dir:
        staging = Path(staging_dir)
        card: dict[str, Path] = {}  # path in the repo -> the rendered card's files
        if render_card:
            fields = {"repo_id": repo_id, "model_name": repo_id, **(card_fields or {})}
            info = card_info_from_folder(folder, eval_report=eval_report, **fields)
            write_card(info, staging)
            card = {p.name: p for p in staging.iterdir() if p.is_file()}
        else:
            card_info_from_folder(folder)  # checks that the folder holds a model
        plan = plan_upload(folder, include, include_training_state)
        files = sorted(set(plan.files) | set(card))
        sent = {**_staged_substitutes(folder, plan.files, staging), **card}
        check_no_secrets(folder, [f for f in files if f not in sent], token)
        for path in sent.values():
            check_no_secrets(path.parent, [path.name], token)
        if verbose:
            _print_plan(folder, repo_id, files, plan)
        api, prefix = HfApi(token=token), f"{path_in_repo.strip('/')}/".lstrip("/")
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(f"{prefix}{f}", str(sent.get(f, folder / f))) for f in files
        ]
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
        )
        for name, path in card.items():  # the push succeeded: the folder shows what was sent
            temporary = folder / f".{name}.glofnd-tmp"
            shutil.copyfile(path, temporary)
            os.replace(temporary, folder / name)
    if verbose and card:
        print(f"wrote the model card {readme}")
    url = str(getattr(commit, "commit_url", None) or getattr(repo_url, "url", None) or repo_url)
    if verbose:
        print(f"pushed to {getattr(repo_url, 'url', repo_id)} ({url})")
    return url


def _check_dataset_type(dataset_type: str | None) -> None:
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


def _staged_substitutes(folder: Path, files: Sequence[str], staging: Path) -> dict[str, Path]:
    """Copies sent instead of files of the folder: JSON files without local paths, a
    tokenizer config every transformers version loads."""
    out = {}
    for name in files:
        if name.endswith(".json") and name not in _LIBRARY_JSON:
            if (clean := _stage_without_local_paths(folder, name, staging)) is not None:
                out[name] = clean
    if "tokenizer_config.json" in files and (config := _portable_tokenizer_config(folder)):
        out["tokenizer_config.json"] = _write_json(
            staging / "portable" / "tokenizer_config.json", config
        )
    return out


def _print_plan(folder: Path, repo_id: str, files: Sequence[str], plan: UploadPlan) -> None:
    if plan.skipped:
        print(f"not uploading {len(plan.skipped)} file(s) or folder(s) of {folder}:")
        for line in plan.skipped_lines():
            print(f"  {line}")
    print(f"uploading {len(files)} file(s) from {folder} to {repo_id}: {', '.join(files)}")
