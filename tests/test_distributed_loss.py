"""Two processes (gloo) over a fixed global batch == one process over the same batch."""

import sys
from pathlib import Path

import pytest
import torch
from distributed.common import (
    apply_loss,
    build_loss,
    fixed_global_batch,
    projection,
    stats_as_floats,
)
from launch import free_port, run_process_group, worker_env

HERE = Path(__file__).resolve().parent


def single_process(kind, steps=2):
    torch.manual_seed(0)
    model = projection(kind)
    loss_fn = build_loss(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, stats = [], []
    for step in range(steps):
        image, text, index, labels = fixed_global_batch(step, kind)
        out = apply_loss(loss_fn, model(image, text), index, float(step), labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())
        stats.append(stats_as_floats(out.stats))
    health = loss_fn.finish_epoch()
    return losses, stats, dict(model.named_parameters()), loss_fn.state_dict(), health


CASES = [
    "clip",
    "global",
    "clip_iq",
    "global_bq",
    "global_oracle",
    "sigmoid",
    "sigmoid_attract",
    # The cached loss in chunks of 3, 3 and 2 pairs of each rank's 8.
    "clip_iq@3",
    "global@3",
    "sigmoid@3",
]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Every case under torchrun with two processes, one launch (each case starts afresh in
    the same process group): case -> the two ranks' results."""
    out = tmp_path_factory.mktemp("two_process_losses") / "result"
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
        "--out",
        str(out),
        "--cases",
        *CASES,
    ]
    proc = run_process_group(cmd, worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        case: [torch.load(f"{out}.{case}.rank{r}", weights_only=False) for r in range(2)]
        for case in CASES
    }


def assert_same_stats(got, expected, where, tolerance=1e-6):
    """Every statistic of one process over the global batch, key by key."""
    assert set(got) == set(expected), (where, set(got) ^ set(expected))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tolerance, abs=tolerance), (where, key)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_match_one_process(two_process_results, case):
    """Also with the cached loss on each rank (gradients synchronised with the last chunk
    only) against the plain loss in one process."""
    kind = case.partition("@")[0]
    ranks = two_process_results[case]
    losses, stats, params, state, health = single_process(kind)
    # The statistics are those of the global batch: percentiles over its anchors, counts and
    # fractions over its totals (the same on both ranks).
    if kind.endswith("_oracle"):
        assert stats[0]["all_filtered_anchors_image"] == 16  # each rank alone has 8
    else:
        assert all(step["filtered_fraction_text"] > 0 for step in stats)
    for rank in ranks:
        for step, record in enumerate(rank["records"]):
            assert torch.allclose(record["loss"], losses[step], atol=1e-5), (step, kind)
            # Step 0 starts from the same parameters: the statistics agree to 1e-6. Later
            # steps also carry the float noise of DDP's gradient averaging (as loss and
            # parameters do), which exp() in u amplifies: 1e-5.
            assert_same_stats(
                record["stats"], stats[step], (kind, step), 1e-6 if step == 0 else 1e-5
            )
            # After every step both ranks hold the same state (digest per rank).
            assert torch.equal(record["digests"][0], record["digests"][1]), step
        for name, value in params.items():
            assert torch.allclose(rank["params"][name], value.detach(), atol=1e-5), name
        for key, value in state.items():
            assert torch.allclose(rank["state"][key], value, atol=1e-5), key
    if not kind.endswith(("clip", "global", "sigmoid", "_iq", "_attract")):
        return  # only GloFND keeps state and reports tracking health
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
