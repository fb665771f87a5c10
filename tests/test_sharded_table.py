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
