"""Per-sample state replicated against sharded over processes (issue 30): memory, step time
and bytes sent.

W gloo processes on the CPU each build the loss the trainer builds for ``loss_type:
fastclip`` with the GloFND detector and its default rule (``GloFNDTrainingArguments`` and
``loss_factory.build_contrastive_loss``, as the trainer does), once with ``state_sharding:
replicated`` and once with ``sharded``, for N samples, and measure:

* state memory per process: VmRSS (``/proc/self/status``) after building the loss minus
  before (the tables are filled when built, so their pages are resident), against the
  formula N x bytes per sample (replicated) and ceil(N / W) x bytes per sample (sharded);
* the step time of the loss forward + backward on random normalised embeddings (global batch
  1024, local 1024 / W, dim 512, random dataset indices in [0, N)), the slowest process's,
  median over the rounds; the two settings alternate round by round in a random order (the
  same on every process), so load from other jobs hits both alike; and the reads alone (the
  global batch's rows of every table, read together as a step reads them: sharded, the one
  all-reduce it adds);
* bytes per step and process: every collective the step runs (forward and backward, the
  functional collectives of the embedding gather included) is seen by a dispatch mode that
  tallies the tensors each process hands in (payload) and what a ring algorithm sends for it;
  the sharded setting's extra is its total minus replicated's.

    python benchmarks/sharded_state.py                  # N = 10^6, 10^7; W = 2, 4
    python benchmarks/sharded_state.py --quick          # N = 10^5, W = 2, few rounds
    python benchmarks/sharded_state.py --sizes 1e6 --processes 4 --repeats 200
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._collectives import CollectiveBytes, tensor_bytes  # noqa: E402
from benchmarks._machine import cpu_model, log, mem_available_bytes  # noqa: E402
from benchmarks.comm import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARDINGS = ("replicated", "sharded")
EPOCH = 0.5  # past every start epoch of the defaults: thresholds update and mask
MEM_MARGIN = 2 * 2**30  # host memory left free beside the run's tables


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def training_args(sharding: str, output_dir: str):
    from glofnd_hf.args import GloFNDTrainingArguments

    return GloFNDTrainingArguments(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        loss_type="fastclip",
        detector="glofnd",
        state_sharding=sharding,
    )


def build_loss(sharding: str, n: int, output_dir: str):
    """The loss the trainer builds, and what the arguments count per sample and process."""
    from glofnd_hf.loss_factory import build_contrastive_loss

    args = training_args(sharding, output_dir)
    loss = build_contrastive_loss(args, n, "cpu")
    return loss, args.state_bytes_per_sample(), args.state_rows_per_process(n)


def state_tables(loss) -> list:
    """The per-sample tables of the loss: its detector's and its ``u``."""
    tables = list(loss.shard_tables().values())
    u = getattr(loss, "u", None)
    return tables + ([u] if u is not None and all(u is not t for t in tables) else [])


def table_bytes(loss) -> int:
    """Bytes of the per-sample tables the loss holds here (scratch and padding rows too)."""
    return sum(tensor_bytes(getattr(t, "storage", t.data)) for t in state_tables(loss))


def build_measured(n: int, output_dir: str) -> tuple[dict, dict]:
    """Both losses of N samples, each built between two RSS readings (sharded first: a
    later, larger build cannot reuse memory a smaller one freed)."""
    for sharding in SHARDINGS:  # first builds load lazily imported code: not counted
        build_loss(sharding, 4096, output_dir)
    gc.collect()
    losses, memory = {}, {}
    for sharding in reversed(SHARDINGS):
        dist.barrier()
        before = rss_bytes()
        loss, per_sample, rows = build_loss(sharding, n, output_dir)
        after = rss_bytes()
        losses[sharding] = loss
        memory[sharding] = {
            "rss_delta": after - before,
            "table_bytes": table_bytes(loss),
            "formula": rows * per_sample,
            "rows": rows,
            "bytes_per_sample": per_sample,
        }
    return losses, memory


def make_inputs(n: int, world: int, rank: int, steps: int, opts, seed: int = 0):
    """A pool of normalised embedding pairs (leaves) and each step's local index slice (the
    same global batch on every process)."""
    batch, dim = opts.global_batch, opts.dim
    b = batch // world
    torch.manual_seed(1234 + rank)
    pool = [
        tuple(
            torch.nn.functional.normalize(torch.randn(b, dim), dim=-1).requires_grad_()
            for _ in range(2)
        )
        for _ in range(4)
    ]
    gen = torch.Generator().manual_seed(seed)
    index = [
        torch.randint(0, n, (batch,), generator=gen)[rank * b : (rank + 1) * b]
        for _ in range(steps)
    ]
    orders = [torch.randperm(len(SHARDINGS), generator=gen).tolist() for _ in range(steps)]
    return pool, index, orders


def step(loss, image, text, index) -> None:
    image.grad = text.grad = None
    scale = torch.tensor(1.0 / 0.07, requires_grad=True)
    loss(image, text, scale, index, epoch=EPOCH).loss.backward()


def time_rounds(losses: dict, n: int, world: int, rank: int, opts) -> dict[str, list[float]]:
    """Step times (ms, the slowest process's) per setting, rounds alternating the settings."""
    steps = opts.warmup + opts.repeats
    pool, index, orders = make_inputs(n, world, rank, steps, opts)
    times: dict[str, list[float]] = {s: [] for s in SHARDINGS}
    for s in range(steps):
        for which in orders[s]:
            sharding = SHARDINGS[which]
            image, text = pool[(s + which) % len(pool)]
            dist.barrier()
            start = time.perf_counter()
            step(losses[sharding], image, text, index[s])
            if s >= opts.warmup:
                times[sharding].append((time.perf_counter() - start) * 1e3)
    return slowest(times)


def time_reads(losses: dict, n: int, world: int, opts) -> dict[str, list[float]]:
    """The reads alone (ms, the slowest process's): one gather of the global batch's rows
    from every table, what a step reads (sharded: the all-reduces the step adds)."""
    from glofnd_hf.fnd.table import gather_together

    tables = {sharding: state_tables(loss) for sharding, loss in losses.items()}
    gen = torch.Generator().manual_seed(2)
    times: dict[str, list[float]] = {s: [] for s in SHARDINGS}
    for s in range(opts.warmup + opts.repeats):
        index = torch.randint(0, n, (opts.global_batch,), generator=gen)
        for which in torch.randperm(len(SHARDINGS), generator=gen).tolist():
            sharding = SHARDINGS[which]
            dist.barrier()
            start = time.perf_counter()
            gather_together(tables[sharding], index, index.device)
            for table in tables[sharding]:
                table.gather(index)
            if s >= opts.warmup:
                times[sharding].append((time.perf_counter() - start) * 1e3)
    return slowest(times)


def slowest(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round, the slowest process's time (a collective step lasts that long)."""
    out = {}
    for sharding, values in times.items():
        values = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        out[sharding] = values.tolist()
    return out


def count_bytes(losses: dict, n: int, world: int, rank: int, opts) -> dict:
    """Collectives of one step of each setting (untimed: the mode slows every op)."""
    pool, index, _ = make_inputs(n, world, rank, 1, opts, seed=1)
    out = {}
    for sharding in SHARDINGS:
        with CollectiveBytes() as mode:
            step(losses[sharding], *pool[0], index[0])
        out[sharding] = mode.summary(world)
    return out


def worker(rank: int, world: int, port: int, n: int, opts, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            losses, memory = build_measured(n, output_dir)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, memory)
            times = time_rounds(losses, n, world, rank, opts)
            reads = time_reads(losses, n, world, opts)
            collectives = count_bytes(losses, n, world, rank, opts)
        if rank == 0:
            queue.put(
                {"memory": per_rank, "step_ms": times, "read_ms": reads, "bytes": collectives}
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_setup(world: int, n: int, opts) -> dict:
    """One spawn of ``world`` processes measuring N samples; the raw figures of rank 0."""
    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(worker, args=(world, free_port(), n, opts, queue), nprocs=world, join=False)
    result = None
    while not context.join(timeout=0.5):
        if result is None and not queue.empty():
            result = queue.get()
    if result is None and not queue.empty():
        result = queue.get()
    if result is None:
        raise RuntimeError(f"{world} processes at N = {n}: no result")
    return result


def summarize(world: int, n: int, raw: dict) -> dict:
    """Per setting: the largest process's RSS difference against the formula, the median
    step time with quartiles, and bytes per step; the sharded setting's extra bytes."""
    out: dict = {"processes": world, "num_samples": n, "settings": {}}
    for sharding in SHARDINGS:
        per_rank = [m[sharding] for m in raw["memory"]]
        rss = [m["rss_delta"] for m in per_rank]
        times = raw["step_ms"][sharding]
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times * 3)
        out["settings"][sharding] = {
            "rss_delta_per_rank": rss,
            "rss_delta_max": max(rss),
            "table_bytes_max": max(m["table_bytes"] for m in per_rank),
            "formula_bytes": per_rank[0]["formula"],
            "bytes_per_sample": per_rank[0]["bytes_per_sample"],
            "step_ms": times,
            "step_ms_median": statistics.median(times),
            "step_ms_quartiles": [q1, q3],
            "collectives": raw["bytes"][sharding],
            "read_ms": raw["read_ms"][sharding],
            "read_ms_median": statistics.median(raw["read_ms"][sharding]),
        }
    rep, shd = out["settings"]["replicated"], out["settings"]["sharded"]
    bps = rep["bytes_per_sample"]
    out["sharded_rss_over_n_by_world"] = shd["rss_delta_max"] / (n / world * bps)
    out["replicated_rss_over_n"] = rep["rss_delta_max"] / (n * bps)
    out["time_ratio"] = shd["step_ms_median"] / rep["step_ms_median"]
    out["time_ratio_ci95"] = ratio_interval(rep["step_ms"], shd["step_ms"])
    out["extra_read_ms"] = shd["read_ms_median"] - rep["read_ms_median"]
    out["extra_read_share"] = out["extra_read_ms"] / rep["step_ms_median"]
    a, b = rep["collectives"], shd["collectives"]
    out["extra_bytes"] = {
        "payload": b["payload_total"] - a["payload_total"],
        "ring_sent": b["ring_sent_total"] - a["ring_sent_total"],
        "calls": {k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()},
    }
    return out


def ratio_interval(base: list[float], other: list[float], resamples: int = 2000) -> list[float]:
    """95 % bootstrap interval of median(other) / median(base), resampling whole rounds (a
    round times both settings, so load that hits a round hits both)."""
    if len(base) < 2:
        return [math.nan, math.nan]
    rng = random.Random(0)
    rounds = range(len(base))
    ratios = []
    for _ in range(resamples):
        pick = [rng.choice(rounds) for _ in rounds]
        ratios.append(
            statistics.median(other[i] for i in pick) / statistics.median(base[i] for i in pick)
        )
    quantiles = statistics.quantiles(ratios, n=40)  # 2.5 % steps
    return [quantiles[0], quantiles[-1]]


UNITS = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)]


def size(nbytes: float, digits: int = 4) -> str:
    return next(f"{nbytes / u:.{digits}g} {k}" for k, u in UNITS if nbytes >= u or k == "KB")


def fmt_n(n: int) -> str:
    exp = round(math.log10(n))
    return f"10^{exp}" if n == 10**exp else f"{n:,}"


COLUMNS = (
    "W|N|RSS replicated (N x bytes)|RSS sharded (N/W x bytes)|sharded RSS / (N/W x bytes)"
    "|step ms replicated|step ms sharded|time sharded / replicated [95 % interval]"
    "|reads alone ms, replicated / sharded (extra / step)|bytes common, payload / ring"
    "|sharded extra, payload / ring"
).split("|")


def markdown_row(r: dict) -> str:
    rep, shd = r["settings"]["replicated"], r["settings"]["sharded"]
    n_w = r["num_samples"] / r["processes"] * rep["bytes_per_sample"]
    common, ci = rep["collectives"], r["time_ratio_ci95"]
    cells = [
        *(str(r["processes"]), fmt_n(r["num_samples"])),
        f"{size(rep['rss_delta_max'])} ({size(rep['formula_bytes'])})",
        f"{size(shd['rss_delta_max'])} ({size(n_w)})",
        f"{r['sharded_rss_over_n_by_world']:.3f}",
        *(f"{rep['step_ms_median']:.1f}", f"{shd['step_ms_median']:.1f}"),
        f"{r['time_ratio']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]",
        f"{rep['read_ms_median']:.2f} / {shd['read_ms_median']:.2f} "
        f"({100 * r['extra_read_share']:.1f} %)",
        f"{common['payload_total']:,} / {common['ring_sent_total']:,}",
        f"{r['extra_bytes']['payload']:,} / {r['extra_bytes']['ring_sent']:,}",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in runs:
        if "skipped" in r:
            lines.append(f"| {r['processes']} | {fmt_n(r['num_samples'])} | {r['skipped']} |")
        else:
            lines.append(markdown_row(r))
    return "\n".join(lines)


DATA_SETS = {"CC3M": 3.3e6, "LAION-400M": 4.0e8, "LAION-2B": 2.32e9, "DataComp-12.8B": 1.28e10}


def measured_bytes_per_sample(runs: list[dict]) -> float:
    """The larger of the two settings' RSS difference per row held, at the largest N."""
    run = max((r for r in runs if "settings" in r), key=lambda r: r["num_samples"])
    return max(
        s["rss_delta_max"] / (s["formula_bytes"] / s["bytes_per_sample"])
        for s in run["settings"].values()
    )


def scale_table(per_sample: float, per_node: int = 8) -> str:
    """State memory per process and per node for the data sets at 8, 64 and 512 processes."""
    lines = [
        "| data set | N | processes | replicated, per process | replicated, per node "
        "| sharded, per process | sharded, per node |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n in DATA_SETS.items():
        count = f"{n / 1e9:g} B" if n >= 1e9 else f"{n / 1e6:g} M"
        for world in (8, 64, 512):
            rep, shd = n * per_sample, math.ceil(n / world) * per_sample
            lines.append(
                f"| {name} | {count} | {world} | {size(rep, 3)} | {size(per_node * rep, 3)} "
                f"| {size(shd, 3)} | {size(per_node * shd, 3)} |"
            )
    return "\n".join(lines)


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_available_bytes": mem_available_bytes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_start": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def default_bytes_per_sample() -> int:
    """GloFND's default rule and FastCLIP's u, from the registries (no Trainer imports)."""
    from glofnd_hf.fnd import registry as detectors
    from glofnd_hf.losses import registry as losses

    return (
        detectors.get("glofnd").bytes_per_sample() + losses.get("fastclip").state_bytes_per_sample
    )


def fits(world: int, n: int, bytes_per_sample: int) -> str | None:
    """Why both settings of N in ``world`` processes would not fit in host memory, or None."""
    need = world * (n + -(-n // world)) * bytes_per_sample
    avail = mem_available_bytes()
    if avail is not None and need > avail - MEM_MARGIN:
        return (
            f"skipped: {need / 2**30:.1f} GiB of tables needed, {avail / 2**30:.1f} GiB available"
        )
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="N (10^6 10^7)")
    parser.add_argument("--processes", type=int, nargs="+", default=None, help="W (2 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (60)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (5)")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="N = 10^5, W = 2, 5 rounds")
    parser.add_argument("--output", default=None, help="the JSON (default results/...)")
    opts = parser.parse_args(argv)
    quick = opts.quick
    opts.sizes = [int(s) for s in opts.sizes or ([1e5] if quick else [1e6, 1e7])]
    opts.processes = opts.processes or ([2] if quick else [2, 4])
    opts.repeats = opts.repeats or (5 if quick else 60)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if quick else 5)
    name = "sharded_state_quick.json" if quick else "sharded_state.json"
    opts.output = Path(opts.output) if opts.output else RESULTS / name
    batch = opts.global_batch
    if any(batch % w for w in opts.processes) or any(n < batch for n in opts.sizes):
        parser.error(f"W must divide the global batch {batch} and N must be at least {batch}")
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    machine = machine_info()
    per_sample = default_bytes_per_sample()
    runs = []
    for world in opts.processes:
        for n in opts.sizes:
            skip = fits(world, n, per_sample)
            if skip:
                runs.append({"processes": world, "num_samples": n, "skipped": skip})
                log(f"W={world} N={fmt_n(n)}: {skip}")
                continue
            start = time.perf_counter()
            runs.append(summarize(world, n, run_setup(world, n, opts)))
            log(f"W={world} N={fmt_n(n)}: {time.perf_counter() - start:.0f} s")
    machine["load_avg_end"] = list(os.getloadavg())
    results = {
        "machine": machine,
        "settings": {
            "loss_type": "fastclip",
            "detector": "glofnd (default rule)",
            "bytes_per_sample": per_sample,
            "global_batch": opts.global_batch,
            "dim": opts.dim,
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "quick": opts.quick,
            "threads_per_process": 1,
        },
        "runs": runs,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, gloo, "
        f"1 thread per process; load average {machine['load_avg_start'][0]:.2f} at start, "
        f"{machine['load_avg_end'][0]:.2f} at end; {per_sample} bytes per sample"
    )
    print(markdown_table(runs))
    if any("settings" in r for r in runs):
        measured = measured_bytes_per_sample(runs)
        print(f"\nScaled with {measured:.2f} bytes per sample (measured), 8 processes a node:\n")
        print(scale_table(measured))
    return results


if __name__ == "__main__":
    main()
