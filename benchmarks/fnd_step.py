"""Time one training-loss step (detector update + loss forward + backward) against N.

For every data set size N, detector (``none``, ``glofnd`` with its default pinball rule,
``glofnd_tail`` with the tail rule, ``glofnd_adam`` with the Adam rule, ``batch_quantile``) and loss
(``clip`` = ClipLoss, ``global`` = GlobalContrastiveLoss) this measures the wall time of

    loss(image_embeds, text_embeds, logit_scale, index, epoch=...).loss.backward()

with leaf embeddings (requires_grad) of this process's local batch. It does so in two process
setups: one process (local batch = global batch) and ``--processes`` processes under
torch.distributed (gloo on CPU, nccl on GPU), where every rank's anchors meet the gathered
global batch. The ratio column compares with the plain CLIP loss (``none``, ``clip``) at the
same N, in the same setup and the same round-robin, so drift of a shared machine hits both.

Keeping the cost independent of N
---------------------------------
* The per-sample state (GloFND thresholds + Adam moments, the global loss's ``u``) lives in
  ``PerSampleTable``s. A step touches only the rows of the batch: reads are one
  ``index_select`` and writes one ``index_copy_`` of the touched rows (O(batch)), nothing in
  the step is O(N).
* Dataset indices are drawn before the timed region, per step, without replacement within the
  (global) step, in O(B log B): B sorted draws from [0, N - B] plus 0..B-1 are distinct, then
  shuffled. No ``randperm(N)``.
* Each rank holds a full copy of the state (every rank applies the same update), so the host
  memory of the multi-process setup is ``processes`` times the per-process figure. One ``u``
  table per process serves the three detectors of the global loss (the detector is swapped on
  the loss object), which keeps the N = 10^8 run at 40 bytes per sample per process.

On CUDA the embeddings sit on the GPU; the state sits on the GPU for N <= 10^7 and in pinned
host memory above; the clock is read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _machine import cpu_model, mem_available_bytes

from glofnd_hf.fnd import GloFNDConfig, GloFNDDetector, build_detector
from glofnd_hf.fnd.thresholds import AdamRule, PinballRule, TailRule
from glofnd_hf.losses import ClipLoss, GlobalContrastiveLoss

DETECTORS = ("none", "glofnd", "glofnd_tail", "glofnd_adam", "batch_quantile")
# Detector variants timed beside the defaults: name -> (registered detector, config changes).
# glofnd_tail and glofnd_adam are the rules the pinball rule replaced as the default (same
# step otherwise).
VARIANTS = {
    "glofnd_tail": ("glofnd", {"update_rule": "tail"}),
    "glofnd_adam": ("glofnd", {"update_rule": "adam"}),
}
LOSSES = ("clip", "global")
BASELINE = ("none", "clip")
GPU_STATE_MAX_N = 10**7
EPOCH = 0.5  # past every start epoch of the default config: update and mask are active


@dataclass
class Row:
    setup: str
    n: int
    detector: str
    loss: str
    times_ms: list[float] | None  # None: skipped
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    def quartiles(self) -> tuple[float, float]:
        if not self.times_ms or len(self.times_ms) < 2:
            return self.median, self.median
        q = statistics.quantiles(self.times_ms, n=4, method="inclusive")
        return q[0], q[2]


# -- helpers ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'1e6', '10**6', '1000000' -> 1000000."""
    text = text.strip()
    if "**" in text:
        base, exp = text.split("**")
        return int(base) ** int(exp)
    value = float(text)
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer size: {text!r}")
    return int(value)


def fmt_n(n: int) -> str:
    exp = len(str(n)) - 1
    return f"10^{exp}" if n == 10**exp else str(n)


def draw_indices(num_samples: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct integers in [0, num_samples) in random order; O(count log count)."""
    if count > num_samples:
        raise ValueError(f"cannot draw {count} distinct indices from {num_samples}")
    base = torch.randint(0, num_samples - count + 1, (count,), generator=generator)
    distinct = base.sort().values + torch.arange(count)
    return distinct[torch.randperm(count, generator=generator)]


def _build(name: str, **kwargs):
    """Detector ``name`` of DETECTORS, a variant's config changes applied."""
    registered, changes = VARIANTS.get(name, (name, {}))
    return build_detector(registered, config=GloFNDConfig(**changes), **kwargs)


def state_bytes_per_sample() -> tuple[int, int]:
    """(GloFND threshold tables of every timed rule, global-loss u table) bytes per sample,
    from real objects."""
    thr = 0
    for d in DETECTORS:
        detector = _build(d, num_samples=1)
        if isinstance(detector, GloFNDDetector):
            thr += detector.state.table.data.element_size() * detector.state.table.data.numel()
    loss = GlobalContrastiveLoss(1)
    return thr, loss.u.data.element_size() * loss.u.data.numel()


def state_placement(n: int, compute: torch.device) -> tuple[torch.device, bool]:
    """Where the per-sample state lives, and whether it is pinned."""
    if compute.type == "cuda" and n <= GPU_STATE_MAX_N:
        return compute, False
    return torch.device("cpu"), compute.type == "cuda"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stderr_log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the measurement (runs in every process of a setup) -------------------------------------


def measure(
    args: argparse.Namespace, compute: torch.device, repeats: int, setup: str, log
) -> list[Row]:
    """Time every (N, detector, loss) of one process setup, interleaved round by round.

    The states of all N live at once, and each round runs one step of every configuration in
    a fresh random order (the same order on every rank): load from other programs on a
    shared machine then hits every N and every detector alike instead of whichever block
    happened to run at the time.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    b, dim = args.local_batch, args.dim
    global_b = b * world
    thr_bps, u_bps = state_bytes_per_sample()
    combos = [(d, lo) for d in DETECTORS for lo in LOSSES]
    rows: list[Row] = []

    # -- build the state of every N (host-memory guard: all ranks hold a full copy) --------
    configs = []  # (n, detector name, loss name, loss object, detector object)
    for n in args.sizes:
        if global_b > n:
            rows += [Row(setup, n, d, lo, None, f"global batch {global_b} > N") for d, lo in combos]
            continue
        state_device, pin = state_placement(n, compute)
        need = n * (thr_bps + u_bps) * world if state_device.type == "cpu" else 0
        if world > 1:
            dist.barrier()  # the other ranks' earlier tables are allocated: MemAvailable is fair
        avail = mem_available_bytes()
        skip = torch.tensor(
            int(avail is not None and need > avail - args.mem_margin_gb * 2**30), device=compute
        )
        if world > 1:  # every rank must agree, or the collectives would hang
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        if skip.item():
            note = (
                f"skipped: needs {need / 2**30:.1f} GiB more host memory "
                f"({world} process(es) x {fmt_n(n)} x {thr_bps + u_bps} B)"
            )
            rows += [Row(setup, n, d, lo, None, note) for d, lo in combos]
            log(f"[{setup}] N={fmt_n(n)}: {note}")
            continue
        t_build = time.perf_counter()
        detectors = {
            d: _build(d, num_samples=n, device=state_device, pin_memory=pin) for d in DETECTORS
        }
        # One global loss (one u table) for all detectors of this N: the detector is swapped
        # in before each step. ClipLoss keeps no state of its own.
        global_loss = GlobalContrastiveLoss(
            n, detectors["glofnd"], device=state_device, pin_memory=pin
        )
        for d, lo in combos:
            loss = ClipLoss(detectors[d]) if lo == "clip" else global_loss
            configs.append((n, d, lo, loss, detectors[d]))
        log(
            f"[{setup}] N={fmt_n(n)}: state on {state_device}{' (pinned)' if pin else ''}, "
            f"built in {time.perf_counter() - t_build:.1f} s"
        )
    if not configs:
        return rows

    # -- inputs, all made before any timing ------------------------------------------------
    steps = args.warmup + repeats
    torch.manual_seed(1234 + rank)
    pool = [
        (
            torch.randn(b, dim, device=compute, requires_grad=True),
            torch.randn(b, dim, device=compute, requires_grad=True),
        )
        for _ in range(4)
    ]
    logit_scale = torch.tensor(1.0 / 0.07, device=compute, requires_grad=True)
    # Same generator on every rank: the same global batch (each rank takes its slice) and the
    # same order of configurations, which the collectives need.
    gen = torch.Generator().manual_seed(20240607)
    index_sets = [
        [draw_indices(n, global_b, gen)[rank * b : (rank + 1) * b].to(compute) for n, *_ in configs]
        for _ in range(steps)
    ]
    orders = [torch.randperm(len(configs), generator=gen).tolist() for _ in range(steps)]

    # -- the timed rounds --------------------------------------------------------------------
    times: list[list[float]] = [[] for _ in configs]
    t_start = time.perf_counter()
    for s in range(steps):
        for c in orders[s]:
            _, _, _, loss, detector = configs[c]
            loss.detector = detector
            image, text = pool[(s + c) % len(pool)]
            image.grad = text.grad = logit_scale.grad = None
            if world > 1:
                dist.barrier()
            sync(compute)
            t0 = time.perf_counter()
            out = loss(image, text, logit_scale, index_sets[s][c], epoch=EPOCH)
            out.loss.backward()
            sync(compute)
            elapsed = time.perf_counter() - t0
            if s >= args.warmup:
                times[c].append(elapsed * 1e3)
        if s + 1 == args.warmup or (s + 1 - args.warmup) % 10 == 0 or s + 1 == steps:
            log(
                f"[{setup}] round {s + 1}/{steps} ({args.warmup} warm-up), "
                f"{time.perf_counter() - t_start:.0f} s"
            )

    for c, (n, d, lo, _, _) in enumerate(configs):
        t = torch.tensor(times[c], dtype=torch.float64, device=compute)
        if world > 1:  # a distributed step lasts as long as its slowest rank
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(Row(setup, n, d, lo, t.cpu().tolist()))
    order = {n: i for i, n in enumerate(args.sizes)}
    combo_order = {c: i for i, c in enumerate(combos)}
    rows.sort(key=lambda r: (order[r.n], combo_order[(r.detector, r.loss)]))
    return rows


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    compute = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    try:
        setup = f"{world} proc x {args.local_batch} = {world * args.local_batch}"
        log = stderr_log if rank == 0 else (lambda msg: None)
        rows = measure(args, compute, args.dist_repeats, setup, log)
        if rank == 0:  # plain dicts: the class lives in a __main__ the parent cannot import
            queue.put([vars(r) for r in rows])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(args: argparse.Namespace) -> list[Row]:
    world = args.processes
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        print(
            f"note: {world} processes need {world} GPUs with nccl, found "
            f"{torch.cuda.device_count()}: multi-process setup skipped",
            file=sys.stderr,
        )
        return []
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(_worker, args=(world, free_port(), args, queue), nprocs=world, join=False)
    rows = None
    while True:
        if rows is None and not queue.empty():
            rows = queue.get()
        if context.join(timeout=0.5):
            break
    if rows is None and not queue.empty():
        rows = queue.get()
    return [Row(**r) for r in rows or []]


# -- report ---------------------------------------------------------------------------------


def print_tables(rows: list[Row], args: argparse.Namespace) -> None:
    thr_bps, u_bps = state_bytes_per_sample()
    print("\n### State memory (per process; every rank holds a full copy)\n")
    print(
        f"bytes per sample: GloFND thresholds tables {thr_bps} (pinball rule: 2 sides x "
        f"[{', '.join(PinballRule.columns)}], tail rule: 2 sides x "
        f"[{', '.join(TailRule.columns)}], Adam rule: 2 sides x [{', '.join(AdamRule.columns)}], "
        f"float32), global-loss u "
        f"{u_bps} (2 sides float32), total {thr_bps + u_bps}\n"
    )
    print("| N | thresholds table | u table | total per process |")
    print("|---:|---:|---:|---:|")
    for n in args.sizes:
        print(
            f"| {fmt_n(n)} | {_mib(n * thr_bps)} | {_mib(n * u_bps)} | "
            f"{_mib(n * (thr_bps + u_bps))} |"
        )

    for setup in dict.fromkeys(r.setup for r in rows):
        part = [r for r in rows if r.setup == setup]
        print(f"\n### {setup} (local x processes = global batch)\n")
        print("| N | detector | loss | median ms/step | p25-p75 ms | ratio to none/clip |")
        print("|---:|---|---|---:|---:|---:|")
        for r in part:
            if r.times_ms is None:
                print(f"| {fmt_n(r.n)} | {r.detector} | {r.loss} | {r.note} | | |")
                continue
            base = next(x for x in part if x.n == r.n and (x.detector, x.loss) == BASELINE)
            lo, hi = r.quartiles()
            print(
                f"| {fmt_n(r.n)} | {r.detector} | {r.loss} | {r.median:.2f} | "
                f"{lo:.2f}-{hi:.2f} | {r.median / base.median:.2f} |"
            )
        measured = sorted({r.n for r in part if r.times_ms})
        if len(measured) >= 2:
            lo_n, hi_n = measured[0], measured[-1]
            print(f"\nmedian at N = {fmt_n(hi_n)} / median at N = {fmt_n(lo_n)}:")
            for d in DETECTORS:
                for lo in LOSSES:
                    a = next(r for r in part if r.n == lo_n and (r.detector, r.loss) == (d, lo))
                    z = next(r for r in part if r.n == hi_n and (r.detector, r.loss) == (d, lo))
                    print(f"  {d}/{lo}: {z.median / a.median:.2f}")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:,.2f} GiB"


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[10**4, 10**5, 10**6, 10**7, 10**8],
        help="data set sizes N (e.g. 1e4 1e6 10**8)",
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--local-batch", type=int, default=256)
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="processes of the distributed setup (<= 1: single process only)",
    )
    parser.add_argument(
        "--repeats", type=int, default=40, help="timed steps per configuration, single process"
    )
    parser.add_argument(
        "--dist-repeats",
        type=int,
        default=None,
        help="timed steps per configuration, distributed (default: repeats / 2)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed rounds (one step of every configuration) before timing",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (0: all cores single, cores / processes distributed)",
    )
    parser.add_argument(
        "--mem-margin-gb",
        type=float,
        default=3.0,
        help="skip an N whose host state would leave less than this available",
    )
    parser.add_argument("--no-single", action="store_true", help="skip the single-process setup")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: N 1e4 1e5, dim 64, batch 32, 2 processes, 3 steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.dim, args.local_batch = [10**4, 10**5], 64, 32
        args.processes, args.repeats, args.warmup = 2, 3, 1
        args.dist_repeats = args.dist_repeats or 3
    if args.dist_repeats is None:
        args.dist_repeats = max(1, args.repeats // 2)

    cuda = torch.cuda.is_available()
    compute = torch.device("cuda", 0) if cuda else torch.device("cpu")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores"
        + (f", GPU {torch.cuda.get_device_name(0)}" if cuda else ", no GPU")
    )
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"settings: sizes {[fmt_n(n) for n in args.sizes]}, dim {args.dim}, local batch "
        f"{args.local_batch}, processes {args.processes}, repeats {args.repeats} "
        f"(distributed {args.dist_repeats}), warmup rounds {args.warmup}, epoch {EPOCH}"
    )
    sys.stdout.flush()

    started = time.perf_counter()
    load_start = _loadavg()
    cores = max(1, min(os.cpu_count() or 1, args.processes))
    rows: list[Row] = []
    if not args.no_single:
        if args.threads:
            torch.set_num_threads(args.threads)
        setup = f"1 proc x {args.local_batch} = {args.local_batch}"
        rows += measure(args, compute, args.repeats, setup, stderr_log)
    if args.processes > 1:
        rows += run_distributed(args)
    print_tables(rows, args)
    print(
        f"\ntotal wall time {time.perf_counter() - started:.0f} s; load average (1, 5, 15 min) "
        f"at start {load_start}, at end {_loadavg()} (this run itself adds ~1 to ~{cores})"
    )


if __name__ == "__main__":
    main()
