"""Trainer callbacks shared by the tests: stop a run early, as an interrupted job would."""

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Stop (and save) after global step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


class StopAfterEpoch(TrainerCallback):
    """Stop at the end of epoch ``epochs`` (the epoch-end save still happens)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epochs:
            control.should_training_stop = True
