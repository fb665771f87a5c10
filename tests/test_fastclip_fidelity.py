"""FastCLIP fidelity: the loss value, the embeddings' and the temperature's gradients, gamma.

The FastCLIP reference code (github.com/Optimization-AI/fast_clip, ``FastCLIPLoss``; SogCLR is
the same loss without ``multiply_tau``) computes, on each process, two terms: ``loss1`` of the
local anchors against the gathered candidates and ``loss2`` of the gathered anchors against
the local candidates, each summed over the two sides of ``mean g / u``. Its embeddings are
gathered without gradient, so ``loss1`` carries the anchors' (and positives') share of the
embeddings' gradients and ``loss2`` the negatives' share. It returns

    (loss1 + loss2) / 2                                       (SogCLR)
    (loss1 + loss2) / 2 / s.detach() + rho / s
      + (mean log u_image + mean log u_text) / 2 / s          (FastCLIP, multiply_tau)

with ``s`` the logit scale (with a fixed temperature ``s`` has no gradient and the last two
terms count in the value only). In one process both terms have the value
``F_image + F_text`` (``F_side = mean_i g_i / u_i``), so the value is that sum, its
embeddings' gradients are those of ``(F_image + F_text) / 2`` (times tau), half of the
value's own gradient, and the scale's gradient is that of the value: the surrogate terms of
the two sides summed, the rho and log u terms averaged. It sets gamma once per epoch from the
integer epoch.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from cpu_args import cpu_args

from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import GammaSchedule, GlobalContrastiveLoss
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import GloFNDTrainer, build_contrastive_loss

RHO, EPS = 6.5, 1e-14


def embeddings(b, d, seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=gen, dtype=torch.float64)
    text = image + 0.7 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    return image.requires_grad_(), text.requires_grad_()


def sides_by_hand(image, text):
    """Cosine similarities of both sides as nested Python lists: [side][anchor][candidate]."""
    u = F.normalize(image.detach(), dim=-1)
    v = F.normalize(text.detach(), dim=-1)
    return [(u @ v.t()).tolist(), (v @ u.t()).tolist()]


def g_by_hand(sims, s):
    """g[side][i]: mean over j != i of exp((sim_ij - sim_ii) * s)."""
    return [
        [
            sum(math.exp((row[j] - row[i]) * s) for j in range(len(row)) if j != i) / (len(row) - 1)
            for i, row in enumerate(side)
        ]
        for side in sims
    ]


def scale_gradient_by_hand(sims, s, u, weighting):
    """d loss / d s from the formula: weight * A + C.

    A, the surrogate's share: tau * mean over sides and anchors of (dg_i/ds) / u_i, with
    dg_i/ds = mean_j exp((sim_ij - sim_ii) s) (sim_ij - sim_ii) and tau = 1/s held fixed;
    C, the rest: d/ds [(rho + mean log u) / s] = -(rho + mean log u) / s^2. FastCLIP's code
    sums the surrogate over the two sides (weight 2); "mean" averages it (weight 1).
    """
    terms, logs = [], []
    for side, u_side in zip(sims, u, strict=True):
        for i, row in enumerate(side):
            diffs = [row[j] - row[i] for j in range(len(row)) if j != i]
            dg = sum(math.exp(d * s) * d for d in diffs) / len(diffs)
            terms.append(dg / (u_side[i] + EPS))
            logs.append(math.log(u_side[i] + EPS))
    a = (1.0 / s) * sum(terms) / len(terms)
    c = -(RHO + sum(logs) / len(logs)) / s**2
    return {"fastclip": 2.0, "mean": 1.0}[weighting] * a + c, a, c


def two_steps(weighting, gamma=0.5, s=5.0):
    """A first visit (u = g), then a second step with new embeddings: u != g."""
    n, b, d = 11, 6, 8
    index = torch.tensor([4, 0, 9, 2, 7, 5])
    loss = GlobalContrastiveLoss(
        n,
        gamma=GammaSchedule(gamma, "constant"),
        temperature="learnable",
        rho=RHO,
        temperature_gradient=weighting,
    )
    first_image, first_text = embeddings(b, d, seed=1)
    loss(first_image, first_text, s, index, epoch=0.0)
    image, text = embeddings(b, d, seed=2)
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    out = loss(image, text, scale, index, epoch=1.0)
    out.loss.backward()
    g1 = g_by_hand(sides_by_hand(first_image, first_text), s)
    g2 = g_by_hand(sides_by_hand(image, text), s)
    u = [[(1 - gamma) * a + gamma * bb for a, bb in zip(g1[k], g2[k], strict=True)] for k in (0, 1)]
    state = loss.state_dict()
    for k, side in enumerate(("image", "text")):  # the u the loss used is the hand-computed one
        assert state[f"{side}.u"][index].tolist() == pytest.approx(u[k], rel=1e-5)
    return out, scale, image, text, sides_by_hand(image, text), u


@pytest.mark.parametrize("weighting", ["fastclip", "mean"])
def test_logit_scale_gradient_equals_the_formula(weighting):
    s = 5.0
    _, scale, _, _, sims, u = two_steps(weighting, s=s)
    want, a, c = scale_gradient_by_hand(sims, s, u, weighting)
    assert scale.grad.item() == pytest.approx(want, abs=1e-6)
    assert abs(a) > 1e-2 and abs(c) > 1e-2  # both shares matter in this case


def test_fastclip_weighting_is_the_reference_loss_written_out():
    """The scale's gradient of the reference's loss expression (module docstring), by autograd
    on the scale alone, equals ours; and A + C (mean) differs from 2A + C (fastclip) by A."""
    s = 5.0
    out, scale, image, text, sims, u = two_steps("fastclip", s=s)
    ref_scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    u_t = torch.tensor(u, dtype=torch.float64)
    sim_t = torch.tensor(sims, dtype=torch.float64)  # (2, b, b)
    b = sim_t.shape[-1]
    off = ~torch.eye(b, dtype=torch.bool)
    diff = sim_t - torch.diagonal(sim_t, dim1=-2, dim2=-1).unsqueeze(-1)
    g = torch.where(off, torch.exp(diff * ref_scale), 0.0).sum(-1) / (b - 1)
    reference = (
        (g / (u_t + EPS)).mean(-1).sum() / ref_scale.detach()
        + RHO / ref_scale
        + torch.log(u_t + EPS).mean(-1).sum() / 2 / ref_scale
    )
    reference.backward()
    assert out.loss.item() == pytest.approx(reference.item(), abs=1e-9)
    assert scale.grad.item() == pytest.approx(ref_scale.grad.item(), abs=1e-9)
    _, mean_scale, _, _, _, _ = two_steps("mean", s=s)
    _, a, _ = scale_gradient_by_hand(sims, s, u, "fastclip")
    assert scale.grad.item() - mean_scale.grad.item() == pytest.approx(a, abs=1e-9)


@pytest.mark.parametrize("weighting", ["fastclip", "mean"])
def test_temperature_gradient_in_entropy_form(weighting):
    """With u = g (gamma 1), d loss / d tau per anchor is rho + H(w) - log n, minus
    E_w[(s_ij - s_ii) / tau] for the FastCLIP weighting, w the softmax of (s_ij - s_ii) / tau
    over the n negatives (benchmarks/README.md reads the demo's temperatures with it)."""
    b, tau_value = 7, 0.2
    image, text = embeddings(b, 8, seed=6)
    tau = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True)
    loss = GlobalContrastiveLoss(
        20, gamma=GammaSchedule(1.0, "constant"), rho=RHO, temperature_gradient=weighting
    )
    loss(image, text, 1.0 / tau, torch.arange(b)).loss.backward()
    terms = []
    for side in sides_by_hand(image, text):
        for i, row in enumerate(side):
            x = [(row[j] - row[i]) / tau_value for j in range(b) if j != i]
            z = sum(math.exp(v) for v in x)
            w = [math.exp(v) / z for v in x]
            entropy = -sum(p * math.log(p) for p in w)
            mean_x = sum(p * v for p, v in zip(w, x, strict=True))
            terms.append(
                RHO + entropy - math.log(b - 1) - (mean_x if weighting == "fastclip" else 0.0)
            )
    assert tau.grad.item() == pytest.approx(sum(terms) / len(terms), abs=1e-9)


def test_the_weighting_changes_only_the_temperature_gradient():
    fast, _, fast_image, fast_text, _, _ = two_steps("fastclip")
    mean, _, mean_image, mean_text, _, _ = two_steps("mean")
    assert fast.loss.item() == mean.loss.item()
    assert torch.equal(fast_image.grad, mean_image.grad)
    assert torch.equal(fast_text.grad, mean_text.grad)


def test_a_fixed_temperature_gets_no_gradient_either_way():
    for weighting in ("fastclip", "mean"):
        loss = GlobalContrastiveLoss(
            8, temperature="fixed", multiply_tau=True, temperature_gradient=weighting
        )
        image, text = embeddings(4, 8, seed=3)
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        loss(image, text, scale, torch.arange(4)).loss.backward()
        assert scale.grad is None


def test_an_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="temperature_gradient"):
        GlobalContrastiveLoss(8, temperature_gradient="sum")


# -- value and embeddings' gradients: the reference's two terms, written out ---------------------
VARIANTS = {  # name: multiply_tau, temperature, temperature_gradient
    "fastclip": (True, "learnable", "fastclip"),
    "fastclip-mean-weighting": (True, "learnable", "mean"),
    "fastclip-fixed-temperature": (True, "fixed", "fastclip"),
    "sogclr": (False, "fixed", "fastclip"),
}


def reference_loss(image, text, scale, u, kept, multiply_tau, gathered_carry_gradient=False):
    """FastCLIPLoss's value in one process, written out from its two terms.

    ``image`` and ``text`` are the raw (b, d) embeddings, ``u`` the (2, b) u the step used,
    ``kept`` the (2, b, b) kept negatives (the GloFND reference multiplies the masked-out
    ones by 0 and divides by the number kept). The gathered copies carry no gradient, as
    the reference's ``dist.all_gather`` (unless ``gathered_carry_gradient``)."""
    local_image, local_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    gathered_image, gathered_text = local_image, local_text
    if not gathered_carry_gradient:
        gathered_image, gathered_text = local_image.detach(), local_text.detach()

    def g(anchors, candidates, positive, keep):
        """Per anchor: mean over its kept candidates of exp((s_ij - s_ii) * scale)."""
        diff = (anchors @ candidates.t() - positive.unsqueeze(-1)) * scale
        return torch.where(keep, torch.exp(diff), 0.0).sum(-1) / keep.sum(-1)

    def sides_summed(g_image, g_text):
        return (g_image / (u[0] + EPS)).mean() + (g_text / (u[1] + EPS)).mean()

    # loss1: local anchors (the positive pair's similarity from the local embeddings too)
    # against the gathered candidates.
    positive = (local_image * local_text).sum(-1)
    loss1 = sides_summed(
        g(local_image, gathered_text, positive, kept[0]),
        g(local_text, gathered_image, positive, kept[1]),
    )
    # loss2: gathered anchors against the local candidates.
    positive = (gathered_image * gathered_text).sum(-1)
    loss2 = sides_summed(
        g(gathered_image, local_text, positive, kept[0]),
        g(gathered_text, local_image, positive, kept[1]),
    )
    value = (loss1 + loss2) / 2
    if multiply_tau:
        log_u = (torch.log(u[0] + EPS).mean() + torch.log(u[1] + EPS).mean()) / 2
        value = value / scale.detach() + RHO / scale + log_u / scale
    return value


def make_detector(name, n):
    if name is None:
        return None
    if name == "oracle":
        return build_detector("oracle")
    detector = build_detector(
        "glofnd", num_samples=n, config=GloFNDConfig(alpha=0.3, lr=1e-6, update_rule="adam")
    )
    detector.state.table.data[:, :, 0] = 0.3  # thresholds that filter some negatives
    return detector


def kept_by_hand(name, detector, image, text, index, labels):
    """(2, b, b) negatives the step kept: all but the pair itself and the detected ones."""
    b = image.shape[0]
    sims = torch.tensor(sides_by_hand(image, text), dtype=torch.float64)
    negatives = (index.unsqueeze(0) != index.unsqueeze(1)).expand(2, b, b)
    if name is None:
        return negatives
    if name == "oracle":
        found = (labels.unsqueeze(0) == labels.unsqueeze(1)).expand(2, b, b)
    else:  # update-then-mask: the thresholds after the step
        found = sims > detector.state.lambdas(index).t().double().unsqueeze(-1)
    return negatives & ~found


def ours_and_the_reference(variant, detector_name, seed, gathered_carry_gradient=False):
    """Two steps of our loss (a first visit, then u != g) and the reference on the second."""
    multiply_tau, temperature, weighting = VARIANTS[variant]
    n, b, d, s, gamma = 24, 8, 6, 5.0, 0.5
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=gen)[:b]
    labels = torch.randint(0, 3, (b,), generator=gen) if detector_name == "oracle" else None
    detector = make_detector(detector_name, n)
    loss = GlobalContrastiveLoss(
        n,
        detector,
        "eliminate",
        gamma=GammaSchedule(gamma, "constant"),
        temperature=temperature,
        rho=RHO,
        multiply_tau=multiply_tau,
        temperature_gradient=weighting,
    )
    loss(*embeddings(b, d, seed=100 + seed), s, index, epoch=0.0, labels=labels)
    state = loss.state_dict()
    old_u = torch.stack([state[f"{side}.u"][index] for side in ("image", "text")]).double()
    image, text = embeddings(b, d, seed=200 + seed)
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    out = loss(image, text, scale, index, epoch=1.0, labels=labels)
    out.loss.backward()

    kept = kept_by_hand(detector_name, detector, image, text, index, labels)
    if detector_name is not None:
        assert (kept.sum(-1) < b - 1).any(), "the detector filtered nothing"
    assert (kept.sum(-1) > 0).all()
    ref_image = image.detach().clone().requires_grad_()
    ref_text = text.detach().clone().requires_grad_()
    ref_scale = torch.tensor(s, dtype=torch.float64, requires_grad=temperature == "learnable")
    with torch.no_grad():
        sims = torch.tensor(sides_by_hand(image, text), dtype=torch.float64)
        diff = (sims - torch.diagonal(sims, dim1=-2, dim2=-1).unsqueeze(-1)) * s
        g = torch.where(kept, torch.exp(diff), 0.0).sum(-1) / kept.sum(-1)
    u = (1 - gamma) * old_u + gamma * g  # the u the step used
    reference = reference_loss(
        ref_image, ref_text, ref_scale, u, kept, multiply_tau, gathered_carry_gradient
    )
    reference.backward()
    ours = (out.loss, image.grad, text.grad, scale.grad)
    return ours, (reference, ref_image.grad, ref_text.grad, ref_scale.grad), (g, u)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("detector", [None, "oracle", "glofnd"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_value_and_embedding_gradients_equal_the_reference(variant, detector, seed):
    ours, ref, (g, u) = ours_and_the_reference(variant, detector, seed)
    assert ours[0].item() == pytest.approx(ref[0].item(), abs=1e-6)
    for got, want in zip(ours[1:3], ref[1:3], strict=True):
        assert want.norm() > 1e-2  # a gradient worth comparing
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()
    if variant == "fastclip":  # the temperature's gradient is the value's, as the reference's
        assert ours[3].item() == pytest.approx(ref[3].item(), abs=1e-6)
    elif VARIANTS[variant][1] == "fixed":
        assert ours[3] is None
    # What the value used to be (the two sides averaged; no rho and log u term with a fixed
    # temperature) is off by at least tau * mean(g / u), far above the tolerance.
    tau = 1.0 / 5.0 if VARIANTS[variant][0] else 1.0
    assert tau * (g / u).mean().item() > 1e-2


@pytest.mark.parametrize("variant", ["fastclip", "sogclr"])
def test_the_value_differentiated_with_gathered_gradients_would_double_the_embeddings(variant):
    """Where "half the reference's gradients" comes from: differentiating the reference's
    value as written, with the gathered embeddings carrying gradient, counts each similarity
    in both terms. The reference gathers without gradient; its gradients are ours."""
    ours, doubled, _ = ours_and_the_reference(variant, "oracle", 3, gathered_carry_gradient=True)
    assert ours[0].item() == pytest.approx(doubled[0].item(), abs=1e-9)
    for got, want in zip(ours[1:3], doubled[1:3], strict=True):
        assert torch.allclose(2 * got, want, atol=1e-9, rtol=0)


# -- gamma --------------------------------------------------------------------------------------
def cosine(final, decay, epoch):
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * epoch / decay))


def test_gamma_per_epoch_is_held_through_each_epoch():
    schedule = GammaSchedule(0.2, "cosine", 18)  # the default granularity: epoch
    assert schedule.granularity == "epoch"
    for epoch, held in [(0.0, 0), (0.5, 0), (0.999, 0), (1.0, 1), (1.5, 1), (9.0, 9), (9.75, 9)]:
        assert schedule(epoch) == pytest.approx(cosine(0.2, 18, held), abs=1e-12), epoch
    assert schedule(0.999) == 1.0
    assert schedule(9.75) == pytest.approx(0.6)
    assert schedule(17.5) == pytest.approx(cosine(0.2, 18, 17))
    assert schedule(18.0) == schedule(18.5) == schedule(40) == 0.2


def test_gamma_per_step_follows_the_fractional_epoch():
    schedule = GammaSchedule(0.2, "cosine", 18, granularity="step")
    for epoch in (0.0, 0.5, 1.0, 9.0, 9.75, 17.5):
        assert schedule(epoch) == pytest.approx(cosine(0.2, 18, epoch), abs=1e-12), epoch
    assert schedule(18.0) == schedule(30) == 0.2
    # Within an epoch the fractional form is lower than the held one, by up to about
    # (1 - final) * pi / (2 * decay) = 0.07 for the defaults (mid-decay, end of an epoch).
    held = GammaSchedule(0.2, "cosine", 18)
    gaps = [held(e / 100) - schedule(e / 100) for e in range(0, 2000)]
    assert min(gaps) >= 0.0
    assert max(gaps) == pytest.approx(0.8 * math.pi / 36, abs=2e-3)


def test_constant_gamma_and_bad_granularity():
    assert GammaSchedule(0.3, "constant", granularity="step")(4.5) == 0.3
    assert GammaSchedule(0.3, "constant")(4.5) == 0.3
    with pytest.raises(ValueError, match="granularity"):
        GammaSchedule(0.2, "cosine", 18, granularity="batch")


@pytest.mark.parametrize("granularity,gamma", [("epoch", 0.6), ("step", cosine(0.2, 4, 2.5))])
def test_the_loss_moves_u_with_the_scheduled_gamma(granularity, gamma):
    n, b = 9, 5
    index = torch.tensor([1, 3, 5, 7, 8])
    loss = GlobalContrastiveLoss(
        n, gamma=GammaSchedule(0.2, "cosine", 4, granularity), temperature="fixed"
    )
    first = embeddings(b, 8, seed=4)
    loss(*first, 5.0, index, epoch=0.25)
    second = embeddings(b, 8, seed=5)
    out = loss(*second, 5.0, index, epoch=2.5)
    assert out.stats["gamma"].item() == pytest.approx(gamma)
    g1 = g_by_hand(sides_by_hand(*first), 5.0)
    g2 = g_by_hand(sides_by_hand(*second), 5.0)
    want = [(1 - gamma) * a + gamma * c for a, c in zip(g1[0], g2[0], strict=True)]
    assert loss.state_dict()["image.u"][index].tolist() == pytest.approx(want, rel=1e-5)


# -- settings and a Trainer run -----------------------------------------------------------------
def make_args(tmp_path, **overrides):
    return cpu_args(tmp_path, **{"loss_type": "fastclip", **overrides})


def test_settings_default_to_the_reference_and_reach_the_loss(tmp_path):
    args = make_args(tmp_path)
    assert args.temperature_gradient == "fastclip" and args.gamma_granularity == "epoch"
    config = build_contrastive_loss(args, 10, "cpu").config_dict()
    assert config["temperature_gradient"] == "fastclip"
    assert config["gamma_granularity"] == "epoch"
    args = make_args(tmp_path, temperature_gradient="mean", gamma_granularity="step")
    config = build_contrastive_loss(args, 10, "cpu").config_dict()
    assert config["temperature_gradient"] == "mean" and config["gamma_granularity"] == "step"
    with pytest.raises(ValueError, match="temperature_gradient"):
        make_args(tmp_path, temperature_gradient="sum")
    with pytest.raises(ValueError, match="granularity"):
        make_args(tmp_path, gamma_granularity="batch")


def test_a_trainer_run_holds_gamma_through_each_epoch(tmp_path):
    """The Trainer's epoch at a step is the epoch index plus the share of it already done, so
    every step of epoch e sees gamma at e (here 3 steps per epoch, decay over 2 epochs)."""
    digits = load_digits_pairs(seed=0)
    adapter = build_tiny_hf_clip(seed=0, texts=list(digits["train"]["caption"][:64]))
    args = make_args(
        tmp_path,
        per_device_train_batch_size=8,
        num_train_epochs=2,
        logging_steps=1,
        learning_rate=1e-3,
        seed=0,
        gamma=0.5,
        gamma_schedule="cosine",
        gamma_decay_epochs=2,
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=digits["train"].select(range(24)))
    trainer.train()
    logged = [h["gamma"] for h in trainer.state.log_history if "gamma" in h]
    assert logged == pytest.approx([1.0] * 3 + [cosine(0.5, 2, 1)] * 3)
