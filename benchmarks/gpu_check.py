"""The GPU path in one run: GPU tests, training-step speed, peak memory, resume on CUDA.

Made for a GPU machine lent for a few minutes: one command, one JSON, one short summary.

1. ``pytest -m gpu``: losses and detectors on CUDA equal to the CPU, float32 threshold math
   under bf16 autocast, no host sync inside a step, pinned host state equal to device state.
2. ``train_step.py``: ViT-B/32-sized HF CLIP (built from its config, random init, nothing
   downloaded), batch 256, bf16, interleaved rounds of ``GloFNDTrainer`` with detectors
   ``none``, ``glofnd`` (state on the device, and in pinned host memory), ``batch_quantile``,
   and the plain ``Trainer`` with transformers' CLIP loss.
3. ``memory.py``: peak memory of the loss and of a full step, ``none`` against ``glofnd``.
4. Resume on CUDA: ``glofnd-train`` (tiny model, digits, bf16, FastCLIP + GloFND) for 12 steps
   saving at step 6 (mid-epoch), then a second run resumed from that checkpoint; the final
   weights and per-sample state of both runs compared element by element.

Writes ``gpu_check.json`` (everything, including each part's own JSON) and ``summary.txt``
into ``--out`` (default ``$OUT`` when set, else ``benchmarks/results/gpu_check``).
``--dry-run`` runs every part at smoke size on the CPU (the test suite does, so the script
cannot rot before a GPU is lent).

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --dry-run       # anywhere: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run one part; its output goes to ``log``; never raises (a failed part is reported)."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)])}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = 124
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else err.stdout or ""
    log.write_text(out)
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "seconds": round(time.perf_counter() - started, 1),
        "log": log.name,
        "tail": out[-2000:],
    }


def gpu_tests(out: Path, timeout: float) -> dict[str, Any]:
    part = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_gpu.py",
        ],
        out / "pytest_gpu.log",
        timeout,
    )
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?)", part["tail"])
    part["counts"] = {word: int(number) for number, word in found}
    return part


def train_step(out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    target = out / "train_step.json"
    args = (
        ["--quick", "--host-state"]
        if dry_run
        else [
            "--model",
            "vit-b32",
            "--batch",
            "256",
            "--steps",
            "30",
            "--warmup",
            "5",
            "--head-steps",
            "100",
        ]
    )
    part = run(
        [sys.executable, str(BENCH / "train_step.py"), *args, "--output", str(target)],
        out / "train_step.log",
        timeout,
    )
    if target.is_file():
        part["result"] = json.loads(target.read_text())
    return part


def memory(out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    target = out / "memory.json"
    args = ["--quick"] if dry_run else ["--what", "loss", "step", "--batches", "256", "1024"]
    part = run(
        [sys.executable, str(BENCH / "memory.py"), *args, "--output", str(target)],
        out / "memory.log",
        timeout,
    )
    if target.is_file():
        part["result"] = json.loads(target.read_text())
    return part


def resume(out: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    """Uninterrupted 12 steps vs 6 steps + resume to 12, compared tensor by tensor."""
    from safetensors.torch import load_file

    work = out / "resume"
    shutil.rmtree(work, ignore_errors=True)
    steps, save = (4, 2) if dry_run else (12, 6)
    common = [
        sys.executable, "-m", "glofnd_hf.cli.train", "recipes/demo.yaml",
        "--loss_type", "fastclip", "--per_device_train_batch_size", "64",
        "--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", str(save),
        "--save_total_limit", "5", "--logging_steps", "1", "--do_eval", "false",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if not dry_run:
        common += ["--use_cpu", "false", "--bf16", "true"]
    full = run([*common, "--output_dir", str(work / "full")], out / "resume_full.log", timeout)
    parts = {"uninterrupted": full}
    first = work / "full" / f"checkpoint-{save}"
    if full["returncode"] == 0 and first.is_dir():
        shutil.copytree(first, work / "resumed" / first.name)
        parts["resumed"] = run(
            [*common, "--output_dir", str(work / "resumed"),
             "--resume_from_checkpoint", str(work / "resumed" / first.name)],
            out / "resume_resumed.log", timeout,
        )  # fmt: skip
    compared = {}
    a, b = work / "full" / f"checkpoint-{steps}", work / "resumed" / f"checkpoint-{steps}"
    for name in ("model.safetensors", "glofnd_state.safetensors"):
        if (a / name).is_file() and (b / name).is_file():
            x, y = load_file(str(a / name)), load_file(str(b / name))
            differing = sum(int((x[k] != y[k]).sum()) for k in x if k in y)
            compared[name] = {
                "tensors": len(x),
                "elements": sum(t.numel() for t in x.values()),
                "differing_elements": differing,
                "max_abs_diff": max(
                    (float((x[k].float() - y[k].float()).abs().max()) for k in x if k in y),
                    default=0.0,
                ),
                "same_keys": sorted(x) == sorted(y),
            }
    return {"steps": steps, "resumed_from": save, "runs": parts, "compared": compared}


def summary(report: dict[str, Any]) -> str:
    parts = report["parts"]
    lines = [f"machine: {report['machine']}", ""]
    if "gpu_tests" in parts:
        tests = parts["gpu_tests"]
        lines.append(f"gpu tests: rc {tests['returncode']}, {tests.get('counts')}")
    if "train_step" in parts:
        step = parts["train_step"]
        lines.append(f"train step: rc {step['returncode']}")
        for result in step.get("result", {}).get("results", []):
            lines.append(f"  {result['model']}, batch {result['batch']}:")
            for row in result["rows"]:
                vs_none, vs_hf = row.get("vs_none"), row.get("vs_hf")
                lines.append(
                    f"    {row['variant']:38s} {row['median_ms']:8.2f} ms"
                    + (f"  vs none {vs_none[0]:.3f}" if vs_none else "")
                    + (f"  vs hf {vs_hf[0]:.3f}" if vs_hf else "")
                )
    if "memory" in parts:
        lines.append(f"memory: rc {parts['memory']['returncode']} (see memory.log)")
    if "resume" in parts:
        compared = parts["resume"]["compared"]
        for name, cmp in compared.items():
            lines.append(
                f"resume {name}: {cmp['differing_elements']} of {cmp['elements']} elements "
                f"differ, max |diff| {cmp['max_abs_diff']:.3g}"
            )
        if not compared:
            lines.append("resume: no comparison (a run failed; see resume_*.log)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="smoke size on the CPU")
    parser.add_argument(
        "--part-timeout", type=float, default=300.0, help="seconds allowed to each part"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=("gpu_tests", "train_step", "memory", "resume")
    )
    opts = parser.parse_args(argv)
    out = opts.out or Path(os.environ.get("OUT") or BENCH / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not opts.dry_run:
        parser.error("no CUDA device: run with --dry-run to check the script on the CPU")
    machine = {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cores": os.cpu_count(),
    }
    report: dict[str, Any] = {"machine": machine, "dry_run": opts.dry_run, "parts": {}}
    parts = {
        "gpu_tests": lambda: gpu_tests(out, opts.part_timeout),
        "train_step": lambda: train_step(out, opts.dry_run, opts.part_timeout),
        "memory": lambda: memory(out, opts.dry_run, opts.part_timeout),
        "resume": lambda: resume(out, opts.dry_run, opts.part_timeout),
    }
    for name, part in parts.items():
        if name in opts.skip:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        report["parts"][name] = part()
        # Written after every part: a machine taken back mid-run still leaves the rest.
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = summary(report)
    (out / "summary.txt").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
