"""Time one loss step of the sigmoid loss against the CLIP loss, one process.

For each batch size B and detector (``none``, ``glofnd``) this measures the wall time of

    loss(image_embeds, text_embeds, logit_scale, index, logit_bias=...).loss.backward()

for ``SigmoidLoss`` and ``ClipLoss`` on leaf embeddings (dimension 512), interleaved round by
round so that drift of a shared machine hits both; it reports medians and the ratio to the
CLIP loss with the same detector. Both losses build the same (2, B, B) similarities; the
sigmoid loss adds element-wise log-sigmoid terms where the CLIP loss has a log-sum-exp.

    PYTHONPATH=. python benchmarks/sigmoid_loss.py --batch 1024 4096 --rounds 10 \\
        --out benchmarks/results/sigmoid_loss.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from _machine import cpu_model, log

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, SigmoidLoss

DIM = 512
N = 100_000


def make_loss(kind: str, detector: str):
    det = build_detector(detector, num_samples=N, config=GloFNDConfig(alpha=1e-3))
    return (SigmoidLoss if kind == "sigmoid" else ClipLoss)(det)


def one_step(loss, batch: int, gen: torch.Generator) -> float:
    image = torch.randn(batch, DIM, generator=gen).requires_grad_(True)
    text = torch.randn(batch, DIM, generator=gen).requires_grad_(True)
    index = torch.randperm(N, generator=gen)[:batch]
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    start = time.perf_counter()
    loss(image, text, scale, index, epoch=0.5, logit_bias=bias).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    rows = []
    for batch in opts.batch:
        losses = {
            (kind, det): make_loss(kind, det)
            for kind in ("clip", "sigmoid")
            for det in ("none", "glofnd")
        }
        times: dict[tuple[str, str], list[float]] = {key: [] for key in losses}
        gen = torch.Generator().manual_seed(0)
        for loss in losses.values():  # warm-up
            one_step(loss, batch, gen)
        for r in range(opts.rounds):
            for key, loss in losses.items():
                times[key].append(one_step(loss, batch, gen))
            log(f"B={batch} round {r + 1}/{opts.rounds}")
        for (kind, det), values in times.items():
            median = statistics.median(values)
            base = statistics.median(times[("clip", det)])
            rows.append(
                {
                    "batch": batch,
                    "loss": kind,
                    "detector": det,
                    "median_s": round(median, 5),
                    "ratio_to_clip": round(median / base, 3),
                }
            )
    print(f"{'B':>6} {'loss':>8} {'detector':>8} {'median ms':>10} {'x clip':>7}")
    for row in rows:
        print(
            f"{row['batch']:>6} {row['loss']:>8} {row['detector']:>8} "
            f"{1000 * row['median_s']:>10.1f} {row['ratio_to_clip']:>7.2f}"
        )
    if opts.out:
        machine = {
            "cpu": cpu_model(),
            "threads": opts.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        with open(opts.out, "w") as f:
            json.dump({"machine": machine, "rounds": opts.rounds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
