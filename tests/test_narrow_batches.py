"""Batches narrower than a rule needs (issue 32 item 1): a batch of one sample (its anchor's
only candidate is itself: no negative) or of two (one negative) trains with every detector
and every GloFND threshold rule. A row without the negatives its rule's step needs keeps its
state (docs/threshold-tracking.md, "Batches with few negatives"); nothing that is not a
negative is filtered; normal batches give what they give without the narrow ones."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from test_trainer import RecordingTrainer, adapter_for, digits, make_args, small_train

from glofnd_hf.fnd import DetectionBatch, SharedSettings, registry
from glofnd_hf.fnd.quantiles import tail_estimate, top_values
from glofnd_hf.fnd.thresholds import RULES

__all__ = ["digits"]  # the trainer tests' module fixture, shared

ALPHA = 0.2
NUM_SAMPLES = 40
NORMAL = torch.arange(16)  # the anchors of the normal batches
DIM = 8

# Negatives an anchor needs for its rule to step: the tail rules fit a tail (the (k+1)-th
# largest and at least one exceedance over it), the Adam rules need one pinball gradient.
MIN_NEGATIVES = {"pinball": 2, "tail": 2, "adam": 1, "reference": 1}

CASES = [("glofnd", rule) for rule in sorted(RULES)] + [
    (name, None) for name in registry.names() if name != "glofnd"
]
# IFND's clustering is over every sample it observed: a narrow batch's samples are data like
# any other, so its normal batches cannot stay as they were without it.
PER_ANCHOR_CASES = [case for case in CASES if case[0] != "ifnd"]


def case_id(case: tuple[str, str | None]) -> str:
    name, rule = case
    return name if rule is None else f"{name}-{rule}"


@pytest.fixture(autouse=True)
def quiet_health():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def build(name: str, rule: str | None = None):
    settings = None
    if name == "glofnd":
        settings = {"update_rule": rule}
    elif name == "ifnd":  # one small round per epoch, every sample accepted at once
        settings = {"num_clusters": [2], "accept_warmup_epochs": 0.0, "kmeans_iters": 5}
    return registry.get(name).build(settings, SharedSettings(alpha=ALPHA), num_samples=NUM_SAMPLES)


def step(detector, index: torch.Tensor, epoch: float, gen: torch.Generator, chunked=False):
    """One training step's detection for the batch ``index`` (random unit embeddings, seen by
    ``observe`` first as the loss does): the similarities, negatives, (2, b, B) false
    negatives and the statistics. ``chunked`` reads the rows one at a time."""
    b = index.numel()
    image = F.normalize(torch.randn(b, DIM, generator=gen), dim=-1)
    text = F.normalize(torch.randn(b, DIM, generator=gen), dim=-1)
    detector.observe(index, image, text)
    sim = torch.stack([image @ text.T, text @ image.T])
    negatives = index.unsqueeze(1) != index.unsqueeze(0)
    labels = index % 3  # for the oracle
    batch = DetectionBatch(index, index, negatives, epoch, labels, labels)
    bounds = [(s, s + 1) for s in range(b)] if chunked else [(0, b)]
    detection = detector.detect_rows(lambda s, e: sim[:, s:e], bounds, batch)
    parts = []
    for s, e in bounds:
        found = detection.false_negatives(s, e, sim[:, s:e])
        parts.append(torch.zeros(2, e - s, b, dtype=torch.bool) if found is None else found)
    return sim, negatives, torch.cat(parts, dim=1), detection.stats


def state_rows(detector, index: torch.Tensor) -> torch.Tensor | None:
    """The GloFND rows of ``index`` as they filter (None for other detectors)."""
    state = getattr(detector, "state", None)
    return None if state is None or not hasattr(state, "rows") else state.rows(index).clone()


def check_detection(detector, negatives, found, stats) -> None:
    assert found.dtype == torch.bool
    assert not (found & ~negatives).any(), "filtered something that is not a negative"
    b = negatives.shape[0]
    assert not found[:, torch.arange(b), torch.arange(b)].any(), "an anchor filtered itself"
    for key, value in stats.items():
        assert math.isfinite(float(value)), (key, value)
    state = getattr(detector, "state", None)
    if state is not None and hasattr(state, "table"):
        data = state.table.data
        assert torch.isfinite(data).all()
        lam = state.lambdas(torch.arange(NUM_SAMPLES))
        assert ((lam >= -1.0) & (lam <= 1.0)).all()


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize(("name", "rule"), CASES, ids=[case_id(c) for c in CASES])
def test_narrow_batches_run_and_filter_only_negatives(name, rule, size, chunked):
    """A narrow batch first (nothing seen yet), then epochs of a normal batch and a narrow
    one of anchors the normal batch visited: every step runs, keeps the state finite and
    the thresholds similarities, filters only negatives (never the anchor itself), and with
    GloFND a narrow row steps exactly when it holds the negatives its rule needs."""
    gen = torch.Generator().manual_seed(0)
    detector = build(name, rule)
    narrow = NORMAL[:size]
    _, negatives, found, stats = step(detector, narrow, 0.0, gen, chunked)
    check_detection(detector, negatives, found, stats)
    for epoch in range(3):
        _, negatives, found, stats = step(detector, NORMAL, float(epoch), gen)
        check_detection(detector, negatives, found, stats)
        before = state_rows(detector, narrow)
        _, negatives, found, stats = step(detector, narrow, epoch + 0.5, gen, chunked)
        check_detection(detector, negatives, found, stats)
        if size == 1:
            assert not found.any()  # a batch of one has no negative to filter
        after = state_rows(detector, narrow)
        if before is None:
            continue
        stepped = size - 1 >= MIN_NEGATIVES[rule]
        visits = after[..., -1] - before[..., -1]
        if stepped:
            assert (visits == 1).all()
        else:  # the row, momentum and visit count included, stays as it was
            assert torch.equal(after, before)
    if name == "glofnd":
        # Normal batches visited every anchor of NORMAL three times, narrow ones added one
        # visit per epoch to the narrow anchors that hold enough negatives.
        stepped = size - 1 >= MIN_NEGATIVES[rule]
        visits = detector.state.rows(NORMAL)[..., -1]
        expected = torch.full_like(visits, 3.0)
        expected[:size] += 4.0 if stepped else 0.0
        assert torch.equal(visits, expected)


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize(
    ("name", "rule"), PER_ANCHOR_CASES, ids=[case_id(c) for c in PER_ANCHOR_CASES]
)
def test_narrow_batches_leave_normal_batches_unchanged(name, rule, size):
    """Two detectors see the same normal batches; one also sees a narrow batch of other
    anchors after each: the normal batches' detections, statistics and their anchors'
    state are bit-identical (the tracking health too, where the narrow rows were skipped:
    a threshold left at its start is no visit at the bound)."""
    plain, mixed = build(name, rule), build(name, rule)
    stepped = rule is not None and size - 1 >= MIN_NEGATIVES[rule]
    narrow = torch.arange(NORMAL.numel(), NORMAL.numel() + size)
    gen_plain, gen_mixed, gen_narrow = (torch.Generator().manual_seed(s) for s in (0, 0, 1))
    for epoch in range(4):
        _, _, found_plain, stats_plain = step(plain, NORMAL, float(epoch), gen_plain)
        _, _, found_mixed, stats_mixed = step(mixed, NORMAL, float(epoch), gen_mixed)
        assert torch.equal(found_plain, found_mixed)
        assert stats_plain.keys() == stats_mixed.keys()
        for key in stats_plain:
            # The tracking health summarises every visit of the epoch: narrow rows that
            # the rule stepped count there, rows it skipped do not.
            if not (key.startswith("tracking_") and stepped):
                assert torch.equal(stats_plain[key], stats_mixed[key]), key
        step(mixed, narrow, epoch + 0.5, gen_narrow)
    rows = state_rows(plain, NORMAL)
    if rows is not None:
        assert torch.equal(rows, state_rows(mixed, NORMAL))


def test_top_values_pad_a_row_narrower_than_asked():
    """The one-candidate row of a batch of one: its top two are the value and -inf, and its
    tail estimate is NaN (no negatives), where topk used to fail."""
    x = torch.tensor([[[0.3]], [[0.5]]])
    top = top_values(x, 2)
    assert torch.equal(top, torch.tensor([[[0.3, -math.inf]], [[0.5, -math.inf]]]))
    q_hat, beta, top_neg, u = tail_estimate(x, torch.zeros(1, 1, dtype=torch.bool), ALPHA, 8)
    for value in (q_hat, beta, top_neg, u):
        assert torch.isnan(value).all()


@pytest.mark.parametrize(
    ("rows", "batch_size"), [(9, 8), (3, 1)], ids=["last-of-one", "all-of-one"]
)
def test_training_with_batches_of_one_sample(tmp_path, digits, rows, batch_size):
    """The default detector and rule (glofnd, pinball) through the Trainer, where an epoch
    ends in a batch of one sample (9 rows at batch 8) or every batch is one sample: training
    runs, the loss is finite, and each sample's thresholds were visited once per full batch
    it was in (a batch of one leaves them as they were)."""
    adapter = adapter_for("hf", digits)
    args = make_args(
        tmp_path, per_device_train_batch_size=batch_size, num_train_epochs=2, fn_alpha=0.2
    )
    trainer = RecordingTrainer(adapter, args, train_dataset=small_train(digits, rows))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    seen = torch.tensor(trainer.seen)
    assert seen.numel() == 2 * rows
    state = trainer.contrastive_loss.state_dict()
    # Each epoch's batches in order: a batch of m samples gives each anchor m - 1 negatives.
    visits = torch.zeros_like(state["detector.image.visits"])
    sizes = [min(batch_size, rows - s) for s in range(0, rows, batch_size)] * 2
    for batch in seen.split(sizes):
        if batch.numel() - 1 >= MIN_NEGATIVES["pinball"]:
            visits[batch] += 1.0
    for side in ("image", "text"):
        assert torch.equal(state[f"detector.{side}.visits"], visits), side
        lam = state[f"detector.{side}.lambda"]
        assert torch.isfinite(lam).all() and (lam.abs() <= 1.0).all()
        if batch_size == 1:  # never visited: the thresholds' start value, nothing filtered
            assert (lam == 1.0).all()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logged)
    if batch_size == 1:
        assert all(entry["filtered_fraction_image"] == 0.0 for entry in logged)
        # No threshold was visited: the health has no share at the bound to report (the
        # thresholds' start, 1.0, is no sign of collapsed embeddings).
        assert not any("tracking_at_bound_image" in e for e in trainer.state.log_history)
