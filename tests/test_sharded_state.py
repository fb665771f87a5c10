"""GloFND's thresholds and the global loss's u sharded across processes give the replicated
run's losses, statistics and state bit for bit; the setting reaches the tables."""

import pytest
import torch
from cpu_args import cpu_args
from launch import run_torchrun_workers

from glofnd_hf.fnd.table import PerSampleTable, ShardedPerSampleTable
from glofnd_hf.loss_factory import build_contrastive_loss


def test_the_setting_builds_sharded_tables(tmp_path):
    loss = build_contrastive_loss(
        cpu_args(tmp_path, loss_type="fastclip", state_sharding="sharded"), 40, "cpu"
    )
    assert type(loss.u) is ShardedPerSampleTable
    assert type(loss.detector.state.table) is ShardedPerSampleTable
    replicated = build_contrastive_loss(cpu_args(tmp_path, loss_type="fastclip"), 40, "cpu")
    assert type(replicated.u) is PerSampleTable
    assert type(replicated.detector.state.table) is PerSampleTable


def test_sharded_single_process_state_round_trips(tmp_path):
    """In one process a sharded loss holds every row; a replicated state loads into it."""
    args = cpu_args(tmp_path, loss_type="fastclip")
    replicated = build_contrastive_loss(args, 40, "cpu")
    sharded = build_contrastive_loss(
        cpu_args(tmp_path, loss_type="fastclip", state_sharding="sharded"), 40, "cpu"
    )
    gen = torch.Generator().manual_seed(0)
    state = replicated.state_dict()
    for key in ("detector.image.lambda", "detector.text.lambda", "image.u", "text.u"):
        shift = torch.rand(state[key].shape, generator=gen)
        state[key] = state[key] + shift if key.endswith("u") else state[key] - shift
    replicated.load_state_dict(state)
    sharded.load_state_dict(state)
    assert sharded.state_dict().keys() == replicated.state_dict().keys()
    for key, value in replicated.state_dict().items():
        assert torch.equal(sharded.state_dict()[key], value), key


def test_ifnd_shards_with_its_torch_kmeans(tmp_path):
    """IFND is no longer refused (tests/test_sharded_ifnd.py); its scikit-learn k-means is."""
    args = cpu_args(tmp_path, detector="ifnd", state_sharding="sharded")
    assert args.detector_settings().kmeans_for(args.state_sharding) == "torch"
    with pytest.raises(ValueError, match="kmeans: torch"):
        cpu_args(
            tmp_path,
            detector="ifnd",
            state_sharding="sharded",
            detector_kwargs={"kmeans": "sklearn"},
        )


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_losses_match_replicated(tmp_path, world):
    """Every rule, the global loss (thresholds and u) and CLIP's (thresholds); a global
    batch with a repeated index across ranks (three ranks take 15 of its 16 pairs). Both
    losses also through the cached loss (chunks of 2 of each rank's pairs, a tiny projection
    under DDP trained by SGD): the weights too are bit-identical after every step."""
    ranks = run_torchrun_workers("sharded_loss_worker.py", world, tmp_path / "loss")
    assert sum("cached" in case for case in ranks[0]) == 2
    for rank, results in enumerate(ranks):
        for case, record in results.items():
            assert all(record["loss"]), (rank, case)
            assert all(record["stats"]), (rank, case)
            assert all(record["state"]), (rank, case)
            assert all(record["params"]), (rank, case)
            assert max(record["filtered"]) > 0, case  # negatives were filtered
            assert record["owned"] == len(range(rank, 64, world))  # about N / world rows
            # One all-reduce reads a step's rows of every table (thresholds and u together).
            assert record["reads"] == ([] if "cached" in case else [1] * len(record["loss"]))
    # Every rank ends with the same (reassembled) state, and the thresholds moved.
    for case, record in ranks[0].items():
        for other in ranks[1:]:
            for key, value in record["final"].items():
                assert torch.equal(value, other[case]["final"][key]), (case, key)
        assert not torch.equal(record["final"]["detector.image.lambda"], torch.ones(64)), case
