"""Two processes (gloo) over a fixed global batch == one process over the same batch."""

import os
import sys
from pathlib import Path

import pytest
import torch
from distributed.common import build_loss, fixed_global_batch, projection
from launch import free_port, run_process_group

HERE = Path(__file__).resolve().parent


def single_process(kind, steps=2):
    torch.manual_seed(0)
    model = projection()
    loss_fn = build_loss(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(steps):
        image, text, index, labels = fixed_global_batch(step)
        out = loss_fn(*model(image, text), index, epoch=float(step), labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())
    health = loss_fn.finish_epoch()
    return losses, dict(model.named_parameters()), loss_fn.state_dict(), health


def run_torchrun(kind, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(HERE / "distributed" / "loss_worker.py"),
        "--loss",
        kind,
        "--out",
        str(out),
    ]
    proc = run_process_group(cmd, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("kind", ["clip", "global", "clip_iq"])
def test_two_processes_match_one_process(tmp_path, kind):
    ranks = run_torchrun(kind, tmp_path / "result")
    losses, params, state, health = single_process(kind)
    for rank in ranks:
        for step, record in enumerate(rank["records"]):
            assert torch.allclose(record["loss"], losses[step], atol=1e-5), (step, kind)
            # After every step both ranks hold the same state (digest per rank).
            assert torch.equal(record["digests"][0], record["digests"][1]), step
        for name, value in params.items():
            assert torch.allclose(rank["params"][name], value.detach(), atol=1e-5), name
        for key, value in state.items():
            assert torch.allclose(rank["state"][key], value, atol=1e-5), key
    # The state actually moved, and identically on both ranks.
    assert not torch.equal(
        state["detector.image.lambda"], torch.ones_like(state["detector.image.lambda"])
    )
    for key in state:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    # Tracking health is global: every rank reports what one process reports.
    assert health and set(health) == set(ranks[0]["health"])
    for rank in ranks:
        for key, value in health.items():
            assert rank["health"][key] == pytest.approx(value, rel=1e-6), key
