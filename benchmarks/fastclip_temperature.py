"""The temperature a short FastCLIP demo run learns, for each temperature-gradient weighting and
gamma granularity.

Runs ``glofnd-train recipes/demo_attributes.yaml --loss_type fastclip`` (the tiny HF CLIP on the embedded
coloured digits, CPU) once per variant, each in its own process with the same seed, and reads
the logged temperature (``1 / logit_scale``, after each step) and gamma from the last
checkpoint's ``trainer_state.json``. Variants (``--variants``, ``WEIGHTING/GRANULARITY``):

* ``fastclip/epoch``: the defaults, FastCLIP's code (surrogate summed over the two sides in
  the temperature's gradient; gamma held per integer epoch);
* ``mean/epoch``: every term averaged over the sides;
* ``fastclip/step``, ``mean/step``: gamma at each step's fractional epoch (``mean/step`` is the
  behaviour before the FastCLIP-fidelity change).

    .venv/bin/python benchmarks/fastclip_temperature.py [--epochs 5] [--out results/x.json]
        [--variants fastclip/epoch mean/epoch ...] [-- extra glofnd-train flags]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_model, log  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = ["fastclip/epoch", "mean/epoch", "fastclip/step", "mean/step"]


def run_variant(variant: str, epochs: int, workdir: str, extra: list[str]) -> dict:
    weighting, granularity = variant.split("/")
    out = os.path.join(workdir, variant.replace("/", "-"))
    command = [
        sys.executable,
        "-m",
        "glofnd_hf.cli.train",
        "recipes/demo_attributes.yaml",  # the recipe its recorded figures came from
        "--loss_type",
        "fastclip",
        "--num_train_epochs",
        str(epochs),
        "--temperature_gradient",
        weighting,
        "--gamma_granularity",
        granularity,
        "--output_dir",
        out,
        "--do_eval",
        "false",
        "--logging_steps",
        "1",
        "--save_strategy",
        "epoch",
        "--save_total_limit",
        "1",
        *extra,
    ]
    start = time.time()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-4000:]}")
    wall = time.time() - start
    checkpoints = sorted(
        (d for d in os.listdir(out) if d.startswith("checkpoint-")),
        key=lambda d: int(d.split("-")[1]),
    )
    with open(os.path.join(out, checkpoints[-1], "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    steps = [h for h in history if "temperature" in h]
    per_epoch = [h for h in steps if abs(h["epoch"] - round(h["epoch"])) < 1e-9]
    return {
        "variant": variant,
        "command": " ".join(command[1:]),
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "temperature_at_epoch_end": {
            str(round(h["epoch"])): round(h["temperature"], 6) for h in per_epoch
        },
        "gamma_by_epoch": {str(round(h["epoch"])): round(h["gamma"], 6) for h in per_epoch},
        "final_temperature": steps[-1]["temperature"],
        "final_loss": steps[-1]["loss"],
        "trajectory": [
            {
                "step": h["step"],
                "temperature": h["temperature"],
                "gamma": h["gamma"],
                "loss": h["loss"],
            }
            for h in steps
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("extra", nargs="*", help="extra glofnd-train flags (after --)")
    args = parser.parse_args()
    import torch
    import transformers

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_avg_start": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants:
            log(f"{variant}: {args.epochs} epochs")
            results.append(run_variant(variant, args.epochs, workdir, args.extra))
            r = results[-1]
            log(f"{variant}: temperature {r['final_temperature']:.6f} ({r['wall_s']} s)")
    machine["load_avg_end"] = os.getloadavg()
    epochs = sorted({e for r in results for e in r["temperature_at_epoch_end"]}, key=int)
    print("| variant | " + " | ".join(f"epoch {e}" for e in epochs) + " | final loss |")
    print("|---|" + "---:|" * (len(epochs) + 1))
    for r in results:
        cells = [f"{r['temperature_at_epoch_end'].get(e, float('nan')):.5f}" for e in epochs]
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['final_loss']:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "epochs": args.epochs, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
