"""Time the full training step of ``GloFNDTrainer`` against a plain ``transformers.Trainer``.

One step is what the Trainer's loop does per optimiser step (without data loading, gradient
clipping, the learning-rate scheduler and logging, which cost every variant the same):

    loss = trainer.training_step(model, inputs)    # forward, loss (+ detector state update), backward
    optimizer.step(); model.zero_grad()             # AdamW from trainer.create_optimizer()
    trainer.callback_handler.on_step_end(...)       # ours: the logit-scale clamp callback

Variants, all in one run, on the same synthetic batch (random pixels, random token ids), the
same optimiser settings and the same precision:

* ``ours`` -- ``GloFNDTrainer`` with the CLIP loss and detector ``none``, ``glofnd``
  (N = 10^6 per-sample state on the training device) or ``batch_quantile``, each with
  ``check_inputs`` on (one host sync per step) and off; on CUDA (or ``--host-state``) also
  ``glofnd`` with its state in pinned host memory (``state_device: cpu``), check off;
* ``hf`` -- the same model in a plain ``transformers.Trainer``: ``CLIPModel`` forward with
  ``return_loss=True``, the Trainer takes the model's ``loss`` (HF models only);
* ``cached`` -- ``GloFNDTrainer`` with the cached loss (``contrastive_chunk_size: --chunk``,
  default a quarter of the batch; 0: off), check on, for each detector: the same global
  batch, encoded in chunks twice. Its ``vs plain`` column compares it with the plain loss
  of the same detector.

``--detectors`` narrows the detectors (e.g. ``glofnd`` alone at large batches on a CPU).

Each trainer is built once; the model given to ``training_step`` is the one accelerate
prepares (on CUDA with bf16 that wraps the forward in autocast, as ``Trainer.train`` does).
Steps run in rounds: every round times one step of every variant in a fresh random order,
so drift of a shared machine hits all variants alike. Ratios are paired: per round, the
baseline's step time over the variant's, then the median over rounds (= relative
throughput; 0.97 means 3 % fewer samples/s), with a bootstrap 95 % interval.

A second table times the loss head alone (``loss_head``) on leaf tensors, in the same
round-robin: everything between the encoders' normalised embeddings and the gradients, the
only part where the variants differ. Full-step differences below a few percent drown in
the noise of a shared machine; the loss head shows what is really ours.

Defaults: on CPU the tiny HF CLIP (image 32, batch 128, fp32); on CUDA ViT-B/32-sized
``CLIPModel`` (``CLIPConfig()`` defaults, random init) and open_clip RN50 (random init), batch
256 per device, bf16. Writes ``benchmarks/results/train_step.json``.

    python benchmarks/train_step.py --threads 1        # CPU: tiny-hf, batch 128
    python benchmarks/train_step.py --model vit-b32 rn50 --batch 256   # on a GPU
    python benchmarks/train_step.py --batch 4096 --chunk 256 --detectors glofnd --no-hf \
        --check-inputs on --head-steps 0 --warmup 1 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _machine import cpu_model, log
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from glofnd_hf.args import GloFNDTrainingArguments
from glofnd_hf.models import (
    DualEncoderAdapter,
    HFDualEncoder,
    OpenClipDualEncoder,
    build_small_clip_tokenizer,
    build_tiny_hf_clip,
)
from glofnd_hf.trainer import GloFNDTrainer

MODELS = ("tiny-hf", "vit-b32", "rn50")
DETECTORS = ("none", "glofnd", "batch_quantile")
NUM_SAMPLES = 10**6
HF_BASELINE = "hf Trainer + CLIPModel loss"
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"


@dataclass
class Variant:
    name: str
    family: str  # "ours" or "hf"
    detector: str | None
    check_inputs: bool | None
    trainer: Trainer
    model: nn.Module
    optimizer: torch.optim.Optimizer
    with_index: bool
    chunk: int | None = None
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


# -- models ---------------------------------------------------------------------------------


def build_adapter(name: str, image_size: int) -> DualEncoderAdapter:
    """The model of the benchmark, randomly initialised, built offline."""
    torch.manual_seed(0)
    if name == "tiny-hf":
        return build_tiny_hf_clip(image_size=image_size, seed=0)
    if name == "vit-b32":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        model = CLIPModel(CLIPConfig())  # ViT-B/32 vision + 12-layer 512-wide text, dim 512
        size = model.config.vision_config.image_size
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            ),
            # Only the collator (unused here) would tokenise; token ids are drawn at random.
            tokenizer=build_small_clip_tokenizer(context_length=77),
        )
        return HFDualEncoder(model, processor, context_length=77)
    if name == "rn50":
        return OpenClipDualEncoder.from_pretrained("RN50")  # random init: pretrained=None
    raise ValueError(f"unknown model {name!r}")


def copy_adapter(adapter: DualEncoderAdapter) -> DualEncoderAdapter:
    """Same weights, own parameters: every variant trains its own copy."""
    model = copy.deepcopy(adapter.model)
    if isinstance(adapter, HFDualEncoder):
        return HFDualEncoder(model, adapter.processor, context_length=adapter.context_length)
    assert isinstance(adapter, OpenClipDualEncoder)
    return OpenClipDualEncoder(
        model,
        adapter.preprocess_train,
        adapter.preprocess_val,
        adapter.tokenizer,
        adapter.model_cfg,
    )


def synthetic_batch(
    adapter: DualEncoderAdapter, batch: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random pixels and random token ids (BOS first, EOS last, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(adapter, HFDualEncoder):
        cfg = adapter.model.config
        size = cfg.vision_config.image_size
        vocab, length = cfg.text_config.vocab_size, adapter.context_length
        bos, eos = cfg.text_config.bos_token_id, cfg.text_config.eos_token_id
    else:
        size = adapter.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        vocab, length = adapter.model.vocab_size, adapter.context_length
        bos, eos = vocab - 2, vocab - 1  # open_clip pools at the argmax id: EOS is the largest
    ids = torch.randint(0, min(bos, eos), (batch, length), generator=gen)
    ids[:, 0], ids[:, -1] = bos, eos
    out = {"pixel_values": torch.randn(batch, 3, size, size, generator=gen), "input_ids": ids}
    if isinstance(adapter, HFDualEncoder):
        out["attention_mask"] = torch.ones_like(ids)
    return {k: v.to(device) for k, v in out.items()}


# -- trainers -------------------------------------------------------------------------------


def common_args(opts: argparse.Namespace, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch,
        learning_rate=1e-4,
        weight_decay=0.1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=opts.device.type == "cpu",
        bf16=opts.bf16,
        dataloader_num_workers=0,
    )


def prepare(trainer: Trainer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The optimiser from ``create_optimizer`` and the model as ``Trainer.train`` prepares it
    (device placement and, under mixed precision, the autocast forward)."""
    optimizer = trainer.create_optimizer()
    model = trainer.accelerator.prepare_model(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return model, optimizer


def build_variants(
    base: DualEncoderAdapter, opts: argparse.Namespace, output_dir: str
) -> list[Variant]:
    variants = []
    configs = [(d, check, None) for d in opts.detectors for check in opts.checks]
    if opts.chunk:
        configs += [(d, True, opts.chunk) for d in opts.detectors]
    for detector, check, chunk in configs:
        args = GloFNDTrainingArguments(
            **common_args(opts, output_dir),
            detector=detector,
            loss_type="clip",
            check_inputs=check,
            num_samples=NUM_SAMPLES,
            state_device="device",
            contrastive_chunk_size=chunk,
        )
        trainer = GloFNDTrainer(copy_adapter(base), args)
        model, optimizer = prepare(trainer)
        cached = "" if chunk is None else f" cached M={chunk}"
        name = f"ours {detector}{cached}, check {'on' if check else 'off'}"
        variants.append(
            Variant(name, "ours", detector, check, trainer, model, optimizer, True, chunk)
        )
    if opts.host_state:
        # GloFND with its state in (pinned) host memory, as state_device: cpu (or auto above
        # 2 GiB) places it: rows travel to the device and back every step.
        args = GloFNDTrainingArguments(
            **common_args(opts, output_dir),
            detector="glofnd",
            loss_type="clip",
            check_inputs=False,
            num_samples=NUM_SAMPLES,
            state_device="cpu",
        )
        trainer = GloFNDTrainer(copy_adapter(base), args)
        model, optimizer = prepare(trainer)
        name = "ours glofnd host state, check off"
        variants.append(
            Variant(name, "ours", "glofnd", False, trainer, model, optimizer, with_index=True)
        )
    if isinstance(base, HFDualEncoder) and opts.hf:
        args = TrainingArguments(**common_args(opts, output_dir), remove_unused_columns=False)
        trainer = Trainer(model=copy.deepcopy(base.model), args=args)
        model, optimizer = prepare(trainer)
        variants.append(
            Variant(HF_BASELINE, "hf", None, None, trainer, model, optimizer, with_index=False)
        )
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_step(v: Variant, inputs: dict) -> None:
    """``Trainer.train``'s per-step work, minus data loading, clipping, scheduler, logging."""
    trainer = v.trainer
    trainer.training_step(v.model, inputs)
    v.optimizer.step()
    v.model.zero_grad()
    trainer.state.global_step += 1
    trainer.control = trainer.callback_handler.on_step_end(
        trainer.args, trainer.state, trainer.control
    )


def loss_head(
    v: Variant,
    image: torch.Tensor,
    text: torch.Tensor,
    log_scale: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """What runs between the encoders' normalised embeddings and the parameters' gradients,
    forward and backward, on leaf tensors: the only part where the variants differ.

    hf: ``CLIPModel``'s logits (``text @ image.T * scale``) + ``image_text_contrastive_loss``.
    ours: the adapter's normalisation and ``exp`` of the scale, ``GloFNDTrainer``'s loss
    (checks, masks, detector and state update, InfoNCE) and its stats accumulation. (Our
    forward also computes CLIPModel's logits, unused: one b x b x d matmul, forward only.)
    float32 leaf tensors, no autocast, whatever the precision of the full step.
    """
    image.grad = text.grad = log_scale.grad = None
    scale = log_scale.exp()
    if v.family == "hf":
        image_text_contrastive_loss(text @ image.t() * scale).backward()
        return
    trainer = v.trainer
    result = trainer.contrastive_loss(
        F.normalize(image, dim=-1),
        F.normalize(text, dim=-1),
        scale,
        index,
        epoch=trainer.current_epoch(),
    )
    trainer._accumulate_stats(result.stats, scale)  # what compute_loss does in training
    result.loss.backward()


# -- the measurement ------------------------------------------------------------------------


def run_rounds(
    variants: list[Variant],
    rounds: int,
    warmup: int,
    device: torch.device,
    gen: torch.Generator,
    run,
    progress=None,
) -> None:
    """``run(variant, round)`` once per variant per round, in a fresh random order each round;
    the rounds after ``warmup`` are timed into ``variant.times_s``."""
    for v in variants:
        v.times_s = []
    orders = [torch.randperm(len(variants), generator=gen).tolist() for _ in range(rounds)]
    for r in range(rounds):
        for i in orders[r]:
            v = variants[i]
            sync(device)
            t0 = time.perf_counter()
            run(v, r)
            sync(device)
            if r >= warmup:
                v.times_s.append(time.perf_counter() - t0)
        if progress is not None:
            progress(r)


def measure(name: str, opts: argparse.Namespace) -> dict:
    device = opts.device
    t_build = time.perf_counter()
    base = build_adapter(name, opts.image_size)
    n_params = sum(p.numel() for p in base.model.parameters())
    dim = embed_dim(base)
    with tempfile.TemporaryDirectory() as output_dir:
        variants = build_variants(base, opts, output_dir)
    del base
    log(
        f"[{name}] {len(variants)} variants built in {time.perf_counter() - t_build:.1f} s, "
        f"{n_params / 1e6:.1f} M parameters each"
    )

    batch = synthetic_batch(variants[0].trainer.adapter, opts.batch, device)
    rounds = opts.warmup + opts.steps
    gen = torch.Generator().manual_seed(20240607)
    # Fresh distinct dataset indices every round (the same for every variant of the round).
    indices = [
        torch.randperm(NUM_SAMPLES, generator=gen)[: opts.batch].to(device)
        for _ in range(max(rounds, opts.warmup + opts.head_steps))
    ]

    def full_step(v: Variant, r: int) -> None:
        extra = {"dataset_index": indices[r]} if v.with_index else {"return_loss": True}
        one_step(v, {**batch, **extra})

    t_start = time.perf_counter()

    def progress(r: int) -> None:
        if r + 1 == opts.warmup or (r + 1 - opts.warmup) % 10 == 0 or r + 1 == rounds:
            log(
                f"[{name}] round {r + 1}/{rounds} ({opts.warmup} warm-up), "
                f"{time.perf_counter() - t_start:.0f} s"
            )

    run_rounds(variants, rounds, opts.warmup, device, gen, full_step, progress)
    result = {
        "model": name,
        "parameters": n_params,
        "batch": opts.batch,
        "rows": summarise(variants, opts.batch),
    }
    if opts.head_steps <= 0:
        return result

    # The loss head alone: same variants, same round-robin, more rounds (it is cheap).
    gen_embed = torch.Generator().manual_seed(1)
    image, text = (
        F.normalize(torch.randn(opts.batch, dim, generator=gen_embed), dim=-1)
        .to(device)
        .requires_grad_()
        for _ in range(2)
    )
    log_scale = torch.tensor(2.659, device=device, requires_grad=True)  # ln(1 / 0.07)
    variants = [v for v in variants if v.chunk is None]  # the cached head is the same head
    run_rounds(
        variants,
        opts.warmup + opts.head_steps,
        opts.warmup,
        device,
        gen,
        lambda v, r: loss_head(v, image, text, log_scale, indices[r]),
    )
    log(f"[{name}] loss head: {opts.warmup + opts.head_steps} rounds, embedding dim {dim}")
    result["loss_head"] = {"dim": dim, "rows": summarise(variants, opts.batch)}
    return result


def embed_dim(adapter: DualEncoderAdapter) -> int:
    config = getattr(adapter.model, "config", None)
    if config is not None:
        return int(config.projection_dim)
    return int(adapter.model.text_projection.shape[-1])  # open_clip


def paired_ratio(
    base: list[float], other: list[float], rng: random.Random, resamples: int = 2000
) -> tuple[float, float, float]:
    """Median over rounds of base_time / other_time (relative throughput of ``other``), and a
    percentile-bootstrap 95 % interval of that median."""
    ratios = [b / o for b, o in zip(base, other, strict=True)]
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), boot[int(0.025 * resamples)], boot[int(0.975 * resamples)]


def summarise(variants: list[Variant], batch: int) -> list[dict]:
    rng = random.Random(0)
    by_name = {v.name: v for v in variants}
    hf = by_name.get(HF_BASELINE)
    rows = []
    for v in variants:
        q = statistics.quantiles(v.times_s, n=4, method="inclusive")
        row = {
            "variant": v.name,
            "family": v.family,
            "detector": v.detector,
            "check_inputs": v.check_inputs,
            "median_ms": v.median_s * 1e3,
            "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3,
            "p10_ms": statistics.quantiles(v.times_s, n=10, method="inclusive")[0] * 1e3,
            "samples_per_s": batch / v.median_s,
            "times_ms": [t * 1e3 for t in v.times_s],
        }
        none = by_name.get(f"ours none, check {'on' if v.check_inputs else 'off'}")
        if v.family == "ours" and none is not None:
            row["vs_none"] = paired_ratio(none.times_s, v.times_s, rng)
        if v.chunk is not None:
            plain = by_name[f"ours {v.detector}, check on"]
            row["chunk"] = v.chunk
            row["vs_plain"] = paired_ratio(plain.times_s, v.times_s, rng)
            row["time_vs_plain"] = statistics.median(
                o / p for o, p in zip(v.times_s, plain.times_s, strict=True)
            )
        if hf is not None:
            row["vs_hf"] = paired_ratio(hf.times_s, v.times_s, rng)
        rows.append(row)
    return rows


# -- report ---------------------------------------------------------------------------------


def fmt_ratio(r: tuple[float, float, float] | None) -> str:
    return "" if r is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def print_table(result: dict) -> None:
    print(
        f"\n### {result['model']} ({result['parameters'] / 1e6:.1f} M parameters), "
        f"batch {result['batch']}: full step\n"
    )
    _rows(result["rows"], "step", digits=1, throughput=True, hf="hf Trainer")
    cached = [r for r in result["rows"] if r.get("chunk") is not None]
    if cached:
        print(
            f"\n### {result['model']}, batch {result['batch']}: cached loss against the plain "
            "loss (same detector, same global batch, check on)\n"
        )
        print("| variant | median ms/step | step time / plain (median of rounds) | vs plain |")
        print("|---|---:|---:|---:|")
        for row in cached:
            print(
                f"| {row['variant']} | {row['median_ms']:.1f} | {row['time_vs_plain']:.2f} | "
                f"{fmt_ratio(row['vs_plain'])} |"
            )
    head = result.get("loss_head")
    if head:
        print(
            f"\n### {result['model']}, batch {result['batch']}: loss head alone "
            f"(embedding dim {head['dim']}, forward + backward)\n"
        )
        _rows(head["rows"], "head", digits=3, throughput=False, hf="hf loss head")


def _rows(rows: list[dict], unit: str, digits: int, throughput: bool, hf: str) -> None:
    extra = " samples/s |" if throughput else ""
    print(
        f"| variant | median ms/{unit} | p10 ms | p25-p75 ms |{extra} vs ours none (same "
        f"check) | vs {hf} |"
    )
    print("|---|---:|---:|---:|" + ("---:|" if throughput else "") + "---:|---:|")
    for row in rows:
        extra = f" {row['samples_per_s']:.0f} |" if throughput else ""
        print(
            f"| {row['variant']} | {row['median_ms']:.{digits}f} | {row['p10_ms']:.{digits}f} | "
            f"{row['p25_ms']:.{digits}f}-{row['p75_ms']:.{digits}f} |{extra} "
            f"{fmt_ratio(row.get('vs_none'))} | {fmt_ratio(row.get('vs_hf'))} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        nargs="+",
        choices=MODELS,
        default=None,
        help="default: tiny-hf on CPU, vit-b32 and rn50 on CUDA",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="per-device batch (default: 128 on CPU, 256 on CUDA)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="also the cached loss in chunks of this many pairs (default: batch // 4; 0: off)",
    )
    parser.add_argument(
        "--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS), help="ours: which"
    )
    parser.add_argument(
        "--check-inputs",
        nargs="+",
        choices=("on", "off"),
        default=["on", "off"],
        help="ours (plain loss): check_inputs on, off or both (the cached loss: on)",
    )
    parser.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the plain transformers.Trainer baseline (HF models)",
    )
    parser.add_argument("--steps", type=int, default=40, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument(
        "--head-steps", type=int, default=200, help="timed rounds of the loss head alone (0: skip)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--host-state",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add GloFND with its state in pinned host memory (default: on CUDA only)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--image-size", type=int, default=32, help="image size of tiny-hf")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny-hf, batch 16, 1 warm-up + 3 timed rounds",
    )
    opts = parser.parse_args(argv)

    cuda = torch.cuda.is_available() if opts.device == "auto" else opts.device == "cuda"
    opts.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if opts.quick:
        opts.model, opts.batch, opts.warmup, opts.steps = ["tiny-hf"], 16, 1, 3
        opts.head_steps = 3
    opts.model = opts.model or (["vit-b32", "rn50"] if cuda else ["tiny-hf"])
    opts.batch = opts.batch or (256 if cuda else 128)
    opts.chunk = max(1, opts.batch // 4) if opts.chunk is None else opts.chunk
    opts.checks = [c == "on" for c in opts.check_inputs]
    if opts.chunk and True not in opts.checks:
        parser.error("the cached loss is compared with the plain loss with --check-inputs on")
    opts.bf16 = opts.precision == "bf16" or (opts.precision == "auto" and cuda)
    opts.host_state = cuda if opts.host_state is None else opts.host_state
    if opts.threads:
        torch.set_num_threads(opts.threads)
    # glofnd_hf.fnd.comm and transformers emit deprecation notices irrelevant here.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()

    import open_clip

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
    }
    settings = {
        "models": opts.model,
        "batch": opts.batch,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "chunk": opts.chunk,
        "detectors": opts.detectors,
        "device": str(opts.device),
        "precision": "bf16" if opts.bf16 else "fp32",
        "num_samples": NUM_SAMPLES,
        "optimizer": "AdamW (trainer.create_optimizer)",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} "
        f"torch threads" + (f", GPU {machine['gpu']}" if cuda else ", no GPU")
    )
    print(
        f"python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, open_clip {machine['open_clip']}"
    )
    print(f"command: {settings['command']}")
    print(
        f"settings: models {opts.model}, batch {opts.batch}, {settings['precision']}, "
        f"{opts.warmup} warm-up + {opts.steps} timed rounds, cached chunk {opts.chunk or 'off'}, "
        f"glofnd N = {NUM_SAMPLES:,} "
        f"(state on {opts.device})"
    )
    sys.stdout.flush()

    started = time.perf_counter()
    results = []
    for name in opts.model:
        result = measure(name, opts)
        print_table(result)
        sys.stdout.flush()
        results.append(result)
        if cuda:
            torch.cuda.empty_cache()
    print(
        "\nvs columns: median over rounds of (baseline step time / variant step time), i.e. "
        "relative samples/s, with a bootstrap 95 % interval"
    )
    print(f"total wall time {time.perf_counter() - started:.0f} s")

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    with open(opts.output, "w") as f:
        json.dump({"machine": machine, "settings": settings, "results": results}, f, indent=1)
    print(f"wrote {opts.output}")


if __name__ == "__main__":
    main()
