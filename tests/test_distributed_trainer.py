"""GloFNDTrainer under `accelerate launch --num_processes 2` (CPU, gloo) against one process."""

import os
import sys
from pathlib import Path

import pytest
import torch
from distributed.train_worker import run
from launch import free_port, run_process_group

HERE = Path(__file__).resolve().parent


def launch_two(tmp_path, name, *extra):
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    config = HERE.parent / "recipes" / "accelerate" / "cpu_2proc.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(free_port()),
        str(HERE / "distributed" / "train_worker.py"),
        "--output-dir",
        str(tmp_path / name),
        "--out",
        str(out),
        *extra,
    ]
    proc = run_process_group(cmd, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def assert_same_run(a, b):
    for key, value in a["state"].items():
        assert torch.allclose(value, b["state"][key], atol=1e-5), key
    for name, value in a["params"].items():
        assert torch.allclose(value, b["params"][name], atol=1e-5), name


@pytest.mark.parametrize("loss_type", ["fastclip"])
def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path, loss_type):
    two = launch_two(tmp_path, "two", "--loss-type", loss_type)
    assert two["world"] == 2
    # After every step, both ranks hold the same per-sample state.
    assert len(two["digests"]) == 8
    for digest in two["digests"]:
        assert torch.equal(digest[0], digest[1])
    one = run(str(tmp_path / "one"), loss_type)
    assert_same_run(one, two)
    assert not torch.equal(
        one["state"]["detector.image.lambda"],
        torch.ones_like(one["state"]["detector.image.lambda"]),
    )

    # A checkpoint of the 2-process run resumes in one process without losing state...
    resumed_one = run(
        str(tmp_path / "two"), loss_type, resume=str(tmp_path / "two" / "checkpoint-4")
    )
    assert_same_run(one, resumed_one)
    # ...and a 1-process checkpoint resumes under two processes.
    resumed_two = launch_two(
        tmp_path,
        "one",
        "--loss-type",
        loss_type,
        "--resume",
        str(tmp_path / "one" / "checkpoint-4"),
    )
    assert_same_run(one, resumed_two)
