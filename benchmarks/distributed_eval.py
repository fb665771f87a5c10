"""Zero-shot evaluation inside a multi-process run: shared across the processes, or the main
process alone while the others wait.

Both are measured in the same run, on the same model and data, against one process alone:

* ``one``: a single process (``--threads`` intra-op threads);
* ``split``: ``--processes`` processes (gloo, one thread each), each embedding a contiguous
  share of whole batches, embeddings gathered, scored once on the main process, metrics
  broadcast (what ``ZeroShotEvaluator`` does under ``torch.distributed``);
* ``main``: the same processes, the main one embeds and scores everything
  (``distributed=False``) while the others wait for the metrics in a broadcast;
* ``every``: the same processes, each one evaluating everything alone (what the evaluator
  did in multi-process runs before it shared the work).

Model: a small randomly initialised Hugging Face CLIP (``--image-size``, ``--width``,
``--layers``); data: the first ``--images`` validation images of the embedded digits, with
retrieval and digit classification. A round runs the modes in a fresh random order; a
distributed evaluation is timed from a barrier to the end of its last collective on the main
process. The table gives the median and quartiles over ``--repeats`` rounds, and the CPU time of
the busiest process (``time.process_time``, median): on a machine whose cores are taken by
other jobs, wall time cannot show the work a process was spared, CPU time does. It checks that
every mode returns the same metrics.

    .venv/bin/python benchmarks/distributed_eval.py [--processes 2] [--images 357]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_model  # noqa: E402

MODES = ("split", "main", "every")
LABELS = {
    "split": "shared (split + gather)",
    "main": "main process alone",
    "every": "each process alone (before)",
}


def save_inputs(
    folder: str, images: int, image_size: int = 32, width: int = 64, layers: int = 2
) -> None:
    """A tiny CLIP and the first ``images`` validation pairs of the digits, saved for the
    processes to load (faster than building them; also the distributed tests' inputs)."""
    from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES, load_digits_pairs
    from glofnd_hf.models import build_tiny_hf_clip

    data = load_digits_pairs(seed=0)["validation"]
    data = data.select(range(min(images, len(data))))
    texts = list(data["caption"])
    texts += [t.format(n) for n in DIGIT_NAMES for t in CLASSIFICATION_TEMPLATES]
    adapter = build_tiny_hf_clip(
        image_size=image_size,
        seed=0,
        texts=texts,
        width=width,
        layers=layers,
        heads=4,
        patch_size=image_size // 8,
        embed_dim=width,
    )
    adapter.save(f"{folder}/model")
    data.save_to_disk(f"{folder}/data")


def make_evaluator(
    folder: str, batch_size: int, distributed: bool = True, show_progress: bool = False
):
    """The saved tiny CLIP and a zero-shot evaluator (retrieval and digit classification)
    over the saved images."""
    import datasets

    from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES
    from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
    from glofnd_hf.models import load_dual_encoder

    adapter = load_dual_encoder(f"{folder}/model")
    adapter.model.eval()
    evaluator = ZeroShotEvaluator(
        datasets.load_from_disk(f"{folder}/data"),
        caption_column="caption",
        class_label_column="digit",
        class_names=DIGIT_NAMES,
        templates=CLASSIFICATION_TEMPLATES,
        batch_size=batch_size,
        show_progress=show_progress,
        distributed=distributed,
    )
    return adapter, evaluator


def one_process(folder: str, opts: argparse.Namespace) -> tuple[list[float], dict]:
    torch.set_num_threads(opts.threads)
    adapter, evaluator = make_evaluator(folder, opts.batch_size, distributed=False)
    evaluator(adapter)  # warm-up
    times, cpu, metrics = [], [], {}
    for _ in range(opts.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        metrics = evaluator(adapter)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times, cpu, metrics


def worker(rank: int, world: int, port: int, folder: str, opts, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from glofnd_hf.eval.distributed import broadcast_from_main

    adapter, shared = make_evaluator(folder, opts.batch_size, distributed=True)
    _, alone = make_evaluator(folder, opts.batch_size, distributed=False)

    def run(mode: str) -> dict:
        if mode == "split":
            return shared(adapter)
        if mode == "every":
            metrics = alone(adapter)
            dist.barrier()  # done when the slowest process is
            return metrics
        return broadcast_from_main(alone(adapter) if rank == 0 else None)

    for mode in MODES:  # warm-up
        run(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    metrics: dict[str, dict] = {}
    order = random.Random(0)
    for _ in range(opts.repeats):
        modes = list(MODES)
        order.shuffle(modes)  # the same order on every rank (same seed)
        for mode in modes:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics[mode] = run(mode)
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    everyone = [None] * world
    dist.all_gather_object(everyone, cpu)
    busiest = {
        mode: [max(ranks[mode][i] for ranks in everyone) for i in range(opts.repeats)]
        for mode in MODES
    }
    if rank == 0:
        queue.put((times, busiest, metrics))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return f"{q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--images", type=int, default=357)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(
        f"images {opts.images}, batch {opts.batch_size}, image size {opts.image_size}, "
        f"width {opts.width}, layers {opts.layers}, {opts.repeats} rounds; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        save_inputs(folder, opts.images, opts.image_size, opts.width, opts.layers)
        rows = []
        reference = None
        for threads in opts.threads:
            opts.threads = threads
            times, cpu, metrics = one_process(folder, opts)
            reference = reference or metrics
            assert metrics == reference, "one process: metrics differ between thread counts"
            rows.append((f"one process, {threads} thread(s)", times, cpu))
        queue = mp.get_context("spawn").Queue()
        mp.start_processes(
            worker,
            args=(opts.processes, free_port(), folder, opts, queue),
            nprocs=opts.processes,
            join=True,
            start_method="spawn",
        )
        times, cpu, metrics = queue.get()
        for mode in MODES:
            assert metrics[mode] == reference, f"{mode}: metrics differ from one process"
            rows.append((f"{opts.processes} processes, {LABELS[mode]}", times[mode], cpu[mode]))
    print(f"load average at end {os.getloadavg()[0]:.2f}; every mode gave the same metrics")
    print("| setup | wall s, median [quartiles] | CPU s of the busiest process |")
    print("|---|---|---|")
    for label, values, cpu_values in rows:
        print(f"| {label} | {summary(values)} | {statistics.median(cpu_values):.3f} |")


if __name__ == "__main__":
    main()
