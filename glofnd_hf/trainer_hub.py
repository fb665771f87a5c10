"""``push_to_hub=True`` inside training pushes what ``glofnd-push`` pushes.

The Trainer's own push uploads its generic card ("More information needed") and every file of
the output folder but the checkpoints. Here every push goes through :mod:`glofnd_hf.hub`: the
GloFND card named after the repo, the model in its family's layout (the allow-list, no
dotfiles, nothing that holds a secret), and with ``hub_strategy`` ``checkpoint`` /
``all_checkpoints`` the checkpoints with their per-sample state, so that a downloaded
``last-checkpoint`` resumes with its thresholds. ``HubPushMixin`` goes before
``transformers.Trainer`` in ``GloFNDTrainer``'s bases.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import HubStrategy, SaveStrategy

from . import hub
from .model_card import write_model_card

logger = logging.getLogger(__name__)

# Written by glofnd-train / the card, not copied from a checkpoint into the output folder.
_NOT_COPIED = {"README.md", hub.CARD_INFO_FILE, "zero_shot_results.json"}


class HubPushMixin:
    """Hub pushes of ``GloFNDTrainer`` (overrides of ``transformers.Trainer``'s)."""

    def create_model_card(self, model_name: str | None = None, **kwargs: Any) -> None:
        """The GloFND card for the output folder (the Trainer calls this before a push);
        ``license``, ``tags``, ``dataset`` and ``finetuned_from`` are taken as the Trainer's
        own card takes them."""
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        fields = {
            "license": kwargs.get("license"),
            "tags": _as_list(kwargs.get("tags")),
            "datasets": _as_list(kwargs.get("dataset")),
            "base_model": kwargs.get("finetuned_from"),
        }
        write_model_card(
            self,
            self.args.output_dir,
            repo_id=repo_id,
            model_name=repo_id or model_name,
            **{k: v for k, v in fields.items() if v},
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> str | None:
        """Save the model, write its GloFND card and upload the output folder's model files
        (:func:`glofnd_hf.hub.push_to_hub`); returns the commit URL (on the main process).
        The upload always completes before this returns (``blocking`` is accepted for the
        Trainer's signature)."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        self.create_model_card(**kwargs)
        return hub.push_to_hub(
            self.args.output_dir,
            self.hub_model_id,
            private=bool(private if private is not None else self.args.hub_private_repo),
            token=token,
            commit_message=commit_message or hub.DEFAULT_COMMIT_MESSAGE,
            render_card=True,
            revision=revision if revision is not None else self.args.hub_revision,
            verbose=False,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The model of a checkpoint to the repo's top, with its card; with ``hub_strategy``
        ``checkpoint`` / ``all_checkpoints`` the checkpoint itself too, training state
        included (under ``last-checkpoint/`` or its own name)."""
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        running = getattr(self, "push_in_progress", None)
        if not args.hub_always_push and running is not None and not running.is_done():
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        output_dir = Path(args.output_dir)
        for name in hub.plan_upload(checkpoint_folder).files:  # the model files, as a release
            if "/" not in name and name not in _NOT_COPIED:
                shutil.copy(os.path.join(checkpoint_folder, name), output_dir / name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(output_dir))
        self.create_model_card()
        if args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        common = {"token": args.hub_token, "revision": args.hub_revision, "verbose": False}
        hub.push_to_hub(output_dir, self.hub_model_id, commit_message=message, **common)
        if args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            where = (
                "last-checkpoint"
                if args.hub_strategy == HubStrategy.CHECKPOINT
                else Path(checkpoint_folder).name
            )
            hub.push_to_hub(
                checkpoint_folder,
                self.hub_model_id,
                commit_message=f"{message}, checkpoint",
                include_training_state=True,
                render_card=False,
                path_in_repo=where,
                **common,
            )


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)
