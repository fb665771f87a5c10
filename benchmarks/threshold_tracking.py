"""Do learned thresholds track the exact global (1 - alpha) quantile?

Streams of similarity batches with known exact per-anchor quantiles (``tracking_streams``),
each sample visited once per epoch, both anchor sides, scored for every threshold rule:

* the reference rule (Adam, bias correction t = epoch + 1), Adam with per-sample bias
  correction (the default before the tail rule), the same with ``init_quantile``, the tail
  rule, and the in-batch quantile (the FND baseline);
* per epoch: median |lambda - exact quantile|, correlation with the exact quantiles, realised
  filtered fraction / alpha, share of thresholds at the clamp, the exact share of the data
  set above each threshold over alpha (mean, and the share of anchors within [0.5, 2], as
  the stationary benchmark scores it); in the last epoch precision
  and recall of the detections against the exact rule's masks; for moving streams the
  exact quantile's own median movement per epoch (the floor for a rule that sees each
  sample once per epoch).

    .venv/bin/python benchmarks/threshold_tracking.py             # 4 small streams (~5 min)
    .venv/bin/python benchmarks/threshold_tracking.py --paper     # + N = 2e5, alpha B < 1
    .venv/bin/python benchmarks/threshold_tracking.py --table benchmarks/results/threshold_tracking.json

Writes ``benchmarks/results/threshold_tracking.json`` and ``threshold_tracking.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import cpu_model  # noqa: E402
from benchmarks._settings import parse_settings  # noqa: E402
from benchmarks.tracking_streams import KINDS, RULES, make_stream, run_stream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SMALL = dict(num_samples=8192, batch_size=512, alpha=0.005, epochs=20)
PAPER = dict(num_samples=200_000, batch_size=4096, alpha=1e-4, epochs=30)


def run_all(
    kinds: list[str],
    rules: list[str],
    paper: bool,
    paper_rules: list[str],
    seed: int,
    **overrides,
) -> dict:
    """Every rule on every stream kind; ``overrides``: GloFND settings for the GloFND rules."""

    def settings_of(rule: str) -> dict:
        return overrides if RULES[rule] is not None else {}

    results: dict = {
        "settings": {"small": SMALL, "paper": PAPER if paper else None},
        "machine": {
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "runs": [],
    }
    for kind in kinds:
        stream = make_stream(kind, SMALL["num_samples"], SMALL["epochs"], seed=seed)
        cache: dict = {}
        for rule in rules:
            start = time.perf_counter()
            run = run_stream(
                stream,
                rule,
                SMALL["alpha"],
                SMALL["batch_size"],
                seed=seed,
                exact_cache=cache,
                **settings_of(rule),
            )
            results["runs"].append(
                {**asdict(run), "setting": "small", "seconds": time.perf_counter() - start}
            )
            print(_line("small", run), flush=True)
    if paper:
        stream = make_stream("fixed", PAPER["num_samples"], PAPER["epochs"], seed=seed)
        cache = {}
        for rule in paper_rules:
            start = time.perf_counter()
            run = run_stream(
                stream,
                rule,
                PAPER["alpha"],
                PAPER["batch_size"],
                seed=seed,
                score_epochs={0, 1, 2, 4, 9, 19},
                exact_cache=cache,
                **settings_of(rule),
            )
            results["runs"].append(
                {**asdict(run), "setting": "paper", "seconds": time.perf_counter() - start}
            )
            print(_line("paper", run), flush=True)
    return results


def _line(setting: str, run) -> str:
    last = run.last
    return (
        f"{setting:5s} {run.stream:9s} {run.rule:19s} err {last.median_error:.4f} "
        f"corr {last.correlation:.3f} filtered/alpha {last.filtered_over_alpha:.2f} "
        f"at bound {last.at_bound:.3f} P {_f(last.precision)} R {_f(last.recall)} "
        f"share/alpha {_f(last.share_over_alpha, 2)} within {_percent(last.within)}"
    )


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    lines = [
        "| setting | stream | rule | median error | corr. | filtered / alpha | at clamp "
        "| P | R | quantile moves / epoch | share / alpha | within [0.5, 2] "
        "| share / alpha, epochs 3 on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        last = run["epochs"][-1]
        move = last.get("quantile_movement")
        lines.append(
            f"| {run['setting']} | {run['stream']} | {run['rule']} | {last['median_error']:.4f} "
            f"| {last['correlation']:.3f} | {last['filtered_over_alpha']:.2f} "
            f"| {last['at_bound']:.1%} | {_f(last['precision'])} | {_f(last['recall'])} "
            f"| {'' if move is None else f'{move:.4f}'} | {_f(last.get('share_over_alpha'), 2)} "
            f"| {_percent(last.get('within'))} | {_span(run['epochs'][2:])} |"
        )
    return "\n".join(lines)


def _percent(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def _span(epochs: list[dict]) -> str:
    """min-max of the epochs' share / alpha (results written before it was measured: empty)."""
    shares = [e["share_over_alpha"] for e in epochs if e.get("share_over_alpha") is not None]
    return f"{min(shares):.2f}–{max(shares):.2f}" if shares else ""


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["setting"], r["stream"]) for r in results["runs"]))
    colours = {
        "reference": "#ff7f0e",
        "adam": "#1f77b4",
        "adam+init_quantile": "#2ca02c",
        "tail": "#d62728",
        "batch_quantile": "#9467bd",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (setting, kind) in zip(axes[0], panels, strict=True):
        for run in results["runs"]:
            if (run["setting"], run["stream"]) != (setting, kind):
                continue
            xs = [e["epoch"] + 1 for e in run["epochs"]]
            style = "--" if run["rule"] == "adam" else "-"  # equals reference here
            ax.plot(
                xs,
                [max(e["median_error"], 1e-4) for e in run["epochs"]],
                style,
                marker=".",
                label=run["rule"],
                color=colours.get(run["rule"]),
            )
            moves = [
                (e["epoch"] + 1, e["quantile_movement"])
                for e in run["epochs"]
                if e.get("quantile_movement") is not None
            ]
        if kind == "moving" and moves:
            ax.plot(*zip(*moves, strict=True), "k:", label="quantile moves / epoch")
        ax.set_yscale("log")
        ax.set_title(f"{kind} ({setting})")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("median |lambda - exact quantile|")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--paper", action="store_true", help="add the N = 2e5 simulation")
    parser.add_argument(
        "--paper-rules", nargs="*", default=["reference", "adam", "tail", "batch_quantile"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE", help="GloFND settings"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "threshold_tracking.json"))
    parser.add_argument(
        "--table",
        help="print the table of an earlier result file (and redraw its plot beside it) and stop",
    )
    opts = parser.parse_args(argv)
    if opts.table:
        results = json.loads(Path(opts.table).read_text())
        print(markdown_table(results))
        plot(results, Path(opts.table).with_suffix(".png"))
        return results
    torch.set_num_threads(opts.threads)
    logging.disable(logging.WARNING)  # the rules' health warnings are what we measure
    start = time.perf_counter()
    overrides = parse_settings(opts.set)
    results = run_all(
        opts.streams, opts.rules, opts.paper, opts.paper_rules, opts.seed, **overrides
    )
    results["overrides"] = overrides
    results["seconds"] = time.perf_counter() - start
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(markdown_table(results))
    try:
        plot(results, output.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
    return results


if __name__ == "__main__":
    main()
