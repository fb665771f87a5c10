"""Per-process checkpoint files of a sharded per-sample state (glofnd_hf.state_shards):
written by each process, marked complete by a manifest, loaded into any world size."""

import errno
import os

import pytest
import torch

from glofnd_hf import state_shards
from glofnd_hf.checkpoints import STATE_FILE, CheckpointWriteError, checkpoint_problems
from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.fnd.table import PerSampleTable, ShardedPerSampleTable, StateError
from glofnd_hf.fnd.thresholds.state import ThresholdState
from glofnd_hf.losses import GammaSchedule, GlobalContrastiveLoss
from glofnd_hf.losses.global_loss import check_u_state
from glofnd_hf.state_file import (
    StateFileError,
    load_detector_state,
    read_state_config,
    write_state_file,
)
from glofnd_hf.state_shards import (
    is_sharded,
    load_state_shards,
    shard_file_name,
    write_shard_manifest,
    write_state_shard,
    write_state_shards,
)

N = 11


class FakeLoss:
    """Two tables of the shapes the loss keeps (thresholds (N, 2, 3), u (N, 2))."""

    def __init__(self, rank, world, sharded=True):
        def table(shape):
            if sharded:
                return ShardedPerSampleTable(N, shape, 0.0, rank=rank, world_size=world)
            return PerSampleTable(N, shape, 0.0)

        self.tables = {"detector.thresholds": table((2, 3)), "u": table((2,))}

    def shard_tables(self):
        return self.tables

    def config_dict(self):
        return {"detector": "glofnd", "num_samples": N}


def full_rows(shape, seed):
    return torch.randn((N, *shape), generator=torch.Generator().manual_seed(seed))


def write_set(folder, world):
    expected = {"detector.thresholds": full_rows((2, 3), 0), "u": full_rows((2,), 1)}
    for rank in range(world):
        loss = FakeLoss(rank, world)
        for name, table in loss.tables.items():
            table.load_full(expected[name])
        write_state_shard(folder, loss, N)
    write_shard_manifest(folder, FakeLoss(0, world).config_dict(), N, world)
    return expected


@pytest.mark.parametrize(("saved", "loaded"), [(2, 3), (3, 2), (2, 1), (1, 2)])
def test_a_shard_set_loads_into_any_world_size(tmp_path, saved, loaded):
    expected = write_set(tmp_path, saved)
    for rank in range(loaded):
        loss = FakeLoss(rank, loaded)
        load_state_shards(tmp_path, loss, N)
        for name, table in loss.tables.items():
            assert torch.equal(table.data, expected[name][rank::loaded]), (name, rank)


def test_a_shard_set_is_read_one_shard_at_a_time(tmp_path, monkeypatch):
    """Resuming holds one shard file's tensors at a time (and its own staged rows), never
    the whole set: each shard read finds every earlier shard's tensors released."""
    import gc
    import weakref

    import glofnd_hf.state_file as state_file

    expected = write_set(tmp_path, 4)
    read, alive_at_read = state_file._read_shard, []
    earlier: list[weakref.ref] = []

    def counting(*args, **kwargs):
        gc.collect()
        alive_at_read.append(sum(ref() is not None for ref in earlier))
        state = read(*args, **kwargs)
        earlier.extend(weakref.ref(t) for t in state.values())
        return state

    monkeypatch.setattr(state_file, "_read_shard", counting)
    loss = FakeLoss(1, 3)
    load_state_shards(tmp_path, loss, N)
    assert alive_at_read == [0, 0, 0, 0]
    for name, table in loss.tables.items():
        assert torch.equal(table.data, expected[name][1::3]), name


def test_a_shard_set_loads_into_a_replicated_table(tmp_path):
    expected = write_set(tmp_path, 2)
    loss = FakeLoss(0, 1, sharded=False)
    load_state_shards(tmp_path, loss, N)
    for name, table in loss.tables.items():
        assert torch.equal(table.data, expected[name])


def test_is_sharded_only_with_more_than_one_process():
    assert is_sharded(FakeLoss(0, 2))
    assert not is_sharded(FakeLoss(0, 1))
    assert not is_sharded(FakeLoss(0, 1, sharded=False))
    assert not is_sharded(object())


def test_the_manifest_needs_every_shard_to_be_complete(tmp_path):
    write_set(tmp_path, 2)
    # The manifest records the config and N as a single state file does.
    assert read_state_config(tmp_path / STATE_FILE) == (FakeLoss(0, 2).config_dict(), N)
    # The rest of a checkpoint, so that only the state's files are asked for.
    problems = checkpoint_problems(tmp_path, weights_only=True)
    assert not any("glofnd_state" in p for p in problems), problems
    os.remove(tmp_path / shard_file_name(1, 2))
    problems = checkpoint_problems(tmp_path, weights_only=True)
    assert shard_file_name(1, 2) in problems
    os.remove(tmp_path / STATE_FILE)
    problems = checkpoint_problems(tmp_path, weights_only=True)
    assert STATE_FILE in problems and shard_file_name(1, 2) not in problems


def _loaded_untouched(tmp_path, match):
    loss = FakeLoss(1, 3)
    before = {name: t.data.clone() for name, t in loss.tables.items()}
    with pytest.raises(StateFileError, match=match) as info:
        load_state_shards(tmp_path, loss, N)
    assert "\n" not in str(info.value)
    for name, table in loss.tables.items():
        assert torch.equal(table.data, before[name]), name
    return str(info.value)


def test_a_missing_shard_is_named_and_nothing_changes(tmp_path):
    write_set(tmp_path, 2)
    os.remove(tmp_path / shard_file_name(1, 2))
    _loaded_untouched(tmp_path, shard_file_name(1, 2).replace(".", r"\."))


def test_a_truncated_shard_is_named_and_nothing_changes(tmp_path):
    write_set(tmp_path, 2)
    path = tmp_path / shard_file_name(0, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _loaded_untouched(tmp_path, shard_file_name(0, 2).replace(".", r"\."))


def test_a_shard_of_another_set_or_n_is_refused(tmp_path):
    write_set(tmp_path, 2)
    os.replace(tmp_path / shard_file_name(1, 2), tmp_path / shard_file_name(0, 2))
    _loaded_untouched(tmp_path, "is not shard 0 of 2")
    write_set(tmp_path, 2)
    with pytest.raises(StateFileError, match="N=11"):
        load_state_shards(tmp_path, FakeLoss(0, 2), N + 1)


def test_rows_of_a_wrong_shape_change_nothing(tmp_path):
    write_set(tmp_path, 2)
    loss = FakeLoss(0, 3)
    # The second table does not fit: the first, loaded already, is put back.
    loss.tables["u"] = ShardedPerSampleTable(N, (3,), 0.0, rank=0, world_size=3)
    before = {name: t.data.clone() for name, t in loss.tables.items()}
    with pytest.raises(StateFileError, match="rows of shape"):
        load_state_shards(tmp_path, loss, N)
    for name, table in loss.tables.items():
        assert torch.equal(table.data, before[name]), name


class CheckedLoss(FakeLoss):
    """Checks stored u as the global loss does."""

    def check_shard_rows(self, name, rows):
        if name == "u":
            for s, side in enumerate(("image", "text")):
                check_u_state(f"{side}.u", rows[:, s], rows.shape[0])


def test_rows_out_of_range_are_refused_naming_the_file_and_entry(tmp_path):
    write_set(tmp_path, 2)  # u rows from randn: some negative
    loss = CheckedLoss(0, 2)
    with pytest.raises(StateFileError, match=r"rank0-of-2.*state entry 'image.u'"):
        load_state_shards(tmp_path, loss, N)
    assert torch.equal(loss.tables["u"].data, torch.zeros_like(loss.tables["u"].data))


def test_threshold_rows_are_checked_against_the_rule_ranges():
    state = ThresholdState(N)
    rows = state.table.data.clone()
    state.check_shard_rows("thresholds", rows)
    rows[3, 1, 0] = float("inf")
    with pytest.raises(StateError, match="text"):
        state.check_shard_rows("thresholds", rows)


# -- reading a shard set in one process (glofnd-inspect) ---------------------------------------
class RankView:
    """Process ``rank`` of a sharded run in ``world`` processes holding ``loss``'s state (a
    one-process loss): its tables' own rows, to write its shard without a process group."""

    def __init__(self, loss, rank, world):
        self.config = loss.config_dict()
        self.tables = {}
        for name, table in loss.shard_tables().items():
            sharded = ShardedPerSampleTable(
                table.num_samples, table.row_shape, 0.0, rank=rank, world_size=world
            )
            sharded.load_full(table.data)
            self.tables[name] = sharded

    def shard_tables(self):
        return self.tables

    def config_dict(self):
        return self.config


def write_shards_of(folder, loss, world):
    """``loss``'s state (one process) as the checkpoint of a run in ``world`` processes with
    state_sharding: sharded (each process's shard, then the manifest)."""
    for rank in range(world):
        write_state_shard(folder, RankView(loss, rank, world), loss.num_samples)
    write_shard_manifest(folder, loss.config_dict(), loss.num_samples, world)


def trained_loss(rule, steps=3):
    """A global loss with GloFND (``rule``) after a few steps on random embeddings: every
    threshold column and u moved."""
    config = GloFNDConfig(alpha=0.2, lr=0.05, update_rule=rule, init_quantile=rule == "adam")
    detector = build_detector("glofnd", num_samples=N, config=config)
    loss = GlobalContrastiveLoss(N, detector, gamma=GammaSchedule(0.5, "constant"))
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randperm(N, generator=gen)[:8]
        image, text = (
            torch.nn.functional.normalize(torch.randn(8, 6, generator=gen), dim=-1)
            for _ in range(2)
        )
        loss(image, text, torch.tensor(10.0), index, epoch=0.5 * step)
    return loss


def detector_from(path, rule):
    config = GloFNDConfig(alpha=0.2, lr=0.05, update_rule=rule, init_quantile=rule == "adam")
    detector = build_detector("glofnd", num_samples=N, config=config)
    load_detector_state(path, detector, N)
    return detector.state_dict()


@pytest.mark.parametrize("rule", ["pinball", "tail", "adam"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_shard_set_reads_as_the_single_file_in_one_process(tmp_path, rule, world):
    """load_detector_state on a shard set's manifest (no process group) gives the detector
    the single file of the same state gives it, bit for bit; the loss's u is left out."""
    loss = trained_loss(rule)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    write_state_file(single / STATE_FILE, loss.state_dict(), loss.config_dict(), N)
    write_shards_of(sharded, loss, world)
    assert read_state_config(sharded / STATE_FILE) == read_state_config(single / STATE_FILE)
    expected = detector_from(single / STATE_FILE, rule)
    got = detector_from(sharded / STATE_FILE, rule)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(expected["image.lambda"], torch.ones(N))  # trained thresholds


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing", r"rank1-of-3\.safetensors is missing"),
        ("truncated", r"rank1-of-3\.safetensors is not a readable safetensors file"),
        ("foreign", r"rank1-of-3\.safetensors is not shard 1 of 3"),
        ("other N", r"rank0-of-3\.safetensors: holds the state of N=12"),
    ],
)
def test_a_damaged_shard_set_is_one_line_naming_the_file(tmp_path, damage, match):
    loss = trained_loss("pinball", steps=1)
    write_shards_of(tmp_path, loss, 3)
    shard = tmp_path / shard_file_name(1, 3)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:40])
    elif damage == "foreign":
        os.replace(tmp_path / shard_file_name(2, 3), shard)
    else:  # shards of another data set, under a manifest that names this N
        other = GlobalContrastiveLoss(
            N + 1, build_detector("glofnd", num_samples=N + 1, config=GloFNDConfig())
        )
        write_shards_of(tmp_path, other, 3)
        write_shard_manifest(tmp_path, loss.config_dict(), N, 3)
    detector = build_detector("glofnd", num_samples=N, config=GloFNDConfig())
    before = detector.state_dict()
    with pytest.raises(StateFileError, match=match) as info:
        load_detector_state(tmp_path / STATE_FILE, detector, N)
    assert "\n" not in str(info.value)
    for key, value in detector.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shards_without_the_detectors_rows_are_refused(tmp_path):
    """Shards of a loss whose detector keeps no table (only u): no thresholds to read."""
    for rank in range(2):
        loss = FakeLoss(rank, 2)
        del loss.tables["detector.thresholds"]
        write_state_shard(tmp_path, loss, N)
    write_shard_manifest(tmp_path, FakeLoss(0, 2).config_dict(), N, 2)
    detector = build_detector("glofnd", num_samples=N, config=GloFNDConfig())
    with pytest.raises(
        StateFileError, match=r"rank0-of-2\.safetensors holds no detector\.thresholds"
    ):
        load_detector_state(tmp_path / STATE_FILE, detector, N)


def test_a_failed_shard_write_is_one_line_naming_the_process_and_file(tmp_path, monkeypatch):
    """In one process (the collective is then a no-op); 2 gloo processes, one failing:
    tests/test_distributed_trainer.py."""
    folder = tmp_path / "checkpoint-2"
    assert write_state_shards(folder, FakeLoss(0, 1), N) == str(folder / shard_file_name(0, 1))

    def full(folder, loss, num_samples):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_shards, "write_state_shard", full)
    with pytest.raises(CheckpointWriteError) as info:
        write_state_shards(folder, FakeLoss(0, 1), N)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint {folder} is incomplete")
    assert f"process 0 could not write {shard_file_name(0, 1)} (OSError: [Errno 28]" in message
    assert isinstance(info.value.__cause__, OSError)
    assert not (folder / STATE_FILE).exists()


class ExtrasLoss(FakeLoss):
    """A loss with state that is not per sample (as IFND's schedule): stored with every
    shard, taken before the tables and put back when they fail."""

    def __init__(self, rank, world, step=0):
        super().__init__(rank, world)
        self.step = step

    def shard_extras(self):
        return {"step": torch.tensor([self.step])}

    def load_shard_extras(self, extras):
        if set(extras) != {"step"} or int(extras["step"][0]) < 0:
            raise ValueError(f"bad extras {sorted(extras)}")
        self.step = int(extras["step"][0])


def test_extras_are_stored_with_every_shard_and_loaded_first(tmp_path):
    for rank in range(2):
        write_state_shard(tmp_path, ExtrasLoss(rank, 2, step=7), N)
    write_shard_manifest(tmp_path, FakeLoss(0, 2).config_dict(), N, 2)
    loss = ExtrasLoss(2, 3)
    load_state_shards(tmp_path, loss, N)
    assert loss.step == 7
    # A table that does not fit: the tables and the extras are put back.
    loss = ExtrasLoss(0, 3, step=1)
    loss.tables["u"] = ShardedPerSampleTable(N, (3,), 0.0, rank=0, world_size=3)
    with pytest.raises(StateFileError, match="rows of shape"):
        load_state_shards(tmp_path, loss, N)
    assert loss.step == 1
    # Extras the loss refuses: one line naming the first shard, nothing changed.
    write_state_shard(tmp_path, ExtrasLoss(0, 2, step=-1), N)
    loss = ExtrasLoss(0, 2, step=1)
    with pytest.raises(StateFileError, match=r"rank0-of-2.*bad extras"):
        load_state_shards(tmp_path, loss, N)
    assert loss.step == 1
