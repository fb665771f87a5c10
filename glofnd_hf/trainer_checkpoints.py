"""How a GloFND run's checkpoints are written, rotated and resumed.

A checkpoint is the Trainer's folder plus the per-sample state file, written last and
atomically: a folder holding it is complete. ``train`` claims the output folder first
(:mod:`glofnd_hf.run_folder`: an earlier run there is refused unless resumed or
``overwrite_output_dir``; another run using it is refused), and rotation deletes only this
run's checkpoints. ``CheckpointingMixin`` goes before ``transformers.Trainer`` in
``GloFNDTrainer``'s bases; it needs ``contrastive_loss`` and ``num_samples`` from the trainer
and nothing of how the loss or its detector works."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import (
    STATE_FILE,
    checkpoint_problems,
    find_checkpoints,
    resolve_resume_checkpoint,
    sync_folder,
)
from .run_folder import check_output_dir, lock_output_dir
from .state_file import load_state_file, write_state_file

logger = logging.getLogger(__name__)


class CheckpointingMixin:
    """Checkpoint methods of ``GloFNDTrainer`` (overrides of ``transformers.Trainer``'s)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint`` may also be ``"last"`` (as ``True``):
        the newest complete checkpoint of ``output_dir``. A folder that is not a complete
        checkpoint is refused with what it lacks (:mod:`glofnd_hf.checkpoints`). The main
        process holds ``output_dir`` while training: a new run into a folder holding an
        earlier run is refused unless ``overwrite_output_dir`` (which deletes that run's
        files first), and so is a folder another run is using (:mod:`glofnd_hf.run_folder`)."""
        quiet = None if self.is_world_process_zero() else (lambda message: None)
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir, quiet)
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
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            if self._state_written_to != output_dir:
                self._finish_checkpoint(output_dir)
            self._own_checkpoints().add(os.path.abspath(output_dir))
            self._rotate_complete_checkpoints(run_dir, output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Pushed checkpoints are complete ones: finish the folder before the upload.
        if self.args.should_save and self._state_written_to != checkpoint_folder:
            self._finish_checkpoint(checkpoint_folder)
        super()._push_from_checkpoint(checkpoint_folder)

    def _finish_checkpoint(self, output_dir: str) -> None:
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
            if not checkpoint_problems(path):
                kept.add(os.path.abspath(path))
        for step, path in checkpoints:
            if os.path.abspath(path) in kept:
                continue
            if step < self.state.global_step or not checkpoint_problems(path):
                logger.info("deleting checkpoint %s (save_total_limit=%d)", path, limit)
                shutil.rmtree(path, ignore_errors=True)

    def save_fnd_state(self, output_dir: str) -> None:
        """Write the per-sample state (thresholds, moments, visits, u) to ``output_dir``,
        atomically (a temporary file renamed into place)."""
        os.makedirs(output_dir, exist_ok=True)
        write_state_file(
            os.path.join(output_dir, STATE_FILE),
            self.contrastive_loss.state_dict(),
            self.contrastive_loss.config_dict(),
            self.num_samples,
        )

    def load_fnd_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            if self.contrastive_loss.state_dict():
                raise FileNotFoundError(
                    f"checkpoint {checkpoint} has no {STATE_FILE}: the per-sample GloFND state "
                    f"cannot be restored"
                )
            return
        load_state_file(path, self.contrastive_loss, self.num_samples)  # checked, or refused
        logger.info("restored the per-sample state from %s", path)
