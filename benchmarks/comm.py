"""Per-step communication of distributed GloFND: the state sync against the feature gather.

Each step, every rank all-gathers its image and text embeddings (b x D each, with gradient)
and, for the per-sample state, its anchors' dataset indices and a few floats per anchor
(the default threshold rule's statistics of both sides, ``num_statistics`` each, and the
global loss's g of both sides). This script measures bytes sent per rank and the time of each
collective in the same run.

    python benchmarks/comm.py --processes 2 --local-batch 256 --dim 512
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def worker(rank: int, world: int, port: int, opts: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from glofnd_hf.fnd import comm

    b, d = opts.local_batch, opts.dim
    image = torch.randn(b, d, requires_grad=True)
    text = torch.randn(b, d, requires_grad=True)
    index = torch.randint(0, 10**8, (b,))
    # The default rule's statistics of both sides (the Adam rule sends 1 or 2 per side).
    from glofnd_hf.fnd.thresholds import RULES, GloFNDConfig

    statistics_per_side = RULES[GloFNDConfig().update_rule].num_statistics
    per_anchor = torch.randn(b, 2 * statistics_per_side)
    u_values = torch.randn(b, 2)

    def features():
        all_image = comm.all_gather_with_grad(image)
        all_text = comm.all_gather_with_grad(text)
        (all_image.sum() + all_text.sum()).backward()

    def state_sync():
        comm.all_gather_no_grad(index)
        comm.all_gather_no_grad(per_anchor)
        comm.all_gather_no_grad(u_values)

    feature_s = timed(features, opts.repeats)
    state_s = timed(state_sync, opts.repeats)
    if rank == 0:
        feature_bytes = 2 * b * d * 4 * 2  # forward gather + backward reduce-scatter
        state_bytes = b * 8 + per_anchor.numel() * 4 + u_values.numel() * 4  # index, stats, g
        queue.put((feature_bytes, state_bytes, feature_s, state_s))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--local-batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    opts = parser.parse_args()
    print(f"torch {torch.__version__}, gloo on CPU, local batch {opts.local_batch}, dim {opts.dim}")
    print(
        f"{'procs':>5} {'feature gather':>16} {'state sync':>12} {'bytes ratio':>12} "
        f"{'feature ms':>11} {'state ms':>9} {'time ratio':>11}"
    )
    ctx = mp.get_context("spawn")
    for world in opts.processes:
        queue = ctx.Queue()
        mp.start_processes(
            worker,
            args=(world, free_port(), opts, queue),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        fb, sb, ft, st = queue.get()
        print(
            f"{world:>5} {fb / 1024:>13.0f} KB {sb / 1024:>9.1f} KB {sb / fb:>12.4f} "
            f"{ft * 1e3:>11.2f} {st * 1e3:>9.2f} {st / ft:>11.3f}"
        )


if __name__ == "__main__":
    main()
