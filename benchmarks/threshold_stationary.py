"""Do learned thresholds rest at the (1 - alpha) quantile, and get better with visits?

Stationary streams (``stationary_streams``): i.i.d. negatives from known distributions, so
the exact quantile and the exact share above any threshold are known. Each rule runs through
the public detector for ``--visits`` visits (one per epoch) of ``--anchors`` anchors and both
sides; figures are in rank units, the exact share of the data set above the threshold over
alpha (what the threshold filters on data it has not stepped on):

* ``early`` / ``late``: mean sf / alpha at visits 20-40 / 150-200;
* ``spread``: sd across anchors of lambda - q late over the same at visits 40-60 (< 1: the
  error shrinks with visits, a consistent rule; about 1: a constant-gain tracker);
* ``within``: share of anchors with sf / alpha in [0.5, 2] at the last visit.

    .venv/bin/python benchmarks/threshold_stationary.py --split development   # tuning set
    .venv/bin/python benchmarks/threshold_stationary.py --split test          # reported
    .venv/bin/python benchmarks/threshold_stationary.py --table benchmarks/results/threshold_stationary.json

``--split development`` runs the families and seeds on which settings were chosen;
``--split test`` other seeds, more alpha x B, and families never tuned on. Writes
``benchmarks/results/threshold_stationary_<split>.json`` and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import stationary_streams as ss  # noqa: E402
from benchmarks._machine import cpu_model  # noqa: E402
from benchmarks._settings import parse_settings  # noqa: E402
from glofnd_hf.fnd import BatchQuantileDetector, GloFNDConfig, GloFNDDetector  # noqa: E402
from glofnd_hf.fnd.detectors import DetectionBatch  # noqa: E402
from glofnd_hf.fnd.quantiles import masked_quantile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RULES: dict[str, dict | None] = {
    "pinball": dict(update_rule="pinball"),
    "tail": dict(update_rule="tail"),
    "reference": dict(update_rule="reference"),
    "batch_quantile": None,
}


def run(
    stream: ss.StationaryStream,
    rule: str,
    alpha: float,
    batch_size: int,
    visits: int = 200,
    **overrides,
) -> dict:
    """One rule on one stream: the figures of ``ss.scores`` and the per-visit trace."""
    b = stream.anchors
    settings = RULES[rule]
    if settings is None:
        detector = BatchQuantileDetector(alpha)
    else:
        config = GloFNDConfig(alpha=alpha, **{**settings, **overrides})
        detector = GloFNDDetector(b + batch_size, config)
    batch = DetectionBatch(
        anchor_index=torch.arange(b),
        candidate_index=torch.arange(b, b + batch_size),
        negatives=torch.ones(b, batch_size, dtype=torch.bool),
        epoch=0.0,
    )
    lams = np.empty((visits, 2, b))
    for visit in range(visits):
        sim = stream.visit(visit, batch_size)
        batch.epoch = float(visit)
        detector.detect(sim, batch)
        if isinstance(detector, GloFNDDetector):
            lam = detector.state.lambdas(batch.anchor_index).t()
        else:
            lam = masked_quantile(sim, batch.negatives, 1.0 - alpha)
        lams[visit] = lam.double().numpy()
    shares = np.stack([stream.share_above(lam) for lam in lams])
    q = stream.quantiles(alpha)
    figures = ss.scores(shares, lams, q, alpha, visits)
    trace = (shares / alpha).mean(axis=(1, 2))
    return {**figures, "trace": [float(x) for x in trace]}


def run_split(
    split: str,
    rules: list[str],
    visits: int,
    anchors: int,
    families: list[str] | None = None,
    **overrides,
) -> dict:
    if split == "development":
        families_of_split, seeds, settings = (
            ss.DEVELOPMENT_FAMILIES,
            ss.DEVELOPMENT_SEEDS,
            ss.DEVELOPMENT_SETTINGS,
        )
    else:
        families_of_split, seeds, settings = ss.FAMILIES, ss.TEST_SEEDS, ss.TEST_SETTINGS
    families = [f for f in families_of_split if f in (families or families_of_split)]
    results: dict = {
        "split": split,
        "visits": visits,
        "anchors": anchors,
        "overrides": overrides,
        "machine": {"cpu": cpu_model(), "torch": torch.__version__},
        "runs": [],
    }
    for name in families:
        for seed in seeds:
            stream = ss.StationaryStream.make(name, anchors, seed)
            for alpha, batch_size in settings:
                for rule in rules:
                    start = time.perf_counter()
                    figures = run(stream, rule, alpha, batch_size, visits, **overrides)
                    entry = {
                        "family": name,
                        "seed": seed,
                        "alpha": alpha,
                        "batch_size": batch_size,
                        "alpha_b": alpha * batch_size,
                        "rule": rule,
                        "seconds": time.perf_counter() - start,
                        **figures,
                    }
                    results["runs"].append(entry)
                    print(_line(entry), flush=True)
    return results


def _line(e: dict) -> str:
    return (
        f"{e['family']:8s} s{e['seed']:<3d} aB {e['alpha_b']:5.2f} {e['rule']:15s} "
        f"early {e['early']:5.2f} late {e['late']:5.2f} spread {e['spread']:4.2f} "
        f"within {e['within']:5.1%}"
    )


def summary(results: dict) -> list[dict]:
    """Per rule, family and alpha x B: the figures averaged over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for e in results["runs"]:
        groups.setdefault((e["rule"], e["family"], round(e["alpha_b"], 2)), []).append(e)
    rows = []
    for (rule, name, ab), runs in groups.items():
        row = {"rule": rule, "family": name, "alpha_b": ab}
        for key in ("early", "late", "spread", "within"):
            row[key] = float(np.mean([r[key] for r in runs]))
        rows.append(row)
    return rows


def markdown_table(results: dict) -> str:
    rows = summary(results)
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    header = "| family | alpha x B | " + " | ".join(
        f"{rule}: early / late / spread / within" for rule in rules
    )
    lines = [header + " |", "|---|---|" + "---|" * len(rules)]
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        cells.setdefault((r["family"], r["alpha_b"]), {})[r["rule"]] = (
            f"{r['early']:.2f} / {r['late']:.2f} / {r['spread']:.2f} / {r['within']:.0%}"
        )
    for (name, ab), by_rule in cells.items():
        lines.append(
            f"| {name} | {ab:.2f} | " + " | ".join(by_rule.get(rule, "") for rule in rules) + " |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    families = list(dict.fromkeys(r["family"] for r in rows))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 3.0), squeeze=False)
    for ax, name in zip(axes[0], families, strict=True):
        for rule in rules:
            pts = sorted(
                (r["alpha_b"], r["late"]) for r in rows if (r["family"], r["rule"]) == (name, rule)
            )
            ax.plot(*zip(*pts, strict=True), marker=".", label=rule)
        ax.axhspan(0.9, 1.1, color="0.9")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("alpha x B")
    axes[0][0].set_ylabel("late sf(lambda) / alpha")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("development", "test"), default="development")
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--visits", type=int, default=200)
    parser.add_argument("--anchors", type=int, default=96)
    parser.add_argument("--families", nargs="*", choices=ss.FAMILIES, help="a subset")
    parser.add_argument("--set", nargs="*", default=[], help="GloFND settings key=value")
    parser.add_argument("--merge", nargs="*", help="merge result files into --output and stop")
    parser.add_argument("--output")
    parser.add_argument("--table", help="print the table of an earlier result file and stop")
    opts = parser.parse_args(argv)
    if opts.table:
        results = json.loads(Path(opts.table).read_text())
        print(markdown_table(results))
        return results
    if opts.merge:
        parts = [json.loads(Path(p).read_text()) for p in opts.merge]
        results = {**parts[0], "runs": [r for part in parts for r in part["runs"]]}
        results["seconds"] = sum(part["seconds"] for part in parts)
        _write(results, Path(opts.output))
        return results
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the rules' health warnings are not what we measure
    overrides = parse_settings(opts.set)
    start = time.perf_counter()
    results = run_split(
        opts.split, opts.rules, opts.visits, opts.anchors, opts.families, **overrides
    )
    results["seconds"] = time.perf_counter() - start
    _write(results, Path(opts.output or RESULTS / f"threshold_stationary_{opts.split}.json"))
    return results


def _write(results: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    try:
        plot(results, output.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
