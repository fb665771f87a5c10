"""Run by torchrun in tests: GloFND losses with their per-sample state replicated and sharded
side by side, on this rank's slice of fixed global batches (random embeddings, no model).
Writes, per rank and case, whether losses, statistics and the reassembled state were
bit-identical after every step, and the final state."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import N, fixed_global_batch, shut_down_process_group  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=4)
opts = parser.parse_args()

# (loss, update rule): every rule, the global loss (thresholds and u) and CLIP's (thresholds).
CASES = [("global", "pinball"), ("global", "tail"), ("global", "adam"), ("clip", "pinball")]


def build(kind, rule, sharding):
    config = GloFNDConfig(alpha=0.1, lr=0.05, update_rule=rule, init_quantile=rule == "adam")
    detector = build_detector("glofnd", num_samples=N, config=config, sharding=sharding)
    if kind == "clip":
        return ClipLoss(detector)
    gamma = GammaSchedule(0.5, "constant")
    return GlobalContrastiveLoss(N, detector, gamma=gamma, sharding=sharding)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    a, b = a.detach().contiguous(), b.detach().contiguous()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
for kind, rule in CASES:
    losses = {sharding: build(kind, rule, sharding) for sharding in ("replicated", "sharded")}
    record = {"loss": [], "stats": [], "state": [], "filtered": []}
    for step in range(opts.steps):
        image, text, index, labels = fixed_global_batch(step)
        gen = torch.Generator().manual_seed(step)
        image = torch.nn.functional.normalize(
            image @ torch.randn(image.shape[1], 8, generator=gen), dim=-1
        )
        text = torch.nn.functional.normalize(
            text @ torch.randn(text.shape[1], 8, generator=gen), dim=-1
        )
        b = image.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        outs = {}
        for sharding, loss_fn in losses.items():
            scale = torch.tensor(10.0, requires_grad=True)
            outs[sharding] = loss_fn(
                image[sl], text[sl], scale, index[sl], epoch=0.5 * step, labels=labels[sl]
            )
        rep, shd = outs["replicated"], outs["sharded"]
        record["loss"].append(same(rep.loss, shd.loss))
        record["stats"].append(
            rep.stats.keys() == shd.stats.keys()
            and all(same(rep.stats[k], shd.stats[k]) for k in rep.stats)
        )
        record["filtered"].append(float(rep.stats.get("filtered_fraction_text", 0.0)))
        states = {sharding: loss_fn.state_dict() for sharding, loss_fn in losses.items()}
        record["state"].append(
            states["replicated"].keys() == states["sharded"].keys()
            and all(same(v, states["sharded"][k]) for k, v in states["replicated"].items())
        )
    record["final"] = states["replicated"]
    record["owned"] = int(losses["sharded"].detector.state.table.data.shape[0])
    results[f"{kind}-{rule}"] = record
torch.save(results, f"{opts.out}.rank{rank}")
shut_down_process_group()
