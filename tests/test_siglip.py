"""SigLIP models end to end: tiny offline builders, a few training steps with the sigmoid loss,
saved folders loading with each family's own tools, zero-shot scores and cards."""

import math
from pathlib import Path

import pytest
import torch
from cpu_args import cpu_args
from PIL import Image

from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.eval.run import evaluate
from glofnd_hf.model_card import write_model_card
from glofnd_hf.models import (
    TINY_OPEN_CLIP_SIGLIP,
    TINY_SIGLIP,
    build_tiny_hf_clip,
    build_tiny_hf_siglip,
    build_tiny_model,
    build_tiny_open_clip_siglip,
    load_dual_encoder,
)
from glofnd_hf.trainer import GloFNDTrainer

LABELS = ["a red seven", "a blue one", "a green four"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_pairs(seed=0)


def train_few_steps(adapter, digits, tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        loss_type="sigmoid",
        detector="glofnd",
        fn_alpha=0.1,
    )
    args = cpu_args(tmp_path, **{**settings, **overrides})
    trainer = GloFNDTrainer(adapter, args, train_dataset=digits["train"].select(range(32)))
    bias_before = adapter.logit_bias_parameter().item()
    trainer.train()
    assert adapter.logit_bias_parameter().item() != bias_before  # the bias learns
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    write_model_card(trainer, folder)
    return trainer, folder


@pytest.mark.parametrize("name", [TINY_SIGLIP, TINY_OPEN_CLIP_SIGLIP])
def test_tiny_siglips_have_bias_and_siglip_text_conventions(name):
    adapter = build_tiny_model(name, texts=LABELS)
    assert adapter.logit_bias_parameter().item() == -10.0
    assert adapter.logit_scale_parameter().exp().item() == pytest.approx(10.0)
    tokens = adapter.tokenize(LABELS)
    assert tokens["input_ids"].shape == (3, 64)  # max_length padding to SigLIP's 64
    if name == TINY_SIGLIP:
        assert set(tokens) == {"input_ids"}  # no attention mask: the last position is pooled
        eos = adapter.tokenizer.eos_token_id
        ids = tokens["input_ids"][0].tolist()
        assert ids[-1] == eos and ids[0] != eos  # no start token, end token then padding
        assert type(adapter.model).__name__ == "SiglipModel"
    else:
        assert type(adapter.model).__name__ == "CustomTextCLIP"


def test_hf_siglip_trains_saves_and_loads_with_the_pipeline(digits, tmp_path):
    from transformers import AutoModel, pipeline

    texts = list(digits["train"]["caption"][:64]) + LABELS
    trainer, folder = train_few_steps(build_tiny_hf_siglip(seed=0, texts=texts), digits, tmp_path)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(logged[-1]["loss"]) and "filtered_fraction_image" in logged[-1]
    assert type(AutoModel.from_pretrained(folder)).__name__ == "SiglipModel"
    # The pipeline's scores are sigmoid(scale * <image, text> + bias) of our embeddings.
    adapter = load_dual_encoder(folder)
    adapter.model.eval()
    image = digits["validation"][0]["image"].convert("RGB")
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    scores = {
        r["label"]: r["score"]
        for r in pipe(image, candidate_labels=LABELS, hypothesis_template="{}")
    }
    with torch.no_grad():
        pixels = adapter.image_transform(train=False)(image).unsqueeze(0)
        sims = (
            adapter.encode_images(adapter.model, pixels)
            @ adapter.encode_texts(adapter.model, LABELS).t()
        )
    model = adapter.model
    expected = torch.sigmoid(sims[0] * model.logit_scale.exp() + model.logit_bias)
    for label, value in zip(LABELS, expected.tolist(), strict=True):
        assert scores[label] == pytest.approx(value, rel=1e-4, abs=1e-9)
    card = (folder / "README.md").read_text()
    assert "SigLIP sigmoid loss" in card and "zhai2023siglip" in card
    # glofnd-eval scores it by the same dot product.
    report = evaluate(str(folder), dataset="glofnd-digits", max_samples=40, show_progress=False)
    assert 0.0 <= report["metrics"]["image_to_text_recall@1"] <= 1.0


def _serve_from(folder: Path):
    """``hf_hub_download`` answered from a local folder (no network in tests)."""

    def download(repo_id, filename, **kwargs):
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{repo_id}/{filename}")
        return str(path)

    return download


def test_open_clip_siglip_trains_and_loads_with_hf_hub(digits, tmp_path, monkeypatch):
    import open_clip
    import open_clip.pretrained

    adapter = build_tiny_open_clip_siglip(seed=0)
    _, folder = train_few_steps(adapter, digits, tmp_path, detector="batch_quantile")
    adapter.model.eval()
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _serve_from(folder))
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:org/tiny-siglip")
    tokenizer = open_clip.get_tokenizer("hf-hub:org/tiny-siglip")
    model.eval()
    assert type(model).__name__ == "CustomTextCLIP"
    assert model.logit_bias.item() == pytest.approx(adapter.model.logit_bias.item())
    image = Image.new("RGB", (40, 40), "red")
    with torch.no_grad():
        img = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
        txt = model.encode_text(tokenizer(LABELS), normalize=True)
        ref_img = adapter.encode_images(
            adapter.model, adapter.image_transform(False)(image).unsqueeze(0)
        )
        ref_txt = adapter.encode_texts(adapter.model, LABELS)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    assert "SigLIP sigmoid loss" in (folder / "README.md").read_text()


def test_loss_and_model_must_agree_on_the_bias(digits, tmp_path):
    clip = build_tiny_hf_clip(seed=0, texts=LABELS)
    with pytest.raises(ValueError, match="logit bias"):
        GloFNDTrainer(
            clip,
            cpu_args(tmp_path, loss_type="sigmoid", max_steps=1),
            train_dataset=digits["train"].select(range(8)),
        )
    # A SigLIP model under a softmax loss: the unused bias is frozen (DDP needs a gradient
    # for every trainable parameter).
    siglip = build_tiny_hf_siglip(seed=0, texts=LABELS)
    GloFNDTrainer(
        siglip,
        cpu_args(tmp_path, loss_type="clip", max_steps=1),
        train_dataset=digits["train"].select(range(8)),
    )
    assert not siglip.logit_bias_parameter().requires_grad


def test_the_training_batch_is_padded_as_siglip_was_trained(digits, tmp_path):
    adapter = build_tiny_hf_siglip(seed=0, texts=list(digits["train"]["caption"][:16]))
    args = cpu_args(tmp_path, loss_type="sigmoid", detector="none")
    trainer = GloFNDTrainer(adapter, args, train_dataset=digits["train"].select(range(8)))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == 64 and "attention_mask" not in batch
    with torch.no_grad():
        out = adapter(adapter.model, batch)
        expected = adapter.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], return_loss=True
        ).loss
        got = trainer.contrastive_loss(
            out.image_embeds, out.text_embeds, out.logit_scale, logit_bias=out.logit_bias
        ).loss
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
