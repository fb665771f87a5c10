"""The command line of ``benchmarks/fn_study.py``: its options, and which of the three
things it does (run the study, print a results file's table, merge a re-run into earlier
results)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from glofnd_hf.fnd import GloFNDConfig
from glofnd_hf.fnd.thresholds import UPDATE_RULES

from .plots import plot_f1
from .runner import DATASETS, merge_results, run_study
from .study import DETECTORS
from .table import markdown_table

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTION = f"False-negative detection study: {' / '.join(DETECTORS)}."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="1-minute smoke run")
    parser.add_argument("--datasets", default="digits,shapes")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs in parallel, one process each (default: 2 cores)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (more than one per core slows CPU "
        "training down badly when the cores are shared)",
    )
    parser.add_argument(
        "--glofnd-lr",
        type=float,
        default=0.05,
        help="GloFND threshold learning rate (the reference default 0.05)",
    )
    parser.add_argument(
        "--glofnd-update-rule",
        default=GloFNDConfig().update_rule,
        choices=UPDATE_RULES,
        help="GloFND's threshold rule (Adam rules start 2 epochs before masking)",
    )
    parser.add_argument(
        "--glofnd-clip-grad-mult",
        type=float,
        default=None,
        help="clip GloFND's threshold gradient to +-mult x alpha (default: off)",
    )
    parser.add_argument(
        "--suffix",
        default=None,
        help="appended to the output file names (default: '_quick' with --quick)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="save GloFND's batches and every epoch's exact quantiles to DIR, for "
        "benchmarks/replay_thresholds.py (about 40 MB per data set)",
    )
    parser.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    parser.add_argument(
        "--merge",
        nargs=2,
        metavar=("BASE", "NEW"),
        help="replace BASE's runs of the detectors NEW holds (e.g. GloFND re-run "
        "with another rule; the other detectors' runs do not depend on "
        "it), write fn_study{suffix}.json and its F1 plot, and stop",
    )
    opts = parser.parse_args(argv)
    if opts.merge:
        merged = merge_results(*(json.loads(Path(p).read_text()) for p in opts.merge))
        out = Path(opts.out)
        with open(out / f"fn_study{opts.suffix or ''}.json", "w") as f:
            json.dump(merged, f, indent=1)
        plot_f1(merged, out / f"fn_f1{opts.suffix or ''}.png")
        print(markdown_table(merged))
        return merged
    if opts.table:
        with open(opts.table) as f:
            print(markdown_table(json.load(f)))
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = opts.suffix if opts.suffix is not None else ("_quick" if opts.quick else "")
    detectors = [d for d in opts.detectors.split(",") if d]
    names = [d for d in opts.datasets.split(",") if d]
    unknown = sorted(set(detectors) - set(DETECTORS)) + sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown detectors or data sets {unknown}")
    return run_study(opts, names, detectors, out, suffix)
