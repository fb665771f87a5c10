"""Trainer integration: cards in every checkpoint folder and for the final model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .info import card_info_from_trainer
from .metrics import normalize_eval_metrics
from .render import write_card

__all__ = [
    "ModelCardCallback",
    "model_card_callback",
    "set_model_card_info",
    "write_model_card",
]


class ModelCardCallback(TrainerCallback):
    """Writes ``README.md`` (and ``glofnd_card.json``) into every checkpoint folder.

    Collects the zero-shot metrics of every evaluation in ``on_evaluate``; a checkpoint's card
    lists them only when they were computed at the checkpoint's step (the Trainer evaluates
    before saving when both fall on the same step). When training ends with the best
    checkpoint loaded (``load_best_model_at_end``), :attr:`model_step` is that checkpoint's
    step, and the final card reports the metrics of that step. ``card_kwargs`` go to
    :func:`card_info_from_trainer` (``model_name_or_path``, ``pretrained``, ``datasets``,
    ``license``, ...); change them later with :func:`set_model_card_info`.
    """

    def __init__(self, trainer: Any, **card_kwargs: Any) -> None:
        self.trainer = trainer
        self.card_kwargs = dict(card_kwargs)
        self.eval_metrics: dict[str, float] = {}
        self.eval_step: int | None = None
        self.history: dict[int, dict[str, float]] = {}
        self.model_step: int | None = None
        """The step the trainer's weights come from when it is not the last one (the best
        checkpoint loaded at the end), else None."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        found = normalize_eval_metrics(metrics)
        if found:
            self.eval_metrics = found
            self.eval_step = state.global_step
            self.history[state.global_step] = found

    def on_train_end(self, args, state, control, **kwargs):
        best = getattr(state, "best_model_checkpoint", None)
        if args.load_best_model_at_end and best:
            _, _, step = os.path.basename(os.path.normpath(best)).rpartition("-")
            self.model_step = int(step) if step.isdigit() else None

    def metrics_at(self, step: int | None) -> dict[str, float]:
        return dict(self.history.get(step, {})) if step is not None else {}

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            return
        info = card_info_from_trainer(
            self.trainer, self.metrics_at(state.global_step), **self.card_kwargs
        )
        info.model_name = info.model_name or f"{Path(args.output_dir).name}-{folder.name}"
        write_card(info, folder)


def model_card_callback(trainer: Any) -> ModelCardCallback | None:
    """The trainer's :class:`ModelCardCallback`, if it has one."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(callback, ModelCardCallback):
            return callback
    return None


def set_model_card_info(trainer: Any, **card_kwargs: Any) -> ModelCardCallback:
    """Set card inputs (``model_name_or_path``, ``pretrained``, ``datasets``, ``license``, ...)
    for the trainer's checkpoint cards and :func:`write_model_card`; adds the callback if
    missing."""
    callback = model_card_callback(trainer)
    if callback is None:
        callback = ModelCardCallback(trainer)
        trainer.add_callback(callback)
    callback.card_kwargs.update({k: v for k, v in card_kwargs.items() if v is not None})
    return callback


def write_model_card(
    trainer: Any,
    output_dir: str | os.PathLike,
    eval_metrics: Mapping[str, Any] | None = None,
    **card_kwargs: Any,
) -> Path | None:
    """Write ``README.md`` + ``glofnd_card.json`` for the final model in ``output_dir``.

    ``eval_metrics``: the evaluator's metrics (``eval_`` prefixes are fine); default: the
    metrics the trainer's :class:`ModelCardCallback` collected at the current step (at the
    best checkpoint's step when ``load_best_model_at_end`` loaded it).
    ``card_kwargs``: see :func:`card_info_from_trainer` (they extend those given to
    :func:`set_model_card_info`). Only the main process writes; returns the card's path there.
    """
    is_main = getattr(trainer, "is_world_process_zero", None)
    if callable(is_main) and not is_main():
        return None
    callback = model_card_callback(trainer)
    kwargs = dict(callback.card_kwargs) if callback is not None else {}
    kwargs.update({k: v for k, v in card_kwargs.items() if v is not None})
    if eval_metrics is None and callback is not None:
        # The metrics of the weights the trainer holds: the best checkpoint's when it was
        # loaded at the end, else those of the last step.
        step = callback.model_step or getattr(trainer.state, "global_step", None)
        eval_metrics = callback.metrics_at(step)
        if eval_metrics and "eval_step" not in kwargs:
            kwargs["eval_step"] = step
    info = card_info_from_trainer(trainer, eval_metrics, **kwargs)
    info.model_name = info.model_name or Path(os.path.abspath(output_dir)).name
    return write_card(info, output_dir)
