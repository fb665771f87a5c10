"""A state that stores embeddings (IFND's feature bank) is sized with the model's embedding
width, read from its configuration before the first step, not an assumed 1024."""

import pytest
import torch
from cpu_args import cpu_args

from glofnd_hf import state_budget
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.fnd import registry
from glofnd_hf.fnd.ifnd_config import ASSUMED_EMBED_WIDTH
from glofnd_hf.loss_factory import build_contrastive_loss
from glofnd_hf.models import build_tiny_hf_clip, build_tiny_hf_siglip, build_tiny_open_clip
from glofnd_hf.trainer import GloFNDTrainer

WIDTH = 48
TEXTS = ["a red digit three", "a blue digit seven"]
BUILDS = {
    "hf_clip": lambda: build_tiny_hf_clip(seed=0, texts=TEXTS, embed_dim=WIDTH),
    "hf_siglip": lambda: build_tiny_hf_siglip(seed=0, texts=TEXTS, width=WIDTH),
    "open_clip": lambda: build_tiny_open_clip(seed=0, embed_dim=WIDTH),
}


@pytest.mark.parametrize("family", sorted(BUILDS))
def test_the_width_read_from_the_configuration_is_what_the_encoders_return(family):
    adapter = BUILDS[family]()
    model = adapter.model.eval()
    with torch.no_grad():
        texts = adapter.encode_texts(model, TEXTS)
        images = adapter.encode_images(model, torch.zeros(2, 3, 32, 32))
    assert adapter.embedding_width() == texts.shape[-1] == images.shape[-1] == WIDTH


def test_ifnd_state_bytes_follow_the_width():
    spec = registry.get("ifnd")
    settings = spec.make_settings({"num_clusters": [4, 8]})
    per_width = spec.bytes_per_sample(settings, embed_width=WIDTH)
    assumed = spec.bytes_per_sample(settings)
    bank = torch.finfo(torch.float16).bits // 8  # the default bank dtype
    assert assumed - per_width == (ASSUMED_EMBED_WIDTH - WIDTH) * bank
    # A detector whose state holds no embeddings ignores the width.
    glofnd = registry.get("glofnd")
    assert glofnd.bytes_per_sample(embed_width=WIDTH) == glofnd.bytes_per_sample() == 80 - 8


def test_the_trainer_sizes_ifnd_with_the_models_width(tmp_path, monkeypatch):
    """Memory for 32 samples at the model's width but not at the assumed one: the loss is
    built (and refused when the width is not passed)."""
    args = cpu_args(tmp_path, detector="ifnd", fn_alpha=0.1, per_device_train_batch_size=8)
    need = 32 * args.state_bytes_per_sample(WIDTH)
    assert 32 * args.state_bytes_per_sample() > need
    monkeypatch.setattr(state_budget, "memory_of", lambda device: need)
    with pytest.raises(state_budget.StateTooLargeError):
        build_contrastive_loss(args, 32, "cpu")
    train = load_digits_pairs(seed=0)["train"].select(range(32))
    adapter = build_tiny_hf_clip(seed=0, texts=list(train["caption"]), embed_dim=WIDTH)
    trainer = GloFNDTrainer(adapter, args, train_dataset=train)
    assert trainer.contrastive_loss.num_samples == 32


def test_the_early_check_does_not_refuse_a_state_that_fits_at_the_models_width(
    tmp_path, monkeypatch
):
    """With num_samples given, the arguments check the state before any model is loaded,
    when the width is not known yet: only what does not depend on it may refuse the run
    (the loss is checked again at the model's width)."""
    plain = cpu_args(tmp_path, detector="ifnd", fn_alpha=0.1, per_device_train_batch_size=8)
    need = 32 * plain.state_bytes_per_sample(WIDTH)
    monkeypatch.setattr(state_budget, "memory_of", lambda device: need)
    args = cpu_args(
        tmp_path, detector="ifnd", fn_alpha=0.1, per_device_train_batch_size=8, num_samples=32
    )
    assert build_contrastive_loss(args, 32, "cpu", embed_width=WIDTH).num_samples == 32
    # What the state needs at any width still refuses early.
    monkeypatch.setattr(state_budget, "memory_of", lambda device: 32)
    with pytest.raises(state_budget.StateTooLargeError):
        cpu_args(
            tmp_path, detector="ifnd", fn_alpha=0.1, per_device_train_batch_size=8, num_samples=32
        )
