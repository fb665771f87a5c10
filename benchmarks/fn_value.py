"""Does removing false negatives pay, and how much of the label oracle's gain does GloFND get?

Trains the demo's tiny CLIP from scratch on the embedded digits with each detector and seed,
all at the same alpha (0.03 by default), strategy (eliminate) and masking start (epoch 20 of
60), and scores what the model learned of the digit on the validation split. The data:
``digit-ink-captions`` by default (captions name the ink colour and the digit; the semantic
class is the digit, so about a tenth of each anchor's negatives are false negatives whose
captions differ in the ink), or ``digit-captions`` (captions name the digit only: the false
negatives' captions are paraphrases or copies). Scores:

* ``top1_accuracy``: zero-shot digit classification (the digits' prompt templates);
* ``class_r@1``: class-aware retrieval R@1 (a hit is any caption or image of the query's
  digit), the mean of both directions;
* the detectors' precision, recall and F1 against the labels (pairs of the batch, both
  anchor sides, pooled over the masking period) and the filtered share over alpha.

Runs go two at a time, one thread each (the two cores). docs/fn-value.md reads the figures.

    .venv/bin/python benchmarks/fn_value.py --seeds 0 1 2            # ~26 min on 2 cores
    .venv/bin/python benchmarks/fn_value.py --quick --output /tmp/q.json   # ~1 minute

Writes ``benchmarks/results/fn_value.json`` (per detector, the per-seed values of each
metric: ``{"metric": "top1_accuracy", "detectors": {"none": [..], ...}, "metrics": {...}}``)
and a plot beside it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # fnstudy beside this file; this checkout

from fnstudy.study import DETECTORS, Study, run_one  # noqa: E402

from glofnd_hf.data.digits import digits_classification_defaults, load_digits_pairs  # noqa: E402

PRIMARY = "top1_accuracy"
METRICS = (PRIMARY, "class_r@1")
DETECTION = ("precision", "recall", "f1", "filtered_over_alpha")
ORDER = ("none", "oracle", "glofnd", "batch_quantile", "ifnd")  # the table's rows


def value_study(
    config: str, seed: int, epochs: int, alpha: float, start: float, quick: bool
) -> Study:
    """The study's setting: a centred configuration of the digits, the demo's model and
    schedule."""
    data = load_digits_pairs(seed=seed, config=config)
    train, validation = data["train"], data["validation"]
    if quick:  # a subset: the trainer numbers the rows again (index space = 256)
        train = train.select(range(256)).remove_columns("dataset_index")
        validation = validation.select(range(128))
    label_column, class_names, templates = digits_classification_defaults()
    return Study(
        config,
        train,
        validation,
        label_column,
        class_names,
        templates,
        alpha=alpha,
        epochs=epochs,
        mask_start=start,
        update_start=0.0,  # GloFND's thresholds learn from the first epoch
        seed=seed,
    )


def one_run(
    seed: int,
    detector: str,
    config: str,
    epochs: int,
    alpha: float,
    start: float,
    quick: bool,
    tmp: str,
) -> dict[str, Any]:
    """One (detector, seed) run's figures, on one thread (two runs share the two cores)."""
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    study = value_study(config, seed, epochs, alpha, start, quick)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    began = time.perf_counter()
    try:
        run = run_one(
            study, detector, os.path.join(tmp, f"{detector}_{seed}"), threshold_snapshots=False
        )
    finally:
        torch.set_num_threads(threads)  # the caller's, when run in its process
    zero_shot, detection = run["zero_shot"], run["masking_period"]
    return {
        "seed": seed,
        "detector": detector,
        "top1_accuracy": zero_shot["top1_accuracy"],
        "class_r@1": (zero_shot["image_to_text_class_r@1"] + zero_shot["text_to_image_class_r@1"])
        / 2,
        "precision": detection["precision"],
        "recall": detection["recall"],
        "f1": detection["f1"],
        "filtered_over_alpha": detection["filtered_fraction"] / alpha,
        "per_epoch": run["per_epoch"],
        "seconds": round(time.perf_counter() - began, 1),
    }


def summarise(values: list[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation of the defined values."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def oracle_share(results: dict[str, Any], detector: str, metric: str = PRIMARY) -> float | None:
    """The part of the oracle's gain over ``none`` that ``detector`` gets (mean over seeds);
    None when the oracle gains nothing."""
    mean = {d: results["summary"][metric][d]["mean"] for d in ("none", "oracle", detector)}
    if None in mean.values() or mean["oracle"] <= mean["none"]:
        return None
    return (mean[detector] - mean["none"]) / (mean["oracle"] - mean["none"])


def collect(runs: list[dict[str, Any]], detectors: list[str]) -> dict[str, Any]:
    """Per metric and detector, the per-seed values (in seed order) and their summary."""
    runs = sorted(runs, key=lambda r: r["seed"])
    metrics = {
        m: {d: [r[m] for r in runs if r["detector"] == d] for d in detectors}
        for m in METRICS + DETECTION
    }
    summary = {m: {d: summarise(v) for d, v in per.items()} for m, per in metrics.items()}
    return {
        "metric": PRIMARY,
        "detectors": metrics[PRIMARY],
        "metrics": metrics,
        "summary": summary,
    }


def markdown_table(results: dict[str, Any]) -> str:
    def cell(metric: str, det: str, scale: float = 1.0, digits: int = 1) -> str:
        s = results["summary"][metric][det]
        if s["mean"] is None:
            return "-"
        return f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f}"

    lines = [
        "| detector | zero-shot top-1 % | class-aware R@1 % | precision | recall | F1 "
        "| filtered / alpha |",
        "|---|---|---|---|---|---|---|",
    ]
    for det in results["detectors"]:
        lines.append(
            f"| {det} | {cell(PRIMARY, det, 100)} | {cell('class_r@1', det, 100)} "
            f"| {cell('precision', det, 1, 2)} | {cell('recall', det, 1, 2)} "
            f"| {cell('f1', det, 1, 2)} | {cell('filtered_over_alpha', det, 1, 2)} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Per metric, each detector's seeds (dots) and mean (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detectors = list(results["detectors"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for x, det in enumerate(detectors):
            values = [100 * v for v in results["metrics"][metric][det]]
            ax.bar(x, statistics.fmean(values), color="#c9d6e8", width=0.6)
            ax.plot([x] * len(values), values, "o", color="#1f4e8c", ms=4)
        ax.set_xticks(range(len(detectors)), detectors, rotation=20)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    settings = results["settings"]
    fig.suptitle(
        f"{settings['config']}, {settings['epochs']} epochs, alpha {settings['alpha']}, masking "
        f"from epoch {settings['start']:g}, seeds {settings['seeds']} ({settings['role']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _runs(tasks: list[tuple[int, str]], args: tuple, jobs: int):
    """Each task's figures, in task order; ``jobs`` processes at a time."""
    if jobs <= 1:
        yield from (one_run(seed, det, *args) for seed, det in tasks)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(one_run, seed, det, *args) for seed, det in tasks]
        yield from (future.result() for future in futures)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="digit-ink-captions", choices=("digit-ink-captions", "digit-captions")
    )
    parser.add_argument("--detectors", nargs="+", default=list(ORDER), choices=DETECTORS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--role",
        default="test",
        choices=("development", "test"),
        help="what the seeds are for: settings are chosen on development seeds and "
        "reported on test seeds (recorded in the results)",
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.03,
        help="every detector's alpha (the oracle ignores it): 0.03, about the share of "
        "negatives whose captions say the same (same digit and ink), chosen over 0.1 (the "
        "digit-level share) on the development seed (docs/fn-value.md)",
    )
    parser.add_argument("--start", type=float, default=20.0, help="masking from this epoch")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="2 epochs on 256 pairs, 1 seed")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "fn_value.json")
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.epochs, opts.start, opts.seeds = 2, 1.0, opts.seeds[:1]
    if opts.start >= opts.epochs:
        parser.error(f"--start {opts.start} leaves no epoch of masking in {opts.epochs}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    began = time.perf_counter()
    tasks = [(s, d) for d in opts.detectors for s in opts.seeds]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = (opts.config, opts.epochs, opts.alpha, opts.start, opts.quick, tmp)
        for run in _runs(tasks, args, opts.jobs):
            print(
                f"{run['detector']:15s} seed {run['seed']}: top-1 {run[PRIMARY]:.3f} "
                f"class R@1 {run['class_r@1']:.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(run)
    results: dict[str, Any] = {
        "settings": {**vars(opts), "data": f"glofnd-digits {opts.config}"},
        **collect(runs, opts.detectors),
        "runs": runs,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads_per_run": 1,
        },
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    if {"none", "oracle"} <= set(opts.detectors):
        results["oracle_gain_share"] = {
            d: oracle_share(results, d) for d in opts.detectors if d not in ("none", "oracle")
        }
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    plot(results, output.with_suffix(".png"))
    print(markdown_table(results))
    print(f"wrote {output} in {results['total_seconds']} s")
    return results


if __name__ == "__main__":
    main()
