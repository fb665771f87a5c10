"""Checkpoints that survive a crash: which ones are complete, which one to resume from.

The Trainer writes a checkpoint folder file by file: model weights, optimizer, scheduler, RNG
state, ``trainer_state.json``. :class:`~glofnd_hf.trainer.GloFNDTrainer` writes the per-sample
state ``glofnd_state.safetensors`` last, atomically (a temporary file renamed into place),
and removes it first when it writes a folder again. Its presence therefore marks a finished
checkpoint: a process killed anywhere in the middle leaves a folder without it.

A checkpoint is *complete* when it holds every file an exact resume reads, each whole: the
weights, ``optimizer.pt`` (or an FSDP/DeepSpeed optimizer state), ``scheduler.pt``, the RNG
state (``rng_state.pth``; ``rng_state_<rank>.pth`` for each process of a multi-process
run), a ``trainer_state.json`` that parses, and the per-sample state. Files are checked
cheaply: safetensors headers against the file size, ``torch.save`` files for their zip end
record, so a truncated file is found without loading it. A checkpoint written with
``save_only_model=True`` holds the weights only: it cannot resume training (the optimizer
would start afresh and the run would not continue as it was), and is named as such.

``resume_from_checkpoint`` accepts a checkpoint folder, or ``last`` (also ``true``/``True``):
the newest complete ``checkpoint-N`` in the output folder, skipping (and naming) incomplete
ones. A named folder that is incomplete is refused with the list of what it lacks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "STATE_FILE",
    "CheckpointError",
    "CheckpointWriteError",
    "checkpoint_family",
    "checkpoint_problems",
    "damaged_file_problem",
    "disk_full_error",
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
#: The Trainer's training-state files (``save_only_model=True`` writes none of them).
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
_RNG_RANK_RE = re.compile(r"^rng_state_(\d+)\.pth$")
#: Other forms of the optimizer state: FSDP (optimizer.bin, optimizer_N/ folders), XLA FSDP
#: (rankK-of-N-optimizer.pt), DeepSpeed (global_stepN/ folders, which hold the scheduler too).
_OPTIMIZER_FORMS = (
    re.compile(r"^optimizer\.bin$"),
    re.compile(r"^optimizer_\d+$"),
    re.compile(r"^rank\d+-of-\d+-optimizer\.pt$"),
    re.compile(r"^optimizer\.pt_\d+"),
)
_DEEPSPEED_RE = re.compile(r"^global_step\d+$")
_TORCH_FILE_RE = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
_TORCH_WEIGHTS_RE = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")
#: A safetensors header larger than this is not a header but damage.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: What torch.save and safetensors say when the disk fills up under them.
_DISK_FULL_MESSAGES = ("unexpected pos", "file write failed", "No space left", "StorageFull")
_LAST = {"last", "latest", "true"}
_NONE = {"", "none", "false", "no"}
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint to resume from that is missing, incomplete or damaged, or that does not fit
    this run (the message says which and what it lacks)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (the disk filled up: the message names the
    folder and the space left; or a process could not write its per-sample state shard:
    the message names the process and the file, and every process raises it)."""


def checkpoint_problems(path: str | os.PathLike, weights_only: bool = False) -> list[str]:
    """What a checkpoint folder lacks to be resumed from (empty: complete): missing files by
    name, damaged ones as ``a readable NAME (why)``. ``weights_only``: the training state
    (optimizer, scheduler, RNG) is not required (checkpoints of ``save_only_model`` runs)."""
    path = Path(path)
    if not path.is_dir():
        return ["a folder (none exists at this path)"]
    names = set(os.listdir(path))
    lacking = []
    if not any(p.match(n) for n in names for p in _WEIGHT_PATTERNS):
        lacking.append("model weights (model.safetensors or pytorch_model.bin)")
    if not weights_only:
        lacking += _training_state_problems(path, names)
    if TRAINER_STATE_FILE not in names:
        lacking.append(TRAINER_STATE_FILE)
    if STATE_FILE not in names:
        lacking.append(STATE_FILE)
    else:
        lacking += [n for n in state_shard_names(path / STATE_FILE) if n not in names]
    for name in sorted(names):
        why = damaged_file_problem(path / name)
        if why is not None:
            lacking.append(f"a readable {name} ({why})")
    return lacking


def _training_state_problems(path: Path, names: set[str]) -> list[str]:
    """The optimizer, scheduler and RNG files a resume reads, where missing."""
    lacking = []
    deepspeed = any(_DEEPSPEED_RE.match(n) and (path / n).is_dir() for n in names)
    if not (
        deepspeed
        or OPTIMIZER_FILE in names
        or any(p.match(n) for n in names for p in _OPTIMIZER_FORMS)
    ):
        lacking.append(OPTIMIZER_FILE)
    if SCHEDULER_FILE not in names and not deepspeed:
        lacking.append(SCHEDULER_FILE)
    ranks = sorted(int(m.group(1)) for n in names if (m := _RNG_RANK_RE.match(n)))
    if RNG_FILE not in names and not ranks:
        lacking.append(RNG_FILE)
    elif ranks:  # one per process of the run that wrote it: 0 .. world size - 1
        lacking += [f"rng_state_{r}.pth" for r in sorted(set(range(ranks[-1])) - set(ranks))]
    return lacking


def shard_file_name(rank: int, world_size: int) -> str:
    """The file of process ``rank``'s rows in a set of ``world_size`` per-sample state
    shards (``state_sharding: sharded``)."""
    return f"{STATE_FILE.removesuffix('.safetensors')}.rank{rank}-of-{world_size}.safetensors"


def state_shard_names(state_file: str | os.PathLike) -> list[str]:
    """The per-process shard files (:func:`shard_file_name`) that a sharded run's state file
    (its manifest, :mod:`glofnd_hf.state_shards`) names; none for a single state file or
    one that cannot be read (reported as damaged elsewhere)."""
    try:
        from safetensors import safe_open

        with safe_open(str(state_file), framework="pt") as f:
            shards = (f.metadata() or {}).get("shards")
    except Exception:
        return []
    if shards is None or not shards.isdigit():
        return []
    return [shard_file_name(r, int(shards)) for r in range(int(shards))]


def damaged_file_problem(path: str | os.PathLike) -> str | None:
    """Why a checkpoint file cannot be what it claims (truncated, corrupt), found cheaply:
    a safetensors file's header against its size, a ``torch.save`` file's zip directory, a
    ``trainer_state.json`` that does not parse. None: nothing found (or not a file checked)."""
    path = Path(path)
    name = path.name
    try:
        if name.endswith(".safetensors") and not name.endswith(".tmp"):
            return _safetensors_problem(path)
        if _TORCH_FILE_RE.match(name) or _TORCH_WEIGHTS_RE.match(name):
            return _torch_file_problem(path)
        if name == TRAINER_STATE_FILE:
            return _json_problem(path)
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, no header"
        length = int.from_bytes(head, "little")
        if length > _MAX_SAFETENSORS_HEADER:
            return f"corrupt: a header length of {length:,} bytes"
        if 8 + length > size:
            return f"truncated: {size:,} of at least {8 + length:,} bytes"
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "corrupt: its header is not a safetensors header"
    if size < 8 + length + end:
        return f"truncated: {size:,} of {8 + length + end:,} bytes"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError):
        return "truncated or corrupt: not a whole torch.save file"
    if not entries:
        return "corrupt: an empty archive"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "not JSON: not UTF-8 text"
    except ValueError as err:
        return f"not JSON: {err}"
    return None


def _weights_only(lacking: Iterable[str]) -> bool:
    """Lacks exactly the training state: a checkpoint written with ``save_only_model``."""
    return set(lacking) == {OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE}


def _weights_only_hint(path: Path) -> str:
    return (
        f"It holds the weights only (as save_only_model=true writes): training cannot resume "
        f"from it; start a new run from its weights with model_name_or_path={path}."
    )


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """The model family (``hf``, ``open_clip``) a checkpoint folder was written by: its
    ``glofnd_card.json``'s, else the family whose marker file it holds; None: unknown."""
    path = Path(path)
    try:
        family = json.loads((path / "glofnd_card.json").read_text(encoding="utf-8"))["family"]
        if isinstance(family, str) and family:
            return family
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from .models import family_of_folder

    try:
        return family_of_folder(path)
    except ValueError:
        return None


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as the Trainer names a checkpoint (``checkpoint-N``)."""
    return _CHECKPOINT_RE.match(Path(path).name) is not None


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
    weights_only = ", weights only: save_only_model" if _weights_only(lacking) else ""
    return f"{path.name} (lacks {', '.join(lacking)}{weights_only})"


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
    if _weights_only(lacking):
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed from: it lacks {', '.join(lacking)}. "
            + _weights_only_hint(path)
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
    return (
        "No complete checkpoint is beside it: start afresh (drop resume_from_checkpoint; "
        "overwrite_output_dir=true deletes the earlier run's files)."
    )


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
            f"{'; '.join(skipped)}. Start afresh (drop resume_from_checkpoint; "
            f"overwrite_output_dir=true deletes the earlier run's files)."
        )
    why = "it does not exist" if not output_dir.is_dir() else "it holds no checkpoint-N folder"
    raise CheckpointError(
        f"resume_from_checkpoint=last: no checkpoint in {output_dir} ({why}). Start afresh "
        f"(drop resume_from_checkpoint), or set output_dir to the interrupted run's folder."
    )


def disk_full_error(
    err: BaseException, folder: str | os.PathLike, final: bool = False
) -> CheckpointWriteError | None:
    """A :class:`CheckpointWriteError` naming ``folder`` and the space left when ``err`` says
    the disk is full (``OSError`` ENOSPC/EDQUOT, torch.save's ``unexpected pos``, ...); None
    for any other error. ``final``: the folder is the run's final model, not a checkpoint."""
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or any(m in str(err) for m in _DISK_FULL_MESSAGES)
    if not full:
        return None
    where = Path(folder).absolute()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        space = f"{_size(usage.free)} free of {_size(usage.total)} on its disk"
    except OSError:
        space = "free space unknown"
    if final:
        return CheckpointWriteError(
            f"no space left to save the trained model in {where} ({space}): free space, then "
            f"resume_from_checkpoint=last continues from the last complete checkpoint "
            f"[{type(err).__name__}: {' '.join(str(err).split())[:200]}]"
        )
    return CheckpointWriteError(
        f"no space left to save checkpoint {where} ({space}): free space or move output_dir "
        f"to a larger disk (fewer checkpoints: save_total_limit), then resume with "
        f"resume_from_checkpoint=last (the unfinished {where.name} is skipped) "
        f"[{type(err).__name__}: {' '.join(str(err).split())[:200]}]"
    )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


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
