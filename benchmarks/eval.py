"""Zero-shot retrieval scoring: the chunked ``retrieval_recall`` vs a naive full-matrix version.

Synthetic set: ``--images`` random unit embeddings (dim ``--dim``) with
``--captions-per-image`` captions each, every caption a noisy copy of its image's embedding.
Both implementations score the same embeddings in the same run and must give the same recall@k:

* naive: the full captions x images score matrix, a dense boolean positive-pair matrix of the
  same shape, ``topk`` along both directions (how simple evaluation scripts do it);
* chunked (``glofnd_hf.eval.metrics.retrieval_recall``): ``--chunk-sizes`` queries at a time,
  ranks by counting, never the full matrix.

Each implementation runs in its own subprocess on embeddings loaded from a file, so its peak
memory is measured cleanly: peak RSS (``ru_maxrss``) minus RSS before scoring; torch's CPU
allocations bypass Python's allocator, so ``tracemalloc`` would not see them.

``--tiny-model-images N`` adds an embedding pass of a tiny Hugging Face CLIP (built offline)
over N synthetic 32x32 images and ``N x captions-per-image`` captions through
``ZeroShotEvaluator``, timing embedding and scoring separately.

    .venv/bin/python benchmarks/eval.py [--images 5000] [--captions-per-image 5] [--dim 512]
                                        [--chunk-sizes 1024 256] [--repeats 3]
                                        [--tiny-model-images 500]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glofnd_hf.eval.metrics import retrieval_recall  # noqa: E402


def naive_retrieval_recall(image_embeds, text_embeds, text_to_image, ks=(1, 5, 10)):
    """Full-matrix reference: scores [T, I], dense positives [T, I], top-k both ways."""
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    scores = texts @ images.t()
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    max_k = max(ks)
    t2i_hits = positive.gather(1, scores.topk(min(max_k, scores.shape[1]), dim=1).indices)
    i2t_hits = positive.t().gather(1, scores.t().topk(min(max_k, scores.shape[0]), dim=1).indices)
    out = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = float(i2t_hits[:, :k].any(1).double().mean())
    for k in ks:
        out[f"text_to_image_recall@{k}"] = float(t2i_hits[:, :k].any(1).double().mean())
    return out


def synthetic(num_images, per_image, dim, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    t2i = torch.arange(num_images).repeat_interleave(per_image)
    texts = images[t2i] + noise * torch.randn(len(t2i), dim, generator=g) / dim**0.5
    return images, F.normalize(texts, dim=-1), t2i


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, data_path: str, repeats: int, chunk_size: int, ks) -> dict:
    data = torch.load(data_path)
    images, texts, t2i = data["images"], data["texts"], data["t2i"]
    before = _rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if impl == "naive":
            metrics = naive_retrieval_recall(images, texts, t2i, ks)
        else:
            metrics = retrieval_recall(images, texts, t2i, ks, chunk_size=chunk_size)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "impl": impl,
        "seconds": min(times),
        "all_seconds": times,
        "peak_extra_bytes": max(0, peak - before),
        "metrics": metrics,
    }


def run_worker(impl, data_path, args, chunk_size=1024) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        impl,
        "--data",
        data_path,
        "--repeats",
        str(args.repeats),
        "--chunk-sizes",
        str(chunk_size),
        "--ks",
        *map(str, args.ks),
    ]
    out = subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_model_pass(num_images, per_image, batch_size, chunk_size, ks) -> dict:
    import datasets
    import numpy as np
    from PIL import Image

    from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
    from glofnd_hf.models import build_tiny_hf_clip

    rng = np.random.default_rng(0)
    words = "a photo of the small large red blue dog cat car tree on in with near old".split()
    images = [
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for _ in range(num_images)
    ]
    captions = [
        [" ".join(rng.choice(words, 8)) for _ in range(per_image)] for _ in range(num_images)
    ]
    data = datasets.Dataset.from_dict(
        {"image": images, "caption": captions},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}
        ),
    )
    adapter = build_tiny_hf_clip(seed=0, texts=words)
    evaluator = ZeroShotEvaluator(
        data, batch_size=batch_size, show_progress=False, chunk_size=chunk_size, ks=ks
    )
    start = time.perf_counter()
    embeds = evaluator.embed(adapter)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.score(embeds)
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_retrieval_recall(embeds["images"], embeds["texts"], evaluator.text_to_image, ks)
    naive_s = time.perf_counter() - start
    assert naive == metrics, "naive and chunked recall differ on the tiny-model embeddings"
    return {
        "images": num_images,
        "captions": evaluator.num_captions,
        "embed_seconds": embed_s,
        "score_seconds": score_s,
        "naive_score_seconds": naive_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--noise",
        type=float,
        default=12.0,
        help="caption noise (scaled by 1/sqrt(dim)): sets how hard retrieval is",
    )
    p.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=[1024, 256],
        help="chunk sizes of the chunked implementation to measure",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny-model-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(
            json.dumps(worker(args.worker, args.data, args.repeats, args.chunk_sizes[0], args.ks))
        )
        return

    images, texts, t2i = synthetic(args.images, args.captions_per_image, args.dim, args.noise)
    print(
        f"synthetic set: {len(images)} images x {len(texts)} captions, dim {args.dim}, "
        f"{torch.get_num_threads()} torch threads; best of {args.repeats} runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "embeds.pt")
        torch.save({"images": images, "texts": texts, "t2i": t2i}, path)
        naive = run_worker("naive", path, args)
        naive["name"] = "naive full matrix"
        results = [naive]
        for chunk_size in args.chunk_sizes:
            r = run_worker("chunked", path, args, chunk_size)
            r["name"] = f"chunked ({chunk_size})"
            results.append(r)
    mib = 1024**2
    print(
        f"{'implementation':<20} {'scoring s':>10} {'peak extra MiB':>15} "
        f"{'time vs naive':>14} {'memory vs naive':>16}"
    )
    for r in results:
        print(
            f"{r['name']:<20} {r['seconds']:>10.3f} {r['peak_extra_bytes'] / mib:>15.1f} "
            f"{r['seconds'] / naive['seconds']:>13.2f}x "
            f"{r['peak_extra_bytes'] / max(naive['peak_extra_bytes'], 1):>15.2f}x"
        )
    same = all(r["metrics"] == naive["metrics"] for r in results)
    print(f"identical metrics: {same}")
    print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in naive["metrics"].items()))
    if not same:
        raise SystemExit("naive and chunked metrics differ")

    if args.tiny_model_images:
        r = tiny_model_pass(
            args.tiny_model_images,
            args.captions_per_image,
            args.batch_size,
            args.chunk_sizes[0],
            args.ks,
        )
        print(
            f"\ntiny HF CLIP, {r['images']} images x {r['captions']} captions: embedding "
            f"{r['embed_seconds']:.2f} s, scoring {r['score_seconds']:.3f} s (chunked), "
            f"{r['naive_score_seconds']:.3f} s (naive)"
        )


if __name__ == "__main__":
    main()
