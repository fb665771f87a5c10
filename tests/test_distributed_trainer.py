"""GloFNDTrainer under `accelerate launch --num_processes 2` (CPU, gloo) against one process."""

import os
import sys
from pathlib import Path

import pytest
import torch
from distributed.train_worker import run, write_train_shards
from launch import free_port, run_process_group, worker_env

from glofnd_hf.checkpoints import STATE_FILE, checkpoint_problems
from glofnd_hf.inspection.thresholds import load_checkpoint_thresholds
from glofnd_hf.model_card import card_info_from_folder
from glofnd_hf.state_file import read_state_config
from glofnd_hf.state_shards import shard_file_name

HERE = Path(__file__).resolve().parent


def launch_two(tmp_path, name, *extra, processes=2, timeout=300):
    out = tmp_path / f"{name}.pt"
    env = worker_env()
    config = HERE.parent / "recipes" / "accelerate" / "cpu_2proc.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(free_port()),
        "--num_processes",
        str(processes),
        str(HERE / "distributed" / "train_worker.py"),
        "--output-dir",
        str(tmp_path / name),
        "--out",
        str(out),
        *extra,
    ]
    proc = run_process_group(cmd, env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if "--fail-shard-write" in extra or "--fail-rng-write" in extra:  # what each raised
        return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(processes)]
    return torch.load(out, weights_only=False)


SHARDED = ("--loss-type", "fastclip", "--state-sharding", "sharded")


@pytest.fixture(scope="module")
def one_fastclip(tmp_path_factory):
    """One process with the FastCLIP loss: the run the two-process runs are held against,
    and whose checkpoints they resume (into folders of their own)."""
    folder = tmp_path_factory.mktemp("one_fastclip") / "one"
    return folder, run(str(folder), "fastclip")


@pytest.fixture(scope="module")
def sharded_two(tmp_path_factory):
    """Two processes with state_sharding: sharded, launched once for the tests that check
    their checkpoints and resume them (each into a folder of its own)."""
    folder = tmp_path_factory.mktemp("sharded_two")
    return folder / "two", launch_two(folder, "two", *SHARDED)


def assert_same_run(a, b):
    for key, value in a["state"].items():
        # The tail rule's drift test and the pinball rule's scatter are ratios of squared
        # small differences, and the tail rule's local density a count over the window
        # +-beta / 4 (beta a small difference): all amplify float rounding (relative 2e-5 to
        # 1e-4 where the thresholds agree to 1e-6).
        rtol = 1e-3 if key.endswith((".innovation", ".density", ".scatter")) else 1e-5
        assert torch.allclose(value, b["state"][key], atol=1e-5, rtol=rtol), key
    for name, value in a["params"].items():
        assert torch.allclose(value, b["params"][name], atol=1e-5), name


# Run-time figures, not statistics of the batch.
NOT_COMPARED = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


def assert_same_logs(one, two, tolerance=1e-6):
    """The logs of two processes are those of one process over the same global batches: the
    same entries, key by key."""
    assert len(one) == len(two)
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert set(a) == set(b), (step, set(a) ^ set(b))
        for key in sorted(set(a) - NOT_COMPARED):
            expected = pytest.approx(a[key], rel=tolerance, abs=tolerance)
            assert b[key] == expected, (step, key, a, b)


def test_two_processes_log_what_one_process_logs(tmp_path):
    """Every logged statistic is the global batch's: percentiles over its anchors, counts and
    fractions over its totals, tracking health over the epoch, bad samples summed over the
    processes. With a learning rate of 0 the model stays put, so the per-sample state moves
    identically and every entry agrees to 1e-6 at every step (training proper, whose float
    noise exp() amplifies, is compared below)."""
    two = launch_two(tmp_path, "two", "--loss-type", "fastclip", "--learning-rate", "0")
    one = run(str(tmp_path / "one"), "fastclip", learning_rate=0.0)
    logged = [entry for entry in one["logs"] if "loss" in entry]
    assert len(logged) == 8 and "lambda_p90_text" in logged[0]
    assert any(entry["filtered_fraction_text"] > 0 for entry in logged)
    assert any("tracking_filtered_over_alpha_text" in entry for entry in one["logs"])
    assert_same_logs(one["logs"], two["logs"])


def test_two_processes_train_like_one_and_checkpoints_cross_over(tmp_path, one_fastclip):
    loss_type = "fastclip"
    two = launch_two(tmp_path, "two", "--loss-type", loss_type)
    assert two["world"] == 2
    # After every step, both ranks hold the same per-sample state.
    assert len(two["digests"]) == 8
    for digest in two["digests"]:
        assert torch.equal(digest[0], digest[1])
    one_folder, one = one_fastclip
    assert_same_run(one, two)
    # The same logs, up to the float noise of DDP's gradient averaging.
    assert_same_logs(one["logs"], two["logs"], tolerance=1e-5)
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
        tmp_path, "one", "--loss-type", loss_type, "--resume", str(one_folder / "checkpoint-4")
    )
    assert_same_run(one, resumed_two)


def test_two_processes_with_the_cached_loss_train_like_one_plain_process(tmp_path, one_fastclip):
    """The cached loss in chunks of 2 of each rank's 4 pairs (DDP reducing with the last chunk
    only) trains as the plain loss in one process: parameters, state and logs."""
    two = launch_two(tmp_path, "two", "--loss-type", "fastclip", "--chunk", "2")
    for digest in two["digests"]:
        assert torch.equal(digest[0], digest[1])
    _, one = one_fastclip
    assert_same_run(one, two)
    assert_same_logs(one["logs"], two["logs"], tolerance=1e-5)


def test_sigmoid_loss_with_a_tiny_siglip_trains_alike_in_two_processes(tmp_path):
    """The sigmoid loss through the Trainer and DDP (the logit bias included): two processes
    end with the weights, state and logs of one."""
    two = launch_two(tmp_path, "two", "--loss-type", "sigmoid")
    one = run(str(tmp_path / "one"), "sigmoid")
    assert_same_run(one, two)
    assert_same_logs(one["logs"], two["logs"], tolerance=1e-5)
    bias = one["params"]["logit_bias"]
    assert bias.item() != -10.0  # the bias learned, alike in both runs


def test_a_sharded_state_checkpoints_per_process_and_resumes(tmp_path, one_fastclip, sharded_two):
    """state_sharding: sharded under two processes: each writes its rows of the per-sample
    state to its own file, the first marks the set complete; the run trains as one process
    does, and its checkpoint resumes under two processes (sharded) and in one (replicated)."""
    folder, two = sharded_two
    for digest in two["digests"]:
        assert torch.equal(digest[0], digest[1])
    checkpoint = folder / "checkpoint-4"
    names = set(os.listdir(checkpoint))
    assert {STATE_FILE, shard_file_name(0, 2), shard_file_name(1, 2)} <= names
    assert checkpoint_problems(checkpoint) == []
    _, one = one_fastclip
    assert_same_run(one, two)
    assert_same_logs(one["logs"], two["logs"], tolerance=1e-5)

    resumed_two = launch_two(tmp_path, "resumed_two", *SHARDED, "--resume", str(checkpoint))
    assert_same_run(one, resumed_two)
    resumed_one = run(str(tmp_path / "resumed_one"), "fastclip", resume=str(checkpoint))
    assert_same_run(one, resumed_one)


def test_a_sharded_checkpoint_of_two_processes_resumes_in_three(tmp_path, sharded_two):
    """Resharding through the trainer: the shards of two processes load into three (each
    keeps its rows), which hold together the state one process loads from them; the three
    then train on, their state alike on every rank."""
    checkpoint = str(sharded_two[0] / "checkpoint-4")
    three = launch_two(tmp_path, "three", *SHARDED, "--resume", checkpoint, processes=3)
    assert three["world"] == 3
    one = run(str(tmp_path / "one"), "fastclip", resume=checkpoint, stop_at=5)
    assert one["loaded_state"].keys() == three["loaded_state"].keys()
    for key, value in one["loaded_state"].items():
        assert torch.equal(value, three["loaded_state"][key]), key
    lam = one["loaded_state"]["detector.image.lambda"]
    assert not torch.equal(lam, torch.ones_like(lam))  # trained thresholds, not the start
    # Offline readers (glofnd-inspect, the model card) in this process, no process group:
    # the shards' thresholds are those the resume loaded, the card's figures the run's.
    thresholds = load_checkpoint_thresholds(checkpoint)
    for s, side in enumerate(("image", "text")):
        loaded = one["loaded_state"][f"detector.{side}.lambda"]
        assert torch.equal(thresholds.thresholds[:, s], loaded), side
    config, num_samples = read_state_config(os.path.join(checkpoint, STATE_FILE))
    card = card_info_from_folder(checkpoint)
    assert card.num_samples == num_samples == thresholds.num_samples == 32
    assert card.loss_config == config and card.detector == "glofnd"
    for digest in three["digests"]:
        assert torch.equal(digest[0], digest[1]) and torch.equal(digest[0], digest[2])


def assert_identical_runs(a, b):
    """Bit for bit: weights, the per-sample state after every step and at the end, and every
    logged entry but the run-time figures."""
    assert a["params"].keys() == b["params"].keys()
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key
    assert len(a["digests"]) == len(b["digests"])
    for step, (x, y) in enumerate(zip(a["digests"], b["digests"], strict=True)):
        assert torch.equal(x, y), step
    assert len(a["logs"]) == len(b["logs"])
    for step, (x, y) in enumerate(zip(a["logs"], b["logs"], strict=True)):
        assert set(x) == set(y), (step, set(x) ^ set(y))
        assert {k: v for k, v in x.items() if k not in NOT_COMPARED} == {
            k: v for k, v in y.items() if k not in NOT_COMPARED
        }, step


def test_sharded_state_on_webdataset_shards_with_the_cached_loss_trains_as_replicated(tmp_path):
    """The webdataset path (each rank streams its own shards) with the cached loss (chunks
    of 2 of each rank's 4 pairs), two gloo processes: state_sharding sharded gives the
    replicated run's weights, GloFND thresholds, u and logs bit for bit."""
    pattern = write_train_shards(tmp_path / "shards")
    common = ("--loss-type", "fastclip", "--shards", pattern, "--chunk", "2")
    # Both runs one after the other in the same two processes (one launch).
    runs = launch_two(tmp_path, "runs", *common, "--state-sharding", "replicated,sharded")
    replicated, sharded = runs["replicated"], runs["sharded"]
    assert replicated["world"] == sharded["world"] == 2
    assert replicated["local_rows"] == {"detector.thresholds": 32, "u": 32}
    assert sharded["local_rows"] == {"detector.thresholds": 16, "u": 16}  # rank 0's half
    assert len(sharded["digests"]) == 8  # 4 shards of 8, 4 steps of 8 pairs an epoch
    for digest in sharded["digests"]:
        assert torch.equal(digest[0], digest[1])
    assert "detector.image.lambda" in sharded["state"] and "image.u" in sharded["state"]
    lam = sharded["state"]["detector.image.lambda"]
    assert torch.all(lam < 1.0)  # every pair was seen: every threshold moved
    logged = [entry for entry in sharded["logs"] if "loss" in entry]
    assert len(logged) == 8 and any(entry["filtered_fraction_text"] > 0 for entry in logged)
    assert_identical_runs(replicated, sharded)


def test_a_trainer_file_failing_on_one_process_fails_on_every_process(tmp_path):
    """Process 1 cannot write its random state (rng_state_1.pth) of the second checkpoint, a
    replicated run: both processes raise the same one-line error naming process 1 and the
    file, instead of process 0 waiting for it at a barrier; the checkpoint is not marked
    complete and the first one is kept whole. A hang fails at the launch's timeout."""
    errors = launch_two(tmp_path, "two", "--fail-rng-write", "1", timeout=240)
    for error in errors:
        assert error is not None and error == errors[0] and "\n" not in error
        assert error.startswith("CheckpointWriteError: checkpoint "), error
        assert "process 1 could not write rng_state_1.pth (PermissionError" in error, error
        assert "process 0" not in error, error
    checkpoint = tmp_path / "two" / "checkpoint-4"
    names = set(os.listdir(checkpoint)) if checkpoint.is_dir() else set()
    assert STATE_FILE not in names and "rng_state_1.pth" not in names
    assert "rng_state_0.pth" in names  # process 0's files went through
    assert STATE_FILE in checkpoint_problems(checkpoint)
    assert checkpoint_problems(tmp_path / "two" / "checkpoint-2") == []


def test_a_shard_write_failing_on_one_process_fails_on_every_process(tmp_path):
    """Process 1 cannot write its shard of the second checkpoint (a permission error):
    both processes raise the same one-line error naming process 1 and its file, instead of
    process 0 waiting for it; the checkpoint is not marked complete and the first one is
    kept whole. A hang fails at the launch's timeout."""
    errors = launch_two(tmp_path, "two", *SHARDED, "--fail-shard-write", "1", timeout=240)
    name = shard_file_name(1, 2)
    for error in errors:
        assert error is not None and error == errors[0] and "\n" not in error
        assert error.startswith("CheckpointWriteError: checkpoint "), error
        assert f"process 1 could not write {name} (PermissionError" in error, error
        assert "process 0" not in error, error
    checkpoint = tmp_path / "two" / "checkpoint-4"
    names = set(os.listdir(checkpoint)) if checkpoint.is_dir() else set()
    assert STATE_FILE not in names and name not in names
    assert shard_file_name(0, 2) in names  # process 0's write went through
    assert STATE_FILE in checkpoint_problems(checkpoint)
    assert checkpoint_problems(tmp_path / "two" / "checkpoint-2") == []
