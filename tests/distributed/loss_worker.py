"""Run by torchrun in tests: steps of a loss on this rank's slice of a fixed global batch.

For each case (a loss, optionally cached in chunks: ``clip`` or ``global@3``), one after the
other in the same process group (one launch serves every case), writes loss, the
statistics, the parameters of a tiny projection after DDP averaging, and the per-sample
state to ``<out>.<case>.rank<r>``.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import (  # noqa: E402
    apply_loss,
    build_loss,
    cached_step,
    fixed_global_batch,
    projection,
    shut_down_process_group,
    stats_as_floats,
)

parser = argparse.ArgumentParser()
parser.add_argument("--cases", nargs="+", required=True, help="LOSS or LOSS@CHUNK")
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
opts = parser.parse_args()


def run_case(kind: str, chunk: int | None, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(projection(kind))
    loss_fn = build_loss(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    records = []
    for step in range(opts.steps):
        image, text, index, labels = fixed_global_batch(step, kind)
        b = image.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        optimizer.zero_grad()
        if chunk is None:
            out = apply_loss(
                loss_fn, model(image[sl], text[sl]), index[sl], float(step), labels[sl]
            )
            out.loss.backward()
        else:
            pairs = (image[sl], text[sl], index[sl], labels[sl])
            out = cached_step(model, loss_fn, *pairs, step, chunk)
        optimizer.step()
        # The loss of the global batch is the mean of the ranks' local means.
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        state = loss_fn.state_dict()
        digest = torch.stack([v.double().sum() for v in state.values()])
        digests = [torch.zeros_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        records.append(
            {
                "loss": loss / world,
                "digests": torch.stack(digests),
                "stats": stats_as_floats(out.stats),
            }
        )
    result = {
        "records": records,
        "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        "state": loss_fn.state_dict(),
        "health": loss_fn.finish_epoch(),
    }
    del model, optimizer  # DDP's reducer holds the group: release it before the next case
    return result


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for case in opts.cases:
    kind, _, chunk = case.partition("@")
    result = run_case(kind, int(chunk) if chunk else None, rank, world)
    torch.save(result, f"{opts.out}.{case}.rank{rank}")
shut_down_process_group()
