"""The IFND baseline detector: clustering, acceptance schedule, losses, state, config."""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from glofnd_hf.fnd import GloFNDConfig, SharedSettings, build_detector, registry
from glofnd_hf.fnd.detectors import DetectionBatch
from glofnd_hf.fnd.ifnd import IFNDConfig, IFNDDetector
from glofnd_hf.losses import ClipLoss

N, K, D = 240, 6, 16


def clustered(n=N, k=K, d=D, seed=0, noise=0.08):
    """Well-separated clusters: image/text embeddings near one of k random unit centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=gen), dim=-1) * 3.0
    labels = torch.arange(n) % k
    image = centres[labels] + noise * torch.randn(n, d, generator=gen)
    text = centres[labels] + noise * torch.randn(n, d, generator=gen)
    return image, text, labels


def make(num_clusters=(K,), n=N, alpha=0.01, **kw):
    kw = {"start_epoch": 0.0, "accept_warmup_epochs": 0.0, **kw}
    settings = IFNDConfig(num_clusters=num_clusters, **kw)
    return registry.get("ifnd").build(settings, SharedSettings(alpha=alpha), num_samples=n)


def batch_for(index, image, text, epoch, labels=None):
    img, txt = F.normalize(image[index], dim=-1), F.normalize(text[index], dim=-1)
    sim = torch.stack([img @ txt.t(), txt @ img.t()])
    negatives = index.unsqueeze(0) != index.unsqueeze(1)
    lab = None if labels is None else labels[index]
    return sim, DetectionBatch(index, index, negatives, float(epoch), lab, lab)


def run_epochs(det, image, text, epochs, batch=40, start=0.0, seed=1):
    """Observe + detect over the data, as the loss does, for ``epochs`` epochs."""
    n = image.shape[0]
    steps = math.ceil(n / batch)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for e in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(steps):
            index = order[s * batch : (s + 1) * batch]
            epoch = start + e + s / steps
            det.observe(index, image[index], text[index])
            out.append(det.detect(*batch_for(index, image, text, epoch)))
    return out


def test_full_acceptance_equals_oracle():
    image, text, labels = clustered()
    det = make()
    run_epochs(det, image, text, 1)
    assert det.rounds == 0  # the bank needs one full epoch first
    index = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:64]
    det.observe(index, image[index], text[index])
    sim, batch = batch_for(index, image, text, 1.0, labels)
    found = det.detect(sim, batch)
    assert det.rounds == 1
    oracle = build_detector("oracle").detect(sim, batch)
    assert found.false_negatives.shape == (2, 64, 64)
    assert found.false_negatives.any()
    assert torch.equal(found.false_negatives, oracle.false_negatives)
    assert found.stats["ifnd_accept_fraction"] == 1.0
    assert found.stats["ifnd_cluster_seconds"] >= 0.0


def test_granularities_intersection_and_union():
    image, text, labels = clustered()
    found = {}
    for combine in ("all", "any"):
        det = make(num_clusters=(K, 2 * K), combine=combine)
        run_epochs(det, image, text, 1)
        index = torch.arange(0, N, 3)
        sim, batch = batch_for(index, image, text, 1.0, labels)
        fn = det.detect(sim, batch).false_negatives[0]
        # Recompute from the detector's labels: same label at all / any granularity.
        lab = det.labels[:, index]
        same = lab.unsqueeze(2) == lab.unsqueeze(1)  # (G, b, b)
        expect = (same.all(0) if combine == "all" else same.any(0)) & batch.negatives
        assert torch.equal(fn, expect)
        found[combine] = fn
    oracle = batch.anchor_labels.unsqueeze(1) == batch.candidate_labels.unsqueeze(0)
    oracle &= batch.negatives
    assert torch.all(found["all"] <= oracle)  # finer split inside true clusters
    assert torch.all(found["any"] >= oracle)  # k = K recovers the clusters
    assert found["all"].sum() < oracle.sum()


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
def test_clip_loss_with_ifnd_matches_oracle(strategy):
    image, text, labels = clustered()
    det = make()
    run_epochs(det, image, text, 1)
    index = torch.arange(0, N, 4)
    img, txt = image[index].clone(), text[index].clone()
    det.observe(index, img, txt)  # what the loss's observe hook does
    out = ClipLoss(det, strategy)(img, txt, 10.0, index, epoch=1.0)
    ref = ClipLoss(build_detector("oracle"), strategy)(
        img, txt, 10.0, index, epoch=1.0, labels=labels[index]
    )
    plain = ClipLoss()(img, txt, 10.0, index, epoch=1.0)
    assert torch.allclose(out.loss, ref.loss)
    assert not torch.allclose(out.loss, plain.loss)
    assert out.stats["filtered_fraction_image"] > 0
    assert torch.isfinite(out.loss)


def test_acceptance_grows_linearly():
    det = make(start_epoch=1.0, accept_warmup_epochs=4.0)
    fracs = [det.accept_fraction(e) for e in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 9.0)]
    assert fracs == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    image, text, labels = clustered(noise=0.3)
    run_epochs(det, image, text, 2, start=0.0)
    assert det.rounds == 1  # first round at epoch 1 (start), once the bank is full
    conf, rank = det.confidence[0], det.accept_rank[0]
    for frac in (0.25, 0.5, 0.75, 1.0):
        accepted = rank <= frac
        assert accepted.sum() == math.floor(frac * N + 1e-9)
        if frac < 1.0:  # the accepted are the most confident
            assert conf[accepted].min() >= conf[~accepted].max()
    # Detection at acceptance 0.5: only pairs of accepted samples.
    index = torch.arange(N)
    sim, batch = batch_for(index, image, text, 3.0)
    fn = det.detect(sim, batch).false_negatives[0]
    acc = det.accept_rank[0] <= 0.5
    assert not fn[~acc].any() and not fn[:, ~acc].any()
    assert fn.any()


def test_per_cluster_acceptance():
    image, text, _ = clustered(noise=0.3)
    det = make(accept_scope="cluster")
    run_epochs(det, image, text, 1)
    det.detect(*batch_for(torch.arange(8), image, text, 1.0))
    lab, rank = det.labels[0], det.accept_rank[0]
    for c in lab.unique():
        members = rank[lab == c]
        assert (members <= 0.5).sum() == math.floor(0.5 * len(members) + 1e-9)
        assert members.max() == 1.0


def test_rounds_follow_the_schedule():
    image, text, _ = clustered()
    det = make(cluster_every=2.0, start_epoch=1.0)
    outs = run_epochs(det, image, text, 6)
    rounds = [int(o.stats["ifnd_rounds"]) for o in outs]
    steps = len(outs) // 6
    # Bank full at epoch 1 = start: rounds at epochs 1, 3, 5.
    assert rounds[steps - 1] == 0 and rounds[steps] == 1
    assert rounds[3 * steps - 1] == 1 and rounds[3 * steps] == 2
    assert rounds[5 * steps] == 3 and rounds[-1] == 3
    assert outs[0].false_negatives is None


def test_state_dict_round_trip(tmp_path):
    image, text, labels = clustered()
    det = make(num_clusters=(K, 9), accept_warmup_epochs=3.0)
    run_epochs(det, image, text, 2)
    path = tmp_path / "state.safetensors"
    save_file(det.state_dict(), str(path))
    fresh = make(num_clusters=(K, 9), accept_warmup_epochs=3.0)
    fresh.load_state_dict(load_file(str(path)))
    state, restored = det.state_dict(), fresh.state_dict()
    assert set(state) >= {"bank", "labels", "confidence", "last_round_epoch"}
    assert state["bank"].dtype == torch.float16 and state["bank"].shape == (N, D)
    for key in state:
        assert torch.equal(state[key].nan_to_num(), restored[key].nan_to_num()), key
    # Both continue identically (no extra round after the resume, same detections).
    a = run_epochs(det, image, text, 1, start=2.0, seed=3)
    b = run_epochs(fresh, image, text, 1, start=2.0, seed=3)
    assert det.rounds == fresh.rounds == 2
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.false_negatives, y.false_negatives)
    # An unused detector saves too (empty bank), and mismatched settings are refused.
    empty = make()
    save_file(empty.state_dict(), str(tmp_path / "empty.safetensors"))
    make().load_state_dict(load_file(str(tmp_path / "empty.safetensors")))
    with pytest.raises(ValueError, match="clustered with k"):
        make(num_clusters=(K, 10)).load_state_dict(load_file(str(path)))
    with pytest.raises(ValueError, match="bank"):
        make(n=N + 1, num_clusters=(K, 9)).load_state_dict(load_file(str(path)))


@pytest.mark.parametrize(
    "bad",
    [
        {"num_clusters": (1,)},
        {"num_clusters": (4, 4)},
        {"cluster_every": 0},
        {"start_epoch": -1.0},
        {"accept_warmup_epochs": -1.0},
        {"accept_scope": "batch"},
        {"confidence": "entropy"},
        {"combine": "majority"},
        {"features": "both"},
        {"bank_dtype": "int8"},
        {"kmeans_iters": 0},
        {"kmeans_algorithm": "faiss"},
    ],
)
def test_bad_config(bad):
    with pytest.raises(ValueError):
        IFNDConfig(**bad)


def test_factory_defaults_and_errors():
    det = build_detector(
        "ifnd", num_samples=100, config=GloFNDConfig(alpha=0.05, mask_start_epoch=3.0)
    )
    assert isinstance(det, IFNDDetector)
    assert det.num_clusters == (20,) and det.start_epoch == 3.0 and det.mask_start_epoch == 3.0
    assert det.config.seed == 0  # the shared seed
    det = build_detector(
        "ifnd",
        num_samples=10,
        config=GloFNDConfig(),
        options={"num_clusters": [4, 8], "cluster_every": 2},
    )
    assert det.num_clusters == (4, 8) and det.config.cluster_every == 2
    spec = registry.get("ifnd")
    det = spec.build({"seed": 5}, SharedSettings(seed=3), num_samples=10)
    assert det.config.seed == 5 and spec.build({}, SharedSettings(seed=3), num_samples=10).seed == 3
    with pytest.raises(ValueError, match="num_samples"):
        build_detector("ifnd", config=GloFNDConfig())
    with pytest.raises(ValueError, match="unknown setting 'clusters'.*num_clusters"):
        build_detector("ifnd", num_samples=10, options={"clusters": 4})
    image, text, _ = clustered()
    with pytest.raises(RuntimeError, match="observe"):
        make().detect(*batch_for(torch.arange(8), image, text, 0.0))
    with pytest.raises(ValueError, match="observe needs"):
        make().observe(torch.arange(4), image[:4], text[:3])


def _two_rank_worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        image, text, _ = clustered()
        det = make(num_clusters=(K, 9), seed=rank)  # a different seed must not matter
        gen = torch.Generator().manual_seed(0)
        for step in range(N // 40 + 2):
            index = torch.randperm(N, generator=gen)[:40]
            local = index.view(world, -1)[rank]
            det.observe(local, image[local], text[local])
            img = F.normalize(image[local], dim=-1)
            txt = F.normalize(text[local], dim=-1)
            all_img = F.normalize(image[index], dim=-1)
            all_txt = F.normalize(text[index], dim=-1)
            sim = torch.stack([img @ all_txt.t(), txt @ all_img.t()])
            negatives = index.unsqueeze(0) != local.unsqueeze(1)
            det.detect(sim, DetectionBatch(local, index, negatives, step / 6.0))
        torch.save(det.state_dict(), f"{out}.rank{rank}")
        dist.barrier()  # leave together: gloo aborts a rank whose peer tears down first
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_same_state(tmp_path):
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "state"
    try:
        mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    except mp.ProcessExitedException as error:
        # gloo sometimes aborts a rank while the group is torn down (tests/launch.py), after
        # the work is done: both states saved means only the teardown failed.
        saved = all(Path(f"{out}.rank{r}").exists() for r in range(2))
        if error.signal_name != "SIGABRT" or not saved:
            raise
    a, b = (torch.load(f"{out}.rank{r}") for r in range(2))
    assert int(a["rounds"][0]) >= 1
    assert int(a["seen"].sum()) > N // 2
    for key in a.keys() - {"round_seconds"}:  # wall time differs by rank
        assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key
