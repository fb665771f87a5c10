"""Faulty training shards and data (issue 32, items 5 to 8): missing shard files, shards that
hold nothing usable, missing labels, empty data sets, a wild dataset index, one index on two
samples, and a mid-epoch resume under another number of DataLoader workers. Each is one line
naming what is wrong and what to do (exit status 2 from the commands)."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
import torch
import yaml
from test_shards import collect, config, good_sample, make_shard_set, to_tensor, tokenize, write_tar

from glofnd_hf.cli import train as train_cli
from glofnd_hf.cli.shards import main as shards_main
from glofnd_hf.data import index_space
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.data.errors import (
    DataError,
    DuplicateIndexError,
    IndexSpaceError,
    ShardResumeError,
)
from glofnd_hf.data.hf import ImageTextCollator, prepare_image_text_dataset
from glofnd_hf.data.loading import load_image_text_dataset
from glofnd_hf.data.shards import STREAM_FILE, ShardDataset, build_shard_loader

GIB = 2**30


@pytest.fixture
def machine_memory(monkeypatch):
    """The data layer sees a machine of 64 GiB (the check does not depend on the host)."""
    monkeypatch.setattr(index_space, "memory_of", lambda device: 64 * GIB)


def train_error(tmp_path, capsys, **settings) -> str:
    """The one line ``glofnd-train`` answers a recipe with (exit status 2)."""
    recipe = dict(
        model_name_or_path="glofnd-tiny-hf-clip",
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        do_eval=False,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    recipe.update(settings)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_cli.main([str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("glofnd-train: error: ")
    return err[-1]


# ----------------------------------------------------------------------------- item 6


def test_a_missing_shard_file_is_refused_naming_it(tmp_path):
    make_shard_set(tmp_path, num_shards=3, per_shard=4)
    pattern = str(tmp_path / "{00000..00003}.tar")  # 00003.tar does not exist
    with pytest.raises(DataError, match=r"1 of the 4 shards does not exist \(the first: '.*00003"):
        ShardDataset(config(pattern, train_num_samples=12), to_tensor, tokenize)


def test_a_pattern_matching_no_file_is_named_not_a_sizes_json(tmp_path):
    pattern = str(tmp_path / "nowhere" / "{00000..00003}.tar")
    for extra in ({}, {"train_num_samples": 12, "dataset_size": 12}):
        with pytest.raises(DataError, match="matches no file") as info:
            ShardDataset(config(pattern, **extra), to_tensor, tokenize)
        assert "nowhere/00000.tar" in str(info.value) and "sizes.json" not in str(info.value)
    with pytest.raises(DataError, match="glob patterns are not expanded"):
        ShardDataset(config(str(tmp_path / "*.tar")), to_tensor, tokenize)


def test_remote_urls_and_a_shard_listed_twice(tmp_path):
    # pipe: and http: shards are not checked up front (reading them reports failures)
    ds = ShardDataset(
        config("pipe:cat /nowhere.tar", train_num_samples=5, dataset_size=5), to_tensor, tokenize
    )
    assert ds.batches_per_epoch == 1
    pattern = make_shard_set(tmp_path, num_shards=2, per_shard=5)
    twice = str(tmp_path / "00000.tar") + "::" + pattern
    with pytest.raises(DataError, match="listed twice"):
        ShardDataset(config(twice), to_tensor, tokenize)
    ShardDataset(config(twice, resampled=True), to_tensor, tokenize)  # weighting on purpose


def test_glofnd_train_refuses_a_missing_shard(tmp_path, capsys):
    make_shard_set(tmp_path, num_shards=2, per_shard=8)
    line = train_error(
        tmp_path, capsys, train_shards=str(tmp_path / "{00000..00002}.tar"), train_num_samples=16
    )
    assert "1 of the 3 shards does not exist" in line and "00002.tar" in line


# ----------------------------------------------------------------------------- item 5: shards


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_shards_with_train_num_samples_are_one_line(num_workers):
    loader = build_shard_loader(
        config("pipe:false", train_num_samples=8, dataset_size=8, num_workers=num_workers),
        to_tensor,
        tokenize,
    )
    with pytest.raises(DataError, match="produced no usable sample") as info:
        list(loader)
    assert "shard_read_error 1" in str(info.value) and "the first read error" in str(info.value)


def test_glofnd_train_with_pipe_false_is_one_line(tmp_path, capsys):
    line = train_error(
        tmp_path, capsys, train_shards="pipe:false", train_num_samples=8, num_samples=8
    )
    assert "produced no usable sample" in line and "pipe:false" in line


def test_shards_without_samples(tmp_path):
    for s in range(2):
        write_tar(tmp_path / f"{s:05d}.tar", [])
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 0, "00001.tar": 0}))
    pattern = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(DataError, match="hold no samples according to their sizes.json"):
        ShardDataset(config(pattern), to_tensor, tokenize)
    with pytest.raises(DataError, match="index space N is 0"):
        ShardDataset(config(pattern, train_num_samples=5), to_tensor, tokenize)
    loader = build_shard_loader(
        config(pattern, train_num_samples=5, dataset_size=5), to_tensor, tokenize
    )
    with pytest.raises(DataError, match=r"no usable sample \(skipped: none\)"):
        list(loader)


@pytest.mark.parametrize("member", ["idx", "json"])
def test_a_wild_index_space_from_the_shards_is_refused(member, tmp_path, machine_memory):
    samples = [good_sample(i) for i in range(8)]
    if member == "idx":
        samples[3]["idx"] = str(10**12)
    else:
        del samples[3]["idx"]
        samples[3]["json"] = json.dumps({"dataset_index": 10**12})
    write_tar(tmp_path / "00000.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 8}))
    pattern = str(tmp_path / "00000.tar")
    with pytest.raises(ValueError, match=r"dataset index 1000000000000 outside \[0, 8\)"):
        list(build_shard_loader(config(pattern, batch_size=4), to_tensor, tokenize))
    with pytest.raises(IndexSpaceError, match="dataset_size=1000000000001: N = 1,000,000,000,001"):
        ShardDataset(config(pattern, dataset_size=10**12 + 1), to_tensor, tokenize)
    (tmp_path / "glofnd_index.json").write_text(json.dumps({"dataset_size": 10**12 + 1}))
    with pytest.raises(IndexSpaceError, match="dataset_size in glofnd_index.json") as info:
        ShardDataset(config(pattern), to_tensor, tokenize)
    assert "needs at least 7,450.6 GiB" in str(info.value) and "has 64.0 GiB" in str(info.value)


# ----------------------------------------------------------------------------- item 5: datasets


def digit_rows(n=16):
    return load_digits_pairs(seed=0)["train"].select(range(n))


def test_a_missing_label_is_named_before_training():
    rows = digit_rows()
    labels = list(rows["semantic_label"])
    labels[5] = None
    data = rows.remove_columns("semantic_label").add_column("semantic_label", labels)
    with pytest.raises(
        DataError,
        match=r"column 'semantic_label' .* 1 missing value\(s\), the first in row 5, dataset index 5",
    ):
        prepare_image_text_dataset(data, extra_columns=["semantic_label"])
    # the collator (rows that escaped the check) names the label and the row
    collator = ImageTextCollator(lambda im: torch.zeros(3, 4, 4), tokenize, label_column="label")
    row = {"image": rows[0]["image"], "caption": "a", "dataset_index": 7}
    for bad in (None, "cat", 1.5):
        with pytest.raises(
            DataError,
            match=f"label column 'label' must hold integer class ids; the row with dataset index 7 holds {bad!r}",
        ):
            collator([dict(row, label=bad)])
    assert collator([dict(row, label=3)])["fn_labels"].tolist() == [3]


def test_empty_datasets(tmp_path):
    rows = digit_rows(4)
    empty = rows.select(range(0))
    with pytest.raises(DataError, match=r"training data is empty \(0 rows\)"):
        prepare_image_text_dataset(empty)
    # save_to_disk writes a split without rows that load_from_disk cannot read (IndexError)
    datasets.DatasetDict({"train": empty, "validation": rows}).save_to_disk(str(tmp_path / "a"))
    with pytest.raises(DataError, match="split 'train' of dataset folder .* holds no rows"):
        load_image_text_dataset(str(tmp_path / "a"), split="train")
    assert len(load_image_text_dataset(str(tmp_path / "a"), split="validation")) == 4
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_image_text_dataset(str(tmp_path / "a"), split="test")
    empty.save_to_disk(str(tmp_path / "b"))
    with pytest.raises(DataError, match="holds no rows"):
        load_image_text_dataset(str(tmp_path / "b"))


def test_a_wild_index_in_a_column_is_refused_naming_the_row(machine_memory):
    rows = digit_rows(8)
    index = list(range(8))
    index[6] = 10**12
    data = rows.remove_columns("dataset_index").add_column("dataset_index", index)
    with pytest.raises(IndexSpaceError) as info:
        prepare_image_text_dataset(data)
    assert str(info.value).startswith(
        "index column 'dataset_index' of the training data holds dataset index 1000000000000 "
        "(row 6 of 8): N = 1,000,000,000,001 samples, whose per-sample state needs at least "
        "7,450.6 GiB (8 bytes per sample) but this machine has 64.0 GiB"
    )
    assert prepare_image_text_dataset(rows)[1] == 8  # N = the largest index + 1


@pytest.mark.parametrize("case", ["missing label", "empty split", "wild index"])
def test_glofnd_train_answers_bad_datasets_with_one_line(case, tmp_path, capsys):
    rows = digit_rows(8)
    if case == "missing label":
        labels = list(rows["semantic_label"])
        labels[2] = None
        rows = rows.remove_columns("semantic_label").add_column("semantic_label", labels)
        expected = "column 'semantic_label' of the training data has 1 missing value(s)"
    elif case == "empty split":
        rows = rows.select(range(0))
        expected = "split 'train' of dataset folder"
    else:
        index = list(range(8))
        index[2] = 10**12
        rows = rows.remove_columns("dataset_index").add_column("dataset_index", index)
        expected = "holds dataset index 1000000000000 (row 2 of 8)"
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "data"))
    line = train_error(
        tmp_path,
        capsys,
        dataset_name=str(tmp_path / "data"),
        eval_split=None,
        label_column="semantic_label",
        detector="oracle",
    )
    assert expected in line


# ----------------------------------------------------------------------------- item 7


def duplicate_shards(root):
    """Two shards of 8; the sample with key 'b5' in the second repeats index 3 of the first."""
    write_tar(root / "00000.tar", [good_sample(i) for i in range(8)])
    second = [good_sample(i) for i in range(8, 16)]
    second[5] = good_sample(3, key="b5")
    write_tar(root / "00001.tar", second)
    (root / "sizes.json").write_text(json.dumps({"00000.tar": 8, "00001.tar": 8}))
    return str(root / "{00000..00001}.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_index_held_by_two_samples_stops_training_naming_the_sample(tmp_path, num_workers):
    pattern = duplicate_shards(tmp_path)
    loader = build_shard_loader(
        config(pattern, batch_size=4, num_workers=num_workers), to_tensor, tokenize
    )
    with pytest.raises(DuplicateIndexError, match="dataset index 3 comes twice in epoch 0") as info:
        collect(loader)
    message = str(info.value)
    assert "00000.tar' key '000000003'" in message or "00001.tar' key 'b5'" in message
    assert "glofnd-shards verify" in message


def test_samples_read_again_on_purpose_are_not_duplicates(tmp_path):
    pattern = make_shard_set(tmp_path, num_shards=2, per_shard=5)
    # a worker re-reads its shards to fill its quota (15 samples from 10): no error
    loader = build_shard_loader(config(pattern, train_num_samples=15), to_tensor, tokenize)
    assert len(collect(loader)) == 15
    loader = build_shard_loader(
        config(pattern, train_num_samples=30, resampled=True), to_tensor, tokenize
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(collect(loader)) == 30
    # every epoch starts afresh
    loader = build_shard_loader(config(pattern), to_tensor, tokenize)
    assert [len(collect(loader)) for _ in range(3)] == [10, 10, 10]


def test_glofnd_shards_verify_names_both_samples(tmp_path, capsys):
    pattern = duplicate_shards(tmp_path)
    with pytest.raises(SystemExit) as stop:
        shards_main(["verify", pattern])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["duplicated_indices"] == 1 and report["samples"] == 16
    line = captured.err.strip()
    assert line.startswith(
        "glofnd-shards: error: dataset index 3 is held by shard "
        f"'{tmp_path}/00000.tar' key '000000003' and by shard '{tmp_path}/00001.tar' key 'b5'"
    )


def test_glofnd_shards_verify_a_clean_set_and_other_problems(tmp_path, capsys):
    pattern = make_shard_set(tmp_path, num_shards=2, per_shard=5)
    assert shards_main(["verify", pattern]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_problems"] == 0 and report["dataset_size"] == 10
    assert report["largest_index"] == 9
    samples = [good_sample(i) for i in range(5)]
    samples[1]["idx"] = "12"  # outside [0, 10)
    write_tar(tmp_path / "00001.tar", samples[:4])  # sizes.json says 5
    with pytest.raises(SystemExit):
        shards_main(["verify", pattern])
    captured = capsys.readouterr()
    problems = json.loads(captured.out)["problems"]
    assert any("dataset index 12 outside [0, 10)" in p for p in problems)
    assert any(
        "sizes.json gives 5 samples for '00001.tar', the shard holds 4" in p for p in problems
    )
    assert "more problem(s)" in captured.err


# ----------------------------------------------------------------------------- item 8


def test_resuming_mid_epoch_with_another_worker_count_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    pattern = make_shard_set(tmp_path / "shards", num_shards=4, per_shard=5)
    straight = build_shard_loader(config(pattern, batch_size=2, num_workers=2), to_tensor, tokenize)
    straight.set_epoch(1)
    full = [s[0] for s in collect(straight)]
    checkpoint = tmp_path / "checkpoint-3"
    straight.save_stream_settings(checkpoint)
    assert json.loads((checkpoint / STREAM_FILE).read_text())["num_workers"] == 2

    other = build_shard_loader(config(pattern, batch_size=2, num_workers=1), to_tensor, tokenize)
    with pytest.raises(ShardResumeError) as info:
        other.resume_at(1, 3, checkpoint=checkpoint)
    assert str(info.value) == (
        "cannot continue epoch 1 after 3 batches: the checkpoint's shard stream was read with "
        "dataloader_num_workers = 2 and this run has 1, which orders the rest of the epoch "
        "differently (samples would be repeated or missed); resume with "
        "dataloader_num_workers = 2, or from a checkpoint saved at the end of an epoch"
    )
    other.resume_at(2, 0, checkpoint=checkpoint)  # a new epoch: any worker count

    same = build_shard_loader(config(pattern, batch_size=2, num_workers=2), to_tensor, tokenize)
    same.resume_at(1, 3, checkpoint=checkpoint)
    same.set_epoch(1)
    assert [s[0] for s in collect(same)] == full[6:]  # the rest of the epoch, as it was
    # a checkpoint without the record (older runs) is not checked
    other.resume_at(1, 3, checkpoint=tmp_path)
