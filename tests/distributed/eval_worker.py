"""Run by torchrun in tests: ``ZeroShotEvaluator`` shared by the processes of a gloo group.

Every rank writes its metrics, the gathered embeddings and whether its progress bars show to
``--out.rank{r}``.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import eval_setup, shut_down_process_group  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--inputs", required=True)
parser.add_argument("--out", required=True)
opts = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
adapter, evaluator = eval_setup(opts.inputs)
embeds = {}
embed = evaluator.embed
evaluator.embed = lambda *args: embeds.update(embed(*args)) or embeds  # keep a copy
metrics = evaluator(adapter)
bar = evaluator._bar(1, "embedding images")
torch.save(
    {"metrics": metrics, "embeds": embeds, "bar_shown": not bar.disable},
    f"{opts.out}.rank{rank}",
)
bar.close()
shut_down_process_group()
