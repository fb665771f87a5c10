"""``glofnd-inspect`` on the demo checkpoint: wall time of a 16-anchor report, end to end.

Each round runs the command line in a fresh process (imports, model and data loading,
embedding all 1,440 training pairs, the whole-data-set summary, HTML, JSON and PNG grids),
pinned to ``--cores`` CPU cores (``taskset``, where there are more) with as many torch
threads. ``cold``: an empty embedding cache (everything computed); ``warm``: the cache
written by the cold run of the same round. The report's own timing splits embedding from
the rest; results go to ``benchmarks/results/inspect_demo.json``.

    .venv/bin/python benchmarks/inspect_demo.py [--checkpoint outputs/demo/checkpoint-720]
        [--dataset-config digit-captions] [--anchors 16] [--repeats 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._machine import cpu_model, log  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_once(args, workdir: Path, cache: Path) -> dict:
    output = workdir / "report.html"
    command = [
        sys.executable,
        "-m",
        "glofnd_hf.cli.inspect_cmd",
        args.checkpoint,
        "--dataset",
        "glofnd-digits",
        "--dataset-config",
        args.dataset_config,
        "--sample",
        str(args.anchors),
        "--output",
        str(output),
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]
    if shutil.which("taskset") and (os.cpu_count() or 1) > args.cores:
        command = ["taskset", "-c", f"0-{args.cores - 1}", *command]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.cores),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(output.with_suffix(".json").read_text())
    return {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(
            after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2
        ),
        "embed_seconds": report["timing"]["embed_seconds"],
        "scan_seconds": report["timing"]["scan_seconds"],
        "html_bytes": output.stat().st_size,
        "anchors": len(report["anchors"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="outputs/demo/checkpoint-720")
    p.add_argument(
        "--dataset-config",
        default="digit-captions",
        help="the digits' configuration the checkpoint was trained on (the earlier demo, "
        "recipes/demo_attributes.yaml: attributes)",
    )
    p.add_argument("--anchors", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inspect_demo.json"))
    args = p.parse_args()
    rounds = {"cold": [], "warm": []}
    load_start = os.getloadavg()[0]
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            for kind in ("cold", "warm"):
                result = run_once(args, Path(tmp), cache)
                rounds[kind].append(result)
                log(f"round {r} {kind}: {result}")
    import torch

    summary = {
        kind: {
            "wall_seconds_median": statistics.median(x["wall_seconds"] for x in runs),
            "wall_seconds_max": max(x["wall_seconds"] for x in runs),
        }
        for kind, runs in rounds.items()
    }
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores_used": args.cores,
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        },
        "checkpoint": args.checkpoint,
        "anchors": args.anchors,
        "summary": summary,
        "rounds": rounds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
