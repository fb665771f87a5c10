"""Picking the best model by a zero-shot metric: ``metric_for_best_model`` with our ``eval_*``
names, ``load_best_model_at_end`` (weights *and* per-sample state of the best checkpoint),
``EarlyStoppingCallback``, and the card of the model that comes out."""

import json
import math
from pathlib import Path

import pytest
import torch
from cpu_args import cpu_args
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback

from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES, load_digits_pairs
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.model_card import write_model_card
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import STATE_FILE, GloFNDTrainer


@pytest.fixture(scope="module")
def digits():
    return load_digits_pairs(seed=0)


@pytest.fixture(scope="module")
def texts(digits):
    texts = list(digits["train"]["caption"][:48]) + list(digits["validation"]["caption"][:24])
    return texts + [t.format(n) for n in DIGIT_NAMES for t in CLASSIFICATION_TEMPLATES]


class ScriptedEvaluator:
    """A zero-shot evaluator whose recall follows a script: the best step is known."""

    def __init__(self, dataset, values):
        self.dataset = dataset
        self.values = list(values)
        self.calls = 0

    def metric_names(self):
        return ["text_to_image_recall@5", "top1_accuracy"]

    def __call__(self, adapter, model=None):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return {"text_to_image_recall@5": value, "top1_accuracy": 0.1}


def make_args(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        max_steps=8,
        learning_rate=0.05,
        optim="sgd",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="text_to_image_recall@5",
        seed=0,
        fn_alpha=0.1,
    )
    return cpu_args(tmp_path, **{**settings, **overrides})


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_holds(trainer, checkpoint):
    """The trainer's model and per-sample state are those saved in ``checkpoint``."""
    saved = weights(checkpoint)
    model = trainer.model.state_dict()
    assert len(saved.keys() & model.keys()) > 0.9 * len(model)
    for name in saved.keys() & model.keys():
        assert torch.equal(model[name], saved[name]), name
    state = load_file(str(Path(checkpoint) / STATE_FILE))
    for key, value in trainer.contrastive_loss.state_dict().items():
        assert torch.equal(value, state[key]), key


def differs(trainer, checkpoint):
    saved = weights(checkpoint)
    model = any(
        not torch.equal(v, saved[n]) for n, v in trainer.model.state_dict().items() if n in saved
    )
    state = load_file(str(Path(checkpoint) / STATE_FILE))
    fnd = any(
        not torch.equal(v, state[k]) for k, v in trainer.contrastive_loss.state_dict().items()
    )
    return model and fnd


def test_load_best_model_at_end_restores_the_best_weights_and_state(tmp_path, digits, texts):
    train = digits["train"].select(range(48))
    evaluator = ScriptedEvaluator(digits["validation"].select(range(8)), [0.2, 0.6, 0.4, 0.3])
    adapter = build_tiny_hf_clip(seed=0, texts=texts)
    trainer = GloFNDTrainer(adapter, make_args(tmp_path), train_dataset=train, evaluator=evaluator)
    trainer.train()
    out = Path(tmp_path / "out")
    assert evaluator.calls == 4  # steps 2, 4, 6, 8
    assert trainer.state.best_metric == 0.6
    assert Path(trainer.state.best_model_checkpoint) == out / "checkpoint-4"
    # The weights *and* the per-sample state are the best checkpoint's, not the last one's.
    assert differs(trainer, out / "checkpoint-8")
    assert_holds(trainer, out / "checkpoint-4")
    evaluated = [h for h in trainer.state.log_history if "eval_text_to_image_recall@5" in h]
    assert [h["step"] for h in evaluated] == [2, 4, 6, 8]
    # The final card reports the metrics of the weights it describes (step 4).
    trainer.save_model(str(out))
    write_model_card(trainer, out)
    card = json.loads((out / "glofnd_card.json").read_text())
    assert card["eval_step"] == 4
    assert card["eval_metrics"]["text_to_image_recall@5"] == 0.6


def test_early_stopping_on_a_zero_shot_metric(tmp_path, digits, texts):
    train = digits["train"].select(range(48))
    evaluator = ScriptedEvaluator(digits["validation"].select(range(8)), [0.5, 0.4, 0.3, 0.2])
    adapter = build_tiny_hf_clip(seed=0, texts=texts)
    args = make_args(tmp_path, metric_for_best_model="eval_text_to_image_recall@5")
    trainer = GloFNDTrainer(adapter, args, train_dataset=train, evaluator=evaluator)
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    trainer.train()
    # No improvement at steps 4 and 6 (patience 2): training stops at step 6 of 8 and ends
    # on the step-2 checkpoint.
    assert trainer.state.global_step == 6 and evaluator.calls == 3
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert_holds(trainer, tmp_path / "out" / "checkpoint-2")


def test_a_real_evaluator_picks_by_its_metric_names(tmp_path, digits, texts):
    train = digits["train"].select(range(48))
    evaluator = ZeroShotEvaluator(
        digits["validation"].select(range(24)),
        class_label_column="digit",
        class_names=DIGIT_NAMES,
        templates=CLASSIFICATION_TEMPLATES,
        show_progress=False,
    )
    adapter = build_tiny_hf_clip(seed=0, texts=texts)
    args = make_args(tmp_path, max_steps=4, metric_for_best_model="top1_accuracy")
    trainer = GloFNDTrainer(adapter, args, train_dataset=train, evaluator=evaluator)
    trainer.train()
    evaluated = [h for h in trainer.state.log_history if "eval_top1_accuracy" in h]
    assert len(evaluated) == 2
    best = max(evaluated, key=lambda h: h["eval_top1_accuracy"])
    assert trainer.state.best_metric == best["eval_top1_accuracy"]
    assert math.isfinite(trainer.state.best_metric)
    assert_holds(trainer, trainer.state.best_model_checkpoint)


@pytest.mark.parametrize("name", ["eval_loss", "recall@5", "text_to_image_recall@50"])
def test_an_unknown_metric_for_best_model_is_refused_at_once(tmp_path, digits, texts, name):
    evaluator = ZeroShotEvaluator(digits["validation"].select(range(8)), show_progress=False)
    adapter = build_tiny_hf_clip(seed=0, texts=texts)
    args = make_args(tmp_path, metric_for_best_model=name)
    with pytest.raises(ValueError, match="text_to_image_recall@5") as error:
        GloFNDTrainer(
            adapter, args, train_dataset=digits["train"].select(range(16)), evaluator=evaluator
        )
    assert repr(name) in str(error.value)
