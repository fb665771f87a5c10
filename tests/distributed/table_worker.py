"""Run by torchrun in tests: a sharded per-sample table against a replicated one over random
index batches (repeats within a batch included). Writes, per rank, whether every gather was
bit-identical and the reassembled sharded table with the replicated one."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from glofnd_hf.fnd.table import PerSampleTable, ShardedPerSampleTable, segment_mean

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import shut_down_process_group  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=30)
opts = parser.parse_args()

# (num_samples, row shape, global batch): N not a multiple of the world size, a (2, C) row
# like the thresholds' and a (2,) row like u's, and fewer samples than processes.
CASES = [(37, (2, 3), 12), (50, (2,), 20), (2, (2,), 4)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def special(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Some entries -0.0, +0.0, +-inf and NaN: the all-reduce must keep them bit for bit."""
    flat = values.reshape(-1).clone()
    picks = torch.randint(0, flat.numel(), (6,), generator=gen)
    flat[picks] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan"), -0.0])
    return flat.view_as(values)


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
result = {"gathers_equal": [], "tables_equal": [], "owned": []}
for case, (n, shape, batch) in enumerate(CASES):
    fill = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    replicated = PerSampleTable(n, shape, fill.tolist() if fill.dim() else float(fill))
    sharded = ShardedPerSampleTable(n, shape, fill.tolist() if fill.dim() else float(fill))
    result["owned"].append(int(sharded.data.shape[0]))
    gen = torch.Generator().manual_seed(case)  # the same batches on every rank
    for _ in range(opts.steps):
        index = torch.randint(0, n, (batch,), generator=gen)  # repeats within the batch
        index[-1] = index[0]  # at least one
        got, expected = sharded.gather(index), replicated.gather(index)
        result["gathers_equal"].append(torch.equal(bits(got), bits(expected)))
        rows = special(expected + torch.randn(expected.shape, generator=gen), gen)
        rows = segment_mean(index, rows)  # repeated indices carry identical rows (the contract)
        replicated.scatter(index, rows)
        sharded.scatter(index, rows)
    result["tables_equal"].append(torch.equal(bits(sharded.full()), bits(replicated.data)))
torch.save(result, f"{opts.out}.rank{rank}")
shut_down_process_group()
