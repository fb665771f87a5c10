"""The study's runs: the settings of each data set (``build_studies``), one (data set,
detector) run in a worker process (``_job``), all of them collected into one results file
with its figures (``run_study``), and the merge of a re-run into earlier results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import torch

from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES, load_digits_pairs
from glofnd_hf.fnd import GloFNDConfig

from .ifnd_cost import ifnd_round_scaling
from .plots import plot_f1, plot_lambda
from .shapes import SHAPE_TEMPLATES, load_shapes_pairs, shape_class_names
from .study import Study, run_one
from .table import fmt, markdown_table

DATASETS = ("digits", "shapes")


def build_studies(
    quick: bool,
    seed: int,
    only: list[str],
    glofnd_lr: float = 0.05,
    glofnd_clip_grad_mult: float | None = None,
    glofnd_update_rule: str = GloFNDConfig().update_rule,
) -> list[Study]:
    """The pinball and tail rules learn from the first epoch; the Adam rules start two epochs
    before masking (the reference's practice of a late start)."""
    studies = []
    rule = dict(
        glofnd_lr=glofnd_lr,
        glofnd_clip_grad_mult=glofnd_clip_grad_mult,
        glofnd_update_rule=glofnd_update_rule,
    )
    late_start = glofnd_update_rule in ("adam", "reference")
    if "digits" in only:
        digits = load_digits_pairs(seed=seed)
        train, val = digits["train"], digits["validation"]
        epochs, mask, update = (20, 6.0, 4.0 * late_start) if not quick else (3, 1.0, 0.0)
        if quick:
            # A subset: let the trainer number the rows again (index space = 512).
            train = train.select(range(512)).remove_columns("dataset_index")
            val = val.select(range(128))
        studies.append(
            Study(
                "digits",
                train,
                val,
                "digit",
                list(DIGIT_NAMES),
                list(CLASSIFICATION_TEMPLATES),
                alpha=0.005,
                epochs=epochs,
                mask_start=mask,
                update_start=update,
                seed=seed,
                **rule,
            )
        )
    if "shapes" in only:
        shapes = load_shapes_pairs(
            per_class=50 if not quick else 12, val_per_class=8 if not quick else 3, seed=seed
        )
        epochs, mask, update = (12, 4.0, 2.0 * late_start) if not quick else (3, 1.0, 0.0)
        studies.append(
            Study(
                "shapes",
                shapes["train"],
                shapes["validation"],
                "object",
                shape_class_names(),
                list(SHAPE_TEMPLATES),
                alpha=0.01,
                epochs=epochs,
                mask_start=mask,
                update_start=update,
                seed=seed,
                **rule,
            )
        )
    return studies


_STUDY_CACHE: dict[tuple, Study] = {}


def _job(
    quick: bool,
    seed: int,
    dataset: str,
    detector: str,
    threads: int,
    glofnd_lr: float,
    glofnd_clip: float | None,
    glofnd_rule: str,
    record: str | None,
    tmp: str,
) -> tuple[str, str, dict[str, Any], dict[str, Any], float]:
    """One (data set, detector) run; in a worker process when ``--jobs`` > 1."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    key = (quick, seed, dataset, glofnd_lr, glofnd_clip, glofnd_rule)
    if key not in _STUDY_CACHE:
        _STUDY_CACHE[key] = build_studies(
            quick, seed, [dataset], glofnd_lr, glofnd_clip, glofnd_rule
        )[0]
    study = _STUDY_CACHE[key]
    settings = {
        k: v
        for k, v in asdict(study).items()
        if k not in ("train", "validation", "adapter", "class_names", "templates")
    }
    settings.update(
        num_train=len(study.train),
        num_validation=len(study.validation),
        num_semantic_classes=len(set(study.train["semantic_label"])),
        ifnd=asdict(study.ifnd_config()),
    )
    t0 = time.perf_counter()
    run = run_one(study, detector, os.path.join(tmp, f"{dataset}_{detector}"), record)
    return dataset, detector, settings, run, time.perf_counter() - t0


def run_study(
    opts: argparse.Namespace, names: list[str], detectors: list[str], out: Path, suffix: str
) -> dict[str, Any]:
    """Every (data set, detector) run of ``opts``; writes ``fn_study{suffix}.json`` and the
    figures to ``out``, prints the table."""
    stem = f"fn_study{suffix}"
    started = time.perf_counter()
    results: dict[str, Any] = {
        "description": "tiny HF CLIP from scratch, CLIP InfoNCE, eliminate; same seed and data "
        "order for every detector; precision/recall/F1 of the detected false "
        "negatives vs same semantic_label, pairs of the batch, both sides",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads_per_run": opts.threads,
            "jobs": opts.jobs,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "datasets": {name: {"settings": None, "runs": {}} for name in names},
    }
    arrays: dict[str, list] = {}
    done: dict[tuple[str, str], tuple] = {}

    def report(item) -> None:
        dataset, det, settings, run, seconds = item
        results["datasets"][dataset]["settings"] = settings
        arrays[dataset] = run.pop("_arrays", arrays.get(dataset, []))
        done[(dataset, det)] = run
        fin, zs = run["masking_period"], run["zero_shot"]
        print(
            f"[{dataset}] {det:15s} P={fmt(fin['precision'])} R={fmt(fin['recall'])} "
            f"F1={fmt(fin['f1'])} filtered={fin['filtered_fraction']:.4f} "
            f"i2t@1={zs['image_to_text_recall@1']:.3f} "
            f"t2i@1={zs['text_to_image_recall@1']:.3f} top1={zs['top1_accuracy']:.3f} "
            f"({seconds:.0f} s)",
            flush=True,
        )

    tasks = [
        (
            opts.quick,
            opts.seed,
            name,
            det,
            opts.threads,
            opts.glofnd_lr,
            opts.glofnd_clip_grad_mult,
            opts.glofnd_update_rule,
            opts.record,
        )
        for name in names
        for det in detectors
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if opts.jobs <= 1:
            for task in tasks:
                report(_job(*task, tmp))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(opts.jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_job, *task, tmp) for task in tasks]
                for future in as_completed(futures):
                    report(future.result())
    for name in names:  # fixed order in the file, whatever order the runs finished in
        results["datasets"][name]["runs"] = {d: done[(name, d)] for d in detectors}
    torch.set_num_threads(opts.threads)
    results["ifnd_round_scaling"] = ifnd_round_scaling(
        [10_000] if opts.quick else [10_000, 100_000, 400_000]
    )
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    with open(out / f"{stem}.json", "w") as f:
        json.dump(results, f, indent=1)
    plot_f1(results, out / f"fn_f1{suffix}.png")
    plot_lambda(results, arrays, out / f"fn_lambda{suffix}.png")
    print(markdown_table(results))
    print(f"wrote {out / (stem + '.json')} in {results['total_seconds']} s")
    return results


def merge_results(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the runs (and the settings) of every detector ``new`` holds replaced."""
    merged = json.loads(json.dumps(base))
    for name, data in new["datasets"].items():
        merged["datasets"][name]["settings"] = data["settings"]
        merged["datasets"][name]["runs"].update(data["runs"])
    merged["merged_from"] = {
        "base": base.get("environment"),
        "new": new.get("environment"),
        "replaced": sorted({d for data in new["datasets"].values() for d in data["runs"]}),
    }
    return merged
