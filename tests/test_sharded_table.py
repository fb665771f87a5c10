"""The sharded per-sample table gives the replicated table's rows bit for bit."""

import pytest
import torch
from launch import run_torchrun_workers

from glofnd_hf.fnd.table import PerSampleTable, ShardedPerSampleTable, make_table, segment_mean


def test_one_process_behaves_as_replicated():
    gen = torch.Generator().manual_seed(0)
    replicated = PerSampleTable(23, (2, 4), [0.5, 1.0, 2.0, 3.0])
    sharded = ShardedPerSampleTable(23, (2, 4), [0.5, 1.0, 2.0, 3.0])
    assert sharded.world_size == 1 and sharded.num_owned == 23
    for _ in range(10):
        index = torch.randint(0, 23, (9,), generator=gen)
        assert torch.equal(sharded.gather(index), replicated.gather(index))
        rows = segment_mean(index, torch.randn(9, 2, 4, generator=gen))
        replicated.scatter(index, rows)
        sharded.scatter(index, rows)
    assert torch.equal(sharded.data, replicated.data)
    assert torch.equal(sharded.full(), replicated.data)
    assert torch.equal(sharded.owned_index(), torch.arange(23))


def test_ownership_and_local_rows():
    """Row i lives on process i % world as local row i // world; about N / world rows each."""
    tables = [ShardedPerSampleTable(10, (2,), 0.0, rank=r, world_size=3) for r in range(3)]
    assert [t.num_owned for t in tables] == [4, 3, 3]
    assert [t.owned_index().tolist() for t in tables] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(t.storage.shape[0] == 5 for t in tables)  # ceil(10 / 3) + the scratch row
    full = torch.arange(20, dtype=torch.float32).view(10, 2)
    for t in tables:
        t.load_full(full)
        assert torch.equal(t.data, full[t.owned_index()])
    # Writing is local (no collective): each owner keeps only its rows.
    index = torch.tensor([0, 1, 2, 9])
    for t in tables:
        t.scatter(index, -torch.ones(4, 2))
    assert tables[0].data[[0, 3]].eq(-1).all() and tables[0].data[[1, 2]].ge(0).all()
    assert tables[1].data[0].eq(-1).all() and tables[1].data[1:].ge(0).all()


def test_reading_without_the_process_group_fails_clearly():
    table = ShardedPerSampleTable(10, (2,), 0.0, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="sharded over 2 processes"):
        table.gather(torch.tensor([1, 2]))


def test_make_table():
    assert type(make_table(5, (2,), 0.0)) is PerSampleTable
    assert type(make_table(5, (2,), 0.0, sharding="sharded")) is ShardedPerSampleTable
    with pytest.raises(ValueError, match="state sharding"):
        make_table(5, (2,), 0.0, sharding="mirrored")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_matches_replicated_across_processes(tmp_path, world):
    results = run_torchrun_workers("table_worker.py", world, tmp_path / "table")
    for rank, result in enumerate(results):
        assert all(result["gathers_equal"]), rank
        assert all(result["tables_equal"]), rank
    # Each process holds about N / world rows: every row exactly once.
    for case, n in enumerate((37, 50, 2)):
        owned = [result["owned"][case] for result in results]
        assert sum(owned) == n and max(owned) - min(owned) <= 1


def _shards(world, full):
    tables = [
        ShardedPerSampleTable(full.shape[0], full.shape[1:], 0.0, rank=r, world_size=world)
        for r in range(world)
    ]
    for t in tables:
        t.load_full(full)
    return [t.shard_state_dict() for t in tables]


@pytest.mark.parametrize("old, new", [(2, 3), (3, 2), (1, 3), (3, 1), (2, 2)])
def test_shards_reshard_between_world_sizes(old, new):
    """Per-process shards of a run with ``old`` processes load into ``new`` processes: no
    communication, every row where its new owner expects it (bit for bit)."""
    full = torch.randn(31, 2, 3, generator=torch.Generator().manual_seed(0))
    full[4, 0, 0] = -0.0
    shards = _shards(old, full)
    assert [int(s["world_size"]) for s in shards] == [old] * old
    tables = [ShardedPerSampleTable(31, (2, 3), 5.0, rank=r, world_size=new) for r in range(new)]
    for t in tables:
        t.load_shards(list(reversed(shards)))  # in any order
        assert torch.equal(t.data.view(torch.int32), full[t.owned_index()].view(torch.int32))


def test_bad_shards_are_refused_and_change_nothing():
    full = torch.randn(10, 2)
    shards = _shards(2, full)
    table = ShardedPerSampleTable(10, (2,), 7.0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="sample 0 0 times"):
        table.load_shards(shards[1:])  # a missing shard
    with pytest.raises(ValueError, match="2 times"):
        table.load_shards(shards + shards[:1])  # one twice
    other = _shards(2, torch.randn(12, 2))
    with pytest.raises(ValueError, match="12 samples, expected 10"):
        table.load_shards(other)
    truncated = dict(shards[0], rows=shards[0]["rows"][:-1])
    with pytest.raises(ValueError, match="shard 0"):
        table.load_shards([truncated, shards[1]])
    assert table.data.eq(7.0).all()
