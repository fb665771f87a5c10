"""IFND's torch k-means (kmeans: torch, what state_sharding: sharded runs) in one process:
the histogram acceptance ranks against the exact ones, the clusters it finds, sharded in
one process as replicated, and the settings around it."""

import math

import pytest
import torch
from cpu_args import cpu_args
from test_ifnd import N, batch_for, clustered, make, run_epochs

from glofnd_hf.fnd import SharedSettings, build_detector, registry
from glofnd_hf.fnd.clustering import acceptance_rank
from glofnd_hf.fnd.ifnd import IFNDConfig
from glofnd_hf.fnd.kmeans_torch import Collectives, _mul32, histogram_rank, sample_keys
from glofnd_hf.fnd.table import PerSampleTable, ShardedPerSampleTable
from glofnd_hf.loss_factory import build_contrastive_loss


def mixture(n, ties=True, seed=0):
    """Confidences of several clusters: labels and (n,) float32 values (with ``ties``, the
    first 51 equal: what duplicated samples give)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(7, (n,), generator=gen)
    conf = 0.6 + 0.05 * labels + 0.1 * torch.randn(n, generator=gen)
    if ties:
        conf[:50] = conf[50]
    return labels, conf.float()


def bin_bound(conf, groups, num_groups, bins):
    """The largest bin count over its group's count: how far the two ranks may differ."""
    c = conf.double()
    high = torch.full((num_groups,), -math.inf, dtype=torch.float64)
    low = torch.full((num_groups,), math.inf, dtype=torch.float64)
    high = high.scatter_reduce(0, groups, c, "amax")
    low = low.scatter_reduce(0, groups, c, "amin")
    width = (high - low)[groups]
    slot = ((high[groups] - c) / width * bins).floor().clamp(0, bins - 1).long()
    counts = torch.bincount(groups * bins + slot, minlength=num_groups * bins)
    sizes = torch.bincount(groups, minlength=num_groups)
    return float((counts[groups * bins + slot] / sizes[groups]).max())


def ranks(scope, bins, ties=True):
    labels, conf = mixture(4000, ties)
    groups = labels if scope == "cluster" else torch.zeros_like(labels)
    num_groups = 7 if scope == "cluster" else 1
    hist = histogram_rank(conf, groups, num_groups, bins, Collectives(False))
    exact = acceptance_rank(labels, conf, scope)
    return conf, groups, num_groups, hist, exact


@pytest.mark.parametrize("scope", ["global", "cluster"])
@pytest.mark.parametrize("bins", [64, 65536])
def test_histogram_rank_is_within_its_bin_of_the_exact_rank(scope, bins):
    conf, groups, num_groups, hist, exact = ranks(scope, bins)
    assert (hist - exact).abs().max() <= bin_bound(conf, groups, num_groups, bins) + 1e-6
    assert bool((hist > 0).all() and (hist <= 1).all())
    for g in range(num_groups):  # the least confident of each group is ranked last
        assert hist[groups == g].max() == 1.0
    # Monotone: a more confident sample is never ranked after a less confident one.
    order = torch.argsort(conf, descending=True, stable=True)
    for g in range(num_groups):
        ranked = hist[order][groups[order] == g]
        assert bool((ranked[1:] >= ranked[:-1]).all())
    # Equal confidences share a rank (the exact rank staggers them by index).
    tied = (conf == conf[0]) & (groups == groups[0])
    assert hist[tied].unique().numel() == 1 and exact[tied].unique().numel() == int(tied.sum())


@pytest.mark.parametrize("scope", ["global", "cluster"])
def test_with_fine_bins_the_histogram_rank_is_nearly_exact(scope):
    """Without ties, 65536 bins, 4000 samples: measured max 5.0e-4 (global) and 1.9e-3
    (per cluster, about 570 samples each), mean 6.9e-6 and 4.2e-6."""
    _, _, _, hist, exact = ranks(scope, 65536, ties=False)
    error = (hist - exact).abs()
    assert error.max() < (2.5e-3 if scope == "cluster" else 1e-3)
    assert error.mean() < 2e-5


def test_sample_keys_are_a_32_bit_hash_of_the_index():
    index = torch.tensor([0, 1, 2, 5, 2**31 + 3, 2**40 + 7])
    keys = sample_keys(index, 3)
    assert bool((keys >= 0).all() and (keys < 2**32).all())
    assert len(set(keys.tolist())) == len(index)
    assert torch.equal(sample_keys(index[3:], 3), keys[3:])  # per index, any layout
    assert not torch.equal(sample_keys(index, 4), keys)
    h = torch.tensor([0, 1, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF])
    c = 0xC2B2AE35
    assert _mul32(h, c).tolist() == [(int(v) * c) % 2**32 for v in h]


def test_torch_kmeans_with_full_acceptance_finds_the_clusters():
    image, text, labels = clustered()
    det = make(kmeans="torch")
    run_epochs(det, image, text, 1)
    index = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:64]
    det.observe(index, image[index], text[index])
    sim, batch = batch_for(index, image, text, 1.0, labels)
    found = det.detect(sim, batch)
    assert det.rounds == 1 and det.kmeans == "torch"
    oracle = build_detector("oracle").detect(sim, batch)
    assert torch.equal(found.false_negatives, oracle.false_negatives)


@pytest.mark.parametrize("scope", ["global", "cluster"])
def test_sharded_in_one_process_is_replicated_with_torch_kmeans(scope):
    image, text, _ = clustered(noise=0.3)
    kw = {"num_clusters": (4, 7), "accept_warmup_epochs": 3.0, "accept_scope": scope}
    replicated = make(kmeans="torch", **kw)
    settings = IFNDConfig(start_epoch=0.0, **kw)  # kmeans auto: torch when sharded
    sharded = registry.get("ifnd").build(
        settings, SharedSettings(alpha=0.01), num_samples=N, sharding="sharded"
    )
    assert type(sharded.tables.assignments) is ShardedPerSampleTable and sharded.kmeans == "torch"
    a = run_epochs(replicated, image, text, 3)
    b = run_epochs(sharded, image, text, 3)
    assert replicated.rounds == sharded.rounds == 2
    for x, y in zip(a, b, strict=True):
        assert (x.false_negatives is None) == (y.false_negatives is None)
        if x.false_negatives is not None:
            assert torch.equal(x.false_negatives, y.false_negatives)
    assert any(x.false_negatives is not None and bool(x.false_negatives.any()) for x in a)
    state, other = replicated.state_dict(), sharded.state_dict()
    for key in state.keys() - {"round_seconds"}:
        assert torch.equal(state[key].nan_to_num(), other[key].nan_to_num()), key
    # The acceptance follows the histogram ranks: about the accepted fraction is accepted.
    accepted = (state["accept_rank"] <= 0.5).float().mean(1)
    assert torch.allclose(accepted, torch.full_like(accepted, 0.5), atol=0.02)


def test_the_settings_reach_a_sharded_ifnd(tmp_path):
    args = cpu_args(tmp_path, detector="ifnd", state_sharding="sharded", num_samples=40)
    assert args.state_rows_per_process() == 40  # one process: every row
    loss = build_contrastive_loss(args, 40, "cpu")
    tables = loss.detector.tables
    assert type(tables.seen) is ShardedPerSampleTable and loss.detector.kmeans == "torch"
    assert set(loss.shard_tables()) == {"detector.bank", "detector.seen", "detector.assignments"}
    replicated = build_contrastive_loss(cpu_args(tmp_path, detector="ifnd"), 40, "cpu")
    assert type(replicated.detector.tables.seen) is PerSampleTable
    assert replicated.detector.kmeans == "sklearn"
    # sklearn with sharded state is refused: tests/test_sharded_state.py
    with pytest.raises(ValueError, match="kmeans must be one of"):
        IFNDConfig(kmeans="faiss")
