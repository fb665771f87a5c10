"""How the evaluation's batches are shared among processes (no process group needed)."""

import pytest

from glofnd_hf.eval.distributed import share_batches


@pytest.mark.parametrize("n", [1, 5, 16, 70, 129])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_whole_batches_in_rank_order_and_forward_passes_in_step(n, world):
    batch = 16
    alone = share_batches(n, batch).local
    assert alone == [(s, min(s + batch, n)) for s in range(0, n, batch)]
    plans = [share_batches(n, batch, rank, world) for rank in range(world)]
    # Concatenated in rank order, the shares are exactly one process's batches.
    assert [b for plan in plans for b in plan.local] == alone
    assert [plan.local_items for plan in plans] == plans[0].rows_per_rank
    assert sum(plans[0].rows_per_rank) == n
    # Shares differ by at most one batch, and everyone makes as many forward passes.
    sizes = [len(plan.local) for plan in plans]
    assert max(sizes) - min(sizes) <= 1
    assert len({len(plan.local) + len(plan.padding) for plan in plans}) == 1
    for plan in plans:
        assert all(b in alone for b in plan.padding)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        share_batches(10, 0)
