"""Losses: equality with transformers' clip_loss, masks, strategies, global loss, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.clip import modeling_clip

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss

hf_clip_loss = (
    getattr(modeling_clip, "clip_loss", None) or modeling_clip.image_text_contrastive_loss
)


def embeddings(b=12, d=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=gen, dtype=dtype)
    text = image + 0.8 * torch.randn(b, d, generator=gen, dtype=dtype)
    return image.requires_grad_(), text.requires_grad_()


def reference_rows(sim, scale, index, fn, strategy):
    """Per-anchor InfoNCE written out with Python sets (one side)."""
    rows = []
    b = sim.shape[0]
    for i in range(b):
        negatives = [j for j in range(b) if index[j] != index[i]]
        detected = [j for j in negatives if fn is not None and fn[i, j]]
        if strategy == "eliminate":
            positives, denominator = [i], [i] + [j for j in negatives if j not in detected]
        else:
            positives, denominator = [i] + detected, [i] + negatives
        logits = scale * sim[i]
        lse = torch.logsumexp(logits[denominator], 0)
        rows.append(lse - logits[positives].mean())
    return torch.stack(rows)


@pytest.mark.parametrize("detector_name", ["none", "glofnd", "batch_quantile", "oracle"])
def test_clip_loss_equals_transformers_before_masking(detector_name):
    image, text = embeddings()
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    cfg = GloFNDConfig(alpha=0.2, update_start_epoch=0, mask_start_epoch=5)
    detector = build_detector(detector_name, num_samples=50, config=cfg)
    labels = torch.arange(12) % 3
    out = ClipLoss(detector)(image, text, scale, torch.arange(12), epoch=2.0, labels=labels)
    out.loss.backward()
    grads = [image.grad.clone(), text.grad.clone(), scale.grad.clone()]
    for t in (image, text, scale):
        t.grad = None
    u, v = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    ref = hf_clip_loss(scale * v @ u.t())
    ref.backward()
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=0)
    for got, want in zip(grads, [image.grad, text.grad, scale.grad], strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
def test_glofnd_masks_exactly_the_negatives_above_the_updated_threshold(strategy):
    image, text = embeddings(b=10, seed=1)
    index = torch.tensor([4, 9, 1, 30, 22, 17, 5, 8, 2, 11])
    detector = build_detector("glofnd", num_samples=40, config=GloFNDConfig(alpha=0.3, lr=0.05))
    # Start from thresholds that filter something.
    detector.state.table.data[:, :, 0] = 0.1
    loss = ClipLoss(detector, strategy=strategy)
    out = loss(image, text, 5.0, index, epoch=0)
    lam = detector.state.lambdas(index)  # after the update: update-then-mask
    assert not torch.allclose(lam, torch.full_like(lam, 0.1))
    u, v = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    total = 0
    n_detected = 0
    for side, sim in enumerate([u @ v.t(), v @ u.t()]):
        fn = (sim > lam[:, side, None]) & ~torch.eye(10, dtype=torch.bool)
        n_detected += fn.sum().item()
        total = total + reference_rows(sim, 5.0, index, fn, strategy).mean() / 2
        assert out.stats[f"filtered_fraction_{['image', 'text'][side]}"].item() == pytest.approx(
            fn.sum().item() / 90
        )
    assert n_detected > 0
    assert out.loss.item() == pytest.approx(total.item(), abs=1e-10)


def test_batch_quantile_and_oracle_filter_what_they_should():
    image, text = embeddings(b=10, seed=2)
    index = torch.arange(10)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 4])
    u, v = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    eye = torch.eye(10, dtype=torch.bool)
    alpha = 0.25
    bq = ClipLoss(build_detector("batch_quantile", config=GloFNDConfig(alpha=alpha)))
    out = bq(image, text, 5.0, index)
    expected = 0
    for sim in (u @ v.t(), v @ u.t()):
        q = torch.stack([torch.quantile(sim[i][~eye[i]], 1 - alpha) for i in range(10)])
        fn = (sim > q[:, None]) & ~eye
        assert fn.sum() > 0
        expected = expected + reference_rows(sim, 5.0, index, fn, "eliminate").mean() / 2
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-10)

    oracle = ClipLoss(build_detector("oracle"))
    out = oracle(image, text, 5.0, index, labels=labels)
    fn = (labels[:, None] == labels[None, :]) & ~eye
    expected = sum(
        reference_rows(s, 5.0, index, fn, "eliminate").mean() / 2 for s in (u @ v.t(), v @ u.t())
    )
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-10)
    with pytest.raises(ValueError, match="labels"):
        oracle(image, text, 5.0, index)


def test_repeated_index_copies_are_not_negatives_of_each_other():
    image, text = embeddings(b=6, seed=3)
    index = torch.tensor([0, 1, 0, 2, 3, 1])
    out = ClipLoss()(image, text, 4.0, index)
    u, v = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    expected = sum(
        reference_rows(s, 4.0, index, None, "eliminate").mean() / 2 for s in (u @ v.t(), v @ u.t())
    )
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-10)
    plain = ClipLoss()(image, text, 4.0, torch.arange(6))
    assert not math.isclose(out.loss.item(), plain.loss.item())


@pytest.mark.parametrize("loss_type", ["clip", "global"])
def test_anchor_with_every_negative_filtered_gives_a_finite_loss(loss_type):
    image, text = embeddings(b=6, seed=4)
    cfg = GloFNDConfig(alpha=0.1, lr=1e-6, update_rule="adam")
    detector = build_detector("glofnd", num_samples=6, config=cfg)
    detector.state.table.data[2, :, 0] = -1.0  # anchor 2 filters every negative
    if loss_type == "clip":
        loss = ClipLoss(detector)
    else:
        loss = GlobalContrastiveLoss(6, detector, gamma=GammaSchedule(0.5, "constant"))
    out = loss(
        image,
        text,
        torch.tensor(20.0, dtype=torch.float64, requires_grad=True),
        torch.arange(6),
        epoch=0,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    assert out.stats["all_filtered_anchors_image"].item() == 1.0
    assert out.stats["all_filtered_anchors_text"].item() == 1.0


def closed_form_global(image, text, scale, kept):
    """log g per anchor and side, with g the mean over kept negatives (by hand)."""
    u, v = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    out = []
    for side, sim in enumerate([u @ v.t(), v @ u.t()]):
        rows = []
        for i in range(sim.shape[0]):
            cols = kept[side][i].nonzero().flatten()
            rows.append(torch.exp((sim[i, cols] - sim[i, i]) * scale).mean())
        out.append(torch.stack(rows))
    return torch.stack(out)  # (2, b) of g


@pytest.mark.parametrize(
    "temperature,weighting",
    [("fixed", "fastclip"), ("learnable", "fastclip"), ("learnable", "mean")],
)
def test_global_loss_with_gamma_one_equals_the_closed_form(temperature, weighting):
    n, b = 30, 8
    image, text = embeddings(b=b, seed=5)
    index = torch.tensor([3, 14, 15, 9, 26, 5, 21, 7])
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    loss = GlobalContrastiveLoss(
        n,
        gamma=GammaSchedule(1.0, "constant"),
        temperature=temperature,
        rho=6.5,
        temperature_gradient=weighting,
    )
    out = loss(image, text, scale, index, epoch=0)
    out.loss.backward()
    got = [
        image.grad.clone(),
        text.grad.clone(),
        scale.grad.clone() if scale.grad is not None else torch.zeros(()),
    ]
    image.grad = text.grad = scale.grad = None

    kept = [~torch.eye(b, dtype=torch.bool)] * 2
    g = closed_form_global(image, text, scale, kept)
    # u equals g at the touched indices and is untouched elsewhere.
    u_state = loss.state_dict()
    assert torch.allclose(u_state["image.u"][index].double(), g[0].detach(), rtol=1e-5)
    assert torch.allclose(u_state["text.u"][index].double(), g[1].detach(), rtol=1e-5)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[index] = False
    assert torch.all(u_state["image.u"][untouched] == 0) and torch.all(
        u_state["text.u"][untouched] == 0
    )
    # With u = g the surrogate's gradient is that of tau * mean log g (+ rho * tau).
    if temperature == "fixed":  # the temperature gets no gradient
        g_fixed = closed_form_global(image, text, scale.detach(), kept)
        objective = (1.0 / scale.detach()) * torch.log(g_fixed).mean()
    else:
        objective = (1.0 / scale) * (torch.log(g).mean() + 6.5)
    if weighting == "fastclip" and temperature == "learnable":
        # FastCLIP's code sums the surrogate over the two sides for the temperature: its share
        # of the scale's gradient (tau held, through g only) counts twice. The embeddings'
        # gradients are unchanged, so the extra term reaches the scale alone.
        g_scale_only = closed_form_global(image.detach(), text.detach(), scale, kept)
        extra = torch.log(g_scale_only).mean() / scale.detach()
        objective = objective + (extra - extra.detach())  # a gradient, no value
    objective.backward()
    want = [image.grad, text.grad, scale.grad if scale.grad is not None else torch.zeros(())]
    if temperature == "learnable":  # the surrogate g/u adds its value 1 per side, times tau
        assert torch.allclose(out.loss, objective + 2.0 / scale.detach(), atol=1e-6)
    for a, bb in zip(got, want, strict=True):
        assert torch.allclose(a, bb, atol=1e-6), (a, bb)


def test_global_loss_normaliser_counts_kept_negatives_and_u_moves_with_gamma():
    n, b = 16, 6
    image, text = embeddings(b=b, seed=6)
    index = torch.arange(b)
    detector = build_detector(
        "glofnd", num_samples=n, config=GloFNDConfig(alpha=0.3, lr=1e-6, update_rule="adam")
    )
    detector.state.table.data[:, :, 0] = 0.0
    loss = GlobalContrastiveLoss(n, detector, gamma=GammaSchedule(0.25, "constant"))
    loss(image, text, 5.0, index, epoch=0)  # first visit: u = g
    u_first = loss.state_dict()["image.u"][:b].clone()
    image, text = embeddings(b=b, seed=7)  # new embeddings, so g moves
    loss(image, text, 5.0, index, epoch=1)
    u_second = loss.state_dict()["image.u"][:b]
    lam = detector.state.lambdas(index)
    u_, v_ = F.normalize(image.detach(), dim=-1), F.normalize(text.detach(), dim=-1)
    sim = u_ @ v_.t()
    kept = ~torch.eye(b, dtype=torch.bool) & ~(sim > lam[:, 0, None])
    assert (~kept & ~torch.eye(b, dtype=torch.bool)).any()
    kept[kept.sum(1) == 0] = ~torch.eye(b, dtype=torch.bool)[kept.sum(1) == 0]  # fallback rows
    assert not torch.allclose(u_first, u_second)
    g = torch.stack([torch.exp((sim[i, kept[i]] - sim[i, i]) * 5.0).mean() for i in range(b)])
    assert torch.allclose(u_second.double(), 0.75 * u_first.double() + 0.25 * g, rtol=1e-5)


def test_gamma_schedule():
    cosine = GammaSchedule(0.2, "cosine", 18)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(9) == pytest.approx(0.6)
    assert cosine(18) == pytest.approx(0.2) and cosine(30) == pytest.approx(0.2)
    assert GammaSchedule(0.3, "constant")(0) == 0.3
    with pytest.raises(ValueError):
        GammaSchedule(0.0)


def test_similarities_are_compared_in_float32_under_autocast():
    image, text = embeddings(b=16, seed=7, dtype=torch.float32)
    image, text = image.detach().bfloat16(), text.detach().bfloat16()
    index = torch.arange(16)
    detector = build_detector(
        "glofnd", num_samples=16, config=GloFNDConfig(alpha=0.2, lr=1e-6, update_rule="adam")
    )
    detector.state.table.data[:, :, 0] = 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ClipLoss(detector)(image, text, 5.0, index)
    assert out.loss.dtype == torch.float32
    lam = detector.state.lambdas(index)
    u, v = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    sim = u @ v.t()
    fn = (sim > lam[:, 0, None]) & ~torch.eye(16, dtype=torch.bool)
    assert out.stats["filtered_fraction_image"].item() == pytest.approx(fn.sum().item() / 240)


def test_bad_input_raises_and_leaves_state_untouched():
    n = 10
    detector = build_detector("glofnd", num_samples=n, config=GloFNDConfig(alpha=0.2))
    loss = GlobalContrastiveLoss(n, detector)
    image, text = embeddings(b=4, seed=8)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    bad_image = image.detach().clone()
    bad_image[1, 3] = float("nan")
    cases = [
        ((image, text, 5.0, torch.tensor([0, 1, 2, 10])), "out of range"),
        ((image, text, 5.0, torch.tensor([0, -1, 2, 3])), "out of range"),
        ((image, text[:3], 5.0, torch.arange(4)), "same shape"),
        ((image, text, 5.0, torch.arange(3)), "index must have shape"),
        ((bad_image, text, 5.0, torch.arange(4)), "non-finite values in the image"),
        ((image, text, float("inf"), torch.arange(4)), "non-finite values in the logit_scale"),
        ((image, text, 5.0, torch.tensor([0.0, 1.0, 2.0, 3.0])), "integer"),
        ((image, text, 5.0, None), "dataset indices"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            loss(*args, epoch=0)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_loss_state_dict_round_trip_and_mismatch():
    n = 12
    loss = GlobalContrastiveLoss(n, build_detector("glofnd", num_samples=n))
    image, text = embeddings(b=4, seed=9)
    loss(image, text, 5.0, torch.tensor([1, 5, 7, 11]), epoch=0)
    state = loss.state_dict()
    assert set(state) >= {"image.u", "text.u", "detector.image.lambda", "detector.text.visits"}
    other = GlobalContrastiveLoss(n, build_detector("glofnd", num_samples=n))
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key])
    with pytest.raises(ValueError, match="disagree"):
        GlobalContrastiveLoss(n + 1, build_detector("glofnd", num_samples=n))


def test_threshold_statistics_describe_the_batch_thresholds():
    image, text = embeddings(b=11, seed=11)
    index = torch.arange(11)
    detector = build_detector(
        "glofnd", num_samples=11, config=GloFNDConfig(alpha=0.1, lr=1e-6, update_rule="adam")
    )
    detector.state.table.data[:, 0, 0] = torch.linspace(-0.5, 0.5, 11)
    detector.state.table.data[:, 1, 0] = torch.linspace(0.0, 1.0, 11).flip(0)
    out = ClipLoss(detector)(image, text, 5.0, index)
    for side in ("image", "text"):
        lam = detector.state.state_dict()[f"{side}.lambda"].sort().values
        assert out.stats[f"lambda_mean_{side}"].item() == pytest.approx(lam.mean().item(), abs=1e-6)
        for q, name in ((0.1, "p10"), (0.5, "p50"), (0.9, "p90")):
            assert out.stats[f"lambda_{name}_{side}"].item() == pytest.approx(
                lam[round(q * 10)].item(), abs=1e-6
            )


@pytest.mark.parametrize(
    "multiply_tau,temperature", [(False, "fixed"), (True, "fixed"), (True, "learnable")]
)
def test_evaluate_gives_the_objective_and_touches_no_state(multiply_tau, temperature):
    n, b = 20, 8
    image, text = embeddings(b=b, seed=9)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    detector = build_detector("glofnd", num_samples=n, config=GloFNDConfig(alpha=0.2))
    loss = GlobalContrastiveLoss(n, detector, temperature=temperature, multiply_tau=multiply_tau)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    # Indices of another split may lie beyond N: they only tell duplicates apart.
    out = loss.evaluate(image, text, 5.0, index + 100)
    after = loss.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    g = closed_form_global(
        image, text, torch.tensor(5.0, dtype=torch.float64), [~torch.eye(b, dtype=torch.bool)] * 2
    )
    want = torch.log(g).mean()
    if multiply_tau:
        want = (want + (6.5 if temperature == "learnable" else 0.0)) / 5.0
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    clip = ClipLoss(build_detector("glofnd", num_samples=n))
    assert clip.evaluate(image, text, 5.0, index).loss.item() == pytest.approx(
        ClipLoss()(image, text, 5.0, index).loss.item(), rel=1e-9
    )
