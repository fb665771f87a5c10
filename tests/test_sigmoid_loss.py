"""The SigLIP sigmoid loss: transformers' and open_clip's value without a detector, and the
per-anchor-half rule for eliminate and attract, written out pair by pair."""

import math

import pytest
import torch
import torch.nn.functional as F

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.fnd.detectors import Detection, NoDetector
from glofnd_hf.losses import ClipLoss, SigmoidLoss
from glofnd_hf.models import build_tiny_hf_siglip


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def embeddings(b=6, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(b, d, generator=gen, dtype=torch.float64)
    text = image + 0.7 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    return image, text


def test_without_a_detector_it_is_transformers_siglip_loss():
    torch.manual_seed(0)
    adapter = build_tiny_hf_siglip(seed=0)
    model = adapter.model.eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-3.0)  # the tiny model's -10 leaves little to compare
    pixels = torch.randn(5, 3, 32, 32)
    tokens = adapter.tokenize(["a red seven", "a blue one", "two", "a green four", "nine"])
    batch = {**tokens, "pixel_values": pixels}
    with torch.no_grad():
        expected = model(**batch, return_loss=True).loss
        out = adapter(model, batch)
        got = SigmoidLoss()(
            out.image_embeds, out.text_embeds, out.logit_scale, None, 0.0, None, out.logit_bias
        )
    assert expected.item() > 1.0
    assert abs(got.loss.item() - expected.item()) < 1e-6


def test_without_a_detector_it_is_open_clip_siglip_loss():
    from open_clip.loss import SigLipLoss

    image, text = embeddings()
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    expected = SigLipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale, bias)
    got = SigmoidLoss()(image, text, scale, logit_bias=bias)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    # Both sides are the same sum of pairs: each reports the full loss (stats are float32).
    assert got.stats["loss_image"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.stats["loss_text"].item() == pytest.approx(expected.item(), rel=1e-6)


def hand_written(image, text, scale, bias, labels, strategy):
    """Pair by pair: each anchor owns half of each of its pairs; a candidate with the
    anchor's label (the oracle's false negative) is dropped from that half (eliminate) or
    labelled +1 there (attract)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    n = len(image)
    total = 0.0
    for anchors, candidates in ((image, text), (text, image)):
        for i in range(n):
            for j in range(n):
                z = scale * float(anchors[i] @ candidates[j]) + bias
                if i == j:
                    total += -log_sigmoid(z)
                elif labels[i] != labels[j]:
                    total += -log_sigmoid(-z)
                elif strategy == "attract":
                    total += -log_sigmoid(z)
    return total / (2 * n)


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
def test_eliminate_and_attract_follow_the_pairwise_formula(strategy):
    image, text = embeddings()
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    index = torch.arange(6)
    loss = SigmoidLoss(build_detector("oracle"), strategy)
    out = loss(image, text, 4.0, index, labels=labels, logit_bias=-1.5)
    expected = hand_written(image, text, 4.0, -1.5, labels.tolist(), strategy)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    plain = SigmoidLoss()(image, text, 4.0, index, logit_bias=-1.5).loss.item()
    assert abs(out.loss.item() - plain) > 1e-3  # the detections changed the loss
    assert out.stats["filtered_fraction_image"].item() == pytest.approx(4 / 30)


class FlagImageZeroTextOne(NoDetector):
    """Only image anchor 0 flags text 1."""

    def detect(self, sim, batch):
        fn = torch.zeros_like(sim, dtype=torch.bool)
        fn[0, 0, 1] = True
        return Detection(fn)


def test_one_side_detecting_keeps_the_other_half():
    image, text = embeddings(b=3)
    index = torch.arange(3)
    out = SigmoidLoss(FlagImageZeroTextOne())(image, text, 3.0, index, logit_bias=-1.0)
    plain = SigmoidLoss()(image, text, 3.0, index, logit_bias=-1.0).loss.item()
    i, t = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    z01 = 3.0 * float(i[0] @ t[1]) - 1.0
    # Only the image-side half of pair (0, 1) leaves: (1/2) * -log sigmoid(-z01) / 3 less.
    assert out.loss.item() == pytest.approx(plain - 0.5 * -log_sigmoid(-z01) / 3, abs=1e-12)


def test_duplicate_indices_are_neither_positive_nor_negative():
    image, text = embeddings(b=4)
    index = torch.tensor([7, 3, 7, 5])  # pairs 0 and 2 are the same sample
    out = SigmoidLoss()(image, text, 4.0, index, logit_bias=-1.0)
    labels = [10, 11, 10, 12]  # a dropped pair is what eliminate does with an equal label
    expected = hand_written(image, text, 4.0, -1.0, labels, "eliminate")
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)


def test_gradients_reach_scale_and_bias_and_evaluate_needs_no_state():
    image, text = embeddings()
    image.requires_grad_(True)
    log_scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss = SigmoidLoss(build_detector("glofnd", num_samples=10, config=GloFNDConfig(alpha=0.2)))
    out = loss(image, text, log_scale.exp(), torch.arange(6), logit_bias=bias)
    out.loss.backward()
    assert image.grad is not None and log_scale.grad is not None and bias.grad is not None
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    value = loss.evaluate(image.detach(), text, log_scale.exp(), torch.arange(6), bias).loss
    assert torch.isfinite(value)
    assert all(torch.equal(v, loss.state_dict()[k]) for k, v in state.items())


def test_the_bias_is_required_and_other_losses_ignore_it():
    image, text = embeddings()
    with pytest.raises(ValueError, match="logit_bias"):
        SigmoidLoss()(image, text, 4.0)
    with pytest.raises(ValueError, match="scalar"):
        SigmoidLoss()(image, text, 4.0, logit_bias=torch.zeros(2))
    assert torch.equal(
        ClipLoss()(image, text, 4.0, logit_bias=-3.0).loss, ClipLoss()(image, text, 4.0).loss
    )
