"""Checkpoints that survive a crash: which ones are complete, which one to resume from.

The Trainer writes a checkpoint folder file by file: model weights, optimizer, scheduler, RNG
state, ``trainer_state.json``. :class:`~glofnd_hf.trainer.GloFNDTrainer` writes the per-sample
state ``glofnd_state.safetensors`` last, atomically (a temporary file renamed into place),
and removes it first when it writes a folder again. Its presence therefore marks a complete
checkpoint: a process killed anywhere in the middle leaves a folder without it.

``resume_from_checkpoint`` accepts a checkpoint folder, or ``last`` (also ``true``/``True``):
the newest complete ``checkpoint-N`` in the output folder, skipping (and naming) incomplete
ones. A named folder that is incomplete is refused with the list of what it lacks.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "STATE_FILE",
    "CheckpointError",
    "checkpoint_problems",
    "find_checkpoints",
    "resolve_resume_checkpoint",
    "sync_folder",
    "write_atomically",
]

logger = logging.getLogger(__name__)

#: The per-sample state of a checkpoint, written last: the mark of a complete checkpoint.
STATE_FILE = "glofnd_state.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
#: Weight files the Trainer writes (one of them), sharded or not, full model or adapter.
_WEIGHT_PATTERNS = (
    re.compile(r"^model(-\d+-of-\d+)?\.safetensors$"),
    re.compile(r"^model\.safetensors\.index\.json$"),
    re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$"),
    re.compile(r"^pytorch_model\.bin\.index\.json$"),
    re.compile(r"^adapter_model\.(safetensors|bin)$"),
    re.compile(r"^pytorch_model_fsdp"),
)
_LAST = {"last", "latest", "true"}
_NONE = {"", "none", "false", "no"}
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint to resume from that is missing or incomplete (the message says which and
    what it lacks)."""


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """What a checkpoint folder lacks to be resumed from (empty: complete)."""
    path = Path(path)
    if not path.is_dir():
        return ["a folder (none exists at this path)"]
    names = set(os.listdir(path))
    lacking = []
    if not any(p.match(n) for n in names for p in _WEIGHT_PATTERNS):
        lacking.append("model weights (model.safetensors or pytorch_model.bin)")
    if TRAINER_STATE_FILE not in names:
        lacking.append(TRAINER_STATE_FILE)
    if STATE_FILE not in names:
        lacking.append(STATE_FILE)
    return lacking


def find_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the ``checkpoint-N`` folders in ``output_dir``, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _describe(path: Path, lacking: list[str]) -> str:
    return f"{path.name} (lacks {', '.join(lacking)})"


def resolve_resume_checkpoint(
    value: Any, output_dir: str | os.PathLike, log: Callable[[str], None] | None = None
) -> str | None:
    """The checkpoint folder ``resume_from_checkpoint`` means, checked complete; None: none.

    ``value``: None/False/``""``/``"false"``/``"none"`` (start afresh), ``True`` or
    ``"last"``/``"latest"``/``"true"`` (the newest complete checkpoint of ``output_dir``;
    incomplete newer ones are skipped and reported through ``log``, a warning by default),
    or a folder. Raises :class:`CheckpointError` for a folder that is not a complete
    checkpoint and when ``last`` finds none.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _LAST):
        return _last_complete(output_dir, log or logger.warning)
    if not isinstance(value, (str, os.PathLike)):
        raise CheckpointError(
            f"resume_from_checkpoint must be a checkpoint folder or 'last', got {value!r}"
        )
    if isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    path = Path(value)
    lacking = checkpoint_problems(path)
    if not lacking:
        return str(path)
    if not path.is_dir():
        what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint {path} {what}. Use resume_from_checkpoint=last for the newest "
            f"complete checkpoint in output_dir."
        )
    inside = find_checkpoints(path)
    if inside:  # the run's folder rather than one of its checkpoints
        names = ", ".join(p.name for _, p in inside[:5])
        raise CheckpointError(
            f"{path} is not a checkpoint but holds checkpoints ({names}): name one of them, or "
            f"use resume_from_checkpoint=last with output_dir={path}."
        )
    raise CheckpointError(
        f"checkpoint {path} is incomplete (its writing was cut short): it lacks "
        f"{', '.join(lacking)}. " + _alternatives(path.parent, exclude=path)
    )


def _alternatives(output_dir: Path, exclude: Path | None = None) -> str:
    complete = [
        p for _, p in find_checkpoints(output_dir) if p != exclude and not checkpoint_problems(p)
    ]
    if complete:
        return (
            f"Resume from a complete one ({', '.join(p.name for p in complete[:3])}) or with "
            f"resume_from_checkpoint=last."
        )
    return "No complete checkpoint is beside it: start afresh (drop resume_from_checkpoint)."


def _last_complete(output_dir: str | os.PathLike, log: Callable[[str], None]) -> str:
    output_dir = Path(output_dir)
    skipped = []
    for _, path in find_checkpoints(output_dir):
        lacking = checkpoint_problems(path)
        if not lacking:
            if skipped:
                log(
                    f"resuming from {path}, the newest complete checkpoint; skipped incomplete "
                    f"{'; '.join(skipped)}"
                )
            else:
                log(f"resuming from {path}, the newest checkpoint")
            return str(path)
        skipped.append(_describe(path, lacking))
    if skipped:
        raise CheckpointError(
            f"resume_from_checkpoint=last: no complete checkpoint in {output_dir}; incomplete: "
            f"{'; '.join(skipped)}. Start afresh (drop resume_from_checkpoint)."
        )
    why = "it does not exist" if not output_dir.is_dir() else "it holds no checkpoint-N folder"
    raise CheckpointError(
        f"resume_from_checkpoint=last: no checkpoint in {output_dir} ({why}). Start afresh "
        f"(drop resume_from_checkpoint), or set output_dir to the interrupted run's folder."
    )


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, flush it to disk, then rename it to ``path``: readers see
    the old file or the whole new one, never a part."""
    path = os.fspath(path)
    temporary = path + ".tmp"
    try:
        write(temporary)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(os.path.dirname(path) or ".")


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush every file of ``folder`` (recursively) to disk: before the completion mark is
    written, so that after a power loss no complete-looking checkpoint holds lost data."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _fsync(path: str) -> None:
    """Best effort: some platforms and file systems cannot fsync (folders on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
