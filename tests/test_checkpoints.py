"""Checkpoints cut short by a crash: which one ``resume_from_checkpoint`` takes, the message
for an incomplete one, the atomic state write; per-sample randomness of the data path."""

import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from cpu_args import cpu_args
from PIL import Image

from glofnd_hf.checkpoints import (
    STATE_FILE,
    CheckpointError,
    checkpoint_problems,
    resolve_resume_checkpoint,
    write_atomically,
)

WEIGHTS = "model weights (model.safetensors or pytorch_model.bin)"


def make_run(out: Path) -> None:
    """checkpoint-2 complete, checkpoint-4 empty (killed as it began), checkpoint-6 cut
    short after the optimizer (the state's temporary file never renamed)."""
    (out / "checkpoint-2").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json", STATE_FILE):
        (out / "checkpoint-2" / name).write_bytes(b"x")
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-6").mkdir()
    for name in ("model.safetensors", "optimizer.pt", STATE_FILE + ".tmp"):
        (out / "checkpoint-6" / name).write_bytes(b"x")


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        if p.is_file()
        else None
        for p in sorted(folder.rglob("*"))
    }


def test_last_and_true_take_the_newest_complete_checkpoint_and_name_the_skipped(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    before = snapshot(out)
    skipped = (
        f"resuming from {out / 'checkpoint-2'}, the newest complete checkpoint; skipped "
        f"incomplete checkpoint-6 (lacks trainer_state.json, {STATE_FILE}); checkpoint-4 "
        f"(lacks {WEIGHTS}, trainer_state.json, {STATE_FILE})"
    )
    for value in ("last", "true", "True", True, "LAST"):
        messages = []
        assert resolve_resume_checkpoint(value, out, messages.append) == str(out / "checkpoint-2")
        assert messages == [skipped], value
    for value in (None, False, "", "false", "none"):
        assert resolve_resume_checkpoint(value, out) is None
    assert snapshot(out) == before  # nothing written, nothing removed


def test_an_incomplete_or_missing_checkpoint_is_refused_with_what_it_lacks(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    before = snapshot(out)
    cases = {
        out / "checkpoint-6": (
            f"checkpoint {out / 'checkpoint-6'} is incomplete (its writing was cut short): it "
            f"lacks trainer_state.json, {STATE_FILE}. Resume from a complete one (checkpoint-2) "
            "or with resume_from_checkpoint=last."
        ),
        out / "checkpoint-4": (
            f"checkpoint {out / 'checkpoint-4'} is incomplete (its writing was cut short): it "
            f"lacks {WEIGHTS}, trainer_state.json, {STATE_FILE}. Resume from a complete one "
            "(checkpoint-2) or with resume_from_checkpoint=last."
        ),
        out / "checkpoint-8": (
            f"checkpoint {out / 'checkpoint-8'} does not exist. Use resume_from_checkpoint=last "
            "for the newest complete checkpoint in output_dir."
        ),
        out: (
            f"{out} is not a checkpoint but holds checkpoints (checkpoint-6, checkpoint-4, "
            f"checkpoint-2): name one of them, or use resume_from_checkpoint=last with "
            f"output_dir={out}."
        ),
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            resolve_resume_checkpoint(str(path), out)
        assert str(info.value) == message
    assert resolve_resume_checkpoint(str(out / "checkpoint-2"), out) == str(out / "checkpoint-2")
    assert snapshot(out) == before


def test_last_without_a_complete_checkpoint_says_so(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    (out / "checkpoint-2" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint("last", out)
    assert str(info.value) == (
        f"resume_from_checkpoint=last: no complete checkpoint in {out}; incomplete: "
        f"checkpoint-6 (lacks trainer_state.json, {STATE_FILE}); checkpoint-4 (lacks {WEIGHTS}, "
        f"trainer_state.json, {STATE_FILE}); checkpoint-2 (lacks {STATE_FILE}). Start afresh "
        "(drop resume_from_checkpoint)."
    )
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint(True, tmp_path / "elsewhere")
    assert str(info.value) == (
        f"resume_from_checkpoint=last: no checkpoint in {tmp_path / 'elsewhere'} (it does not "
        "exist). Start afresh (drop resume_from_checkpoint), or set output_dir to the "
        "interrupted run's folder."
    )
    with pytest.raises(CheckpointError, match="cut short"):
        resolve_resume_checkpoint(out / "checkpoint-2", out)
    assert checkpoint_problems(out / "checkpoint-2") == [STATE_FILE]


def test_glofnd_train_resolves_the_checkpoint_before_loading_anything(tmp_path, monkeypatch):
    from glofnd_hf.cli import train as cli

    out = tmp_path / "run"
    make_run(out)
    (out / "checkpoint-2" / STATE_FILE).unlink()

    def never(*args, **kwargs):
        raise AssertionError("data loaded before the checkpoint was checked")

    monkeypatch.setattr(cli, "load_image_text_dataset", never)
    argv = ["--dataset_name", "glofnd-digits", "--output_dir", str(out), "--use_cpu", "true"]
    # 'true' is the newest complete checkpoint, never a folder named 'true'
    with pytest.raises(CheckpointError, match=r"^resume_from_checkpoint=last: no complete"):
        cli.run([*argv, "--resume_from_checkpoint", "true"])
    with pytest.raises(CheckpointError, match=r"checkpoint-6 is incomplete .* it lacks"):
        cli.run([*argv, "--resume_from_checkpoint", str(out / "checkpoint-6")])


def test_the_trainer_refuses_an_incomplete_checkpoint(tmp_path):
    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_hf_clip
    from glofnd_hf.trainer import GloFNDTrainer

    out = tmp_path / "run"
    make_run(out)
    before = snapshot(out)
    data = load_digits_pairs(seed=0)["train"].select(range(8))
    adapter = build_tiny_hf_clip(image_size=16, texts=list(data["caption"]))
    args = cpu_args(
        tmp_path, output_dir=str(out), save_strategy="steps", per_device_train_batch_size=8
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=data)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 is incomplete .* lacks model"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert snapshot(out) == before


def test_the_state_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / STATE_FILE
    path.write_bytes(b"old")

    def fails(temporary):
        Path(temporary).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == [STATE_FILE]
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == [STATE_FILE]


# -- per-sample randomness ------------------------------------------------------------------


def image_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_augmentation_is_a_function_of_seed_epoch_and_index_only():
    from glofnd_hf.data.hf import ImageTextCollator
    from glofnd_hf.models import build_tiny_hf_clip

    adapter = build_tiny_hf_clip(image_size=16, texts=["a", "b"])
    rows = [
        {"image": image_bytes(i), "caption": ["a", "b", "a b"], "dataset_index": 10 + i}
        for i in range(4)
    ]

    def collate(batch_rows, epoch, seed=0):
        collator = ImageTextCollator(
            adapter.image_transform(train=True), adapter.tokenize, seed=seed
        )
        collator.set_epoch(epoch)
        return collator(batch_rows)

    torch.manual_seed(1)
    random.seed(1)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = collate(rows, epoch=0)
    # the global generators are left as they were
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert np.array_equal(np.random.get_state()[1], state[2])
    torch.manual_seed(2)  # another global state, another batch composition and order
    again = collate(rows[::-1][:3], epoch=0)
    for k, i in enumerate([3, 2, 1]):
        assert torch.equal(again["pixel_values"][k], first["pixel_values"][i])
        assert torch.equal(again["input_ids"][k], first["input_ids"][i])
    other = collate(rows, epoch=1)
    assert not torch.equal(other["pixel_values"], first["pixel_values"])  # new crops each epoch
    assert not torch.equal(collate(rows, epoch=0, seed=1)["pixel_values"], first["pixel_values"])


def test_resume_notices_go_to_the_log(tmp_path, caplog):
    out = tmp_path / "run"
    make_run(out)
    with caplog.at_level(logging.WARNING, logger="glofnd_hf.checkpoints"):
        resolve_resume_checkpoint("last", out)
    assert "skipped incomplete checkpoint-6" in caplog.text
