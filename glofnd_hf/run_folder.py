"""Whose output folder it is: a new run never silently reuses a folder that holds an earlier
run, and two runs never write into one folder at once.

*An earlier run* is anything a training run or a saved model leaves in ``output_dir``: a
``checkpoint-N`` folder (complete or not), ``trainer_state.json``, ``training_args.bin``,
``glofnd_card.json``, ``glofnd_state.safetensors``, ``zero_shot_results.json`` or model
weights (``model.safetensors``, ``pytorch_model.bin``, their shards, ``open_clip_*`` weights).
A missing or empty folder, or one with other files only (logs, notes, ``runs/``), is free.

A new run (not a resume) into a folder holding an earlier run stops with one line
(:class:`RunFolderError`) unless ``overwrite_output_dir`` is set; then the earlier run's
files listed above are deleted before anything else is written (other files stay; the new
run's final save rewrites the model's config, processor and card). A resume from a
checkpoint inside ``output_dir`` continues that run: nothing is checked or deleted
(``overwrite_output_dir`` is ignored). A resume from a checkpoint elsewhere is a new run for
``output_dir``.

While a run uses the folder its main process (world rank 0) holds an exclusive lock on
``_glofnd_run.lock`` in it, which records its pid and host; a second run finds it held and
stops with one line naming them. The lock is a POSIX record lock (``fcntl.lockf``): the
system drops it when the process ends, however it ends (a crash, SIGKILL), so no stale lock
outlives a run, and forked workers do not inherit it. ``GloFNDTrainer.train`` holds it while
it trains; ``glofnd-train`` also takes it (and checks the folder) before anything loads.
In a multi-process run only rank 0 checks and locks (other nodes' folders, with
``save_on_each_node``, are not checked); when it stops, the launcher (``accelerate launch``,
``torchrun``) ends the others. Where ``fcntl`` is missing (Windows)
runs are not locked. The lock file stays behind, empty of meaning once its holder has ended
(``glofnd-push`` and the Trainer's Hub push leave ``_*`` and ``*.lock`` files out).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoints import _WEIGHT_PATTERNS, STATE_FILE, TRAINER_STATE_FILE, find_checkpoints

try:
    import fcntl
except ImportError:  # Windows: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "OutputDirLock",
    "RunFolderError",
    "check_output_dir",
    "earlier_run_files",
    "lock_output_dir",
]

logger = logging.getLogger(__name__)

LOCK_FILE = "_glofnd_run.lock"
#: Files only a training run or a saved model leaves in its folder.
_RUN_FILES = (
    TRAINER_STATE_FILE,
    "training_args.bin",
    "glofnd_card.json",
    STATE_FILE,
    "zero_shot_results.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
_SETTING = "overwrite_output_dir"


class RunFolderError(ValueError):
    """An output folder that holds an earlier run or is in use by another one (the message
    says which and what to do)."""


def earlier_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names in ``output_dir`` that an earlier run left (checkpoint folders newest first,
    then files, sorted); empty: the folder is free for a new run."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    checkpoints = [path.name for _, path in find_checkpoints(folder)]
    files = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_file()
        and (entry.name in _RUN_FILES or any(p.match(entry.name) for p in _WEIGHT_PATTERNS))
    )
    return checkpoints + files


def _inside(checkpoint: str | os.PathLike | None, output_dir: str | os.PathLike) -> bool:
    if checkpoint is None:
        return False
    return Path(checkpoint).resolve().parent == Path(output_dir).resolve()


def check_output_dir(
    output_dir: str | os.PathLike,
    resume_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Refuse (:class:`RunFolderError`) a new run into a folder holding an earlier run, or
    with ``overwrite`` delete that run's files; returns the names deleted. ``resume_from``:
    the checkpoint the run resumes (resolved; None: a new run); one inside ``output_dir``
    continues the run there, and nothing is checked."""
    if _inside(resume_from, output_dir):
        if overwrite:
            (log or logger.info)(
                f"{_SETTING} is ignored: resuming the run in {output_dir} keeps its files"
            )
        return []
    found = earlier_run_files(output_dir)
    if not found:
        return []
    if not overwrite:
        shown = ", ".join(found[:5]) + (f", ... ({len(found)} in all)" if len(found) > 5 else "")
        raise RunFolderError(
            f"output_dir {output_dir} holds an earlier run ({shown}): resume it with "
            f"resume_from_checkpoint=last, choose another output_dir, or set {_SETTING}=true "
            f"to delete that run's files and start afresh"
        )
    folder = Path(output_dir)
    for name in found:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (log or logger.warning)(
        f"{_SETTING}: deleted the earlier run's files in {output_dir}: {', '.join(found)}"
    )
    return found


class OutputDirLock:
    """This process's hold on an output folder (see :func:`lock_output_dir`); ``release()``
    or leave the ``with`` block to let go."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _GUARD:
            fd, count = _HELD[self._key]
            if count > 1:
                _HELD[self._key] = (fd, count - 1)
                return
            del _HELD[self._key]
        if fd is not None:
            os.close(fd)  # drops the lock

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# folder -> (open descriptor holding the lock, holds): one lock per folder per process
# (POSIX locks are per process: a second descriptor closed would drop the first's lock).
_HELD: dict[str, tuple[int | None, int]] = {}
_GUARD = threading.Lock()


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Hold ``output_dir`` for this process (created if missing): its lock file gets this
    process's pid and host. Holds within one process nest. Another process holding it:
    :class:`RunFolderError` naming it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _GUARD:
        if key in _HELD:
            fd, count = _HELD[key]
            _HELD[key] = (fd, count + 1)
            return OutputDirLock(key)
        fd = None
        if fcntl is not None:
            fd = _take(folder / LOCK_FILE, output_dir)
        _HELD[key] = (fd, 1)
    return OutputDirLock(key)


def _take(path: Path, output_dir: str | os.PathLike) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").split()
        os.close(fd)
        who = (
            f"pid {holder[0]} on {holder[1]}"
            if len(holder) >= 2
            else f"its lock file {path} is held"
        )
        raise RunFolderError(
            f"output_dir {output_dir} is in use by another run ({who}): wait for it to end, "
            f"or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
    return fd
