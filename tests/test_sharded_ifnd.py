"""IFND's per-sample state sharded across 2 and 3 gloo processes (torch k-means) detects
what one process clustering every row with the same torch k-means detects, bit for bit, and
its per-process checkpoints reshard (2 -> 3, 3 -> 2) without changing anything."""

import shutil

import pytest
import torch
from distributed.sharded_ifnd_worker import N, build, same, same_state
from launch import run_torchrun_workers
from safetensors.torch import load_file, save_file

from glofnd_hf.state_file import StateFileError
from glofnd_hf.state_shards import load_state_shards, shard_file_name

SAVE_AT = 6  # of the worker's 12 steps (4 per epoch; rounds at steps 4 and 8)
CASES = ("global", "cluster")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two launches: 3 processes from step 0 (a checkpoint after step 6); 2 processes from
    step 0 (a checkpoint) and from the 3-process checkpoint (3 -> 2)."""
    folder = tmp_path_factory.mktemp("sharded_ifnd")
    save = ("--save-at", str(SAVE_AT), "--save-dir")
    worker = "sharded_ifnd_worker.py"
    three = run_torchrun_workers(worker, 3, folder / "three", *save, folder / "ck3")
    resume = ("--resume-from", folder / "ck3", "--from-step", str(SAVE_AT))
    two = run_torchrun_workers(worker, 2, folder / "two", *save, folder / "ck2", *resume)
    return {2: two, 3: three, "ck2": folder / "ck2"}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_ifnd_matches_one_process(runs, world):
    for rank, results in enumerate(runs[world]):
        for case in CASES:
            record = results[case]
            assert all(record["same_fn"]), (rank, case)
            assert all(record["same_stats"]), (rank, case)
            assert all(record["same_state"]), (rank, case)
            assert record["rounds"] == 2, case  # at epochs 1 and 2
            assert record["owned"] == len(range(rank, N, world))  # about N / world rows
            assert any(fn is not None and bool(fn.any()) for fn in record["fn"]), case
    # Every rank sees the same global detections and state.
    for results in runs[world][1:]:
        for case in CASES:
            assert all(map(same, results[case]["fn"], runs[world][0][case]["fn"])), case
            assert same_state(results[case]["final"], runs[world][0][case]["final"]), case


def test_two_and_three_processes_agree(runs):
    for case in CASES:
        two, three = runs[2][0][case], runs[3][0][case]
        assert all(map(same, two["fn"], three["fn"])), case
        assert two["stats"] == three["stats"], case
        assert same_state(two["final"], three["final"]), case


def test_a_three_process_checkpoint_resumes_in_two(runs):
    """The state it loads is the one saved, and the run goes on as the uninterrupted one
    (a clustering round after the resume included)."""
    straight = runs[3][0]
    for rank, results in enumerate(runs[2]):
        for case in CASES:
            record = results[f"{case}-resumed"]
            assert same_state(record["loaded"], straight[case]["saved"]), (rank, case)
            assert all(record["same_fn"]) and all(record["same_state"]), (rank, case)
            assert all(map(same, record["fn"], straight[case]["fn"][SAVE_AT:])), (rank, case)
            assert record["stats"] == straight[case]["stats"][SAVE_AT:], (rank, case)
            assert same_state(record["final"], straight[case]["final"]), (rank, case)


@pytest.mark.parametrize("world", [3, 1])
def test_a_two_process_checkpoint_loads_into_three_and_one(runs, world, monkeypatch):
    """Each of three processes (built one after the other here: loading needs no
    communication) takes its rows of every table and the schedule; one process takes
    every row."""
    saved = runs[2][0]["global"]["saved"]
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        loss = build("global", "sharded")
        load_state_shards(runs["ck2"] / "global", loss, N)
        detector, mine = loss.detector, slice(rank, None, world)
        assert same(detector.tables.bank.data, saved["detector.bank"][mine])
        assert same(detector.tables.seen.data, saved["detector.seen"][mine])
        rows = detector.tables.assignments.data
        assert same(rows[:, :, 0].t().to(torch.int32), saved["detector.labels"][:, mine])
        assert same(rows[:, :, 2].t().contiguous(), saved["detector.accept_rank"][:, mine])
        assert detector.rounds == int(saved["detector.rounds"][0]) == 1
        assert detector.last_round_epoch == float(saved["detector.last_round_epoch"][0])


def test_bad_ifnd_shards_are_refused_naming_the_file_and_entry(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    folder = tmp_path / "ck"
    shutil.copytree(runs["ck2"] / "global", folder)
    path = folder / shard_file_name(1, 2)
    state = load_file(str(path))
    state["detector.assignments.rows"][2, 0, 0] = 9.0  # label 9 of k = 4
    save_file(state, str(path), metadata={"rank": "1", "world_size": "2", "num_samples": "48"})
    loss = build("global", "sharded")
    with pytest.raises(StateFileError, match=r"rank1-of-2.*'detector.labels\[0\]'"):
        load_state_shards(folder, loss, N)
    assert loss.detector.bank is None and loss.detector.rounds == 0  # nothing changed
    shutil.copytree(runs["ck2"] / "global", folder, dirs_exist_ok=True)
    loss = build("global", "sharded")
    loss.detector.tables.allocate_bank(5)  # another model's width
    with pytest.raises(StateFileError, match="bank holds 8 features"):
        load_state_shards(folder, loss, N)
