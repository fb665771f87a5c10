"""``glofnd-train CONFIG.yaml [--flag value ...]``: train a dual encoder with GloFND.

Works alone and under ``accelerate launch``. Evaluates zero-shot retrieval (and
classification, when class names are known) before and after training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

from ..args import DataArguments, GloFNDTrainingArguments, ModelArguments
from ..checkpoints import resolve_resume_checkpoint
from ..data.digits import DIGITS_DATASET, digits_classification_defaults
from ..data.hf import usable_captions
from ..data.loading import load_image_text_dataset
from ..data.shards import ShardConfig, build_shard_loader
from ..eval.metrics import format_metrics_table
from ..eval.zero_shot import ZeroShotEvaluator
from ..fnd import registry
from ..model_card import set_model_card_info, write_model_card
from ..models import (
    TINY_HF_CLIP,
    TINY_MODEL_NAMES,
    DualEncoderAdapter,
    build_tiny_model,
    load_dual_encoder,
)
from ..run_folder import check_output_dir, lock_output_dir
from ..trainer import GloFNDTrainer
from .config import parse_config_and_flags
from .errors import UsageError, run_cli

logger = logging.getLogger("glofnd_hf")


CallbackFactory = Callable[[GloFNDTrainer, Any], TrainerCallback]
"""Builds a callback from the trainer and its training split (``run``'s ``callbacks``)."""


def help_overrides() -> dict[str, str]:
    """--help texts drawn from the detector registry (detectors registered at run time)."""
    detectors = "; ".join(
        f"{name}: {registry.get(name).description}"
        + (" (needs label_column)" if registry.get(name).requires_labels else "")
        for name in registry.names()
    )
    settings = "; ".join(
        f"{name}: {', '.join(registry.get(name).setting_names()) or '(none)'}"
        for name in registry.names()
    )
    return {
        "detector": f"False-negative detector. {detectors}.",
        "detector_kwargs": "Settings of the chosen detector: a mapping (YAML) or a JSON string "
        f'(flag), e.g. \'{{"update_rule": "adam"}}\' for glofnd. Keys by detector: '
        f"{settings}. Meanings: docs/settings.md.",
        "resume_from_checkpoint": "Continue an interrupted run: a checkpoint folder, or 'last' "
        "(also 'true') for the newest complete checkpoint in output_dir (incomplete ones, cut "
        "short by a crash, are skipped and named).",
    }


def build_adapter(
    model_args: ModelArguments, texts: Sequence[str], seed: int
) -> DualEncoderAdapter:
    name = model_args.model_name_or_path
    if name in TINY_MODEL_NAMES:
        return build_tiny_model(
            name, image_size=model_args.tiny_image_size, seed=seed, texts=list(texts)
        )
    return load_dual_encoder(name, family=model_args.model_family, pretrained=model_args.pretrained)


def _classification_defaults(data_args: DataArguments) -> None:
    if data_args.dataset_name == DIGITS_DATASET:
        (data_args.class_label_column, data_args.class_names, data_args.prompt_templates) = (
            digits_classification_defaults(
                data_args.class_label_column, data_args.class_names, data_args.prompt_templates
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``glofnd-train``: a configuration, data or Hub problem exits with status 2 and one
    line (``--debug``: with the traceback)."""
    return run_cli("glofnd-train", _train, argv)


def _train(argv: list[str]) -> int:
    run(argv)
    return 0


def run(
    argv: Sequence[str], callbacks: Sequence[CallbackFactory] = ()
) -> dict[str, dict[str, float]]:
    """Train as ``glofnd-train`` does; returns the zero-shot metrics before/after.

    ``callbacks``: for studies of a run, each called with the trainer and the training split
    (None with shards) once both are built; the ``TrainerCallback`` it returns is added."""
    model_args, data_args, args = parse_config_and_flags(
        (ModelArguments, DataArguments, GloFNDTrainingArguments), argv, help_overrides()
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.should_log else logging.WARNING,
    )
    if data_args.dataset_name is None and data_args.train_shards is None:
        raise UsageError("set dataset_name (e.g. glofnd-digits) or train_shards")
    # Before any model or data loads: 'last' becomes a folder, an incomplete one is refused.
    args.resume_from_checkpoint = resolve_resume_checkpoint(
        args.resume_from_checkpoint, args.output_dir, None if args.should_log else _silent
    )
    if args.process_index == 0 and os.path.isdir(args.output_dir):
        # An earlier run in output_dir, or another run using it, stops here (the trainer
        # holds the folder again while it trains).
        with lock_output_dir(args.output_dir):
            check_output_dir(
                args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir
            )
    _classification_defaults(data_args)
    train, evaluation = _load_splits(data_args)
    adapter = build_adapter(
        model_args, _tokenizer_texts(model_args, data_args, train, evaluation), args.seed
    )
    if data_args.train_shards is not None:
        train = _shard_loader(data_args, args, adapter)
    evaluator = None
    if evaluation is not None:
        evaluator = ZeroShotEvaluator(
            evaluation,
            data_args.image_column,
            data_args.caption_column,
            data_args.class_label_column,
            data_args.class_names,
            data_args.prompt_templates,
            batch_size=args.per_device_eval_batch_size,
            show_progress=not args.disable_tqdm,
        )
    trainer = GloFNDTrainer(
        adapter,
        args,
        train_dataset=train,
        evaluator=evaluator,
        image_column=data_args.image_column,
        caption_column=data_args.caption_column,
        index_column=data_args.index_column,
        label_column=data_args.label_column,
    )
    for factory in callbacks:
        trainer.add_callback(factory(trainer, train))
    set_model_card_info(
        trainer,
        model_name_or_path=model_args.model_name_or_path,
        pretrained=model_args.pretrained,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        eval_dataset=data_args.dataset_name if evaluator is not None else None,
        eval_split=data_args.eval_split if evaluator is not None else None,
        eval_dataset_config=data_args.dataset_config_name if evaluator is not None else None,
    )
    results = _train_and_evaluate(trainer, args, evaluate=evaluator is not None and args.do_eval)
    if args.world_size > 1:
        trainer.accelerator.end_training()  # destroy the process group before exit
    return results


def _load_splits(data_args: DataArguments) -> tuple[Any, Any]:
    """The map-style train split (None with shards) and the evaluation split (or None)."""
    train = None
    if data_args.train_shards is None:
        train = load_image_text_dataset(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_split
        )
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = None
    if data_args.eval_split and data_args.dataset_name is not None:
        evaluation = load_image_text_dataset(
            data_args.dataset_name, data_args.dataset_config_name, data_args.eval_split
        )
        if data_args.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _tokenizer_texts(
    model_args: ModelArguments, data_args: DataArguments, train: Any, evaluation: Any
) -> list[str]:
    """The texts the tiny CLIP's tokenizer is built from (it keeps the merges they need);
    nothing for any other model."""
    texts: list[str] = []
    if model_args.model_name_or_path != TINY_HF_CLIP:
        return texts
    for data in (train, evaluation):
        if data is not None and data_args.caption_column in data.column_names:
            for value in data.with_format(None)[data_args.caption_column]:
                texts.extend(usable_captions(value))  # rows without one are skipped later
    for template in data_args.prompt_templates or []:
        texts.extend(template.format(c) for c in data_args.class_names or [])
    return texts


def _shard_loader(data_args: DataArguments, args: GloFNDTrainingArguments, adapter: Any) -> Any:
    return build_shard_loader(
        ShardConfig(
            shards=data_args.train_shards,
            batch_size=args.per_device_train_batch_size,
            dataset_size=args.num_samples,
            train_num_samples=data_args.train_num_samples,
            resampled=data_args.shard_resampled,
            shuffle_buffer=data_args.shard_shuffle_buffer,
            seed=args.seed,
            num_workers=args.dataloader_num_workers,
            index_source=data_args.shard_index_source,
            on_bad_index=data_args.shard_on_bad_index,
            pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
        ),
        adapter.image_transform(train=True),
        adapter.tokenize,
    )


def _train_and_evaluate(
    trainer: GloFNDTrainer, args: GloFNDTrainingArguments, evaluate: bool
) -> dict[str, dict[str, float]]:
    """Zero-shot evaluation before (fresh runs only) and after training, the final model
    with its card, and ``zero_shot_results.json``."""
    results: dict[str, dict[str, float]] = {}
    if evaluate and args.resume_from_checkpoint is None:
        results["before"] = trainer.evaluate(metric_key_prefix="eval_before")
        _print_table("before training", results["before"], trainer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir, _internal_call=True)  # pushed below, with its scores
    if evaluate:
        results["after"] = trainer.evaluate()
        _print_table("after training", results["after"], trainer)
    write_model_card(trainer, args.output_dir, results.get("after"))
    if trainer.is_world_process_zero() and results:
        with open(os.path.join(args.output_dir, "zero_shot_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if args.push_to_hub:
        trainer.push_to_hub()  # the GloFND card, named after hub_model_id
    return results


def _silent(message: str) -> None:
    """Resume notices are printed by the main process only."""


def _print_table(title: str, metrics: dict[str, float], trainer: GloFNDTrainer) -> None:
    if not trainer.is_world_process_zero():
        return
    shown = {
        k.split("_", 2)[-1] if k.startswith("eval_before_") else k.removeprefix("eval_"): v
        for k, v in metrics.items()
        if k != "epoch"
    }
    print(f"\nZero-shot results on the evaluation split, {title}:")
    print(format_metrics_table(shown))


if __name__ == "__main__":
    sys.exit(main())
