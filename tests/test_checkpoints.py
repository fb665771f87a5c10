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
TRAINING_STATE = "optimizer.pt, scheduler.pt, rng_state.pth"


def write_file(path: Path) -> None:
    """A small but whole file of the kind its name says."""
    from safetensors.torch import save_file

    if path.name.endswith(".safetensors"):
        save_file({"w": torch.ones(256)}, str(path))
    elif path.name.endswith((".pt", ".pth")):
        torch.save({"state": torch.ones(4)}, path)
    elif path.name.endswith(".json"):
        path.write_text("{}")
    else:
        path.write_bytes(b"x")


CHECKPOINT_FILES = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    STATE_FILE,
)


def make_run(out: Path) -> None:
    """checkpoint-2 complete, checkpoint-4 empty (killed as it began), checkpoint-6 cut
    short after the optimizer (the state's temporary file never renamed)."""
    (out / "checkpoint-2").mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        write_file(out / "checkpoint-2" / name)
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-6").mkdir()
    for name in ("model.safetensors", "optimizer.pt", STATE_FILE + ".tmp"):
        write_file(out / "checkpoint-6" / name)


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
        f"incomplete checkpoint-6 (lacks scheduler.pt, rng_state.pth, trainer_state.json, "
        f"{STATE_FILE}); checkpoint-4 (lacks {WEIGHTS}, {TRAINING_STATE}, trainer_state.json, "
        f"{STATE_FILE})"
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
            f"lacks scheduler.pt, rng_state.pth, trainer_state.json, {STATE_FILE}. Resume from "
            "a complete one (checkpoint-2) or with resume_from_checkpoint=last."
        ),
        out / "checkpoint-4": (
            f"checkpoint {out / 'checkpoint-4'} is incomplete (its writing was cut short): it "
            f"lacks {WEIGHTS}, {TRAINING_STATE}, trainer_state.json, {STATE_FILE}. Resume from "
            "a complete one (checkpoint-2) or with resume_from_checkpoint=last."
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
        f"checkpoint-6 (lacks scheduler.pt, rng_state.pth, trainer_state.json, {STATE_FILE}); "
        f"checkpoint-4 (lacks {WEIGHTS}, {TRAINING_STATE}, trainer_state.json, {STATE_FILE}); "
        f"checkpoint-2 (lacks {STATE_FILE}). Start afresh (drop resume_from_checkpoint; "
        "overwrite_output_dir=true deletes the earlier run's files)."
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


# -- issue 32, item 4: complete means every file a resume reads, each whole ------------------


def complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        write_file(folder / name)
    return folder


def cut(path: Path) -> int:
    """Keep the first half of a file (a copy cut short); returns the whole size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data)


NOT_A_TORCH_FILE = "truncated or corrupt: not a whole torch.save file"


def test_a_checkpoint_lacks_each_file_a_resume_reads(tmp_path):
    def problems(change) -> list[str]:
        folder = complete_checkpoint(tmp_path / f"case-{len(list(tmp_path.iterdir()))}")
        change(folder)
        return checkpoint_problems(folder)

    assert problems(lambda f: None) == []
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert problems(lambda f, n=name: (f / n).unlink()) == [name]

    def ranks(folder, present):
        (folder / "rng_state.pth").unlink()
        for rank in present:
            write_file(folder / f"rng_state_{rank}.pth")

    # one RNG file per process of a multi-process run
    assert problems(lambda f: ranks(f, [0, 1, 2])) == []
    assert problems(lambda f: ranks(f, [0, 2, 3])) == ["rng_state_1.pth"]

    def deepspeed(folder):  # DeepSpeed keeps optimizer and scheduler in global_stepN/
        (folder / "optimizer.pt").unlink()
        (folder / "scheduler.pt").unlink()
        (folder / "global_step7").mkdir()

    def fsdp(folder):
        (folder / "optimizer.pt").unlink()
        write_file(folder / "optimizer.bin")

    assert problems(deepspeed) == [] and problems(fsdp) == []


def test_a_truncated_or_corrupt_file_makes_a_checkpoint_incomplete(tmp_path):
    folder = complete_checkpoint(tmp_path / "checkpoint-3")
    size = (folder / "model.safetensors").stat().st_size
    cut(folder / "model.safetensors")
    assert checkpoint_problems(folder) == [
        f"a readable model.safetensors (truncated: {size // 2:,} of {size:,} bytes)"
    ]
    write_file(folder / "model.safetensors")
    for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):
        cut(folder / name)
        assert checkpoint_problems(folder) == [f"a readable {name} ({NOT_A_TORCH_FILE})"]
        write_file(folder / name)
    (folder / "trainer_state.json").write_text('{"global_step": 3,')
    assert checkpoint_problems(folder) == [
        "a readable trainer_state.json (not JSON: Expecting property name enclosed in double "
        "quotes: line 1 column 19 (char 18))"
    ]
    write_file(folder / "trainer_state.json")
    (folder / STATE_FILE).write_bytes(b"\x00" * 3)
    assert checkpoint_problems(folder) == [
        f"a readable {STATE_FILE} (truncated: 3 bytes, no header)"
    ]


def test_last_skips_a_damaged_checkpoint_and_a_named_one_is_refused(tmp_path):
    out = tmp_path / "run"
    complete_checkpoint(out / "checkpoint-2")
    complete_checkpoint(out / "checkpoint-4")
    cut(out / "checkpoint-4" / "optimizer.pt")
    messages = []
    assert resolve_resume_checkpoint("last", out, messages.append) == str(out / "checkpoint-2")
    assert messages == [
        f"resuming from {out / 'checkpoint-2'}, the newest complete checkpoint; skipped "
        f"incomplete checkpoint-4 (lacks a readable optimizer.pt ({NOT_A_TORCH_FILE}))"
    ]
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint(str(out / "checkpoint-4"), out)
    assert str(info.value) == (
        f"checkpoint {out / 'checkpoint-4'} is incomplete (its writing was cut short): it lacks "
        f"a readable optimizer.pt ({NOT_A_TORCH_FILE}). Resume from a complete one "
        "(checkpoint-2) or with resume_from_checkpoint=last."
    )


def test_a_weights_only_checkpoint_says_it_cannot_resume(tmp_path):
    """save_only_model=True writes no optimizer, scheduler or RNG state: transformers would
    resume from it with a fresh optimizer (another run than the interrupted one)."""
    out = tmp_path / "run"
    folder = complete_checkpoint(out / "checkpoint-5")
    for name in TRAINING_STATE.split(", "):
        (folder / name).unlink()
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint(str(folder), out)
    assert str(info.value) == (
        f"checkpoint {folder} cannot be resumed from: it lacks {TRAINING_STATE}. It holds the "
        f"weights only (as save_only_model=true writes): training cannot resume from it; start "
        f"a new run from its weights with model_name_or_path={folder}."
    )
    with pytest.raises(CheckpointError) as info:
        resolve_resume_checkpoint("last", out)
    assert str(info.value) == (
        f"resume_from_checkpoint=last: no complete checkpoint in {out}; incomplete: "
        f"checkpoint-5 (lacks {TRAINING_STATE}, weights only: save_only_model). Start afresh "
        "(drop resume_from_checkpoint; overwrite_output_dir=true deletes the earlier run's "
        "files)."
    )
    assert checkpoint_problems(folder, weights_only=True) == []  # what rotation counts


DAMAGES = {
    "no optimizer": (lambda f: (f / "optimizer.pt").unlink(), "it lacks optimizer.pt"),
    "truncated optimizer": (
        lambda f: cut(f / "optimizer.pt"),
        f"it lacks a readable optimizer.pt ({NOT_A_TORCH_FILE})",
    ),
    "truncated rng state": (
        lambda f: cut(f / "rng_state.pth"),
        f"it lacks a readable rng_state.pth ({NOT_A_TORCH_FILE})",
    ),
    "truncated weights": (
        lambda f: cut(f / "model.safetensors"),
        "it lacks a readable model.safetensors (truncated: ",
    ),
    "corrupt trainer state": (
        lambda f: (f / "trainer_state.json").write_text("{not json"),
        "it lacks a readable trainer_state.json (not JSON: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_glofnd_train_names_the_damaged_file_in_one_line(tmp_path, monkeypatch, capsys, damage):
    from glofnd_hf.cli import train as cli

    out = tmp_path / "run"
    folder = complete_checkpoint(out / "checkpoint-2")
    change, expected = DAMAGES[damage]
    change(folder)

    def never(*args, **kwargs):
        raise AssertionError("data loaded before the checkpoint was checked")

    monkeypatch.setattr(cli, "load_image_text_dataset", never)
    argv = ["--dataset_name", "glofnd-digits", "--output_dir", str(out), "--use_cpu", "true"]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--resume_from_checkpoint", str(folder)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"glofnd-train: error: checkpoint {folder} is incomplete (its writing was cut short): "
        + expected
    ), err
    assert err.endswith(
        "No complete checkpoint is beside it: start afresh (drop resume_from_checkpoint; "
        "overwrite_output_dir=true deletes the earlier run's files). [--debug shows the "
        "traceback]\n"
    ), err


# -- issue 32, item 5: damage met while resuming, another model family, a full disk ---------


def tiny_trainer(out: Path, family: str = "hf", **overrides):
    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_hf_clip, build_tiny_open_clip
    from glofnd_hf.trainer import GloFNDTrainer

    data = load_digits_pairs(seed=0)["train"].select(range(16))
    if family == "hf":
        adapter = build_tiny_hf_clip(image_size=16, texts=list(data["caption"]))
    else:
        adapter = build_tiny_open_clip(image_size=16, seed=0)
    values = dict(
        output_dir=str(out),
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
        per_device_train_batch_size=8,
    )
    args = cpu_args(out.parent, **{**values, **overrides})
    return GloFNDTrainer(adapter, args, train_dataset=data)


def corrupt_pickle(path: Path) -> None:
    """Spoil the pickled part of a torch.save file, leaving its size and zip directory whole
    (what the cheap checks cannot see)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    raw = bytearray(path.read_bytes())
    at = info.header_offset
    start = at + 30 + int.from_bytes(raw[at + 26 : at + 28], "little")
    start += int.from_bytes(raw[at + 28 : at + 30], "little")
    raw[start : start + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run's folder with checkpoint-1 and checkpoint-2 (kept pristine: copy it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    tiny_trainer(out).train()
    return out


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_a_file_spoiled_past_the_cheap_checks_is_named_when_resuming(tmp_path, trained_run, name):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    folder = out / "checkpoint-2"
    corrupt_pickle(folder / name)
    assert checkpoint_problems(folder) == []  # whole to the cheap checks
    with pytest.raises(CheckpointError) as info:
        tiny_trainer(out, max_steps=3).train(resume_from_checkpoint=str(folder))
    assert str(info.value) == (
        f"checkpoint {folder}: {name} cannot be read (truncated or corrupt? UnpicklingError: "
        "Unsupported operand 255); resume from an earlier checkpoint (name its folder in "
        "resume_from_checkpoint)"
    )


def test_a_checkpoint_of_another_model_family_is_refused_before_loading(tmp_path, trained_run):
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    folder = out / "checkpoint-2"
    before = snapshot(out)
    with pytest.raises(CheckpointError) as info:
        tiny_trainer(out, family="open_clip", max_steps=3).train(resume_from_checkpoint="last")
    assert str(info.value) == (
        f"checkpoint {folder} holds a model of the hf family, this run trains one of the "
        "open_clip family (CLIP): resume with the model it was trained from "
        "(model_name_or_path, model_family), or start a new run in another output_dir"
    )
    # Without a card, the family's marker file tells it.
    card = json.loads((folder / "glofnd_card.json").read_text())
    assert card["family"] == "hf"
    (folder / "glofnd_card.json").unlink()
    with pytest.raises(CheckpointError, match="holds a model of the hf family"):
        tiny_trainer(out, family="open_clip", max_steps=3).train(resume_from_checkpoint="last")
    before.pop("checkpoint-2/glofnd_card.json")
    assert snapshot(out) == before


def test_glofnd_train_refuses_another_family_in_one_line(tmp_path, trained_run, capsys):
    import shutil

    from glofnd_hf.cli import train as cli

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    argv = ["--dataset_name", "glofnd-digits", "--max_train_samples", "16", "--eval_split"]
    argv += ["none", "--per_device_train_batch_size", "8", "--tiny_image_size", "16"]
    argv += ["--output_dir", str(out), "--use_cpu", "true", "--report_to", "none"]
    argv += ["--model_name_or_path", "glofnd-tiny-open-clip", "--resume_from_checkpoint", "last"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (
        f"glofnd-train: error: checkpoint {out / 'checkpoint-2'} holds a model of the hf "
        "family, this run trains one of the open_clip family (CLIP): resume with the model it "
        "was trained from (model_name_or_path, model_family), or start a new run in another "
        "output_dir [--debug shows the traceback]\n"
    )


DISK_FULL = {
    "ENOSPC": OSError(28, "No space left on device"),
    "unexpected pos": RuntimeError(
        "[enforce fail at inline_container.cc:626] . unexpected pos 4352 vs 4240"
    ),
}


@pytest.mark.parametrize("kind", list(DISK_FULL))
def test_a_full_disk_while_saving_names_the_folder_and_the_space_left(tmp_path, monkeypatch, kind):
    import collections
    import shutil

    import glofnd_hf.checkpoints as checkpoints

    error = DISK_FULL[kind]

    def full(*args, **kwargs):
        raise error

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(
        checkpoints.shutil, "disk_usage", lambda path: usage(50 * 1024**3, 0, 12 * 1024**2)
    )
    assert checkpoints.shutil is shutil
    out = tmp_path / "run"
    trainer = tiny_trainer(out, max_steps=1)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
        trainer.train()
    assert isinstance(info.value, OSError)
    detail = " ".join(str(error).split())
    assert str(info.value) == (
        f"no space left to save checkpoint {out / 'checkpoint-1'} (12.0 MiB free of 50.0 GiB on "
        "its disk): free space or move output_dir to a larger disk (fewer checkpoints: "
        "save_total_limit), then resume with resume_from_checkpoint=last (the unfinished "
        f"checkpoint-1 is skipped) [{type(error).__name__}: {detail}]"
    )


def test_glofnd_train_says_the_disk_is_full_in_one_line(tmp_path, monkeypatch, capsys):
    from glofnd_hf.cli import train as cli

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    argv = ["--dataset_name", "glofnd-digits", "--max_train_samples", "16", "--eval_split"]
    argv += ["none", "--per_device_train_batch_size", "8", "--tiny_image_size", "16"]
    argv += ["--output_dir", str(out), "--use_cpu", "true", "--report_to", "none"]
    argv += ["--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err  # after the progress bars of training
    assert "Traceback" not in err, err
    err = err.rstrip("\n").split("\n")[-1]
    assert err.startswith(
        f"glofnd-train: error: no space left to save checkpoint {out / 'checkpoint-1'} ("
    ), err
    assert " free of " in err and "[OSError: [Errno 28] No space left on device]" in err, err


def test_weights_of_another_size_are_one_line(tmp_path, trained_run):
    import shutil

    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_hf_clip
    from glofnd_hf.trainer import GloFNDTrainer

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    data = load_digits_pairs(seed=0)["train"].select(range(16))
    adapter = build_tiny_hf_clip(image_size=32, texts=list(data["caption"]))  # was 16
    args = cpu_args(tmp_path, output_dir=str(out), max_steps=3, per_device_train_batch_size=8)
    with pytest.raises(CheckpointError) as info:
        GloFNDTrainer(adapter, args, train_dataset=data).train(resume_from_checkpoint="last")
    assert str(info.value).startswith(
        f"checkpoint {out / 'checkpoint-2'}: its weights do not fit this model (Error(s) in "
        "loading state_dict for CLIPModel: size mismatch for "
        "vision_model.embeddings.position_embedding.weight: "
    )
    assert str(info.value).endswith("): resume with the model it was trained from")


def test_a_full_disk_while_saving_the_final_model_is_one_line(tmp_path, monkeypatch):
    import glofnd_hf.checkpoints as checkpoints

    out = tmp_path / "run"
    trainer = tiny_trainer(out, max_steps=1)
    trainer.train()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.model, "save_pretrained", full)
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
        trainer.save_model(str(out))
    assert str(info.value).startswith(f"no space left to save the trained model in {out} (")
    assert "resume_from_checkpoint=last" in str(info.value)
