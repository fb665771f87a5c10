"""One run per output folder (issue 32, item 2): a new run never reuses a folder holding an
earlier run unless told to (``overwrite_output_dir``, which deletes that run's files), a
resume continues its own run, rotation deletes only this run's checkpoints, and two runs
never use one folder at once (a lock the system drops when its process dies)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_checkpoints import snapshot, tiny_trainer

from glofnd_hf.checkpoints import STATE_FILE
from glofnd_hf.cli import train as cli
from glofnd_hf.run_folder import (
    LOCK_FILE,
    RunFolderError,
    check_output_dir,
    earlier_run_files,
    lock_output_dir,
)

ROOT = Path(__file__).resolve().parents[1]
DEBUG_HINT = " [--debug shows the traceback]\n"
TINY_RUN = [
    "--dataset_name",
    "glofnd-digits",
    "--max_train_samples",
    "16",
    "--eval_split",
    "none",
    "--per_device_train_batch_size",
    "8",
    "--tiny_image_size",
    "16",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "steps",
    "--save_steps",
    "1",
]


def refused(out, names: str) -> str:
    return (
        f"output_dir {out} holds an earlier run ({names}): resume it with "
        "resume_from_checkpoint=last, choose another output_dir, or set "
        "overwrite_output_dir=true to delete that run's files and start afresh"
    )


def write_file(path: Path) -> None:
    """A small but whole file of the kind its name says."""
    import torch
    from safetensors.torch import save_file

    if path.name.endswith(".safetensors"):
        save_file({"w": torch.ones(8)}, str(path))
    elif path.name.endswith((".pt", ".pth", ".bin")):
        torch.save({"w": torch.ones(8)}, path)
    else:
        path.write_text("{}")


def checkpoint(folder: Path) -> Path:
    """A complete checkpoint folder (small files of the right kinds)."""
    folder.mkdir(parents=True)
    names = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")
    for name in (*names, "trainer_state.json", STATE_FILE):
        write_file(folder / name)
    return folder


def earlier_run(out: Path) -> None:
    """A finished run's folder (checkpoints 3 and 8, the final model) beside a user's notes
    and logs."""
    checkpoint(out / "checkpoint-3")
    checkpoint(out / "checkpoint-8")
    for name in ("model.safetensors", "training_args.bin", "glofnd_card.json", "config.json"):
        write_file(out / name)
    (out / "notes.txt").write_text("keep me")
    (out / "runs").mkdir()
    (out / "runs" / "events.log").write_text("a log")


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- what an earlier run is ------------------------------------------------------------------


def test_a_missing_empty_or_unrelated_folder_is_free(tmp_path):
    assert earlier_run_files(tmp_path / "missing") == []
    assert check_output_dir(tmp_path / "missing") == []
    out = tmp_path / "out"
    out.mkdir()
    assert check_output_dir(out) == []
    for name in ("notes.txt", "README.md", "config.json", LOCK_FILE):
        (out / name).write_text("x")
    (out / "runs").mkdir()
    (out / "checkpoint-best").mkdir()  # not checkpoint-N
    before = snapshot(out)
    assert check_output_dir(out) == [] and snapshot(out) == before


@pytest.mark.parametrize(
    "name",
    [
        "checkpoint-5/",
        "trainer_state.json",
        "training_args.bin",
        "glofnd_card.json",
        STATE_FILE,
        "zero_shot_results.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
    ],
)
def test_each_kind_of_earlier_run_is_found(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    if name.endswith("/"):
        (out / name).mkdir()  # even an empty (incomplete) checkpoint folder
    else:
        (out / name).write_bytes(b"x")
    found = name.rstrip("/")
    assert earlier_run_files(out) == [found]
    with pytest.raises(RunFolderError) as info:
        check_output_dir(out)
    assert str(info.value) == refused(out, found)


def test_overwrite_deletes_the_earlier_run_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    before = snapshot(out)
    names = "checkpoint-8, checkpoint-3, glofnd_card.json, model.safetensors, training_args.bin"
    with pytest.raises(RunFolderError) as info:
        check_output_dir(out)
    assert str(info.value) == refused(out, names)
    assert snapshot(out) == before
    messages = []
    deleted = check_output_dir(out, overwrite=True, log=messages.append)
    assert deleted == names.split(", ")
    assert messages == [f"overwrite_output_dir: deleted the earlier run's files in {out}: {names}"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt", "runs"]
    assert (out / "runs" / "events.log").read_text() == "a log"


def test_more_than_five_names_are_counted(tmp_path):
    out = tmp_path / "out"
    for step in range(1, 8):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(RunFolderError) as info:
        check_output_dir(out)
    assert str(info.value) == refused(
        out, "checkpoint-7, checkpoint-6, checkpoint-5, checkpoint-4, checkpoint-3, ... (7 in all)"
    )


def test_a_resume_continues_its_own_run_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    before = snapshot(out)
    messages = []
    resume = out / "checkpoint-8"
    assert check_output_dir(out, resume, overwrite=True, log=messages.append) == []
    assert messages == [
        f"overwrite_output_dir is ignored: resuming the run in {out} keeps its files"
    ]
    assert check_output_dir(str(out) + "/", str(resume)) == []
    assert snapshot(out) == before
    # A checkpoint elsewhere starts a new run in output_dir.
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        check_output_dir(out, tmp_path / "other" / "checkpoint-2")


# -- glofnd-train ---------------------------------------------------------------------------


def test_glofnd_train_refuses_a_reused_folder_before_loading_anything(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    earlier_run(out)
    before = snapshot(out)

    def never(*args, **kwargs):
        raise AssertionError("data loaded before the output folder was checked")

    monkeypatch.setattr(cli, "load_image_text_dataset", never)
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY_RUN, "--output_dir", str(out)])
    assert info.value.code == 2
    names = "checkpoint-8, checkpoint-3, glofnd_card.json, model.safetensors, training_args.bin"
    assert one_line(capsys.readouterr().err) == (
        f"glofnd-train: error: {refused(out, names)}{DEBUG_HINT}"
    )
    before[LOCK_FILE] = snapshot(out)[LOCK_FILE]  # the check held the folder meanwhile
    assert snapshot(out) == before


def test_glofnd_train_overwrites_when_told_and_resumes_its_own_run(tmp_path, capsys):
    """The README's case: a second run into the demo's folder deleted the first run's
    checkpoints (higher steps too) and its model, with an INFO line only."""
    out = tmp_path / "out"
    assert cli.main([*TINY_RUN, "--output_dir", str(out), "--max_steps", "4"]) == 0
    first = snapshot(out)
    assert {"checkpoint-3", "checkpoint-4", "model.safetensors"} <= set(first)
    capsys.readouterr()  # the first run's progress bars
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY_RUN, "--output_dir", str(out), "--max_steps", "1"])
    assert info.value.code == 2
    assert "holds an earlier run (checkpoint-4, checkpoint-3, checkpoint-2, checkpoint-1, " in (
        one_line(capsys.readouterr().err)
    )
    assert {k: v for k, v in snapshot(out).items() if k != LOCK_FILE} == {
        k: v for k, v in first.items() if k != LOCK_FILE
    }
    # Told to: the earlier run's files go first; the new run's are all that is left of it.
    argv = [*TINY_RUN, "--output_dir", str(out), "--overwrite_output_dir", "true"]
    assert cli.main([*argv, "--max_steps", "1"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 1
    # A resume of that run into its own folder is never refused, overwrite or not.
    argv += ["--max_steps", "2", "--resume_from_checkpoint", "last"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# -- the trainer (library users) -------------------------------------------------------------


def test_the_trainer_refuses_a_reused_folder_unless_told(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    before = snapshot(out)
    with pytest.raises(RunFolderError, match=r"^output_dir .* holds an earlier run \(checkpoint-8"):
        tiny_trainer(out).train()
    before[LOCK_FILE] = snapshot(out)[LOCK_FILE]
    assert snapshot(out) == before
    tiny_trainer(out, overwrite_output_dir=True).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "model.safetensors").exists()  # the earlier run's final model is gone
    assert (out / "notes.txt").read_text() == "keep me"


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    out = tmp_path / "out"
    trainer = tiny_trainer(out, save_total_limit=1)
    # checkpoint-1 and checkpoint-5: another writer's (after this run's start); 2 and 3: ours
    for step in (1, 2, 3, 5):
        checkpoint(out / f"checkpoint-{step}")
    trainer._written_checkpoints = {str(out / "checkpoint-2"), str(out / "checkpoint-3")}
    trainer.state.global_step = 3
    trainer._rotate_complete_checkpoints(str(out), str(out / "checkpoint-3"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-3",
        "checkpoint-5",
    ]
    # Resuming the run in output_dir: its checkpoints are this run's.
    trainer._continues_folder_run = True
    trainer._rotate_complete_checkpoints(str(out), str(out / "checkpoint-3"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


# -- two runs at once ------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from glofnd_hf.run_folder import lock_output_dir
    lock_output_dir(sys.argv[1])
    if sys.argv[2] == "fork":  # a DataLoader worker, say, outliving its killed parent
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
    print("held", flush=True)
    time.sleep(120)
    """
)


def hold(out: Path, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), "fork" if fork else "-"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    child = int(proc.stdout.readline()) if fork else None
    assert proc.stdout.readline() == "held\n"
    return proc, child


def end(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no clean-up: a crash
    proc.wait()


def in_use(out, pid: int) -> str:
    return (
        f"output_dir {out} is in use by another run (pid {pid} on {socket.gethostname()}): "
        "wait for it to end, or choose another output_dir"
    )


def test_a_folder_in_use_is_refused_and_freed_when_its_run_dies(tmp_path):
    out = tmp_path / "out"
    proc, _ = hold(out)
    try:
        with pytest.raises(RunFolderError) as info:
            lock_output_dir(out)
        assert str(info.value) == in_use(out, proc.pid)
    finally:
        end(proc)
    lock_output_dir(out).release()  # a killed run leaves no stale lock


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    out = tmp_path / "out"
    proc, child = hold(out, fork=True)
    try:
        end(proc)
        os.kill(child, 0)  # still alive
        lock_output_dir(out).release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_holds_nest_within_a_process(tmp_path):
    out = tmp_path / "out"
    first = lock_output_dir(out)
    with lock_output_dir(out):  # the CLI's check, then the trainer's
        pass
    probe = subprocess.run(
        [sys.executable, "-c", HOLDER, str(out), "-"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert "is in use by another run" in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    first.release()
    first.release()  # twice is harmless
    proc, _ = hold(out)
    end(proc)


def test_glofnd_train_and_the_trainer_stop_while_another_run_uses_the_folder(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    proc, _ = hold(out)
    try:

        def never(*args, **kwargs):
            raise AssertionError("data loaded while another run uses the folder")

        with monkeypatch.context() as patch:
            patch.setattr(cli, "load_image_text_dataset", never)
            with pytest.raises(SystemExit) as info:
                cli.main([*TINY_RUN, "--output_dir", str(out)])
        assert info.value.code == 2
        assert one_line(capsys.readouterr().err) == (
            f"glofnd-train: error: {in_use(out, proc.pid)}{DEBUG_HINT}"
        )
        with pytest.raises(RunFolderError) as error:
            tiny_trainer(out).train()
        assert str(error.value) == in_use(out, proc.pid)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        end(proc)
