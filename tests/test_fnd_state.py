"""Per-sample threshold state: update rule, convergence, persistence, duplicates."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from glofnd_hf.fnd import (
    GloFNDConfig,
    ThresholdState,
    build_detector,
    masked_quantile,
    segment_mean,
)
from glofnd_hf.fnd.thresholds import adam_step
from glofnd_hf.losses import ClipLoss


def clustered_pairs(n: int, dim: int = 32, clusters: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(clusters, dim, generator=gen), dim=-1)
    assign = torch.randint(0, clusters, (n,), generator=gen)
    image = F.normalize(centers[assign] + 0.5 * torch.randn(n, dim, generator=gen), dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(n, dim, generator=gen), dim=-1)
    return image, text


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 0.999])
def test_masked_quantile_matches_torch_quantile(q):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 5, 9, generator=gen)
    mask = torch.rand(5, 9, generator=gen) > 0.3
    mask[0] = False
    mask[1, :] = False
    mask[1, 4] = True
    got = masked_quantile(values, mask, q)
    for s in range(2):
        for i in range(5):
            row = values[s, i][mask[i]]
            if row.numel() == 0:
                assert torch.isnan(got[s, i])
            else:
                assert torch.allclose(got[s, i], torch.quantile(row, q), atol=1e-6)


def test_segment_mean_averages_duplicates_and_keeps_unique_values_exactly():
    index = torch.tensor([5, 2, 5, 7, 2, 5])
    values = torch.tensor(
        [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [0.1, 0.2], [4.0, 40.0], [5.0, 50.0]]
    )
    got = segment_mean(index, values)
    expected = torch.tensor(
        [[3.0, 30.0], [3.0, 30.0], [3.0, 30.0], [0.1, 0.2], [3.0, 30.0], [3.0, 30.0]]
    )
    assert torch.equal(got[3], values[3])
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("rule", ["adam", "reference"])
def test_adam_rules_are_adam_on_the_pinball_gradient(rule):
    """The reference rule keeps the reference code's semantics (bias correction with
    t = epoch + 1); "adam" counts each sample's own steps."""
    cfg = GloFNDConfig(alpha=0.1, lr=0.05, betas=(0.9, 0.98), eps=1e-8, update_rule=rule)
    rows = torch.tensor([[[0.5, 0.01, 0.001, 3.0], [1.0, 0.0, 0.0, 0.0]]])
    grad = torch.tensor([[-0.3, 0.1]])
    epoch = 4.6
    out = cfg.rule().step(rows, grad.unsqueeze(-1), epoch)
    for side in range(2):
        lam, m, v, visits = rows[0, side].tolist()
        g = grad[0, side].item()
        m2, v2 = 0.9 * m + 0.1 * g, 0.98 * v + 0.02 * g * g
        t = visits + 1 if rule == "adam" else math.floor(epoch) + 1
        mhat, vhat = m2 / (1 - 0.9**t), v2 / (1 - 0.98**t)
        lam2 = max(-1.0, min(1.0, lam - 0.05 * mhat / (math.sqrt(vhat) + 1e-8)))
        assert out[0, side].tolist() == pytest.approx([lam2, m2, v2, visits + 1], rel=1e-5)


def test_gradient_clipping_and_init_quantile():
    cfg = GloFNDConfig(
        alpha=0.01, lr=0.05, clip_grad_mult=2.0, init_quantile=True, update_rule="adam"
    )
    rows = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 1.0]]])
    grad = torch.tensor([[-0.5, -0.5]])
    quantile = torch.tensor([[0.42, 0.9]])
    out = cfg.rule().step(rows, torch.stack([grad, quantile], dim=-1), 0.0)
    # First visit: the threshold jumps to the in-batch quantile, the moments stay.
    assert out[0, 0].tolist() == pytest.approx([0.42, 0.0, 0.0, 1.0])
    # Later visit: a normal Adam step with the gradient clipped to -2 * alpha.
    assert out[0, 1, 1].item() == pytest.approx(0.1 * -0.02)
    assert out[0, 1, 0].item() == pytest.approx(0.3 + 0.05, rel=1e-4)


def test_config_rejects_bad_values():
    for kwargs in [
        dict(alpha=0.0),
        dict(alpha=1.5),
        dict(lr=-1),
        dict(betas=(0.9, 1.0)),
        dict(update_start_epoch=3, mask_start_epoch=2),
        dict(update_rule="sometimes"),
        dict(clip_grad_mult=0.0),
        dict(tail_size=0),
        dict(tail_size=2.5),
        dict(band=0.0),
        dict(step_floor=0.0),
        dict(step_floor=1.5),
        dict(drift_rate=0.0),
        dict(drift_rate=2.0),
        dict(averaging=0.0),
        dict(averaging=1.5),
    ]:
        with pytest.raises(ValueError):
            GloFNDConfig(**kwargs)


@pytest.mark.parametrize("rule,epochs", [("tail", 12), ("adam", 80)])
def test_thresholds_converge_to_the_global_quantile_on_both_sides(rule, epochs):
    """N = 4096 clustered pairs, shuffled batches of 256, alpha = 0.01, one visit per sample
    and epoch: lambda approaches the exact (1 - alpha) quantile over all N - 1 negatives (the
    tail rule in 12 epochs; Adam with lr 0.02 needs 80)."""
    n, alpha, batch = 4096, 0.01, 256
    image, text = clustered_pairs(n)
    config = GloFNDConfig(alpha=alpha, lr=0.02, update_rule=rule)
    detector = build_detector("glofnd", num_samples=n, config=config)
    loss = ClipLoss(detector)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            loss(image[idx], text[idx], 10.0, idx, epoch=epoch)
    state = detector.state_dict()
    eye = torch.eye(n, dtype=torch.bool)
    for sim, side in [(image @ text.t(), "image"), (text @ image.t(), "text")]:
        lam = state[f"{side}.lambda"]
        exact = torch.nanquantile(sim.masked_fill(eye, float("nan")), 1 - alpha, dim=1)
        assert (lam - exact).abs().median() < 0.02, side
        realised = ((sim > lam[:, None]) & ~eye).sum(1).float() / (n - 1)
        within = ((realised >= 0.5 * alpha) & (realised <= 2 * alpha)).float().mean()
        assert within > 0.9, (side, within)


def test_state_round_trips_through_safetensors_bit_exactly(tmp_path):
    n = 64
    detector = build_detector("glofnd", num_samples=n, config=GloFNDConfig(alpha=0.1))
    image, text = clustered_pairs(n)
    loss = ClipLoss(detector)
    for start in range(0, n, 16):
        idx = torch.arange(start, start + 16)
        loss(image[idx], text[idx], 10.0, idx, epoch=0)
    state = detector.state_dict()
    save_file(state, tmp_path / "state.safetensors")
    fresh = build_detector("glofnd", num_samples=n, config=GloFNDConfig(alpha=0.1))
    fresh.load_state_dict(load_file(tmp_path / "state.safetensors"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not torch.equal(state["image.lambda"], torch.ones(n))


@pytest.mark.parametrize("rule", ["pinball", "tail", "adam"])
def test_the_iterates_are_the_column_the_rule_steps(rule):
    n = 32
    config = GloFNDConfig(alpha=0.1, update_rule=rule)
    detector = build_detector("glofnd", num_samples=n, config=config)
    image, text = clustered_pairs(n)
    loss = ClipLoss(detector)
    for epoch in range(3):  # a first visit sets both at the batch's tail estimate
        for start in range(0, n, 16):
            idx = torch.arange(start, start + 16)
            loss(image[idx], text[idx], 10.0, idx, epoch=epoch)
    state = detector.state
    rows = state.rows(torch.arange(n))
    iterates = state.iterates_of(rows)
    if rule == "adam":  # steps its thresholds themselves
        assert iterates is None
        return
    assert torch.equal(iterates, rows[..., state.columns.index("iterate")])
    # The threshold averages the iterates: after a few visits they differ.
    assert not torch.equal(iterates, state.thresholds_of(rows))


def test_load_state_rejects_wrong_size_and_keys():
    state = ThresholdState(10)
    other = ThresholdState(12).state_dict()
    with pytest.raises(ValueError, match="another size"):
        state.load_state_dict(other)
    with pytest.raises(ValueError, match="missing"):
        state.load_state_dict({"image.lambda": torch.ones(10)})


def test_duplicate_indices_update_deterministically_as_one_averaged_step():
    n = 20
    image, text = clustered_pairs(8, seed=3)
    index = torch.tensor([3, 7, 3, 11, 12, 3, 15, 16])
    cfg = GloFNDConfig(alpha=0.2, lr=0.05, update_rule="adam")
    results = []
    for _ in range(2):
        detector = build_detector("glofnd", num_samples=n, config=cfg)
        detector.state.table.data[3, :, 0] = 0.0  # so the three copies see different counts
        ClipLoss(detector)(image, text, 10.0, index, epoch=0)
        results.append(detector.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])
    # Index 3 took exactly one step (visits == 1) with the mean gradient of its three copies.
    assert results[0]["image.visits"][3].item() == 1.0
    sim = image @ text.t()
    negatives = index[None, :] != index[:, None]
    grads = [
        cfg.alpha - ((sim[i] > 0.0) & negatives[i]).sum() / negatives[i].sum() for i in (0, 2, 5)
    ]
    assert len({g.item() for g in grads}) > 1
    g = torch.stack(grads).float().mean().reshape(1, 1).expand(1, 2)
    expected = adam_step(torch.tensor([[[0.0, 0, 0, 0]] * 2]), g, None, cfg, 0)
    assert results[0]["image.lambda"][3].item() == pytest.approx(expected[0, 0, 0].item())
    # Untouched indices keep their initial state.
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[index] = False
    assert torch.all(results[0]["text.lambda"][untouched] == 1.0)
    assert torch.all(results[0]["text.visits"][untouched] == 0.0)


def test_a_new_threshold_rule_is_its_class_and_one_registration():
    """Adding an update rule takes its class and a line in ``RULES``: the config accepts its
    name, the state holds its columns, and the detector runs it."""
    from glofnd_hf.fnd import DetectionBatch, GloFNDDetector
    from glofnd_hf.fnd.table import COUNT
    from glofnd_hf.fnd.thresholds import RULES, THRESHOLD_RANGE, ThresholdRule

    class HalfwayRule(ThresholdRule):
        """Moves each threshold halfway to the batch's top negative (a toy)."""

        columns = ("lambda", "visits")
        settings = ()
        fill = (1.0, 0.0)
        valid = (THRESHOLD_RANGE, COUNT)
        num_statistics = 1

        def statistics(self, sim, negatives, lam):
            top = torch.where(negatives, sim, -1.0).amax(-1)
            return top.unsqueeze(-1).to(torch.float32)

        def step(self, rows, stats, epoch):
            lam = 0.5 * (rows[..., 0] + stats[..., 0])
            return torch.stack([lam, rows[..., 1] + 1.0], dim=-1)

    RULES["halfway"] = HalfwayRule
    try:
        with pytest.raises(ValueError, match="update_rule"):
            GloFNDConfig(update_rule="nowhere")
        detector = GloFNDDetector(8, GloFNDConfig(alpha=0.1, update_rule="halfway"))
        assert detector.state.bytes_per_sample == 16
        index = torch.arange(4)
        batch = DetectionBatch(index, index, ~torch.eye(4, dtype=torch.bool), epoch=0.0)
        sim = torch.full((2, 4, 4), 0.2)
        detector.detect(sim, batch)
        assert torch.allclose(detector.state.lambdas(index), torch.full((4, 2), 0.6))
    finally:
        del RULES["halfway"]
