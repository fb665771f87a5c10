"""Does the demo's tiny CLIP learn what its captions mean?

Trains the demo's model (``build_tiny_hf_clip``, batch 128, learning rate 2e-3, cosine
schedule) on a configuration of the embedded digits, with each detector and seed, and scores
the digit: zero-shot top-1 on the validation split, and a linear probe (logistic
regression) of the digit on the image embeddings, fit on the train split and scored on the
validation split. docs/demo-semantics.md reads the figures.

    .venv/bin/python benchmarks/demo_semantics.py --config digit-captions \\
        --detectors none oracle --seeds 0 1 2 --output /tmp/demo_semantics.json

With ``--model DIR`` it trains nothing and scores a saved model instead (``make demo``'s
``outputs/demo``), on the data of ``--config`` and ``--seeds``' first seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's glofnd_hf

from glofnd_hf.args import GloFNDTrainingArguments  # noqa: E402
from glofnd_hf.data.digits import (  # noqa: E402
    DIGITS_CONFIGS,
    digits_classification_defaults,
    load_digits_pairs,
)
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator  # noqa: E402
from glofnd_hf.models import build_tiny_hf_clip  # noqa: E402
from glofnd_hf.trainer import GloFNDTrainer  # noqa: E402


def digit_probe(train_images, train, validation_images, validation) -> float:
    """Validation accuracy of a logistic regression of the digit on image embeddings."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=2000).fit(train_images.numpy(), train["digit"])
    return float(probe.score(validation_images.numpy(), validation["digit"]))


def score(adapter, model, train, validation) -> dict[str, float]:
    """Zero-shot digit top-1 on the validation split and the linear probe of the digit."""
    label_column, class_names, templates = digits_classification_defaults()
    evaluator = ZeroShotEvaluator(
        validation,
        class_label_column=label_column,
        class_names=class_names,
        templates=templates,
        show_progress=False,
    )
    embeds = evaluator.embed(adapter, model)  # once: for the scores and the probe
    train_images = ZeroShotEvaluator(train, show_progress=False).embed(adapter, model)
    return {
        "top1": float(evaluator.score(embeds)["top1_accuracy"]),
        "probe": digit_probe(train_images["images"], train, embeds["images"], validation),
    }


def score_saved(path: str, config: str, seed: int) -> dict[str, float]:
    """``score`` of a saved model folder on the data it was trained on."""
    from glofnd_hf.eval.run import load_eval_model

    data = load_digits_pairs(seed=seed, config=config)
    adapter = load_eval_model(path, device="cpu")
    return score(adapter, adapter.model, data["train"], data["validation"])


def run(
    config: str, detector: str, seed: int, epochs: int, alpha: float, start: float, out: str
) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = load_digits_pairs(seed=seed, config=config)
    train, validation = data["train"], data["validation"]
    _, class_names, templates = digits_classification_defaults()
    prompts = [t.format(n) for n in class_names for t in templates]
    texts = list(train["caption"]) + list(validation["caption"]) + prompts
    adapter = build_tiny_hf_clip(seed=seed, texts=texts)
    args = GloFNDTrainingArguments(
        output_dir=out,
        per_device_train_batch_size=128,
        num_train_epochs=epochs,
        learning_rate=2e-3,
        weight_decay=0.1,
        warmup_steps=30,
        lr_scheduler_type="cosine",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        detector=detector,
        fn_alpha=alpha,
        fn_start_epoch=start,
        temperature_init=0.07,
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=train, label_column="semantic_label")
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    return {
        **score(adapter, trainer.model, train, validation),
        "train_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="digit-captions", choices=DIGITS_CONFIGS)
    parser.add_argument("--detectors", nargs="+", default=["none", "oracle"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--start", type=float, default=0.0, help="fn_start_epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/demo_semantics.json")
    parser.add_argument("--model", help="score this saved model folder; train nothing")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)
    if opts.model:
        figures = score_saved(opts.model, opts.config, opts.seeds[0])
        print(f"{opts.model}: zero-shot top-1 {figures['top1']:.3f}, probe {figures['probe']:.3f}")
        return figures
    results: dict[str, Any] = {"settings": vars(opts), "detectors": {}}
    for detector in opts.detectors:
        runs = []
        for seed in opts.seeds:
            figures = run(
                opts.config, detector, seed, opts.epochs, opts.alpha, opts.start, "/tmp/ds"
            )
            print(f"{detector:15s} seed {seed}: {figures}", flush=True)
            runs.append({"seed": seed, **figures})
        summary = {
            key: {
                "mean": statistics.fmean(r[key] for r in runs),
                "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0,
            }
            for key in ("top1", "probe")
        }
        results["detectors"][detector] = {"runs": runs, "summary": summary}
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {opts.output}")
    return results


if __name__ == "__main__":
    main()
