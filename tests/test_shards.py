"""Tests of the streaming shard loader and the shard writer (CPU, tiny generated shards)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from glofnd_hf.cli.shards import main
from glofnd_hf.data.bad_samples import BAD_SAMPLE_KINDS
from glofnd_hf.data.shard_writer import (
    add_index_to_shards,
    write_shards_from_csv,
    write_shards_from_dataset,
)
from glofnd_hf.data.shards import (
    ShardConfig,
    ShardDataset,
    build_shard_loader,
    is_presharded_loader,
    shard_partition,
)

L = 24  # token length of the fake tokenizer


# ----------------------------------------------------------------------------- helpers


def color_of(index: int) -> tuple[int, int, int]:
    return ((index * 37) % 256, (index * 91 + 40) % 256, (255 - index * 13) % 256)


def jpeg_bytes(color, size=16, fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format=fmt, quality=95)
    return out.getvalue()


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.resize((8, 8)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 255.0


def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(captions), L, dtype=torch.int32)
    mask = torch.zeros(len(captions), L, dtype=torch.int32)
    for i, caption in enumerate(captions):
        codes = [ord(c) for c in caption[:L]]
        ids[i, : len(codes)] = torch.tensor(codes)
        mask[i, : len(codes)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def untokenize(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [
        "".join(chr(c) for c, m in zip(row.tolist(), mrow.tolist(), strict=True) if m)
        for row, mrow in zip(ids, mask, strict=True)
    ]


def write_tar(path: str, samples: list[dict]) -> None:
    """samples: dicts with "__key__" and ext -> bytes/str entries."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good_sample(index: int, key: str | None = None) -> dict:
    return {
        "__key__": key or f"{index:09d}",
        "jpg": jpeg_bytes(color_of(index)),
        "txt": f"caption {index}",
        "idx": str(index),
    }


def make_shard_set(root, num_shards=8, per_shard=10) -> str:
    sizes = {}
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        write_tar(
            os.path.join(root, name), [good_sample(s * per_shard + r) for r in range(per_shard)]
        )
        sizes[name] = per_shard
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return os.path.join(str(root), f"{{00000..{num_shards - 1:05d}}}.tar")


def collect(loader) -> list[tuple[int, str, torch.Tensor]]:
    """(index, caption, mean colour) for every sample, in order."""
    out = []
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == L
        assert batch["attention_mask"].dtype == torch.long
        assert batch["dataset_index"].dtype == torch.long
        captions = untokenize(batch["input_ids"], batch["attention_mask"])
        colours = batch["pixel_values"].mean(dim=(2, 3)) * 255
        for i, c, col in zip(batch["dataset_index"].tolist(), captions, colours, strict=True):
            out.append((i, c, col))
    return out


def check_consistent(samples) -> None:
    for index, caption, colour in samples:
        assert caption == f"caption {index}"
        assert torch.allclose(colour, torch.tensor(color_of(index), dtype=torch.float32), atol=6)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return make_shard_set(root)


def config(shards, **kw) -> ShardConfig:
    kw.setdefault("batch_size", 5)
    kw.setdefault("num_workers", 0)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    kw.setdefault("shuffle_buffer", 7)
    return ShardConfig(shards=shards, **kw)


# ----------------------------------------------------------------------------- partition


def test_shard_partition_disjoint_complete_and_epoch_dependent():
    urls = [f"s{i}.tar" for i in range(12)]
    orders = []
    for epoch in range(3):
        parts = {
            (r, w): shard_partition(urls, r, 2, 3, w, epoch, seed=5)
            for r in range(2)
            for w in range(3)
        }
        flat = [u for p in parts.values() for u in p]
        assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
        rank0 = {u for (r, _), p in parts.items() if r == 0 for u in p}
        rank1 = {u for (r, _), p in parts.items() if r == 1 for u in p}
        assert not rank0 & rank1 and len(rank0) == len(rank1) == 6
        assert parts == {
            (r, w): shard_partition(urls, r, 2, 3, w, epoch, seed=5)
            for r in range(2)
            for w in range(3)
        }
        orders.append(shard_partition(urls, 0, 1, 1, 0, epoch, seed=5))
    assert orders[0] != orders[1] != orders[2]
    assert shard_partition(urls, 0, 1, 1, 0, 0, seed=6) != orders[0]
    assert shard_partition(urls, 0, 1, 1, 0, 1, seed=5, shuffle=False) == urls


# ----------------------------------------------------------------------------- loader


def test_every_sample_once_across_two_ranks_two_workers(shard_set):
    per_rank = {}
    for rank in range(2):
        loader = build_shard_loader(
            config(shard_set, rank=rank, world_size=2, num_workers=2, seed=3),
            to_tensor,
            tokenize,
        )
        assert is_presharded_loader(loader) and loader.glofnd_presharded
        assert len(loader) == 8 == loader.batches_per_epoch
        samples = collect(loader)
        assert len(samples) == 40
        check_consistent(samples)
        per_rank[rank] = [s[0] for s in samples]
        # the rank read exactly the shards shard_partition assigns to its two workers
        urls = [shard_set.replace("{00000..00007}", f"{i:05d}") for i in range(8)]
        mine = {u for w in range(2) for u in shard_partition(urls, rank, 2, 2, w, 0, 3)}
        assert {i // 10 for i in per_rank[rank]} == {int(os.path.basename(u)[:5]) for u in mine}
    assert sorted(per_rank[0] + per_rank[1]) == list(range(80))
    assert not set(per_rank[0]) & set(per_rank[1])


def test_epoch_order_changes_and_is_reproducible(shard_set):
    cfg = config(shard_set, num_workers=2, seed=11, batch_size=5)
    loader = build_shard_loader(cfg, to_tensor, tokenize)
    epoch0 = [s[0] for s in collect(loader)]
    loader.set_epoch(1)
    epoch1 = [s[0] for s in collect(loader)]  # persistent workers see the new epoch
    epoch2 = [s[0] for s in collect(loader)]  # not set: advances to epoch 2
    assert loader.epoch == 2
    assert sorted(epoch0) == sorted(epoch1) == sorted(epoch2) == list(range(80))
    assert epoch0 != epoch1 != epoch2
    fresh = build_shard_loader(cfg, to_tensor, tokenize)
    fresh.set_epoch(1)
    assert [s[0] for s in collect(fresh)] == epoch1
    fresh.set_epoch(0)
    assert [s[0] for s in collect(fresh)] == epoch0


def test_resume_with_skip_batches_yields_the_rest_of_the_epoch(shard_set):
    cfg = config(shard_set, num_workers=2, seed=2, batch_size=5, persistent_workers=False)
    loader = build_shard_loader(cfg, to_tensor, tokenize)
    loader.set_epoch(4)
    full = [tuple(b["dataset_index"].tolist()) for b in loader]
    assert len(full) == 16
    loader.set_epoch(4, skip_batches=3)
    assert len(loader) == 13
    rest = [tuple(b["dataset_index"].tolist()) for b in loader]
    assert sorted(rest) == sorted(full[3:])
    loader.set_epoch(4, skip_batches=16)  # the whole epoch was already done
    assert len(loader) == 0 and list(loader) == []


def test_resampled_epoch_length(shard_set):
    total = 0
    for rank in range(2):
        loader = build_shard_loader(
            config(
                shard_set,
                resampled=True,
                train_num_samples=44,
                batch_size=4,
                rank=rank,
                world_size=2,
                num_workers=2,
            ),
            to_tensor,
            tokenize,
        )
        assert len(loader) == 5  # 44 // (2 * 4)
        samples = collect(loader)
        assert len(samples) == 20
        check_consistent(samples)
        total += len(samples)
    assert total == 40


def test_too_few_shards_for_workers(tmp_path):
    pattern = make_shard_set(tmp_path, num_shards=2, per_shard=4)
    with pytest.raises(ValueError, match="shards < world_size"):
        ShardDataset(
            config(pattern, world_size=2, rank=0, num_workers=2, batch_size=2), to_tensor, tokenize
        )
    # resampled mode does not need a shard per worker
    ds = ShardDataset(
        config(pattern, world_size=2, rank=1, num_workers=2, batch_size=2, resampled=True),
        to_tensor,
        tokenize,
    )
    assert len(ds) == 2


def test_bad_samples_skipped_and_counted(tmp_path, caplog):
    sizes = {}
    for s in range(2):
        samples = []
        for r in range(10):
            index = s * 10 + r
            sample = good_sample(index)
            if r == 2:
                sample["jpg"] = b"definitely not a jpeg"
            if r == 4:
                del sample["txt"]
            if r == 6 and s == 0:
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]  # truncated JPEG
            if r == 6 and s == 1:
                sample["txt"] = "   "
            if r == 8 and s == 1:
                del sample["jpg"]
            samples.append(sample)
        write_tar(tmp_path / f"{s:05d}.tar", samples)
        sizes[f"{s:05d}.tar"] = 10
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    pattern = str(tmp_path / "{00000..00001}.tar")
    good = [i for i in range(20) if i % 10 not in (2, 4, 6) and i != 18]
    assert len(good) == 13
    caplog.set_level(logging.WARNING, logger="glofnd_hf.data.shards")

    # single process: exact counts and rate-limited warnings
    loader = build_shard_loader(
        config(pattern, shuffle_buffer=0, shuffle_shards=False, batch_size=1, train_num_samples=13),
        to_tensor,
        tokenize,
    )
    samples = collect(loader)
    assert sorted(s[0] for s in samples) == good
    check_consistent(samples)
    expected = {"corrupt_image": 3, "missing_image": 1, "missing_caption": 3}
    assert loader.epoch_bad_sample_counts == {k: expected.get(k, 0) for k in BAD_SAMPLE_KINDS}
    warned = [r.getMessage() for r in caplog.records]
    assert sum("(corrupt_image)" in m for m in warned) == 1  # rate limited: once per 60 s
    assert sum("(missing_caption)" in m for m in warned) == 1
    assert any("00000.tar" in m for m in warned)

    # two workers: counts travel with the batches
    loader = build_shard_loader(
        config(pattern, shuffle_buffer=0, batch_size=2, num_workers=2, train_num_samples=12),
        to_tensor,
        tokenize,
    )
    samples = collect(loader)
    assert len(samples) == 12 and set(s[0] for s in samples) <= set(good)
    counts = loader.bad_sample_counts
    assert counts["corrupt_image"] == 3 and counts["missing_caption"] == 3
    assert counts["missing_image"] in (0, 1)  # sample 18 may lie beyond worker 1's quota

    # the raw dataset exposes the per-batch deltas
    ds = ShardDataset(
        config(
            pattern, shuffle_buffer=0, shuffle_shards=False, batch_size=13, train_num_samples=13
        ),
        to_tensor,
        tokenize,
    )
    (batch,) = list(ds)
    assert batch["bad_sample_counts"].tolist() == [3, 1, 3, 0, 0, 0]


def test_truncated_tar_does_not_crash(tmp_path):
    write_tar(tmp_path / "a.tar", [good_sample(i) for i in range(10)])
    write_tar(tmp_path / "b.tar", [good_sample(i) for i in range(10, 20)])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: int(len(data) * 0.6)])
    spec = f"{tmp_path / 'b.tar'}::{tmp_path / 'a.tar'}"
    loader = build_shard_loader(
        config(spec, shuffle_shards=False, train_num_samples=10, dataset_size=20, batch_size=5),
        to_tensor,
        tokenize,
    )
    samples = collect(loader)
    assert len(samples) == 10
    check_consistent(samples)
    assert loader.bad_sample_counts["shard_read_error"] == 1
    assert any(10 <= s[0] < 20 for s in samples)  # samples before the truncation were used


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"idx": None}, "no '.idx' entry"),
        ({"idx": "abc"}, "is not an integer"),
        ({"idx": "7.5"}, "is not an integer"),
        ({"idx": "1000000"}, r"outside \[0, 20\)"),
        ({"idx": "-1"}, r"outside \[0, 20\)"),
        ({"idx": None, "json": json.dumps({"dataset_index": "x"})}, "is not an integer"),
    ],
)
def test_bad_index_raises_or_is_skipped(tmp_path, bad, message):
    samples = [good_sample(i) for i in range(20)]
    samples[13].update(bad)
    samples[13] = {k: v for k, v in samples[13].items() if v is not None}
    write_tar(tmp_path / "00000.tar", samples[:10])
    write_tar(tmp_path / "00001.tar", samples[10:])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 10, "00001.tar": 10}))
    pattern = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(ValueError, match=message) as info:
        list(build_shard_loader(config(pattern, batch_size=4), to_tensor, tokenize))
    assert "00001.tar" in str(info.value) and "000000013" in str(info.value)

    loader = build_shard_loader(
        config(pattern, batch_size=19, on_bad_index="skip", train_num_samples=19),
        to_tensor,
        tokenize,
    )
    samples = collect(loader)
    assert sorted(s[0] for s in samples) == [i for i in range(20) if i != 13]
    assert loader.bad_sample_counts["bad_index"] == 1


def test_bad_index_raises_through_worker_processes(tmp_path):
    pattern = make_shard_set(tmp_path, num_shards=2, per_shard=5)
    with pytest.raises(ValueError, match="outside"):
        list(
            build_shard_loader(config(pattern, num_workers=2, dataset_size=7), to_tensor, tokenize)
        )


def make_img2dataset_shards(root, num_shards=2, per_shard=5):
    """img2dataset layout: keys shard_id * 10**4 + row, .jpg/.txt/.json, NNNNN_stats.json."""
    for s in range(num_shards):
        samples = []
        for r in range(per_shard):
            key = f"{s:05d}{r:04d}"
            index = int(key)
            samples.append(
                {
                    "__key__": key,
                    "jpg": jpeg_bytes(color_of(index)),
                    "txt": f"caption {index}",
                    "json": json.dumps({"key": key, "url": f"http://x/{key}.jpg"}),
                }
            )
        write_tar(os.path.join(root, f"{s:05d}.tar"), samples)
        with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0}, f)
    return os.path.join(str(root), f"{{00000..{num_shards - 1:05d}}}.tar")


def test_key_mode_maps_img2dataset_keys(tmp_path):
    pattern = make_img2dataset_shards(tmp_path)
    with pytest.raises(ValueError, match="explicit dataset_size"):
        ShardDataset(config(pattern, index_source="key"), to_tensor, tokenize)
    loader = build_shard_loader(
        config(pattern, index_source="key", dataset_size=2 * 10**4, batch_size=2),
        to_tensor,
        tokenize,
    )
    assert len(loader) == 5  # epoch length from the *_stats.json files
    samples = collect(loader)
    check_consistent(samples)
    assert sorted(s[0] for s in samples) == [0, 1, 2, 3, 4, 10000, 10001, 10002, 10003, 10004]
    # a key >= N is an error, never wrapped
    with pytest.raises(ValueError, match=r"outside \[0, 10000\)"):
        list(
            build_shard_loader(
                config(pattern, index_source="key", dataset_size=10**4), to_tensor, tokenize
            )
        )
    # field mode on shards without an index field
    with pytest.raises(ValueError, match="no '.idx' entry"):
        list(build_shard_loader(config(pattern, dataset_size=10**5), to_tensor, tokenize))


# ----------------------------------------------------------------------------- writer


def read_tar(path):
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_writer_round_trip_from_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (20, 12), color_of(i)) for i in range(10)]
    ds = datasets.Dataset.from_dict(
        {
            "image": images,
            "caption": [f"caption {i}" for i in range(10)],
            "uid": [100 + i for i in range(10)],
            "score": [i / 10 for i in range(10)],
        }
    ).cast_column("image", datasets.Image())
    out = tmp_path / "out"
    pattern, n = write_shards_from_dataset(
        ds, str(out), samples_per_shard=4, extra_columns=("uid",)
    )
    assert n == 10 and pattern == str(out / "{00000..00002}.tar")
    assert json.loads((out / "sizes.json").read_text()) == {
        "00000.tar": 4,
        "00001.tar": 4,
        "00002.tar": 2,
    }
    assert json.loads((out / "glofnd_index.json").read_text())["dataset_size"] == 10
    first = read_tar(out / "00000.tar")["000000001"]
    assert set(first) == {"jpg", "txt", "json", "idx"}
    assert json.loads(first["json"]) == {"dataset_index": 1, "key": "000000001", "uid": 101}
    assert first["idx"] == b"1" and first["txt"] == b"caption 1"

    loader = build_shard_loader(
        config(pattern, batch_size=2, shuffle_buffer=3), to_tensor, tokenize
    )
    samples = collect(loader)
    assert sorted(s[0] for s in samples) == list(range(10))
    check_consistent(samples)

    # index column; the loader infers N = max index + 1 from glofnd_index.json
    out2 = tmp_path / "out2"
    pattern2, _ = write_shards_from_dataset(
        ds, str(out2), index_column="uid", samples_per_shard=5, image_format="png"
    )
    ds2 = ShardDataset(config(pattern2, batch_size=10), to_tensor, tokenize)
    assert ds2.dataset_size == 110
    (batch,) = list(ds2)
    assert sorted(batch["dataset_index"].tolist()) == list(range(100, 110))
    with pytest.raises(FileExistsError):
        write_shards_from_dataset(ds, str(out2))
    # JPEG bytes stored in a datasets Image column are copied, not re-encoded
    raw = jpeg_bytes(color_of(3), size=9)
    ds3 = datasets.Dataset.from_dict(
        {"image": [{"bytes": raw, "path": None}], "caption": ["x"]}
    ).cast_column("image", datasets.Image())
    write_shards_from_dataset(ds3, str(tmp_path / "out3"))
    assert read_tar(tmp_path / "out3" / "00000.tar")["000000000"]["jpg"] == raw
    with pytest.raises(ValueError, match="duplicate dataset index"):
        write_shards_from_dataset(
            [{"image": images[0], "caption": "a", "i": 1}] * 2,
            str(tmp_path / "dup"),
            index_column="i",
        )


def test_writer_from_csv_and_cli(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (10, 10), color_of(i)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"filepath": f"imgs/{i}.png", "title": f"caption {i}"})
    csv_path = tmp_path / "data.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    pattern, n = write_shards_from_csv(
        str(csv_path), str(tmp_path / "csv_out"), samples_per_shard=3
    )
    assert n == 6
    samples = collect(build_shard_loader(config(pattern, batch_size=3), to_tensor, tokenize))
    assert sorted(s[0] for s in samples) == list(range(6))
    check_consistent(samples)

    # console entry: from-csv and from-dataset (save_to_disk directory)
    assert (
        main(["from-csv", str(csv_path), str(tmp_path / "cli_csv"), "--samples-per-shard", "6"])
        == 0
    )
    assert json.loads((tmp_path / "cli_csv" / "sizes.json").read_text()) == {"00000.tar": 6}
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (8, 8), color_of(i)) for i in range(3)],
            "text": [f"caption {i}" for i in range(3)],
        }
    ).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    assert (
        main(
            [
                "from-dataset",
                str(tmp_path / "saved"),
                str(tmp_path / "cli_ds"),
                "--image-column",
                "img",
                "--caption-column",
                "text",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "cli_ds" / "sizes.json").read_text()) == {"00000.tar": 3}


def test_add_index_to_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pattern = make_img2dataset_shards(src, num_shards=3, per_shard=4)
    out_pattern, n = add_index_to_shards(pattern, str(tmp_path / "seq"), start_index=0)
    assert n == 12 and out_pattern == str(tmp_path / "seq" / "{00000..00002}.tar")
    for s in range(3):
        shard = read_tar(tmp_path / "seq" / f"{s:05d}.tar")
        assert [int(v["idx"]) for v in shard.values()] == list(range(4 * s, 4 * s + 4))
        assert all(set(v) == {"jpg", "txt", "json", "idx"} for v in shard.values())
    loader = build_shard_loader(config(out_pattern, batch_size=3), to_tensor, tokenize)
    samples = collect(loader)
    assert sorted(s[0] for s in samples) == list(range(12))
    for index, caption, _ in samples:  # captions carry the img2dataset key
        key = int(caption.split()[1])
        assert index == (key // 10**4) * 4 + key % 10**4

    add_index_to_shards(pattern, str(tmp_path / "bykey"), index_source="key")
    info = json.loads((tmp_path / "bykey" / "glofnd_index.json").read_text())
    assert info["dataset_size"] == 20004
    samples = collect(
        build_shard_loader(
            config(str(tmp_path / "bykey" / "{00000..00002}.tar"), batch_size=4),
            to_tensor,
            tokenize,
        )
    )
    check_consistent(samples)
    assert main(["add-index", pattern, str(tmp_path / "cli"), "--start-index", "5"]) == 0
    assert int(read_tar(tmp_path / "cli" / "00000.tar")["000000000"]["idx"]) == 5
