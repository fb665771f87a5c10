"""The cached (GradCache-style) loss: the same gradients, state and statistics as one backward
through the same chunks' forwards, and as the plain loss where the forward is deterministic."""

import copy

import pytest
import torch
from cpu_args import cpu_args

from glofnd_hf.fnd import GloFNDConfig, build_detector, registry
from glofnd_hf.losses import (
    ClipLoss,
    GammaSchedule,
    GlobalContrastiveLoss,
    SigmoidLoss,
    cached_contrastive_step,
    chunk_bounds,
)
from glofnd_hf.losses import cached as cached_module
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import GloFNDTrainer

N, BATCH, DIM, CHUNK = 64, 16, 12, 6  # chunks of 6, 6, 4


class DropoutEncoder(torch.nn.Module):
    """Two small towers with dropout and batch norm, and a learnable log temperature."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()

        def tower():
            return torch.nn.Sequential(
                torch.nn.Linear(DIM, 16),
                torch.nn.BatchNorm1d(16),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(16, 8),
            )

        self.image, self.text = tower(), tower()
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text):
        return self.image(image), self.text(text), self.logit_scale.exp()


def make_loss(kind: str, strategy: str = "eliminate", detector: str = "glofnd"):
    # alpha 0.1 and the in-batch quantile start: false negatives from the first step on.
    config = GloFNDConfig(alpha=0.1, init_quantile=True, update_rule="adam")
    det = build_detector(detector, num_samples=N, config=config)
    if kind == "clip":
        return ClipLoss(det, strategy)
    return GlobalContrastiveLoss(N, det, strategy, gamma=GammaSchedule(0.5, "constant"))


def global_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, DIM, generator=gen)
    text = image + 0.3 * torch.randn(BATCH, DIM, generator=gen)
    index = torch.randperm(N, generator=gen)[:BATCH]
    index[3] = index[9]  # a duplicate, in two chunks
    return image, text, index, index % 3


def reference_step(model, loss, image, text, index, labels, seed, chunks=None):
    """One backward through the chunks' forwards (all activations kept); ``chunks=None``:
    one forward over the whole batch."""
    torch.manual_seed(seed)
    bounds = chunks or [(0, len(index))]
    parts = [model(image[s:e], text[s:e]) for s, e in bounds]
    out = loss(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        parts[-1][2],
        index,
        epoch=0.0,
        labels=labels,
    )
    out.loss.backward()
    return out


def cached_step(model, loss, image, text, index, labels, seed, **kwargs):
    torch.manual_seed(seed)
    bounds = chunk_bounds(len(index), CHUNK)

    def encode(i):
        s, e = bounds[i]
        return model(image[s:e], text[s:e])

    return cached_contrastive_step(
        loss, encode, len(bounds), index, epoch=0.0, labels=labels, module=model, **kwargs
    )


def assert_same_step(ref_model, model, ref_loss, loss, ref_out, result, tolerance=1e-5):
    assert torch.allclose(result.output.loss, ref_out.loss.detach(), atol=tolerance)
    assert set(result.output.stats) == set(ref_out.stats)
    for key, value in ref_out.stats.items():
        assert torch.allclose(result.output.stats[key], value, atol=tolerance), key
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(q.grad, p.grad, atol=tolerance), name
    for (name, b), c in zip(ref_model.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(c, b), name  # batch-norm statistics moved once
    state = loss.state_dict()
    for key, value in ref_loss.state_dict().items():
        assert torch.allclose(state[key].double(), value.double(), atol=tolerance, equal_nan=True)


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
@pytest.mark.parametrize("kind", ["clip", "global"])
def test_cached_step_equals_one_backward_with_dropout(kind, strategy):
    torch.manual_seed(0)
    ref_model = DropoutEncoder()
    model = copy.deepcopy(ref_model)
    ref_loss, loss = make_loss(kind, strategy), make_loss(kind, strategy)
    image, text, index, labels = global_batch()
    bounds = chunk_bounds(BATCH, CHUNK)
    ref_out = reference_step(ref_model, ref_loss, image, text, index, labels, 7, bounds)
    result = cached_step(model, loss, image, text, index, labels, 7)
    assert float(ref_out.stats["filtered_fraction_image"]) > 0  # the masks act
    assert_same_step(ref_model, model, ref_loss, loss, ref_out, result)
    # The random state ends where one pass leaves it.
    torch.manual_seed(7)
    for s, e in bounds:
        ref_model(image[s:e], text[s:e])
    expected = torch.rand(3)
    assert torch.equal(cached_rng_after(model, loss, image, text, index, labels), expected)


class SigmoidEncoder(DropoutEncoder):
    """The dropout encoder with SigLIP's learnable logit bias."""

    def __init__(self):
        super().__init__()
        self.logit_bias = torch.nn.Parameter(torch.tensor(-2.0))

    def forward(self, image, text):
        return (*super().forward(image, text), self.logit_bias)


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
def test_cached_sigmoid_step_carries_the_logit_bias(strategy):
    """The bias reaches the loss directly, like the scale: its gradient goes in once."""
    torch.manual_seed(0)
    ref_model = SigmoidEncoder()
    model = copy.deepcopy(ref_model)
    config = GloFNDConfig(alpha=0.1, init_quantile=True, update_rule="adam")
    ref_loss, loss = (
        SigmoidLoss(build_detector("glofnd", num_samples=N, config=config), strategy)
        for _ in range(2)
    )
    image, text, index, labels = global_batch()
    bounds = chunk_bounds(BATCH, CHUNK)
    torch.manual_seed(7)
    parts = [ref_model(image[s:e], text[s:e]) for s, e in bounds]
    ref_out = ref_loss(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        parts[-1][2],
        index,
        labels=labels,
        logit_bias=parts[-1][3],
    )
    ref_out.loss.backward()
    result = cached_step(model, loss, image, text, index, labels, 7)
    assert float(ref_out.stats["filtered_fraction_image"]) > 0  # the masks act
    assert ref_model.logit_bias.grad.abs() > 1e-3
    assert_same_step(ref_model, model, ref_loss, loss, ref_out, result)
    assert result.logit_bias.item() == pytest.approx(-2.0)


def cached_rng_after(model, loss, image, text, index, labels):
    cached_step(model, loss, image, text, index, labels, 7)
    return torch.rand(3)


def test_without_replaying_the_random_state_dropout_breaks_the_gradients(monkeypatch):
    """What the replay is for: without it the second pass draws other dropout masks."""
    torch.manual_seed(0)
    ref_model = DropoutEncoder()
    model = copy.deepcopy(ref_model)
    image, text, index, labels = global_batch()
    bounds = chunk_bounds(BATCH, CHUNK)
    reference_step(ref_model, make_loss("clip"), image, text, index, labels, 7, bounds)
    monkeypatch.setattr(cached_module.RandomState, "restore", lambda self: None)
    cached_step(model, make_loss("clip"), image, text, index, labels, 7)
    weight = model.image[0].weight.grad
    assert not torch.allclose(weight, ref_model.image[0].weight.grad, atol=1e-3)


class Bf16Forward(torch.nn.Module):
    """The forward under bfloat16 autocast, as accelerate wraps a model's forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, image, text):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(image, text)


def test_cached_step_under_bf16_autocast_equals_one_backward():
    """Both passes under the same autocast: the bfloat16 embeddings' gradients are the float32
    loss gradients cast down, as in one backward."""
    torch.manual_seed(0)
    ref_model = Bf16Forward(DropoutEncoder())
    model = copy.deepcopy(ref_model)
    ref_loss, loss = make_loss("global"), make_loss("global")
    image, text, index, labels = global_batch()
    bounds = chunk_bounds(BATCH, CHUNK)
    ref_out = reference_step(ref_model, ref_loss, image, text, index, labels, 7, bounds)
    result = cached_step(model, loss, image, text, index, labels, 7)
    assert copy.deepcopy(model).eval()(image, text)[0].dtype == torch.bfloat16
    assert_same_step(ref_model, model, ref_loss, loss, ref_out, result)


@pytest.mark.parametrize("detector", registry.names())
def test_every_detector_equals_the_plain_loss_without_dropout(detector):
    """A deterministic forward (eval mode): the cached step is the plain full-batch step."""
    torch.manual_seed(0)
    ref_model = DropoutEncoder().eval()
    model = copy.deepcopy(ref_model)
    ref_loss, loss = make_loss("global", detector=detector), make_loss("global", detector=detector)
    image, text, index, labels = global_batch()
    ref_out = reference_step(ref_model, ref_loss, image, text, index, labels, 7)
    result = cached_step(model, loss, image, text, index, labels, 7)
    assert_same_step(ref_model, model, ref_loss, loss, ref_out, result)


def test_only_the_last_chunk_synchronises_and_the_weight_scales_the_gradients():
    torch.manual_seed(0)
    ref_model = DropoutEncoder().eval()
    model = copy.deepcopy(ref_model)
    image, text, index, labels = global_batch()
    reference_step(ref_model, make_loss("clip"), image, text, index, labels, 7)
    entered = []

    class NoSync:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    cached_step(
        model, make_loss("clip"), image, text, index, labels, 7, no_sync=NoSync, loss_weight=0.5
    )
    assert len(entered) == len(chunk_bounds(BATCH, CHUNK)) - 1
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.allclose(q.grad, 0.5 * p.grad, atol=1e-6)


# -- the Trainer -------------------------------------------------------------------------------


def tiny_trainer(tmp_path, chunk, **overrides):
    adapter = build_tiny_hf_clip(seed=0)
    args = cpu_args(
        tmp_path,
        per_device_train_batch_size=8,
        loss_type="fastclip",
        fn_alpha=0.2,
        detector_kwargs={"init_quantile": True, "update_rule": "adam"},
        num_samples=N,
        contrastive_chunk_size=chunk,
        **overrides,
    )
    trainer = GloFNDTrainer(adapter, args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop otherwise
    return trainer


def tiny_batch(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = adapter.model.config
    size = cfg.vision_config.image_size
    ids = torch.randint(0, 100, (8, 12), generator=gen)
    ids[:, 0], ids[:, -1] = cfg.text_config.bos_token_id, cfg.text_config.eos_token_id
    return {
        "pixel_values": torch.randn(8, 3, size, size, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "dataset_index": torch.randperm(N, generator=gen)[:8],
    }


def set_attention_dropout(model, p):
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "dropout"):
            module.dropout = p


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_cached_step_equals_the_plain_step(tmp_path, accumulation):
    """Gradients, per-sample state, returned loss and logged statistics of one training step,
    with chunks of 3, 3 and 2 pairs; under gradient accumulation the loss is scaled alike."""
    plain, cached = tiny_trainer(tmp_path, None), tiny_trainer(tmp_path, 3)
    results = []
    for trainer in (plain, cached):
        trainer.current_gradient_accumulation_steps = accumulation
        torch.manual_seed(3)
        loss = trainer.training_step(trainer.model, tiny_batch(trainer.adapter))
        results.append(loss)
    assert torch.allclose(results[0], results[1], atol=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), cached.model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, atol=1e-5), name
    assert plain.adapter.logit_scale_parameter().grad.abs() > 0
    for key, value in plain.contrastive_loss.state_dict().items():
        assert torch.allclose(cached.contrastive_loss.state_dict()[key], value, atol=1e-6), key
    logs = []
    for trainer in (plain, cached):
        trainer.log({"loss": 0.0})
        logs.append(trainer.state.log_history[-1])
    assert set(logs[0]) == set(logs[1])
    for key, value in logs[0].items():
        assert logs[1][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_trainer_cached_step_replays_dropout(tmp_path):
    """Attention dropout on: the cached step equals one backward through the same chunks."""
    reference, cached = tiny_trainer(tmp_path, None), tiny_trainer(tmp_path, 3)
    for trainer in (reference, cached):
        set_attention_dropout(trainer.model, 0.3)
    batch = tiny_batch(cached.adapter)
    torch.manual_seed(3)
    cached.training_step(cached.model, dict(batch))

    model, adapter = reference.model.train(), reference.adapter
    torch.manual_seed(3)
    outs = [
        adapter(model, {k: v[s:e] for k, v in batch.items() if k != "dataset_index"})
        for s, e in chunk_bounds(8, 3)
    ]
    reference.contrastive_loss(
        torch.cat([o.image_embeds for o in outs]),
        torch.cat([o.text_embeds for o in outs]),
        outs[-1].logit_scale,
        batch["dataset_index"],
        epoch=0.0,
    ).loss.backward()
    for (name, p), q in zip(model.named_parameters(), cached.model.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, atol=1e-5), name
    # ...and dropout really changes them: the plain full-batch forward draws other masks.
    plain = tiny_trainer(tmp_path, None)
    set_attention_dropout(plain.model, 0.3)
    torch.manual_seed(3)
    plain.training_step(plain.model, dict(batch))
    weight = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    grads = {n: p.grad for n, p in plain.model.named_parameters()}
    cached_grads = {n: p.grad for n, p in cached.model.named_parameters()}
    assert not torch.allclose(grads[weight], cached_grads[weight], atol=1e-6)


def test_chunk_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="contrastive_chunk_size must be positive"):
        cpu_args(tmp_path, contrastive_chunk_size=0)
