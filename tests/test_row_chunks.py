"""The loss computed row chunk by row chunk (``backward_by_rows``, what the cached loss runs):
the same value, statistics, per-sample state and gradients as the loss on the whole batch,
and no detector or loss chunk ever holding more than a chunk of rows."""

import pytest
import torch

from glofnd_hf.fnd import (
    Detection,
    GloFNDConfig,
    NoDetector,
    RowwiseDetector,
    build_detector,
    registry,
)
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss, SigmoidLoss
from glofnd_hf.losses import rows as loss_rows

N, B, DIM, ROWS = 50, 10, 8, 3  # row chunks of 3, 3, 3, 1


def make_loss(kind: str, strategy: str, detector: str):
    # alpha 0.2: false negatives from the first step on, with the default (tail) rule.
    det = build_detector(detector, num_samples=N, config=GloFNDConfig(alpha=0.2))
    if kind == "clip":
        return ClipLoss(det, strategy)
    if kind == "sigmoid":
        return SigmoidLoss(det, strategy)
    return GlobalContrastiveLoss(N, det, strategy, gamma=GammaSchedule(0.5, "constant"))


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(B, DIM, generator=gen, dtype=torch.float64)
    text = image + 0.5 * torch.randn(B, DIM, generator=gen, dtype=torch.float64)
    index = torch.randperm(N, generator=gen)[:B]
    index[2] = index[7]  # a duplicate, in two row chunks
    return image, text, index, index % 3


def leaves(image, text):
    scale = torch.tensor(5.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    return [t.clone().requires_grad_() for t in (image, text, scale, bias)]


def whole(loss, image, text, index, labels, epoch):
    i, t, scale, bias = leaves(image, text)
    out = loss(i, t, scale, index, epoch=epoch, labels=labels, logit_bias=bias)
    out.loss.backward()
    return out, [i.grad, t.grad, scale.grad, bias.grad]


def by_rows(loss, image, text, index, labels, epoch, rows=ROWS):
    i, t, scale, bias = leaves(image, text)
    out = loss.backward_by_rows(
        i, t, scale, index, epoch=epoch, labels=labels, logit_bias=bias, rows_per_chunk=rows
    )
    return out, [i.grad, t.grad, scale.grad, bias.grad]


def assert_same(ref, got, ref_loss, loss):
    (ref_out, ref_grads), (out, grads) = ref, got
    assert not out.loss.requires_grad
    assert torch.allclose(out.loss, ref_out.loss.detach(), atol=1e-10)
    assert set(out.stats) == set(ref_out.stats)
    for key, value in ref_out.stats.items():
        if not key.endswith("_seconds"):  # a timing
            assert torch.allclose(out.stats[key].double(), value.double(), atol=1e-10), key
    for name, a, b in zip(["image", "text", "scale", "bias"], ref_grads, grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=1e-10), name
    state = loss.state_dict()
    for key, value in ref_loss.state_dict().items():
        if "seconds" in key:  # a timing
            continue
        assert torch.allclose(state[key].double(), value.double(), atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("detector", [d for d in registry.names() if d != "ifnd"])
@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
@pytest.mark.parametrize("kind", ["clip", "global", "sigmoid"])
def test_row_chunks_equal_the_whole_batch_over_steps(kind, strategy, detector):
    ref_loss, loss = (make_loss(kind, strategy, detector) for _ in range(2))
    for step in range(3):  # later steps read the state the earlier ones wrote
        image, text, index, labels = batch(step)
        ref = whole(ref_loss, image, text, index, labels, epoch=float(step))
        got = by_rows(loss, image, text, index, labels, epoch=float(step))
        assert_same(ref, got, ref_loss, loss)
    if detector != "none":
        assert ref[0].stats["filtered_fraction_image"] > 0  # detections took part


def test_ifnd_row_chunks_equal_the_whole_batch():
    ref_loss, loss = (make_loss("clip", "eliminate", "ifnd") for _ in range(2))
    for step in range(4):
        image, text, index, labels = batch(step)
        ref = whole(ref_loss, image, text, index, labels, epoch=float(step))
        got = by_rows(loss, image, text, index, labels, epoch=float(step))
        assert_same(ref, got, ref_loss, loss)
    assert ref[0].stats["ifnd_rounds"] > 0


class FlagFirstPair(NoDetector):
    """A detector that redefines ``detect`` alone (reads the whole matrix)."""

    seen_rows: list[int] = []

    def detect(self, sim, batch):
        FlagFirstPair.seen_rows.append(sim.shape[1])
        fn = torch.zeros_like(sim, dtype=torch.bool)
        fn[:, 0, 1] = True
        return Detection(fn)


def test_a_detector_that_only_defines_detect_sees_the_whole_batch():
    image, text, index, labels = batch(0)
    FlagFirstPair.seen_rows.clear()
    ref = whole(ClipLoss(FlagFirstPair()), image, text, index, labels, 0.0)
    got = by_rows(ClipLoss(FlagFirstPair()), image, text, index, labels, 0.0)
    assert FlagFirstPair.seen_rows == [B, B]
    assert_same(ref, got, ClipLoss(), ClipLoss())
    assert ref[0].stats["filtered_fraction_image"] > 0


@pytest.mark.parametrize("kind", ["global", "clip"])
@pytest.mark.parametrize("detector", ["glofnd", "batch_quantile", "none"])
def test_no_more_than_a_chunk_of_rows_at_once(monkeypatch, detector, kind):
    """Row-wise detectors and the loss never ask for the whole (2, b, B) matrix."""
    spans = []
    original = loss_rows.RowSimilarities.__call__

    def recording(self, start, end):
        spans.append(end - start)
        return original(self, start, end)

    monkeypatch.setattr(loss_rows.RowSimilarities, "__call__", recording)
    assert issubclass(registry.get(detector).detector_class, RowwiseDetector)
    loss = make_loss(kind, "eliminate", detector)
    image, text, index, labels = batch(0)
    by_rows(loss, image, text, index, labels, 0.0, rows=4)
    assert spans and max(spans) == 4
    # The detector reads each chunk once (GloFND: its statistics and the health count of
    # the thresholds before the step in one pass; the detections come from the loss's own
    # rows), the global loss once for u, and each loss once more with gradients.
    reads = {"glofnd": 1, "batch_quantile": 1, "none": 0}[detector] + (2 if kind == "global" else 1)
    assert len(spans) == reads * 3


def test_rows_per_chunk_must_be_positive():
    image, text, index, labels = batch(0)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        by_rows(ClipLoss(), image, text, index, labels, 0.0, rows=0)
