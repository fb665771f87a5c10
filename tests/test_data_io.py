"""The shared data pieces: webdataset I/O, to_rgb, the bad-sample counter, the dataset loader,
rank/world resolution and the glofnd-shards module entry."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from glofnd_hf.data.bad_samples import (
    BAD_SAMPLE_KINDS,
    DATASETS_BAD_SAMPLE_KINDS,
    BadSampleCounter,
)
from glofnd_hf.data.images import defer_image_decoding, to_rgb
from glofnd_hf.data.loading import MissingSplitError, load_image_text_dataset
from glofnd_hf.data.webdataset_io import (
    expand_shards,
    find_image,
    is_local,
    local_path,
    read_caption,
    read_dataset_index,
    read_metadata,
    shard_basename,
)
from glofnd_hf.fnd.comm import rank_and_world


def png_bytes(mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (4, 4), 7 if mode in ("L", "P") else (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- webdataset I/O


def test_shard_paths_local_and_remote(tmp_path):
    assert is_local("/data/00001.tar") and is_local("file:///data/00001.tar")
    assert not is_local("pipe:aws s3 cp s3://b/00001.tar -")
    assert local_path("file:/data/x.tar") == "/data/x.tar"
    shard = tmp_path / "00003.tar"
    shard.write_bytes(b"")
    assert os.path.samefile(local_path(f"file://{shard}"), shard)
    assert shard_basename("file:///data/00001.tar") == "00001.tar"
    assert shard_basename("pipe:aws s3 cp 's3://b/p/00007.tar.gz' -") == "00007.tar.gz"
    urls = expand_shards(f"{tmp_path}/{{0..2}}.tar::pipe:cat {tmp_path}/x.tar")
    assert urls == [
        f"{tmp_path}/0.tar",
        f"{tmp_path}/1.tar",
        f"{tmp_path}/2.tar",
        f"pipe:cat {tmp_path}/x.tar",
    ]
    with pytest.raises(ValueError, match="no shards"):
        expand_shards([])


def test_caption_image_index_and_metadata_members():
    assert read_caption({"caption": b" a dog "}) == "a dog"
    assert read_caption({"text": b"t", "caption": b"c"}) == "t"  # order of preference
    assert read_caption({"txt": b"   "}) is None
    assert read_caption({"txt": b"\xff\xfe"}) is None
    assert read_caption({"json": b"{}"}) is None
    assert find_image({"png": b"p", "jpg": b"j"}) == b"j"
    assert find_image({"txt": b"x"}) is None
    assert read_dataset_index({"__key__": "k", "idx": b" 12\n"}) == (12, "")
    assert read_dataset_index({"__key__": "k", "json": b'{"dataset_index": "7"}'}) == (7, "")
    index, reason = read_dataset_index({"__key__": "k", "idx": b"x1"})
    assert index is None and "not an integer" in reason
    assert read_dataset_index({"__key__": "dir/000123"}, "key") == (123, "")
    assert read_metadata({"json": json.dumps({"image_id": 3}).encode()}) == {"image_id": 3}
    assert read_metadata({"json": b"[1]"}) == {} and read_metadata({}) == {}
    with pytest.raises(ValueError):
        read_metadata({"json": b"{not json"})


# ----------------------------------------------------------------------------- to_rgb


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_to_rgb_reads_every_cell_kind(tmp_path, mode):
    data = png_bytes(mode)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    cells = [
        data,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        Image.open(io.BytesIO(data)),
        array,
    ]
    for cell in cells:
        image = to_rgb(cell)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), array), type(cell)


def test_to_rgb_rejects_corrupt_and_unknown_cells():
    with pytest.raises(OSError):
        to_rgb(b"definitely not an image")
    truncated = png_bytes()[:40]
    with pytest.raises(OSError):  # decoded eagerly, not at the first transform
        to_rgb(truncated)
    with pytest.raises(ValueError, match="cannot read an image"):
        to_rgb(3.5)


def test_defer_image_decoding_hands_out_stored_bytes():
    import datasets

    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(), "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    assert isinstance(data[0]["image"], Image.Image)
    assert defer_image_decoding(data, "image")[0]["image"]["bytes"] == png_bytes()
    rows = [{"image": b"x"}]
    assert defer_image_decoding(rows, "image") is rows  # plain iterables pass through


# ----------------------------------------------------------------------------- bad samples


def test_counter_deltas_travel_between_counters_of_the_same_kinds(caplog):
    caplog.set_level(logging.WARNING)
    worker = BadSampleCounter(kinds=DATASETS_BAD_SAMPLE_KINDS, warn_interval_s=3600)
    worker.add("missing_caption", "row 1")
    worker.add("missing_caption", "row 2")
    worker.add("corrupt_image", "row 3")
    delta = worker.take_delta()
    assert delta.tolist() == [1, 2]  # ordered like the kinds
    assert worker.take_delta().tolist() == [0, 0]
    main = BadSampleCounter(kinds=DATASETS_BAD_SAMPLE_KINDS, log=False)
    main.add_tensor(delta)
    assert main.as_dict() == {"corrupt_image": 1, "missing_caption": 2} and main.total() == 3
    warned = [r.getMessage() for r in caplog.records]
    assert sum("(missing_caption)" in m for m in warned) == 1  # rate limited per kind
    with pytest.raises(KeyError):
        worker.add("bad_index")  # not a kind this counter counts
    with pytest.raises(ValueError, match="unknown bad-sample kind"):
        BadSampleCounter(kinds=("cosmic_ray",))
    assert set(DATASETS_BAD_SAMPLE_KINDS) <= set(BAD_SAMPLE_KINDS)


def test_collator_counts_with_the_shared_counter():
    from glofnd_hf.data.hf import ImageTextCollator

    def transform(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    def tokenize(texts):
        return {"input_ids": torch.tensor([[len(t)] for t in texts])}

    collator = ImageTextCollator(transform, tokenize)
    rows = [
        {"image": png_bytes(), "caption": "ok", "dataset_index": 0},
        {"image": b"broken", "caption": "ok", "dataset_index": 1},
        {"image": png_bytes(), "caption": " ", "dataset_index": 2},
    ]
    batch = collator(rows)
    assert batch["bad_sample_counts"].tolist() == [1, 1]
    assert batch["dataset_index"].tolist() == [0, 0, 0]  # stand-ins copy the good row
    assert "bad_sample_counts" not in collator(rows[:1])
    assert collator.bad_sample_counts == {"corrupt_image": 1, "missing_caption": 1}


# ----------------------------------------------------------------------------- loading


def test_loader_picks_splits_of_folders_and_names_missing_ones(tmp_path):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"caption": ["a", "b"]})}
    ).save_to_disk(folder)
    assert load_image_text_dataset(folder, split="train")["caption"] == ["a", "b"]
    assert isinstance(load_image_text_dataset(folder), datasets.DatasetDict)
    with pytest.raises(MissingSplitError, match="no split 'test'") as info:
        load_image_text_dataset(folder, split="test")
    assert info.value.available == ["train"]


def test_glofnd_shards_runs_as_a_module_and_names_a_missing_split(tmp_path):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"caption": ["a"]})}).save_to_disk(
        folder
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "glofnd_hf.cli.shards",
            "from-dataset",
            folder,
            str(tmp_path / "out"),
            "--split",
            "test",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.endswith(
        "glofnd-shards: error: split 'test' not in ['train'] [--debug shows the traceback]\n"
    )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- rank / world


def test_rank_and_world_explicit_then_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world() == (2, 4)
    assert rank_and_world(rank=1) == (1, 4)
    assert rank_and_world(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="invalid rank"):
        rank_and_world(rank=4)
