"""Throughput of the GloFND shard loader vs a plain webdataset pipeline with the same stages.

Both pipelines read the same generated shards of 224px JPEGs and do
tar read -> sample shuffle buffer -> JPEG decode (PIL, RGB) -> CLIP image transform
-> batch + tokenize (collate into the package's batch dict).  The GloFND loader
additionally parses/validates the dataset index and counts bad samples.

    .venv/bin/python benchmarks/loader.py [--num-samples 384] [--workers 0 2]

Prints samples/s (best of ``--repeats`` epochs after one warm-up epoch) per
worker count and the ratio glofnd / webdataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glofnd_hf.data.shard_writer import write_shards_from_dataset  # noqa: E402
from glofnd_hf.data.shards import ShardConfig, build_shard_loader  # noqa: E402
from glofnd_hf.data.webdataset_io import expand_shards  # noqa: E402

WORDS = "a photo of the small large red blue dog cat car tree on in with near old new".split()


def make_rows(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        # smooth low-frequency content plus noise: JPEG sizes close to real photos
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
        yield {"image": image, "caption": caption}


def make_tokenizer():
    try:
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer()

        def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
            ids = tok(captions)
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        return tokenize, "open_clip SimpleTokenizer"
    except Exception:  # noqa: BLE001 - fallback keeps the benchmark runnable

        def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
            ids = torch.zeros(len(captions), 77, dtype=torch.long)
            for i, c in enumerate(captions):
                codes = [hash(w) % 49000 + 1 for w in c.split()][:77]
                ids[i, : len(codes)] = torch.tensor(codes)
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        return tokenize, "hash tokenizer (open_clip unavailable)"


TRANSFORM = transforms.Compose(
    [
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(
            (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        ),
    ]
)


class Collate:
    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, samples):
        images, captions, indices = zip(*samples, strict=True)
        tokens = self.tokenize(list(captions))
        return {
            "pixel_values": torch.stack(list(images)),
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "dataset_index": torch.tensor(indices, dtype=torch.long),
        }


def plain_webdataset_loader(urls, batch_size, shuffle, workers, tokenize):
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle) if shuffle > 1 else None,
        wds.decode("pilrgb"),
        wds.to_tuple("jpg", "txt", "idx"),
        wds.map_tuple(TRANSFORM, str.strip, int),
        wds.batched(batch_size, collation_fn=Collate(tokenize), partial=False),
    )
    return DataLoader(
        pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0
    )


def epoch_rate(loader) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["dataset_index"].numel()
    return n / (time.perf_counter() - start), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-samples", type=int, default=384)
    p.add_argument("--samples-per-shard", type=int, default=48)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shuffle-buffer", type=int, default=100)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", default=None, help="shard directory (default: a temp dir)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    tokenize, tok_name = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or os.path.join(tmp, "shards")
        t0 = time.perf_counter()
        pattern, n = write_shards_from_dataset(
            make_rows(args.num_samples, args.image_size),
            out,
            samples_per_shard=args.samples_per_shard,
            overwrite=True,
        )
        urls = expand_shards(pattern)
        mb = sum(os.path.getsize(u) for u in urls) / 1e6
        print(
            f"shards: {len(urls)} x ~{args.samples_per_shard} samples, {n} samples, "
            f"{mb:.1f} MB ({mb * 1e3 / n:.1f} kB/sample), written in "
            f"{time.perf_counter() - t0:.1f}s; tokenizer: {tok_name}; "
            f"batch {args.batch_size}; shuffle buffer {args.shuffle_buffer}"
        )
        print(f"{'workers':>7} {'glofnd samples/s':>17} {'webdataset samples/s':>21} {'ratio':>6}")
        for workers in args.workers:
            ours = build_shard_loader(
                ShardConfig(
                    shards=pattern,
                    batch_size=args.batch_size,
                    num_workers=workers,
                    rank=0,
                    world_size=1,
                    shuffle_buffer=args.shuffle_buffer,
                ),
                TRANSFORM,
                tokenize,
            )
            plain = plain_webdataset_loader(
                urls, args.batch_size, args.shuffle_buffer, workers, tokenize
            )
            epoch_rate(ours)  # warm-up: page cache, worker start
            epoch_rate(plain)
            best = {"glofnd": 0.0, "webdataset": 0.0}
            for _ in range(args.repeats):
                for name, loader in (("glofnd", ours), ("webdataset", plain)):
                    rate, count = epoch_rate(loader)
                    best[name] = max(best[name], rate)
            ratio = best["glofnd"] / best["webdataset"]
            print(f"{workers:>7} {best['glofnd']:>17.1f} {best['webdataset']:>21.1f} {ratio:>6.2f}")
            del ours, plain
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
