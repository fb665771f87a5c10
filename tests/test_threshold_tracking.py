"""Learned thresholds track the exact global quantile: the tail rule on every stream kind,
its step and tail estimate by hand, the tracking-health warning, the state it keeps."""

import logging
import math

import pytest
import torch
from cpu_args import cpu_args
from safetensors.torch import load_file, save_file

from benchmarks.tracking_streams import exact_quantiles, exact_share_above, make_stream, run_stream
from glofnd_hf.fnd import GloFNDConfig, build_detector, pinball_gradient, tail_estimate
from glofnd_hf.fnd.detectors import DetectionBatch
from glofnd_hf.fnd.quantiles import tail_unit, top_values

N, BATCH, ALPHA, EPOCHS = 2048, 256, 0.01, 12
HEALTH_LOGGER = "glofnd_hf.fnd.health"


@pytest.fixture(scope="module")
def streams():
    return {
        kind: make_stream(kind, N, EPOCHS, seed=0)
        for kind in ("fixed", "narrow", "settling", "moving")
    }


@pytest.mark.parametrize(
    "kind,max_error",
    [
        ("fixed", 0.02),
        ("narrow", 0.005),
        ("settling", 0.02),
        ("moving", 0.04),
    ],
)
def test_tail_rule_tracks_the_exact_quantile_on_every_stream(streams, kind, max_error):
    """From the first epoch, without a start epoch: small error, filtered fraction near
    alpha, nothing parked at the clamp, detections agree with the exact rule."""
    last = run_stream(streams[kind], "tail", ALPHA, BATCH, score_epochs=set()).last
    assert last.median_error <= max_error, last
    assert 0.5 <= last.filtered_over_alpha <= 2.0, last
    assert last.at_bound < 0.05, last
    assert last.correlation > 0.7, last
    assert last.precision > 0.7 and last.recall > 0.6, last


def test_reference_rule_parks_at_the_clamp_when_embeddings_start_collapsed(streams):
    """The failure the tail rule fixes, seen by the same benchmark (so it can fail)."""
    last = run_stream(streams["settling"], "reference", ALPHA, BATCH, score_epochs=set()).last
    assert last.at_bound > 0.5, last
    assert last.filtered_over_alpha < 0.5, last


def test_tail_rule_is_no_worse_than_the_reference_on_fixed_embeddings(streams):
    tail = run_stream(streams["fixed"], "tail", ALPHA, BATCH, score_epochs=set()).last
    reference = run_stream(streams["fixed"], "reference", ALPHA, BATCH, score_epochs=set()).last
    assert tail.median_error <= 1.1 * reference.median_error, (tail, reference)


def test_exact_share_above_counts_the_negatives_above_each_threshold():
    """At the exact quantile the share is alpha (to one sample); the pair is never counted."""
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(300, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(image + 0.1 * torch.randn(300, 8, generator=gen), dim=-1)
    index = torch.arange(300)
    q = exact_quantiles(image, text, index, 0.05, chunk=64)
    share = exact_share_above(image, text, index, q, chunk=64)
    assert (share - 0.05).abs().max().item() <= 1.5 / 299
    everything = exact_share_above(image, text, index, torch.full((300,), -2.0), chunk=64)
    assert torch.all(everything == 1.0)  # 299 negatives each: the pair is excluded
    sim = image @ text.t()
    by_hand = ((sim > q[:, None]) & ~torch.eye(300, dtype=torch.bool)).sum(-1).double() / 299
    assert torch.equal(share, by_hand)


def test_tail_estimate_finds_the_quantile_of_an_exponential_tail():
    """alpha * n = 0.4 < 1: the batch holds on average less than one sample above the
    quantile, yet the peaks-over-threshold estimate is centred on it."""
    gen = torch.Generator().manual_seed(0)
    rows, n, alpha = 2000, 4096, 1e-4
    sim = -torch.log(torch.rand(1, rows, n, generator=gen)) * 0.05  # exponential, scale 0.05
    negatives = torch.ones(rows, n, dtype=torch.bool)
    q_hat, beta, _, _ = tail_estimate(sim, negatives, alpha, size=8, upper=None)  # unbounded tail
    exact = 0.05 * math.log(1 / alpha)
    assert abs(q_hat.mean().item() - exact) < 0.005  # unbiased for an exponential tail
    assert abs(beta.mean().item() - 0.05) < 0.003
    # Rows with fewer than two negatives have no estimate.
    negatives[0] = False
    negatives[1, 1:] = False
    q_hat = tail_estimate(sim, negatives, alpha, size=8, upper=None)[0]
    assert torch.isnan(q_hat[0, :2]).all() and torch.isfinite(q_hat[0, 2:]).all()


def test_tail_estimate_stays_below_the_bound_of_cosine_similarity():
    """A few near-duplicates just under 1 above a body far below: an exponential tail
    through them extrapolates past 1 (the threshold would sit at the clamp); the tail that
    ends at 1 may not."""
    gen = torch.Generator().manual_seed(0)
    body = 0.5 + 0.3 * torch.rand(1, 64, 120, generator=gen)
    near = 0.95 + 0.045 * torch.rand(1, 64, 7, generator=gen)
    sim = torch.cat([body, near], dim=-1)
    negatives = torch.ones(64, 127, dtype=torch.bool)
    q_exp = tail_estimate(sim, negatives, 0.005, size=8, upper=None)[0]
    q_bounded = tail_estimate(sim, negatives, 0.005, size=8)[0]
    top = sim.max(-1).values
    assert (q_exp > 1.0).all()  # the failure, for contrast
    assert (q_bounded < 1.0).all() and (q_bounded >= top - 0.02).all()
    # Far below the bound the two agree.
    far = torch.rand(1, 64, 127, generator=gen) * 0.3
    assert torch.allclose(
        tail_estimate(far, negatives, 0.005, 8)[0],
        tail_estimate(far, negatives, 0.005, 8, upper=None)[0],
        atol=0.01,
    )


def tail_row(lam, scale, centre, innovation, density, visits, iterate=None, unit=None):
    """A tail-rule state row; the iterate equals the threshold and the step unit the tail
    scale unless given."""
    iterate = lam if iterate is None else iterate
    unit = scale if unit is None else unit
    return [lam, iterate, scale, unit, centre, innovation, density, visits]


def tail_stats(grad, q_hat, beta, up_cap, kth, noise, density, unit=None):
    """A visit's tail-rule statistics; the step unit is the tail scale unless given (an
    exponential tail, far below the bound)."""
    return [grad, q_hat, beta, beta if unit is None else unit, up_cap, kth, noise, density]


def test_tail_step_by_hand():
    """The iterate's step (averaging 1: the threshold is the iterate itself)."""
    cfg = GloFNDConfig(
        alpha=0.01, update_rule="tail", band=1.0, step_floor=0.2, drift_rate=0.3, averaging=1.0
    )
    rule = cfg.rule()
    nan = float("nan")
    # rows: [lambda, iterate, scale, unit, centre, innovation, density, visits]; stats:
    # [pinball gradient, q_hat, beta, step unit, highest step up, (k+1)-th, q_hat's variance
    # / beta^2, local density]. Densities of 0 here: the similarities are sparse near
    # lambda, the step is the tail's (the dense case is the next test); units equal to beta:
    # tails far below the bound.
    rows = torch.tensor(
        [
            [tail_row(1.0, 0.0, 1.0, 1.0, 0.0, 0.0), tail_row(0.50, 0.02, 0.54, 1.0, 0.0, 1.0)],
            [tail_row(0.60, 0.03, 0.60, 1.2, 0.0, 9.0), tail_row(0.70, 0.02, 0.70, 1.0, 0.0, 3.0)],
            [tail_row(0.90, 0.30, 0.96, 1.0, 0.0, 5.0), tail_row(0.90, 0.30, 0.90, 1.0, 0.0, 5.0)],
        ]
    )
    stats = torch.tensor(
        [
            [
                tail_stats(0.01, 0.8, 0.05, 0.9, 0.7, 0.5, 0.0),
                tail_stats(-0.02, 0.55, 0.04, 0.6, 0.45, 0.25, 0.0),
            ],
            [tail_stats(0.01, 0.45, 0.05, 0.5, 0.40, 0.5, 0.0), [nan] * 8],
            [
                tail_stats(-0.05, 0.96, 0.3, 0.97, 0.5, 0.2, 0.0),
                tail_stats(0.01, 0.9, 0.3, 0.95, 0.88, 0.2, 0.0),
            ],
        ]
    )
    out = rule.step(rows, stats, epoch=3.0)
    # First visit: start at the batch's estimate, take its scale and unit; the centre starts
    # there, the density at the fitted tail's alpha / unit = 0.2.
    assert out[0, 0].tolist() == pytest.approx(tail_row(0.8, 0.05, 0.8, 1.0, 0.2, 1.0))
    # Second visit, w = 1/2: scale 0.02 -> 0.03. Innovation 0.55 - 0.54 = 0.01 against the
    # estimate's noise 0.25 * 0.04^2: ratio 0.25, running mean 1 + 0.3 (0.25 - 1) = 0.775,
    # no drift, so the centre's gain is 1/t = 1/2: 0.545. The step -w * scale * g / alpha =
    # +0.03 gives 0.53, 0.015 below the centre, shrunk by 0.03^2 / (0.015^2 + 0.03^2) = 0.8.
    assert out[0, 1].tolist() == pytest.approx(
        tail_row(0.545 - 0.012, 0.03, 0.545, 0.775, 0.0, 2.0)
    )
    # Tenth visit: the estimate fell by 0.15 = 3 beta, ratio 0.15^2 / (0.5 * 0.05^2) = 18,
    # running mean 1.2 + 0.3 (18 - 1.2) = 6.24: drift, gain 1 - 1 / 6.24 (not 1/10).
    gain = 1 - 1 / 6.24
    centre = 0.6 - 0.15 * gain
    x = 0.6 - 0.2 * 0.034 - centre  # w = max(1/10, 0.2), scale 0.034
    expected = tail_row(centre + x * 0.034**2 / (x * x + 0.034**2), 0.034, centre, 6.24, 0.0, 10.0)
    assert out[1, 0].tolist() == pytest.approx(expected)
    # No estimate (no negatives): the row is kept as it was.
    assert torch.equal(out[1, 1], rows[1, 1])
    # Five exceedances with a wide scale: 0.9 + 0.2 * 0.3 * 5 = 1.2 stops at the highest
    # step up the batch allows, 0.97 (not at the clamp), then the offset 0.01 from the
    # centre is shrunk a little.
    assert out[2, 0, 0].item() == pytest.approx(0.96 + 0.01 * 0.09 / (0.0001 + 0.09))
    # Going down, 0.9 - 0.2 * 0.3 = 0.84 stops at the (k+1)-th largest, 0.88.
    assert out[2, 1, 0].item() == pytest.approx(0.9 - 0.02 * 0.09 / (0.0004 + 0.09))


def gpd_survival(x, level, u, beta):
    """Share of negatives above ``x`` under the tail that ``tail_estimate`` fits: ``level``
    of them above ``u``, a generalised Pareto tail ending at 1 with mean excess ``beta``."""
    xi = -beta / (1.0 - u - beta)
    sigma = beta * (1.0 - xi)
    return level * (1.0 + xi * (x - u) / sigma) ** (-1.0 / xi)


def test_step_unit_is_the_fitted_tails_inverse_density():
    """The step unit is alpha over the density, at q_hat, of the tail that q_hat comes from
    (the generalised Pareto tail ending at 1): the tail scale beta far below the bound,
    several times smaller near it."""
    gen = torch.Generator().manual_seed(0)
    alpha = 0.005
    negatives = torch.ones(4, 127, dtype=torch.bool)
    uniform = torch.rand(2, 2, 4, 127, generator=gen, dtype=torch.float64)
    # An exponential tail far below the bound; one that ends at it (xi = -1/2).
    for near, sim in ((False, 0.1 - 0.05 * uniform[0].log()), (True, 1 - 0.3 * uniform[1].sqrt())):
        q_hat, beta, _, u, k = tail_estimate(sim, negatives, alpha, 8, with_size=True)
        unit = tail_unit(q_hat, beta, u)
        tail = (k / 127, u, beta)
        assert torch.allclose(gpd_survival(q_hat, *tail), torch.full_like(q_hat, alpha), rtol=1e-4)
        h = 1e-4 * unit
        density = (gpd_survival(q_hat - h, *tail) - gpd_survival(q_hat + h, *tail)) / (2 * h)
        assert torch.allclose(unit, alpha / density, rtol=1e-3)
        ratio = (unit / beta).mean().item()
        if near:
            assert ratio < 0.5  # the same share of negatives packed into less similarity
        else:
            assert ratio > 0.8  # about the tail scale (0.9 here)
    stats = (
        GloFNDConfig(update_rule="tail", alpha=alpha)
        .rule()
        .statistics(sim, negatives, torch.full((2, 4), 0.9))
    )
    assert torch.allclose(stats[..., 3], unit.float())


def test_tail_step_is_taken_in_the_running_unit():
    """The running step unit (the fitted tail's) sizes the step, not the tail scale; an
    earlier state without a unit steps in tail scales as before."""
    rule = GloFNDConfig(update_rule="tail", alpha=0.01, step_floor=0.2, averaging=1.0).rule()
    # No exceedance (g = alpha): a step down by w * unit; unit 0.02 running towards the
    # batch's 0.04 with w = 0.2: 0.024. The centre sits at the iterate: no pull to speak of.
    rows = torch.tensor([[tail_row(0.9, 0.1, 0.9, 1.0, 0.0, 9.0, unit=0.02)] * 2])
    stats = torch.tensor([[tail_stats(0.01, 0.9, 0.1, 0.95, 0.8, 0.5, 0.0, unit=0.04)] * 2])
    out = rule.step(rows, stats, epoch=1.0)
    assert out[0, 0, 3].item() == pytest.approx(0.024)
    assert out[0, 0, 2].item() == pytest.approx(0.1)  # the tail scale is kept apart
    x = -0.2 * 0.024  # the step, then shrunk a little towards the centre (band x scale 0.1)
    assert out[0, 0, 1].item() == pytest.approx(0.9 + x * 0.01 / (x * x + 0.01))


def test_threshold_averages_the_iterate_and_follows_a_large_move():
    """The threshold moves by ``averaging`` of its lag behind the iterate while that lag is
    small against band x scale; a lag far beyond it (the quantile moved within a visit) is
    shrunk like (band x scale)^2 / lag, so the threshold follows the iterate."""
    rule = GloFNDConfig(update_rule="tail", alpha=0.01, step_floor=0.2, averaging=0.5).rule()
    # g = 0 (on the quantile): the iterate stays at 0.5, the centre there too; the threshold
    # starts 0.01 above the iterate (small against scale 0.1), or 1.0 above it.
    rows = torch.tensor(
        [
            [
                tail_row(0.51, 0.1, 0.5, 1.0, 0.0, 9.0, 0.5),
                tail_row(1.0, 0.1, 0.5, 1.0, 0.0, 9.0, 0.5),
            ]
        ]
    )
    stats = torch.tensor([[tail_stats(0.0, 0.5, 0.1, 0.9, 0.1, 0.5, 0.0)] * 2])
    out = rule.step(rows, stats, epoch=1.0)
    assert out[0, :, 1].tolist() == pytest.approx([0.5, 0.5])  # the iterates
    small = 0.01 * 0.01 / (0.01**2 + 0.01)  # lag shrunk by (band scale)^2 / (x^2 + ...)
    large = 0.5 * 0.01 / (0.5**2 + 0.01)
    assert out[0, 0, 0].item() == pytest.approx(0.5 + 0.5 * small)  # about half-way: 0.505
    assert out[0, 1, 0].item() == pytest.approx(0.5 + 0.5 * large)  # within 0.02 of it
    # averaging 1: the threshold is the iterate.
    plain = GloFNDConfig(update_rule="tail", alpha=0.01, step_floor=0.2, averaging=1.0).rule()
    assert plain.step(rows, stats, epoch=1.0)[0, :, 0].tolist() == pytest.approx([0.5, 0.5])


def test_threshold_moves_with_the_batchs_common_drift():
    """When every iterate of the batch steps by the same amount (all similarities shifted),
    the threshold follows the whole step at once; one iterate stepping alone is averaged."""
    rule = GloFNDConfig(update_rule="tail", alpha=0.01, step_floor=0.2, averaging=0.5).rule()
    n = 6
    # Many exceedances (g = alpha - 0.5): a long step up, stopped at the top negative 0.52;
    # the centre and the batch estimate sit there too, so no pull.
    rows = torch.tensor([[tail_row(0.5, 0.1, 0.52, 1.0, 0.0, 9.0)] * 2] * n)
    up = torch.tensor(tail_stats(-0.49, 0.52, 0.1, 0.52, 0.3, 0.5, 0.0))
    still = torch.tensor(tail_stats(0.0, 0.5, 0.1, 0.9, 0.3, 0.5, 0.0))  # on the quantile
    together = rule.step(rows, up.expand(n, 2, -1).clone(), epoch=1.0)
    assert together[..., 1].flatten().tolist() == pytest.approx([0.52] * 2 * n)  # iterates
    assert together[..., 0].flatten().tolist() == pytest.approx([0.52] * 2 * n)  # thresholds
    alone = torch.stack([up] + [still] * (n - 1)).unsqueeze(1).expand(n, 2, -1).clone()
    out = rule.step(rows, alone, epoch=1.0)
    assert out[0, 0, 1].item() == pytest.approx(0.52)
    # The batch's drift is 0.02 / n; the rest of the lag is averaged (about half of it).
    assert 0.505 < out[0, 0, 0].item() < 0.515


def test_averaged_threshold_is_closer_than_the_iterate_on_fixed_embeddings(streams):
    """Polyak averaging: on fixed embeddings the threshold (the mean of the iterate) ends
    closer to the exact quantile than the iterate does (averaging 1)."""
    averaged = run_stream(streams["fixed"], "tail", ALPHA, BATCH, score_epochs=set()).last
    iterate = run_stream(
        streams["fixed"], "tail", ALPHA, BATCH, score_epochs=set(), averaging=1.0
    ).last
    assert averaged.median_error < iterate.median_error, (averaged, iterate)
    assert averaged.correlation > iterate.correlation, (averaged, iterate)


def test_tail_step_shrinks_where_the_similarities_are_dense():
    """On a plateau (local density far above the tail's alpha / beta) the step is the
    inverse density alpha / density, not the tail scale; where the data are sparser than
    the tail implies, the tail scale still bounds it. Without local_step (the default) the
    step is the tail scale's on both."""
    rule = GloFNDConfig(
        update_rule="tail", alpha=0.01, step_floor=0.2, local_step=True, averaging=1.0
    ).rule()
    # No exceedance (g = alpha): a step down by w * unit; the centre sits at lambda, so the
    # pull changes nothing.
    rows = torch.tensor(
        [[tail_row(0.5, 0.1, 0.5, 1.0, 2.0, 9.0), tail_row(0.5, 0.1, 0.5, 1.0, 0.05, 9.0)]]
    )
    stats = torch.tensor(
        [
            [
                tail_stats(0.01, 0.5, 0.1, 0.6, 0.3, 0.5, 2.0),
                tail_stats(0.01, 0.5, 0.1, 0.6, 0.3, 0.5, 0.05),
            ]
        ]
    )
    out = rule.step(rows, stats, epoch=1.0)
    dense, sparse = out[0, 0], out[0, 1]
    # Dense: density stays 2.0, unit min(0.1, 0.01 / 2) = 0.005, lambda 0.5 - 0.2 * 0.005.
    assert dense[6].item() == pytest.approx(2.0)
    offset = -0.001
    assert dense[0].item() == pytest.approx(0.5 + offset * 0.01 / (offset**2 + 0.01))
    # Sparse: alpha / 0.05 = 0.2 > the tail scale 0.1: the step is 0.2 * 0.1 = 0.02.
    offset = -0.02
    assert sparse[0].item() == pytest.approx(0.5 + offset * 0.01 / (offset**2 + 0.01))
    default = GloFNDConfig(update_rule="tail", alpha=0.01, step_floor=0.2, averaging=1.0).rule()
    default = default.step(rows, stats, epoch=1.0)
    assert default[0, :, 0].tolist() == pytest.approx([sparse[0].item()] * 2)
    assert default[0, 0, 6].item() == pytest.approx(2.0)  # the density is still tracked


def test_tail_statistics_bound_the_step_up_and_measure_the_local_density():
    """The highest step up passes at most about step_floor of the batch's excess
    exceedances; the local density is calibrated to alpha / beta on an exponential tail and
    rises on a plateau of near-duplicates."""
    alpha = 0.005
    rule = GloFNDConfig(
        update_rule="tail", alpha=alpha, tail_size=8, step_floor=0.2, local_step=True
    ).rule()
    body = torch.linspace(0.0, 0.3, 94)
    above = torch.tensor([0.9, 0.8, 0.7, 0.65, 0.6, 0.55])
    sim = torch.cat([above, body]).view(1, 1, 100).expand(2, 1, 100).contiguous()
    negatives = torch.ones(1, 100, dtype=torch.bool)
    # m = 6 above 0.5, alpha n = 0.5: r = ceil(0.8 * 6 + 0.2 * 0.5) = 5 -> the 5th largest.
    stats = rule.statistics(sim, negatives, torch.full((2, 1), 0.5))
    assert stats[..., 4].flatten().tolist() == pytest.approx([0.6, 0.6])
    # Without local_step (the default): the top negative.
    default = GloFNDConfig(update_rule="tail", alpha=alpha, tail_size=8).rule()
    stats = default.statistics(sim, negatives, torch.full((2, 1), 0.5))
    assert stats[..., 4].flatten().tolist() == pytest.approx([0.9, 0.9])
    # One exceedance (or none): the top negative, as before.
    stats = rule.statistics(sim, negatives, torch.full((2, 1), 0.85))
    assert stats[..., 4].flatten().tolist() == pytest.approx([0.9, 0.9])
    # Exponential tail (scale 0.05): at the exact quantile the density averages alpha / 0.05.
    gen = torch.Generator().manual_seed(0)
    rows, n = 4000, 1024
    sim = (-torch.log(torch.rand(1, rows, n, generator=gen)) * 0.05).expand(2, -1, -1)
    negatives = torch.ones(rows, n, dtype=torch.bool)
    quantile = torch.full((2, rows), 0.05 * math.log(1 / alpha))
    density = rule.statistics(sim, negatives, quantile)[..., 7]
    assert density.mean().item() == pytest.approx(alpha / 0.05, rel=0.1)
    # A plateau: a tenth of every row tied just under the quantile, far denser there (the
    # count runs over the batch's top k + 1 = 12, so it sees about 7 of the ties).
    sim = sim.clone()
    sim[..., : n // 10] = quantile[0, 0] - 0.001
    plateau = rule.statistics(sim, negatives, quantile)[..., 7]
    assert plateau.mean().item() > 5 * alpha / 0.05


def test_tail_statistics_carry_the_estimates_noise():
    """The seventh statistic is q_hat's variance in units of beta^2: (1 + L^2) / k with
    L = (q_hat - u) / beta the extrapolation from the batch's top k to alpha."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(2, 6, 200, generator=gen) * 0.5
    negatives = torch.ones(6, 200, dtype=torch.bool)
    cfg = GloFNDConfig(update_rule="tail", alpha=0.005, tail_size=8)
    stats = cfg.rule().statistics(sim, negatives, torch.full((2, 6), 0.4))
    q_hat, beta, _, u = tail_estimate(sim, negatives, 0.005, 8)
    extrapolation = (q_hat - u) / beta
    assert torch.allclose(stats[..., 6], (1 + extrapolation**2) / 8)
    assert (extrapolation > 0.5).all()  # alpha is below the batch's top-8 level: a real test


@pytest.mark.parametrize("width,k", [(256, 9), (300, 9), (100, 9), (512, 9), (1024, 21), (64, 5)])
def test_top_values_are_topk_values(width, k):
    """The group-maxima shortcut returns exactly topk's values: ties, -inf (non-negatives,
    padding), NaN (ranked highest) and rows with fewer finite values than k included."""
    gen = torch.Generator().manual_seed(width + k)
    x = (torch.rand(3, 40, width, generator=gen) * 16).round() / 16  # many ties
    x[0, :, ::3] = -math.inf
    x[1, 0] = -math.inf  # nothing but -inf
    x[1, 1, 2:] = -math.inf  # two values
    x[1, 2, :: width // 4] = math.nan
    x[2] = torch.randn(40, width, generator=gen)
    assert torch.equal(
        top_values(x, k).nan_to_num(nan=9.0), x.topk(k, dim=-1).values.nan_to_num(nan=9.0)
    )


def test_tail_statistics_count_the_exceedances_of_every_threshold():
    """The pinball gradient of the statistics counts from the batch's top where lambda is
    at or above it and over the whole row where it is not: the same gradient as the direct
    count for thresholds above, inside and below the top, and for rows with few
    negatives."""
    gen = torch.Generator().manual_seed(0)
    sim = (torch.rand(2, 64, 256, generator=gen) * 32).round() / 32
    negatives = torch.rand(64, 256, generator=gen) > 0.1
    negatives[:4, 3:] = False  # three negatives or fewer
    negatives[4] = False  # none
    lam = (torch.rand(2, 64, generator=gen) * 32).round() / 32  # some equal a similarity
    lam[:, ::2] = 0.99  # most rows: above the batch's top k + 1
    stats = GloFNDConfig(update_rule="tail", alpha=0.01).rule().statistics(sim, negatives, lam)
    expected = pinball_gradient(sim, negatives, lam, 0.01)
    assert torch.equal(stats[..., 0], expected)
    assert (lam[:, 1::2] < 0.9).any()  # some rows need the count over the whole row


def test_centre_averages_noise_and_follows_a_jump():
    """Without drift the centre averages the batch estimates (its spread falls well below
    one estimate's); after the embeddings jump, the innovations dwarf the noise and it moves
    most of the way at once, where a plain running mean would move 1/t of it."""
    rule = GloFNDConfig(update_rule="tail", alpha=0.01).rule()
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([tail_row(1.0, 0.0, 1.0, 1.0, 0.0, 0.0)]).repeat(500, 2, 1)
    beta, noise = 0.02, 0.5  # q_hat's standard deviation: beta * sqrt(noise)
    for _ in range(30):
        q_hat = 0.5 + beta * noise**0.5 * torch.randn(500, 2, generator=gen)
        stats = torch.stack(
            [
                torch.zeros_like(q_hat),
                q_hat,
                torch.full_like(q_hat, beta),
                torch.full_like(q_hat, beta),  # the step unit: an exponential tail
                q_hat + beta,
                q_hat - 2 * beta,
                torch.full_like(q_hat, noise),
                torch.zeros_like(q_hat),  # sparse near lambda: steps in tail scales
            ],
            dim=-1,
        )
        rows = rule.step(rows, stats, epoch=0.0)
    centre = rows[..., 4]
    # One estimate's spread is beta * sqrt(noise) = 0.0141; the centre's is 0.0078 (the
    # drift test's own noise keeps its gain near 0.3 rather than 1/t).
    assert (centre - 0.5).std().item() < 0.6 * beta * noise**0.5
    q_hat = torch.full((500, 2), 0.3)
    stats = torch.stack(
        [
            torch.zeros_like(q_hat),
            q_hat,
            torch.full_like(q_hat, beta),
            torch.full_like(q_hat, beta),
            q_hat + beta,
            q_hat - 2 * beta,
            torch.full_like(q_hat, noise),
            torch.zeros_like(q_hat),
        ],
        dim=-1,
    )
    moved = rule.step(rows, stats, epoch=0.0)[..., 4]
    assert ((0.5 - moved) / 0.2).median().item() > 0.9  # not the 1/31 of a plain mean


def test_state_bytes_follow_the_rule_and_round_trip(tmp_path):
    tail = cpu_args(tmp_path, detector_kwargs={"update_rule": "tail"})
    adam = cpu_args(tmp_path, detector_kwargs={"update_rule": "adam"})
    assert tail.state_bytes_per_sample() == 64 and adam.state_bytes_per_sample() == 32
    detector = build_detector("glofnd", num_samples=N, config=tail.detector_settings())
    assert detector.state.bytes_per_sample == 64
    run = make_stream("fixed", N, 2)
    image, text = run.embeds(0.0)
    for start in range(0, N, BATCH):
        index = torch.arange(start, start + BATCH)
        negatives = index[None] != index[:, None]
        sim = torch.stack([image[index] @ text[index].t(), text[index] @ image[index].t()])
        detector.detect(sim, DetectionBatch(index, index, negatives, epoch=0.0))
    save_file(detector.state_dict(), tmp_path / "state.safetensors")
    fresh = build_detector("glofnd", num_samples=N, config=tail.detector_settings())
    fresh.load_state_dict(load_file(tmp_path / "state.safetensors"))
    for key, value in detector.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert set(detector.state_dict()) == {
        f"{s}.{c}"
        for s in ("image", "text")
        for c in (
            "lambda",
            "iterate",
            "scale",
            "unit",
            "centre",
            "innovation",
            "density",
            "visits",
        )
    }
    other = build_detector("glofnd", num_samples=N, config=adam.detector_settings())
    with pytest.raises(ValueError, match="another rule"):
        other.load_state_dict(load_file(tmp_path / "state.safetensors"))


def test_state_of_the_earlier_tail_rule_still_loads():
    """0.2.0.dev0 stored lambda, scale and visits: the centre starts at the threshold. The
    centred rule before the local step (40 bytes) had no density: it starts at the
    exponential tail's alpha / scale, as a first visit does (0 where no scale yet)."""
    state = {
        f"{side}.{column}": (torch.rand(N) * 9).floor() if column == "visits" else torch.rand(N) / 2
        for side in ("image", "text")
        for column in ("lambda", "scale", "visits")
    }
    state["text.scale"][:5] = 0.0  # never visited
    detector = build_detector(
        "glofnd", num_samples=N, config=GloFNDConfig(update_rule="tail", alpha=ALPHA)
    )
    detector.load_state_dict(state)
    loaded = detector.state_dict()
    for side in ("image", "text"):
        for column in ("lambda", "scale", "visits"):
            assert torch.equal(loaded[f"{side}.{column}"], state[f"{side}.{column}"])
        assert torch.equal(loaded[f"{side}.centre"], state[f"{side}.lambda"])
        assert torch.equal(loaded[f"{side}.iterate"], state[f"{side}.lambda"])
        assert torch.equal(loaded[f"{side}.innovation"], torch.ones(N))
        scale = state[f"{side}.scale"]
        expected = torch.where(scale > 0, ALPHA / scale.clamp(min=1e-30), 0.0)
        assert torch.allclose(loaded[f"{side}.density"], expected)
    assert torch.equal(loaded["text.density"][:5], torch.zeros(5))
    centred = {k: v for k, v in loaded.items() if not k.endswith((".density", ".iterate"))}
    detector.load_state_dict(centred)  # 40 bytes
    assert torch.allclose(detector.state_dict()["image.density"], loaded["image.density"])
    dense = {k: v for k, v in loaded.items() if not k.endswith(".iterate")}  # 48 bytes
    detector.load_state_dict(dense)
    assert torch.equal(detector.state_dict()["text.iterate"], loaded["text.lambda"])
    assert torch.equal(loaded["image.unit"], state["image.scale"])  # steps in tail scales
    averaged = {k: v for k, v in loaded.items() if not k.endswith(".unit")}  # 56 bytes
    loaded["image.unit"] = loaded["image.scale"] / 2
    detector.load_state_dict(averaged)
    assert torch.equal(detector.state_dict()["image.unit"], averaged["image.scale"])
    del state["text.scale"]
    with pytest.raises(ValueError, match="missing.*text.scale"):
        detector.load_state_dict(state)


def test_health_warns_once_per_epoch_when_thresholds_do_not_track(streams, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOGGER)
    run_stream(streams["settling"], "reference", ALPHA, BATCH, score_epochs=set())
    warnings = [r for r in caplog.records if r.name == HEALTH_LOGGER]
    epochs = [int(r.args[0]) for r in warnings]
    assert warnings, "the parked reference thresholds must be reported"
    assert len(epochs) == len(set(epochs)), "at most one warning per epoch"
    assert min(epochs) >= 1, "no warning during the warm-up epoch"
    message = warnings[-1].getMessage()
    assert "clamp" in message and "update_rule: pinball" in message


def test_health_stays_quiet_when_thresholds_track(streams, caplog):
    caplog.set_level(logging.WARNING, logger=HEALTH_LOGGER)
    run_stream(streams["fixed"], "tail", ALPHA, BATCH, score_epochs=set())
    assert not [r for r in caplog.records if r.name == HEALTH_LOGGER]


def test_health_warns_on_a_filtered_share_off_beyond_chance_only(caplog):
    """An epoch that expects a handful of exceedances (a small data set at a small alpha)
    filters 0 or 2.4 x alpha by chance: no warning; the same shares over ten times the
    negatives are off beyond chance, and warn, naming only the side that is off."""
    from glofnd_hf.fnd import TrackingHealth

    caplog.set_level(logging.WARNING, logger=HEALTH_LOGGER)
    health = TrackingHealth(alpha=0.01, first_checked_epoch=0, advice=lambda kind: kind)
    thresholds = torch.zeros(2, 4)

    def epoch(index, filtered, negatives):
        health.record(float(index), torch.tensor(filtered), torch.tensor(negatives), thresholds)
        summary = health.finish_epoch()
        return summary, [r.getMessage() for r in caplog.records if r.name == HEALTH_LOGGER]

    # 5 expected per side: none filtered, and 12 filtered (2.4 x), are chance.
    summary, messages = epoch(0, [0, 12], [500, 500])
    assert summary["tracking_filtered_over_alpha_image"] == 0.0
    assert summary["tracking_filtered_over_alpha_text"] == pytest.approx(2.4)
    assert messages == []
    # 50 expected: none filtered is not; 30 (0.6 x) is within the range.
    _, messages = epoch(1, [0, 30], [5000, 5000])
    assert len(messages) == 1
    assert "image anchors filtered 0.00 x alpha" in messages[0] and "text" not in messages[0]
    assert messages[0].endswith("low")
    # 150 of 50 expected (3 x) is beyond chance too; 120 (2.4 x) would be 2 sd off the
    # range's edge, P = 0.03.
    _, messages = epoch(2, [25, 150], [5000, 5000])
    assert len(messages) == 2 and "text anchors filtered 3.00 x alpha" in messages[1]
    assert "image" not in messages[1] and messages[1].endswith("high")


def test_health_summary_reports_each_finished_epoch():
    """Each epoch's figure counts the negatives above the thresholds as they were before the
    step (what they filter on data they have not stepped on), over anchors visited before."""
    detector = build_detector("glofnd", num_samples=64, config=GloFNDConfig(alpha=0.1))
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(2, 16, 16, generator=gen)
    index = torch.arange(16)
    batch = DetectionBatch(index, index, index[None] != index[:, None], epoch=0.0)
    assert detector.detect(sim, batch).stats.get("tracking_at_bound_image") is None
    before = detector.state.lambdas(index).t().unsqueeze(-1)
    batch.epoch = 1.0  # the first step of epoch 1 reports epoch 0
    stats = detector.detect(sim, batch).stats
    # Epoch 0 held first visits only: nothing had a threshold before its step.
    assert "tracking_filtered_over_alpha_image" not in stats
    assert stats["tracking_at_bound_image"].item() == 0.0
    after = detector.state.lambdas(index).t().unsqueeze(-1)
    assert not torch.equal(before, after)
    filtered = ((sim > before) & batch.negatives).sum(dim=(1, 2)).float()
    summary = detector.finish_epoch()  # epoch 1, closed by the caller
    for s, side in enumerate(("image", "text")):
        assert summary[f"tracking_filtered_over_alpha_{side}"] == pytest.approx(
            filtered[s].item() / batch.negatives.sum().item() / 0.1, rel=1e-5
        )
    assert detector.finish_epoch() == {}  # nothing recorded since


def test_health_advice_names_the_tail_rules_settings():
    """Each warning of the tail rule names the settings that address its cause, with their
    current values (so the message can be acted on)."""
    detector = build_detector(
        "glofnd", num_samples=8, config=GloFNDConfig(update_rule="tail", alpha=0.1)
    )
    high = detector._advice("high")
    for setting in ("tail_size (now 8)", "step_floor (now 0.5)", "averaging (now 0.5)"):
        assert setting in high
    # local_step filtered more, not less, on the demo's plateau (docs/fn-study.md).
    assert "local_step" not in high
    low = detector._advice("low")
    assert "drift_rate (now 0.3)" in low and "step_floor (now 0.5)" in low
    # A narrower band kept the demo's thresholds lagging a fast-moving model for longer
    # (docs/training.md, what is logged): not advised there.
    assert "band" not in low


def test_the_benchmark_passes_set_settings_to_the_glofnd_rules_only(tmp_path, monkeypatch):
    """``threshold_tracking.py --set``: the settings reach every GloFND rule (an invalid one
    is refused there) and not the in-batch rule, which has none."""
    from benchmarks import threshold_tracking

    for key, value in dict(num_samples=256, batch_size=64, epochs=2).items():
        monkeypatch.setitem(threshold_tracking.SMALL, key, value)
    base = ["--streams", "fixed", "--threads", "1", "--output", str(tmp_path / "t.json")]
    kept = threshold_tracking.main([*base, "--rules", "batch_quantile", "--set", "drift_level=-1"])
    assert kept["overrides"] == {"drift_level": -1}
    with pytest.raises(ValueError, match="drift_level must be positive"):
        threshold_tracking.main([*base, "--rules", "pinball", "--set", "drift_level=-1"])
    ran = threshold_tracking.main([*base, "--rules", "pinball", "--set", "drift_level=5"])
    assert [r["rule"] for r in ran["runs"]] == ["pinball"]
