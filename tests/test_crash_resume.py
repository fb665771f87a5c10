"""Crashes at chosen points (SIGKILL), then ``resume_from_checkpoint: last``: the final
weights, optimizer state, per-sample state and logged epochs equal an uninterrupted run's
bit for bit - `datasets` data and webdataset shards, 0 and 2 DataLoader workers.

Every run is ``glofnd-train`` in a child process forked from one server that imported
everything once (``crash_child.py --serve``); the child kills itself at the chosen point.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glofnd_hf.checkpoints import STATE_FILE, checkpoint_problems
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.data.shard_writer import write_shards_from_dataset

HERE = Path(__file__).resolve().parent
KILLED = -signal.SIGKILL
CUT_BEFORE_TRAINER_STATE = "checkpoint-{} (lacks trainer_state.json, " + STATE_FILE + ")"

COMMON = {
    "model_name_or_path": "glofnd-tiny-hf-clip",
    "tiny_image_size": 16,
    "eval_split": None,
    "do_eval": False,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "learning_rate": 1.0e-3,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 1,
    "report_to": "none",
    "seed": 0,
    "use_cpu": True,
    "disable_tqdm": True,
    "loss_type": "fastclip",
    "gamma": 0.5,
    "gamma_schedule": "cosine",
    "gamma_decay_epochs": 2,
    "detector": "glofnd",
    "fn_alpha": 0.05,
    "detector_kwargs": {"init_quantile": True},
}


class Server:
    def __init__(self, tmp: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_child.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.tmp = tmp
        self.count = 0

    def train(self, config: dict, out: Path, kill: str | None = None, **flags):
        self.count += 1
        path = self.tmp / f"config-{self.count}.json"
        path.write_text(json.dumps({**config, "output_dir": str(out), **flags}))
        log = self.tmp / f"run-{self.count}.log"
        request = {"argv": [str(path)], "kill": kill, "log": str(log), "timeout": 300}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["exit"], log.read_text()

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rows = load_digits_pairs(seed=0)["train"].select(range(32))
    out = tmp_path_factory.mktemp("shards")
    pattern, count = write_shards_from_dataset(
        rows, str(out), index_column="dataset_index", samples_per_shard=8
    )
    assert count == 32
    return pattern


def datasets_config(workers: int) -> dict:
    # 24 pairs, batch 8: 3 steps per epoch, 6 in all
    return {
        **COMMON,
        "dataset_name": "glofnd-digits",
        "max_train_samples": 24,
        "dataloader_num_workers": workers,
    }


def shards_config(pattern: str, workers: int) -> dict:
    # 4 shards of 8, batch 8: 4 steps per epoch, 8 in all
    return {
        **COMMON,
        "train_shards": pattern,
        "shard_shuffle_buffer": 8,
        "dataloader_num_workers": workers,
    }


def assert_same_run(reference: Path, resumed: Path, step: int) -> None:
    a, b = reference / f"checkpoint-{step}", resumed / f"checkpoint-{step}"
    assert not checkpoint_problems(b), checkpoint_problems(b)
    for name in ("model.safetensors", STATE_FILE):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key}"
    x = torch.load(a / "optimizer.pt", weights_only=True)
    y = torch.load(b / "optimizer.pt", weights_only=True)
    assert x["param_groups"] == y["param_groups"]
    assert x["state"].keys() == y["state"].keys()
    for key, state in x["state"].items():
        for name, value in state.items():
            assert torch.equal(value, y["state"][key][name]), f"optimizer {key} {name}"
    # Logged epochs (and losses, learning rates) of every step, before and after the resumes.
    history = [json.loads((d / "trainer_state.json").read_text())["log_history"] for d in (a, b)]
    fields = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    steps = [[{k: h[k] for k in fields} for h in hist if "loss" in h] for hist in history]
    assert steps[0] == steps[1]
    assert len(steps[0]) == step


def crash_and_resume(server, config, out, kills, expect_skipped=()):
    """Run with each kill point in turn (each run resuming from the last complete
    checkpoint), then to the end."""
    first = True
    logs = []
    for kill in [*kills, None]:
        flags = {} if first else {"resume_from_checkpoint": "last"}
        code, log = server.train(config, out, kill, **flags)
        assert code == (KILLED if kill else 0), log[-3000:]
        logs.append(log)
        first = False
    for text in expect_skipped:
        assert any(f"; skipped incomplete {text}\n" in log for log in logs), text
    return logs


def assert_resumes_exactly(server, config, tmp_path, kills, expect_skipped, steps) -> Path:
    """An uninterrupted reference run, then the same run killed at each of ``kills`` and
    resumed; both must end the same after ``steps`` steps. Returns the crashed run's folder."""
    code, log = server.train(config, tmp_path / "reference")
    assert code == 0, log[-3000:]
    crashed = tmp_path / "crashed"
    crash_and_resume(server, config, crashed, kills, expect_skipped)
    assert_same_run(tmp_path / "reference", crashed, steps)
    return crashed


def test_datasets_no_workers_mid_epoch_and_during_the_state_write(server, tmp_path):
    config = datasets_config(0)
    # killed after step 2 (resume at step 1: mid-epoch), then inside the state write of
    # checkpoint 5 (resume at step 4, mid-epoch of the second epoch)
    assert_resumes_exactly(
        server, config, tmp_path, ["step:2", "state:5"], [f"checkpoint-5 (lacks {STATE_FILE})"], 6
    )


def test_datasets_two_workers_at_the_epoch_boundary_and_mid_checkpoint(server, tmp_path):
    config = datasets_config(2)
    # killed right after the epoch-end checkpoint 3, then inside checkpoint 5 before its
    # trainer_state.json (resume at 4)
    assert_resumes_exactly(
        server,
        config,
        tmp_path,
        ["saved:3", "trainer_state:5"],
        [CUT_BEFORE_TRAINER_STATE.format(5)],
        6,
    )


def test_shards_accumulating_gradients_mid_epoch_mid_checkpoint_and_at_epoch_ends(
    server, tmp_path, shards
):
    # 24 of the 32 samples per epoch: 3 batches, 2 optimizer steps (2 + 1 batches) per epoch
    config = {
        **shards_config(shards, 0),
        "train_num_samples": 24,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 3,
        "save_total_limit": 2,
    }
    # after step 2 (resume at 1: the epoch's last, one-batch step is left), inside checkpoint
    # 3 (resume at 2: an epoch boundary), right after the epoch-end checkpoint 4
    crashed = assert_resumes_exactly(
        server,
        config,
        tmp_path,
        ["step:2", "trainer_state:3", "saved:4"],
        [CUT_BEFORE_TRAINER_STATE.format(3)],
        6,
    )
    # save_total_limit counts complete checkpoints; the crash's leftovers are gone
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_shards_two_workers_mid_epoch_after_an_odd_number_of_batches(server, tmp_path, shards):
    config = shards_config(shards, 2)
    # resume at step 1 and at step 5: one batch into an epoch, the workers' turn rotates
    assert_resumes_exactly(
        server, config, tmp_path, ["step:2", "state:6"], [f"checkpoint-6 (lacks {STATE_FILE})"], 8
    )
