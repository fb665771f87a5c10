"""How a GloFND run's checkpoints are written, rotated and resumed.

A checkpoint is the Trainer's folder plus the per-sample state file, written last and
atomically: a folder holding it is finished (complete when every file a resume reads is
there and whole: :mod:`glofnd_hf.checkpoints`). ``train`` claims the output folder first
(:mod:`glofnd_hf.run_folder`: an earlier run there is refused unless resumed or
``overwrite_output_dir``; another run using it is refused), and rotation deletes only this
run's checkpoints. Damaged files met while resuming, a checkpoint of another model family,
and a disk that fills up while saving are one-line errors naming the file or folder.
``CheckpointingMixin`` goes before ``transformers.Trainer`` in ``GloFNDTrainer``'s bases; it
needs ``adapter``, ``contrastive_loss`` and ``num_samples`` from the trainer and nothing of
how the loss or its detector works."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import (
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_family,
    checkpoint_problems,
    damaged_file_problem,
    disk_full_error,
    find_checkpoints,
    resolve_resume_checkpoint,
    sync_folder,
)
from .run_folder import check_output_dir, lock_output_dir
from .state_file import load_state_file, read_state_metadata, write_state_file
from .state_shards import (
    agree_on_writes,
    is_sharded,
    load_state_shards,
    manifest_shards,
    write_shard_manifest,
    write_state_shards,
)

logger = logging.getLogger(__name__)


class CheckpointingMixin:
    """Checkpoint methods of ``GloFNDTrainer`` (overrides of ``transformers.Trainer``'s)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint`` may also be ``"last"`` (as ``True``):
        the newest complete checkpoint of ``output_dir``. A folder that is not a complete
        checkpoint is refused with what it lacks (:mod:`glofnd_hf.checkpoints`), one of
        another model family too. The main process holds ``output_dir`` while training: a
        new run into a folder holding an earlier run is refused unless
        ``overwrite_output_dir`` (which deletes that run's files first), and so is a folder
        another run is using (:mod:`glofnd_hf.run_folder`)."""
        quiet = None if self.is_world_process_zero() else (lambda message: None)
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, quiet)
        if checkpoint is not None:
            self._check_checkpoint_family(checkpoint)
        # Rotation deletes this run's checkpoints only: those it writes, and on a resume in
        # output_dir those of the run it continues.
        self._written_checkpoints: set[str] = set()
        self._continues_folder_run = checkpoint is not None and (
            os.path.realpath(os.path.dirname(os.path.abspath(checkpoint)))
            == os.path.realpath(self.args.output_dir)
        )
        if self.args.process_index != 0:  # the main process checks and holds the folder
            return super().train(checkpoint, *args, **kwargs)
        with lock_output_dir(self.args.output_dir):
            check_output_dir(
                self.args.output_dir, checkpoint, getattr(self.args, "overwrite_output_dir", False)
            )
            return super().train(checkpoint, *args, **kwargs)

    def _check_checkpoint_family(self, checkpoint: str) -> None:
        """A checkpoint of another model family (open_clip vs transformers) would load none
        of its weights: refused before anything is loaded."""
        from .models import family_of_adapter

        theirs = checkpoint_family(checkpoint)
        ours = family_of_adapter(self.adapter).name
        if theirs is not None and theirs != ours:
            raise CheckpointError(
                f"checkpoint {checkpoint} holds a model of the {theirs} family, this run trains "
                f"one of the {ours} family ({type(self.adapter.model).__name__}): resume with "
                f"the model it was trained from (model_name_or_path, model_family), or start a "
                f"new run in another output_dir"
            )

    def _checkpoint_dir(self, trial: Any) -> tuple[str, str]:
        run_dir = self._get_output_dir(trial=trial)
        return run_dir, os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, then the per-sample state, written last and atomically:
        a folder holding it is complete (the final model folder never gets it). Old
        checkpoints are rotated out only after that, so a crash at any point leaves the
        previous complete checkpoint in place."""
        run_dir, output_dir = self._checkpoint_dir(trial)
        if self.args.should_save:
            # Written again (a resumed run passing the same step): not complete until the end.
            for name in (STATE_FILE, STATE_FILE + ".tmp"):
                if os.path.exists(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation inside: the new one is not complete yet
        self._state_written_to = None
        try:
            if is_sharded(self.contrastive_loss):
                # Every process writes its rows first; all are on disk before the folder
                # can be marked complete (by the first process, _finish_checkpoint). No
                # shard is replaced before an earlier mark of this folder is gone: a
                # crash never leaves a complete-looking set of mixed steps. A failed write
                # on any process raises on every one (no process left at a barrier).
                self.accelerator.wait_for_everyone()
                write_state_shards(output_dir, self.contrastive_loss, self.num_samples)
            failure: Exception | None = None
            try:
                super()._save_checkpoint(model, trial)
            except Exception as err:  # told to every process below, then raised everywhere
                failure = err
            finally:
                self.args.save_total_limit = limit
            if self.args.world_size > 1:
                # Every process's files (its rng_state_<rank>.pth) are written before the
                # folder is marked finished; a process that could not write them does not
                # leave the others waiting at a barrier: all raise its error (a full disk
                # with the space left, as a single process says it).
                if failure is not None:
                    failure = disk_full_error(failure, output_dir) or failure
                agree_on_writes(output_dir, failure, _trainer_files)
            elif failure is not None:
                raise failure
            if self.args.should_save and self._state_written_to != output_dir:
                self._finish_checkpoint(output_dir)
        except Exception as err:
            if isinstance(err, CheckpointWriteError):  # already one line (which process, file)
                raise
            full = disk_full_error(err, output_dir)
            if full is None:
                raise
            raise full from err
        if self.args.should_save:
            self._own_checkpoints().add(os.path.abspath(output_dir))
            self._rotate_complete_checkpoints(run_dir, output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Pushed checkpoints are complete ones: finish the folder before the upload.
        if self.args.should_save and self._state_written_to != checkpoint_folder:
            self._finish_checkpoint(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def _finish_checkpoint(self, output_dir: str) -> None:
        loader = getattr(self, "shard_loader", None)
        if loader is not None:  # what a mid-epoch resume checks the stream against
            loader.save_stream_settings(output_dir)
        sync_folder(output_dir)
        self.save_fnd_state(output_dir)
        self._state_written_to = output_dir

    def _own_checkpoints(self) -> set[str]:
        if getattr(self, "_written_checkpoints", None) is None:
            self._written_checkpoints = set()
        return self._written_checkpoints

    def _is_own_checkpoint(self, path: str | os.PathLike, run_dir: str) -> bool:
        """Written by this run, or (resuming in output_dir) by the run it continues."""
        if os.path.abspath(path) in self._own_checkpoints():
            return True
        return getattr(self, "_continues_folder_run", False) and (
            os.path.realpath(run_dir) == os.path.realpath(self.args.output_dir)
        )

    def _rotate_complete_checkpoints(self, run_dir: str, current: str) -> None:
        """``save_total_limit``, counting complete checkpoints only: keep the newest ones (the
        current one and the best one always), delete the other complete ones and the
        incomplete ones older than the current one (left by a crash). Only this run's
        checkpoints are counted or deleted (:meth:`_is_own_checkpoint`)."""
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        weights_only = bool(self.args.save_only_model)
        checkpoints = [  # newest first
            (step, path)
            for step, path in find_checkpoints(run_dir)
            if self._is_own_checkpoint(path, run_dir)
        ]
        protected = {os.path.abspath(current)}
        if self.state.best_model_checkpoint is not None:
            protected.add(os.path.abspath(self.state.best_model_checkpoint))
        kept = set(protected)
        for _, path in checkpoints:
            if len(kept) >= max(limit, len(protected)):
                break
            if not checkpoint_problems(path, weights_only):
                kept.add(os.path.abspath(path))
        for step, path in checkpoints:
            if os.path.abspath(path) in kept:
                continue
            if step < self.state.global_step or not checkpoint_problems(path, weights_only):
                logger.info("deleting checkpoint %s (save_total_limit=%d)", path, limit)
                shutil.rmtree(path, ignore_errors=True)

    def save_fnd_state(self, output_dir: str) -> None:
        """Write the per-sample state (thresholds, moments, visits, u) to ``output_dir``,
        atomically (a temporary file renamed into place). Sharded over processes: the
        manifest of the shards every process wrote first (:mod:`glofnd_hf.state_shards`)."""
        os.makedirs(output_dir, exist_ok=True)
        if is_sharded(self.contrastive_loss):
            # Every process wrote its shard (_save_checkpoint): the manifest marks the set.
            world = self.args.world_size
            write_shard_manifest(
                output_dir, self.contrastive_loss.config_dict(), self.num_samples, world
            )
            return
        write_state_file(
            os.path.join(output_dir, STATE_FILE),
            self.contrastive_loss.state_dict(),
            self.contrastive_loss.config_dict(),
            self.num_samples,
        )

    # -- resuming: a damaged file is one line naming it ------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except Exception as err:
            names = _weight_files(resume_from_checkpoint)
            mapped = _resume_error(err, resume_from_checkpoint, names, fits=None)
            if mapped is None:
                raise
            raise mapped from err

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:
            names = [OPTIMIZER_FILE, SCHEDULER_FILE]
            mapped = (
                None
                if checkpoint is None
                else _resume_error(err, checkpoint, names, fits=OPTIMIZER_FILE)
            )
            if mapped is None:
                raise
            raise mapped from err

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)
        except Exception as err:
            rank = f"rng_state_{self.args.process_index}.pth"
            names = [RNG_FILE if self.args.world_size <= 1 else rank]
            mapped = (
                None if checkpoint is None else _resume_error(err, checkpoint, names, fits=None)
            )
            if mapped is None:
                raise
            raise mapped from err

    def load_fnd_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            if self.contrastive_loss.state_dict():
                raise FileNotFoundError(
                    f"checkpoint {checkpoint} has no {STATE_FILE}: the per-sample GloFND state "
                    f"cannot be restored"
                )
            return
        if manifest_shards(read_state_metadata(path)) is not None:  # one file per process
            load_state_shards(checkpoint, self.contrastive_loss, self.num_samples)
        else:
            load_state_file(path, self.contrastive_loss, self.num_samples)  # checked, or refused
        logger.info("restored the per-sample state from %s", path)


#: What torch.load and safetensors raise for a damaged file (a RuntimeError only with one of
#: _READ_MESSAGES: others, such as running out of memory, keep their own error).
_READ_ERRORS: tuple[type[BaseException], ...] = (EOFError, pickle.UnpicklingError, OSError)
_READ_MESSAGES = ("PytorchStreamReader", "archive", "unexpected EOF", "Ran out of input")
try:
    from safetensors import SafetensorError

    _READ_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover - safetensors ships with transformers
    pass


def _resume_error(
    err: Exception, checkpoint: str, names: Sequence[str], fits: str | None
) -> CheckpointError | None:
    """``err``, met while loading ``names`` of ``checkpoint``, as one line; None: leave it be.
    ``fits``: the file a ValueError means does not fit this run (the optimizer's)."""
    if isinstance(err, CheckpointError):
        return None
    text = _first_line(err)
    if isinstance(err, RuntimeError) and "size mismatch" in text:
        return CheckpointError(
            f"checkpoint {checkpoint}: its weights do not fit this model ({text}): resume "
            f"with the model it was trained from"
        )
    if isinstance(err, _READ_ERRORS) or (
        isinstance(err, RuntimeError) and any(m in text for m in _READ_MESSAGES)
    ):
        damaged = [n for n in names if _cannot_load(os.path.join(checkpoint, n))]
        return CheckpointError(
            f"checkpoint {checkpoint}: {' or '.join(damaged or names)} cannot be read "
            f"(truncated or corrupt? {type(err).__name__}: {text}); resume from an earlier "
            f"checkpoint (name its folder in resume_from_checkpoint)"
        )
    if fits is not None and isinstance(err, ValueError):
        return CheckpointError(
            f"checkpoint {checkpoint}: its {fits} does not fit this run ({text}): resume "
            f"with the model and optimizer settings it was trained with"
        )
    return None


def _cannot_load(path: str) -> bool:
    """The file fails a cheap check, or loading it (an error path only: no cost otherwise)."""
    if not os.path.isfile(path):
        return False
    if damaged_file_problem(path) is not None:
        return True
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(path)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return True
    return False


def _first_line(err: BaseException) -> str:
    """The error's text on one line; of torch's long weights-only message, the reason."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(text.split())[:300]


def _weight_files(checkpoint: str) -> list[str]:
    names = sorted(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else []
    state = STATE_FILE.removesuffix(".safetensors")  # the state file and its shards
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) and not n.startswith(state)]
    return [n for n in weights if n != "training_args.bin"] or ["model.safetensors"]


def _trainer_files(rank: int) -> str:
    """What process ``rank`` writes of the Trainer's own checkpoint (``agree_on_writes``):
    every process its random state; the main process also the model and optimizer."""
    return f"rng_state_{rank}.pth" if rank else "the model, optimizer or rng_state_0.pth"
