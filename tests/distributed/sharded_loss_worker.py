"""Run by torchrun in tests: GloFND losses with their per-sample state replicated and sharded
side by side, on this rank's slice of fixed global batches. The plain cases call the loss on
random embeddings (no model); the cached cases run the cached loss
(``cached_contrastive_step`` in chunks of 2 of this rank's pairs) through a tiny projection
under DDP, one copy per sharding, and take an SGD step. Writes, per rank and case, whether
losses, statistics, the reassembled state (and the cached cases' weights) were bit-identical
after every step, and the final state."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import (  # noqa: E402
    N,
    bitwise_equal,
    cached_step,
    fixed_global_batch,
    projection,
    shut_down_process_group,
)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=4)
opts = parser.parse_args()

# (loss, update rule, chunk): every rule, the global loss (thresholds and u) and CLIP's
# (thresholds); chunk: the cached loss in chunks of that many pairs (None: the plain loss).
CASES = [
    ("global", "pinball", None),
    ("global", "tail", None),
    ("global", "adam", None),
    ("clip", "pinball", None),
    ("global", "pinball", 2),
    ("clip", "tail", 2),
]
SHARDINGS = ("replicated", "sharded")


def build(kind, rule, sharding):
    config = GloFNDConfig(alpha=0.1, lr=0.05, update_rule=rule, init_quantile=rule == "adam")
    detector = build_detector("glofnd", num_samples=N, config=config, sharding=sharding)
    if kind == "clip":
        return ClipLoss(detector)
    gamma = GammaSchedule(0.5, "constant")
    return GlobalContrastiveLoss(N, detector, gamma=gamma, sharding=sharding)


def plain_step(loss_fn, image, text, index, labels, step, sl):
    """The loss on this rank's slice of random unit embeddings."""
    gen = torch.Generator().manual_seed(step)
    image = torch.nn.functional.normalize(
        image @ torch.randn(image.shape[1], 8, generator=gen), dim=-1
    )
    text = torch.nn.functional.normalize(
        text @ torch.randn(text.shape[1], 8, generator=gen), dim=-1
    )
    scale = torch.tensor(10.0, requires_grad=True)
    return loss_fn(image[sl], text[sl], scale, index[sl], epoch=0.5 * step, labels=labels[sl])


def same_dicts(a, b):
    return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


class CountedReduces:
    """Counts torch.distributed.all_reduce calls while active (the sharded tables' reads)."""

    def __enter__(self):
        self.count, self.original = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original


def run_case(kind, rule, chunk, rank, world):
    losses = {sharding: build(kind, rule, sharding) for sharding in SHARDINGS}
    models, optimizers = {}, {}
    if chunk is not None:
        for sharding in SHARDINGS:
            models[sharding] = torch.nn.parallel.DistributedDataParallel(projection())
            optimizers[sharding] = torch.optim.SGD(models[sharding].parameters(), lr=0.5)
    record = {"loss": [], "stats": [], "state": [], "filtered": [], "params": [], "reads": []}
    for step in range(opts.steps):
        image, text, index, labels = fixed_global_batch(step)
        b = image.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        outs, reduces = {}, {}
        for sharding, loss_fn in losses.items():
            if chunk is None:
                with CountedReduces() as counted:
                    outs[sharding] = plain_step(loss_fn, image, text, index, labels, step, sl)
                reduces[sharding] = counted.count
                continue
            optimizers[sharding].zero_grad()
            model = models[sharding]
            pairs = (image[sl], text[sl], index[sl], labels[sl])
            outs[sharding] = cached_step(model, loss_fn, *pairs, step, chunk)
            optimizers[sharding].step()
        if reduces:  # all-reduces a sharded step adds: its state reads
            record["reads"].append(reduces["sharded"] - reduces["replicated"])
        rep, shd = outs["replicated"], outs["sharded"]
        record["loss"].append(bitwise_equal(rep.loss, shd.loss))
        record["stats"].append(same_dicts(rep.stats, shd.stats))
        record["filtered"].append(float(rep.stats.get("filtered_fraction_text", 0.0)))
        states = {sharding: loss_fn.state_dict() for sharding, loss_fn in losses.items()}
        record["state"].append(same_dicts(states["replicated"], states["sharded"]))
        params = {s: dict(m.module.named_parameters()) for s, m in models.items()}
        record["params"].append(not params or same_dicts(*params.values()))
    record["final"] = states["replicated"]
    record["owned"] = int(losses["sharded"].detector.state.table.data.shape[0])
    return record


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {}
for kind, rule, chunk in CASES:
    name = f"{kind}-{rule}" + ("" if chunk is None else f"-cached{chunk}")
    results[name] = run_case(kind, rule, chunk, rank, world)
torch.save(results, f"{opts.out}.rank{rank}")
shut_down_process_group()
