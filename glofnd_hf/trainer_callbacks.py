"""The callbacks ``GloFNDTrainer`` adds to every run: the logit-scale clamp, the data path's
epoch bookkeeping and the loss's per-epoch summary. They read the trainer through attributes
it documents (``data_collator``, ``shard_loader``, ``contrastive_loss``)."""

from __future__ import annotations

import math

import torch
from transformers import Trainer, TrainerCallback


class ClampLogitScale(TrainerCallback):
    """Keep ``logit_scale`` (log space) within [0, ln(max_logit_scale)] after every step."""

    def __init__(self, parameter: torch.nn.Parameter, upper: float) -> None:
        self.parameter = parameter
        self.upper = upper

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.parameter.clamp_(0.0, self.upper)


class DataEpoch(TrainerCallback):
    """Epoch bookkeeping of the data path.

    At each epoch start the collator learns the epoch (a part of every sample's random seed,
    also in DataLoader workers). With a shard loader, ``state.epoch`` after each step is set
    to what an uninterrupted run logs: the Trainer counts the batches of a resumed epoch from
    zero, since the loader (not the Trainer) skips the batches done before the checkpoint.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        collator = self.trainer.data_collator
        if hasattr(collator, "set_epoch"):
            # state.epoch is e + (batches done) / (batches per epoch) < e + 1 within epoch e
            collator.set_epoch(math.floor(state.epoch or 0.0))

    def on_step_end(self, args, state, control, **kwargs):
        loader = self.trainer.shard_loader
        if loader is not None and state.global_step > 0:
            batches = loader.batches_per_epoch
            per_epoch = self.trainer.shard_steps_per_epoch()
            epoch, steps = divmod(state.global_step - 1, per_epoch)
            done = min((steps + 1) * args.gradient_accumulation_steps, batches)
            state.epoch = epoch + done / batches  # the Trainer's formula, uninterrupted


class EpochSummary(TrainerCallback):
    """Log the loss's per-epoch summary (the detector's tracking health) at each epoch end."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        summary = self.trainer.contrastive_loss.finish_epoch()  # a collective: every rank
        if summary:
            self.trainer.log({k: round(v, 6) for k, v in summary.items()})
