"""Peak memory of one training step with detector ``none`` against ``glofnd``, and the
per-sample state that GloFND adds.

Two measurements, each for batch 256 / 1024 / 4096 (``--batches``):

* ``loss`` -- the loss part of a step: image and text embeddings of dim 512 as leaf tensors
  (requires_grad) and a logit scale, then ``ClipLoss`` / ``GlobalContrastiveLoss`` forward and
  backward. The peak counts everything the loss allocates on top of its inputs (similarities,
  masks, detector temporaries, autograd buffers, the embeddings' gradients). Default on CPU.
* ``step`` -- a full ``GloFNDTrainer`` step (``training_step`` + AdamW step + ``zero_grad``)
  on synthetic data: ViT-B/32-sized ``CLIPModel`` in bf16 on CUDA, the tiny HF CLIP on CPU.
  The peak is above what is held between steps (weights, AdamW moments, per-sample state),
  which is reported beside it. Default on CUDA (with ``loss``). Beside the plain steps, the
  cached loss (``contrastive_chunk_size: --chunk``, GloFND) at every batch above the chunk:
  its peak is set by a chunk's activations plus the loss on the whole batch.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus the allocation before the step. On CPU neither RSS (the allocator keeps freed pages)
nor ``tracemalloc`` (blind to torch's allocator) works; the step runs under
``torch.profiler`` with ``profile_memory=True`` and the peak is the largest "Total Allocated"
of the CPU allocator's memory events -- the running sum of the bytes allocated and not yet
freed since profiling started. One unmeasured step runs first (lazy allocations, AdamW
state); of ``--repeats`` measured steps the smallest peak is kept (CPU GEMM libraries add a
few MiB of scratch buffers now and then).

The per-sample state (allocated once, before any step, so outside the peaks above) is read
off real objects: ``table.data.element_size() * table.data.nelement() / N`` of the GloFND
``ThresholdState`` table and of the ``GlobalContrastiveLoss`` ``u`` table, with totals for
CC3M and LAION-400M. Writes ``benchmarks/results/memory.json``.

    python benchmarks/memory.py                       # CPU: loss part, 256/1024/4096
    python benchmarks/memory.py --what loss step      # on a GPU
    python benchmarks/memory.py --what step --batches 256 1024 4096 --chunk 256  # cached vs plain
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from _machine import cpu_model, log, mem_available_bytes
from torch.profiler import ProfilerActivity, profile

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GlobalContrastiveLoss

DETECTORS = ("none", "glofnd")
LOSSES = ("clip", "global", "hf_clip")  # hf_clip: transformers' CLIP loss (no detector)
NUM_SAMPLES = 10**6
DATASETS = {"CC3M": 3_318_333, "LAION-400M": 400_000_000}
RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"


# -- peak memory ----------------------------------------------------------------------------


def peak_bytes(fn: Callable[[], None], device: torch.device, repeats: int = 1) -> int:
    """Peak bytes allocated by ``fn`` on ``device`` above what was allocated before it; the
    smallest of ``repeats`` runs (CPU GEMM libraries add a few MiB of scratch now and then)."""
    return min(_peak_bytes(fn, device) for _ in range(max(1, repeats)))


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    cpu = [
        e["args"]
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
    ]
    return max((a["Total Allocated"] for a in cpu), default=0)


def held_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


# -- loss part ------------------------------------------------------------------------------


def make_loss(loss: str, detector: str, device: torch.device):
    det = build_detector(detector, num_samples=NUM_SAMPLES, config=GloFNDConfig(), device=device)
    if loss == "clip":
        return ClipLoss(det)
    return GlobalContrastiveLoss(NUM_SAMPLES, det, device=device)


def hf_clip_loss(image, text, scale, index, epoch):
    """transformers' CLIP loss as CLIPModel computes it from normalised embeddings."""
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return SimpleNamespace(loss=image_text_contrastive_loss(text @ image.t() * scale))


def loss_peak(
    loss, batch: int, dim: int, device: torch.device, gen: torch.Generator, repeats: int
) -> dict[str, int]:
    """Peak of one loss forward + backward (after an unmeasured one) above its inputs."""
    image = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    text = torch.randn(batch, dim, generator=gen).to(device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def step(index: torch.Tensor) -> None:
        image.grad = text.grad = scale.grad = None
        loss(image, text, scale, index, epoch=0.5).loss.backward()

    step(torch.randperm(NUM_SAMPLES, generator=gen)[:batch].to(device))  # warm-up
    index = torch.randperm(NUM_SAMPLES, generator=gen)[:batch].to(device)
    image.grad = text.grad = scale.grad = None
    return {
        "peak_bytes": peak_bytes(lambda: step(index), device, repeats),
        "input_bytes": 2 * batch * dim * image.element_size(),
    }


def measure_loss(opts: argparse.Namespace) -> list[dict]:
    device, dim = opts.device, opts.dim
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in opts.batches:
        # Rough upper bound of the loss's temporaries: measured peaks are 7-10 (2, b, b)
        # float32 tensors; allow 12.
        need = 12 * 2 * batch * batch * 4
        avail = mem_available_bytes() if device.type == "cpu" else None
        for loss_name in LOSSES:
            for detector in DETECTORS if loss_name != "hf_clip" else ("none",):
                row = {"what": "loss", "loss": loss_name, "detector": detector, "batch": batch}
                if avail is not None and need > avail - opts.mem_margin_gb * 2**30:
                    row["note"] = (
                        f"skipped: may need {need / 2**30:.1f} GiB, "
                        f"{avail / 2**30:.1f} GiB available"
                    )
                    log(f"[loss] {loss_name}/{detector} b={batch}: {row['note']}")
                    rows.append(row)
                    continue
                loss = (
                    hf_clip_loss
                    if loss_name == "hf_clip"
                    else make_loss(loss_name, detector, device)
                )
                row.update(loss_peak(loss, batch, dim, device, gen, opts.repeats))
                rows.append(row)
                log(
                    f"[loss] {loss_name}/{detector} b={batch}: peak "
                    f"{row['peak_bytes'] / 2**20:.1f} MiB"
                )
    return rows


# -- full step ------------------------------------------------------------------------------


def step_peak(
    trainer, model, optimizer, data: dict, device: torch.device, gen: torch.Generator, repeats: int
) -> dict[str, int | None]:
    """Peak of one full step (after an unmeasured one) above what is held between steps."""
    batch = data["input_ids"].shape[0]

    def step() -> None:
        index = torch.randperm(NUM_SAMPLES, generator=gen)[:batch].to(device)
        trainer.training_step(model, {**data, "dataset_index": index})
        optimizer.step()
        model.zero_grad()

    step()  # warm-up: AdamW state, lazy allocations
    held = held_bytes(device)
    return {"held_bytes": held, "peak_bytes": peak_bytes(step, device, repeats)}


def step_variants(opts: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(detector, chunk size) of each trainer: the plain loss with each detector, and the
    cached loss with GloFND in chunks of ``--chunk`` (0: none)."""
    variants: list[tuple[str, int | None]] = [(d, None) for d in DETECTORS]
    if opts.chunk:
        variants.append(("glofnd", opts.chunk))
    return variants


def measure_step(opts: argparse.Namespace) -> list[dict]:
    """GloFNDTrainer step (training_step + AdamW + zero_grad), none vs glofnd, plain and
    cached."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import build_adapter, copy_adapter, prepare, synthetic_batch

    from glofnd_hf.args import GloFNDTrainingArguments
    from glofnd_hf.trainer import GloFNDTrainer

    device = opts.device
    name = "vit-b32" if device.type == "cuda" else "tiny-hf"
    base = build_adapter(name, image_size=32)
    rows = []
    for detector, chunk in step_variants(opts):
        with tempfile.TemporaryDirectory() as output_dir:
            args = GloFNDTrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=max(opts.batches),
                learning_rate=1e-4,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
                bf16=device.type == "cuda",
                detector=detector,
                loss_type="clip",
                num_samples=NUM_SAMPLES,
                state_device="device",
                check_inputs=True,
                contrastive_chunk_size=chunk,
            )
            trainer = GloFNDTrainer(copy_adapter(base), args)
        model, optimizer = prepare(trainer)
        gen = torch.Generator().manual_seed(0)
        oom = False
        for batch in opts.batches:
            if chunk is not None and batch <= chunk:
                continue  # the plain loss
            row = {
                "what": "step",
                "model": name,
                "detector": detector,
                "chunk": chunk,
                "batch": batch,
                "precision": "bf16" if args.bf16 else "fp32",
            }
            if oom:
                row["note"] = "skipped after OOM at a smaller batch"
                rows.append(row)
                continue
            data = synthetic_batch(trainer.adapter, batch, device)
            try:
                row.update(step_peak(trainer, model, optimizer, data, device, gen, opts.repeats))
                log(
                    f"[step] {name}/{detector}{_cached(chunk)} b={batch}: peak "
                    f"{row['peak_bytes'] / 2**20:.1f} MiB above held"
                )
            except torch.OutOfMemoryError:
                oom = True
                row["note"] = "out of memory"
                log(f"[step] {name}/{detector}{_cached(chunk)} b={batch}: out of memory")
            rows.append(row)
            del data
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del trainer, model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _cached(chunk: int | None) -> str:
    return "" if chunk is None else f" cached M={chunk}"


# -- state ----------------------------------------------------------------------------------


def state_bytes_per_sample(n: int = 1000) -> dict[str, float]:
    """Bytes per sample of the per-sample tables, from the real objects."""
    det = build_detector("glofnd", num_samples=n)
    thr = det.state.table.data
    u = GlobalContrastiveLoss(n).u.data
    return {
        "glofnd_thresholds": thr.element_size() * thr.nelement() / n,
        "global_loss_u": u.element_size() * u.nelement() / n,
    }


# -- report ---------------------------------------------------------------------------------


def _mib(nbytes: float | None) -> str:
    return "" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:,.2f} GB"


def print_report(rows: list[dict], bps: dict[str, float]) -> None:
    loss_rows = [r for r in rows if r["what"] == "loss"]
    if loss_rows:
        print(
            "\n### Loss part: peak MiB above the inputs (embeddings dim "
            f"{loss_rows[0].get('dim', '')}; forward + backward)\n"
        )
        print(
            "| loss | batch | none | glofnd | glofnd - none | glofnd / none | transformers "
            "clip loss |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        hf = {r["batch"]: r.get("peak_bytes") for r in loss_rows if r["loss"] == "hf_clip"}
        for key in dict.fromkeys(
            (r["loss"], r["batch"]) for r in loss_rows if r["loss"] != "hf_clip"
        ):
            pair = {r["detector"]: r for r in loss_rows if (r["loss"], r["batch"]) == key}
            a, b = pair["none"].get("peak_bytes"), pair["glofnd"].get("peak_bytes")
            ref = _mib(hf.get(key[1])) if key[0] == "clip" else ""
            if a is None or b is None:
                note = pair["none"].get("note") or pair["glofnd"].get("note")
                print(f"| {key[0]} | {key[1]} | {_mib(a)} | {_mib(b)} | {note} | | {ref} |")
                continue
            print(
                f"| {key[0]} | {key[1]} | {_mib(a)} | {_mib(b)} | {_mib(b - a)} | "
                f"{b / a:.2f} | {ref} |"
            )
    all_step_rows = [r for r in rows if r["what"] == "step"]
    step_rows = [r for r in all_step_rows if r.get("chunk") is None]
    if step_rows:
        print(
            f"\n### Full step ({step_rows[0]['model']}, {step_rows[0]['precision']}): peak "
            "MiB above what is held between steps\n"
        )
        print("| batch | none peak | glofnd peak | glofnd - none | held none | held glofnd |")
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in dict.fromkeys(r["batch"] for r in step_rows):
            pair = {r["detector"]: r for r in step_rows if r["batch"] == batch}
            a, b = pair["none"].get("peak_bytes"), pair["glofnd"].get("peak_bytes")
            diff = (
                _mib(b - a)
                if a is not None and b is not None
                else (pair["none"].get("note") or pair["glofnd"].get("note") or "")
            )
            held = [pair[d].get("held_bytes") for d in DETECTORS]
            held = [_mib(h) if h is not None else "n/a" for h in held]
            print(f"| {batch} | {_mib(a)} | {_mib(b)} | {diff} | {held[0]} | {held[1]} |")
    print_cached_report(all_step_rows)

    thr, u = bps["glofnd_thresholds"], bps["global_loss_u"]
    print("\n### Per-sample state (allocated once; outside the peaks above)\n")
    print(
        f"bytes per sample: GloFND thresholds table {thr:g} (2 sides x [lambda, m, v, "
        f"visits] float32), global-loss u {u:g} (2 sides float32)\n"
    )
    print("| data set | N | GloFND + CLIP loss | GloFND + global loss (thresholds + u) |")
    print("|---|---:|---:|---:|")
    for name, n in DATASETS.items():
        print(f"| {name} | {n:,} | {_size(n * thr)} | {_size(n * (thr + u))} |")


def print_cached_report(step_rows: list[dict]) -> None:
    """The cached loss against the plain one (GloFND both): at the same global batch, and
    against a plain step at the chunk's batch (the memory the cached step aims at)."""
    cached = [r for r in step_rows if r.get("chunk") is not None]
    if not cached:
        return
    plain = {
        r["batch"]: r for r in step_rows if r.get("chunk") is None and r["detector"] == "glofnd"
    }
    print(
        f"\n### Cached loss (contrastive_chunk_size M, glofnd; {cached[0]['model']}, "
        f"{cached[0]['precision']}): peak MiB above what is held between steps\n"
    )
    print(
        "| batch | M | plain peak | cached peak | cached / plain | plain at batch M | cached / plain at M |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in cached:
        same = plain.get(row["batch"], {}).get("peak_bytes")
        small = plain.get(row["chunk"], {}).get("peak_bytes")
        peak = row.get("peak_bytes")
        print(
            f"| {row['batch']} | {row['chunk']} | {_mib(same) or plain.get(row['batch'], {}).get('note', '')} "
            f"| {_mib(peak) or row.get('note', '')} | {_ratio(peak, same)} | {_mib(small)} "
            f"| {_ratio(peak, small)} |"
        )


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--what",
        nargs="+",
        choices=("loss", "step"),
        default=None,
        help="default: loss on CPU, loss and step on CUDA",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512, help="embedding dim (loss part)")
    parser.add_argument(
        "--chunk",
        type=int,
        default=256,
        help="full step: also the cached loss in chunks of this many pairs (0: not)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--mem-margin-gb",
        type=float,
        default=1.0,
        help="CPU: skip a batch whose loss may leave less than this available",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured steps per configuration; the smallest peak is kept",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="smoke run: batches 64 128")
    opts = parser.parse_args(argv)

    cuda = torch.cuda.is_available() if opts.device == "auto" else opts.device == "cuda"
    opts.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    opts.what = opts.what or (["loss", "step"] if cuda else ["loss"])
    if opts.quick:
        opts.batches = [64, 128]
        opts.chunk = min(opts.chunk, 32)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores"
        + (f", GPU {machine['gpu']}" if cuda else ", no GPU")
    )
    print(
        f"python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}"
    )
    print(f"command: {command}")
    print(
        f"settings: {opts.what}, batches {opts.batches}, dim {opts.dim}, cached chunk "
        f"{opts.chunk or 'off'} (step), {opts.repeats} "
        f"measured steps each (smallest peak kept), device "
        f"{opts.device}, glofnd N = {NUM_SAMPLES:,}; peak via "
        + (
            "torch.cuda.max_memory_allocated"
            if cuda
            else "torch.profiler(profile_memory=True), CPU allocator 'Total Allocated'"
        )
    )
    sys.stdout.flush()

    rows = []
    if "loss" in opts.what:
        rows += [{**r, "dim": opts.dim} for r in measure_loss(opts)]
    if "step" in opts.what:
        rows += measure_step(opts)
    bps = state_bytes_per_sample()
    print_report(rows, bps)

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: {
            "num_samples": n,
            "glofnd_thresholds_bytes": n * bps["glofnd_thresholds"],
            "global_loss_u_bytes": n * bps["global_loss_u"],
        }
        for name, n in DATASETS.items()
    }
    with open(opts.output, "w") as f:
        json.dump(
            {
                "machine": machine,
                "command": command,
                "rows": rows,
                "state_bytes_per_sample": bps,
                "state_totals": state,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {opts.output}")


if __name__ == "__main__":
    main()
