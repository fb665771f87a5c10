"""Model adapters: tiny offline HF CLIP and open_clip models behind one interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from glofnd_hf import models as M
from glofnd_hf.models import (
    TINY_HF_CLIP,
    TINY_MODEL_NAMES,
    TINY_OPEN_CLIP,
    TINY_OPEN_CLIP_SIGLIP,
    TINY_SIGLIP,
    DualEncoderOutput,
    HFDualEncoder,
    OpenClipDualEncoder,
    build_small_clip_tokenizer,
    build_tiny_hf_clip,
    build_tiny_model,
    build_tiny_open_clip,
    family_of_folder,
    infer_family,
    load_dual_encoder,
)
from glofnd_hf.models.clip_bpe import clip_bpe_merges, make_clip_tokenizer

TEXTS = ["a red circle", "a blue square on grey", "a photo of a cat", "zzqx glorp!"]
FAMILIES = ["hf", "open_clip"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing in these tests may reach the network."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _images(n: int = 4) -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(adapter, train: bool = False) -> dict[str, torch.Tensor]:
    tf = adapter.image_transform(train)
    pixel_values = torch.stack([tf(im) for im in _images(len(TEXTS))])
    return {"pixel_values": pixel_values, **adapter.tokenize(TEXTS)}


@pytest.fixture(scope="module")
def adapters() -> dict[str, M.DualEncoderAdapter]:
    return {
        "hf": build_tiny_hf_clip(texts=TEXTS, seed=0),
        "open_clip": build_tiny_open_clip(seed=0),
    }


@pytest.fixture(scope="module")
def saved(adapters, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for fam, adapter in adapters.items():
        out[fam] = str(root / fam)
        adapter.save(out[fam])
    return out


class _FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: forwards to `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _tower_params(adapter) -> tuple[nn.Parameter, nn.Parameter]:
    m = adapter.model
    if adapter.family == "hf":
        return (
            m.vision_model.embeddings.patch_embedding.weight,
            m.text_model.embeddings.token_embedding.weight,
        )
    return m.visual.conv1.weight, m.token_embedding.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_call_shapes_normalised_and_scale(adapters, family):
    adapter = adapters[family]
    assert adapter.family == family
    batch = _batch(adapter)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 32)
    assert ("attention_mask" in batch) == (family == "hf")

    out = adapter(adapter.model, batch)
    assert isinstance(out, DualEncoderOutput)
    for emb in (out.image_embeds, out.text_embeds):
        assert emb.shape == (4, 64)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert out.logit_scale.ndim == 0 and out.logit_scale.requires_grad
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-3)  # exp of the init log-scale
    assert out.logit_bias is None and adapter.logit_bias_parameter() is None
    assert adapter.logit_scale_parameter().item() == pytest.approx(np.log(1 / 0.07), rel=1e-3)
    # different images/texts give different embeddings (the towers see the input)
    assert (out.image_embeds[0] - out.image_embeds[1]).abs().max() > 1e-4
    assert (out.text_embeds[0] - out.text_embeds[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_train_transform_shape(adapters, family):
    adapter = adapters[family]
    img = _images(1)[0]
    x_train, x_val = adapter.image_transform(True)(img), adapter.image_transform(False)(img)
    assert x_train.shape == x_val.shape == (3, 32, 32)
    assert x_train.dtype == x_val.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_reaches_both_towers_and_scale_through_wrapper(adapters, family):
    adapter = adapters[family]
    adapter.model.zero_grad(set_to_none=True)
    wrapped = _FakeDDP(adapter.model)
    assert adapter.unwrap(wrapped) is adapter.model
    out = adapter(wrapped, _batch(adapter, train=True))
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.t()
    labels = torch.arange(logits.shape[0])
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    vision, text = _tower_params(adapter)
    for p in (vision, text, adapter.logit_scale_parameter()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    adapter.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_training_call(adapters, family):
    adapter = adapters[family]
    adapter.model.eval()
    batch = _batch(adapter)
    with torch.no_grad():
        out = adapter(adapter.model, batch)
        img = adapter.encode_images(adapter.model, batch["pixel_values"])
        txt = adapter.encode_texts(_FakeDDP(adapter.model), TEXTS)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)


def test_small_tokenizer_matches_full_clip_bpe():
    """The cut-down vocabulary tokenises the given texts exactly like the full CLIP BPE."""
    small = build_small_clip_tokenizer(TEXTS, num_merges=200, context_length=32)
    full_merges = clip_bpe_merges()
    full = make_clip_tokenizer(full_merges, 77)
    assert len(full.get_vocab()) == 49408  # same vocabulary as CLIP / open_clip
    assert len(small.get_vocab()) < 1000
    for text in TEXTS:
        s = small.convert_ids_to_tokens(small(text)["input_ids"])
        f = full.convert_ids_to_tokens(full(text)["input_ids"])
        assert s == f
    # and the full one agrees with open_clip's own tokenizer on ids
    import open_clip

    ref = open_clip.SimpleTokenizer(context_length=77)(TEXTS[:3])
    for i, text in enumerate(TEXTS[:3]):
        ids = full(text)["input_ids"]
        assert ref[i, : len(ids)].tolist() == ids
    # text outside the given ones still tokenises (byte-level fallback), no unknown tokens
    ids = small("xylophone quartet")["input_ids"]
    assert small.unk_token_id not in ids[1:-1]


def test_hf_save_reload_and_zero_shot_pipeline(adapters, saved):
    from transformers import AutoModel, AutoProcessor, pipeline

    adapter = adapters["hf"]
    adapter.model.eval()
    model = AutoModel.from_pretrained(saved["hf"]).eval()
    processor = AutoProcessor.from_pretrained(saved["hf"])
    reloaded = HFDualEncoder(model, processor)
    assert reloaded.context_length == adapter.context_length == 32
    batch = _batch(adapter)
    re_batch = _batch(reloaded)
    torch.testing.assert_close(re_batch["pixel_values"], batch["pixel_values"])
    assert torch.equal(re_batch["input_ids"], batch["input_ids"])
    with torch.no_grad():
        a, b = adapter(adapter.model, batch), reloaded(model, batch)
    torch.testing.assert_close(b.image_embeds, a.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.text_embeds, a.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.logit_scale, a.logit_scale)

    labels = ["red circle", "blue square", "cat"]
    pipe = pipeline("zero-shot-image-classification", model=saved["hf"])
    image = _images(1)[0]
    result = pipe(image, candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    # the pipeline computes exactly what the adapter computes
    with torch.no_grad():
        img = adapter.encode_images(adapter.model, adapter.image_transform(False)(image)[None])
        txt = adapter.encode_texts(adapter.model, [f"This is a photo of {x}." for x in labels])
        probs = (a.logit_scale * img @ txt.t()).softmax(-1)[0]
    expected = dict(zip(labels, probs.tolist(), strict=True))
    for r in result:
        assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-4)


def test_open_clip_save_reload(adapters, saved):
    import open_clip

    for name in (M.OPEN_CLIP_CONFIG_NAME, M.OPEN_CLIP_SAFE_WEIGHTS_NAME, M.OPEN_CLIP_WEIGHTS_NAME):
        assert (Path(saved["open_clip"]) / name).is_file()
    adapter = adapters["open_clip"]
    adapter.model.eval()
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        f"local-dir:{saved['open_clip']}"
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{saved['open_clip']}")
    image = _images(1)[0]
    torch.testing.assert_close(preprocess_val(image), adapter.image_transform(False)(image))
    batch = _batch(adapter)
    assert torch.equal(tokenizer(TEXTS), batch["input_ids"])
    with torch.no_grad():
        ref = adapter(adapter.model, batch)
        img = model.encode_image(batch["pixel_values"], normalize=True)
        txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(img, ref.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logit_scale.exp(), ref.logit_scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_dual_encoder_picks_family(adapters, saved, family):
    adapter = adapters[family]
    adapter.model.eval()
    assert infer_family(saved[family]) == family
    names = [saved[family]] + ([f"local-dir:{saved[family]}"] if family == "open_clip" else [])
    batch = _batch(adapter)
    with torch.no_grad():
        ref = adapter(adapter.model, batch)
    for name in names:
        loaded = load_dual_encoder(name)
        assert loaded.family == family
        assert isinstance(loaded, HFDualEncoder if family == "hf" else OpenClipDualEncoder)
        loaded.model.eval()
        with torch.no_grad():
            out = loaded(loaded.model, _batch(loaded))
        torch.testing.assert_close(out.image_embeds, ref.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=1e-5, rtol=0)
    # a reloaded open_clip adapter saves again (its model_cfg comes from the folder)
    if family == "open_clip":
        assert loaded.open_clip_config()["model_cfg"] == adapter.open_clip_config()["model_cfg"]


def test_infer_family_by_name():
    assert infer_family("ViT-B-32") == "open_clip"
    assert infer_family("hf-hub:someorg/some-model") == "open_clip"
    assert infer_family("local-dir:/some/where") == "open_clip"
    assert infer_family("openai/clip-vit-base-patch32") == "hf"


def test_unknown_names_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dual_encoder(str(tmp_path / "no" / "such" / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_dual_encoder(str(empty))
    # a Hub-id-looking name that resolves nowhere (offline): says what was tried
    with pytest.raises(OSError) as info:
        load_dual_encoder("glofnd-test-org/definitely-not-a-model")
    msg = str(info.value)
    assert "open_clip" in msg and "Hugging Face" in msg and "definitely-not-a-model" in msg
    with pytest.raises(ValueError, match="family"):
        load_dual_encoder("ViT-B-32", family="jax")
    with pytest.raises(ValueError, match="pretrained"):
        load_dual_encoder("glofnd-test-org/x", pretrained="openai")


def test_hf_adapter_rejects_models_without_logit_scale(adapters):
    with pytest.raises(ValueError, match="logit_scale"):
        HFDualEncoder(adapters["hf"].model.vision_model, adapters["hf"].processor)


def test_tiny_builders_are_seeded():
    a, b = build_tiny_open_clip(seed=1), build_tiny_open_clip(seed=1)
    assert torch.equal(a.model.visual.conv1.weight, b.model.visual.conv1.weight)
    c = build_tiny_hf_clip(seed=1)
    d = build_tiny_hf_clip(seed=2)
    w = c.model.vision_model.embeddings.patch_embedding.weight
    assert not torch.equal(w, d.model.vision_model.embeddings.patch_embedding.weight)


def test_family_of_folder_reads_the_layout(saved, tmp_path):
    assert family_of_folder(saved["hf"]) == "hf"
    assert family_of_folder(saved["open_clip"]) == "open_clip"
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ValueError, match="holds no model"):
            family_of_folder(folder)


def test_architecture_description_names_class_and_size(adapters):
    hf = adapters["hf"].architecture_description()
    assert hf.startswith("`CLIPModel` (clip), ") and hf.endswith("M parameters")
    oc = adapters["open_clip"].architecture_description()
    assert oc.startswith("open_clip `CLIP`, embedding dim 64, ")
    n = adapters["open_clip"].num_parameters()
    assert oc.endswith(f"{n / 1e6:.1f}M parameters")


def test_build_tiny_model_knows_every_tiny_name():
    families = {name: build_tiny_model(name, texts=TEXTS).family for name in TINY_MODEL_NAMES}
    assert families == {
        TINY_HF_CLIP: "hf",
        TINY_OPEN_CLIP: "open_clip",
        TINY_SIGLIP: "hf",
        TINY_OPEN_CLIP_SIGLIP: "open_clip",
    }
    with pytest.raises(ValueError, match="glofnd-tiny-hf-clip"):
        build_tiny_model("glofnd-tiny-jax")


def test_a_new_model_family_is_its_adapter_and_one_table_entry(tmp_path):
    """A family known only by its adapter and one ``register_family``: its folders load
    through ``load_dual_encoder`` (by their marker file, or by name), the command lines and
    the training arguments accept it, and the model card names its library and layout."""
    from glofnd_hf.args import ModelArguments
    from glofnd_hf.fnd.setting_types import SettingTypeError, check_dataclass_values
    from glofnd_hf.model_card import CardInfo, render_model_card
    from glofnd_hf.models.families import unregister_family

    class ToyAdapter(M.HFDualEncoder):
        """The tiny HF CLIP saved with a marker of its own."""

        family = "toy"

        def save(self, output_dir, **kwargs):
            super().save(output_dir)
            (Path(output_dir) / "toy_config.json").write_text("{}")

        @classmethod
        def from_pretrained(cls, name, **kwargs):
            loaded = M.HFDualEncoder.from_pretrained(name, **kwargs)
            return cls(loaded.model, loaded.processor)

    family = M.ModelFamily(
        name="toy",
        adapter=ToyAdapter,
        library_name="toylib",
        folder_marker="toy_config.json",
        layout="toy layout (`toy_config.json`)",
        folder_priority=-1,  # before the HF folder it also is
    )
    M.register_family(family)
    try:
        tiny = build_tiny_hf_clip(seed=0)
        ToyAdapter(tiny.model, tiny.processor).save(tmp_path / "toy")
        assert M.family_of_folder(tmp_path / "toy") == "toy"
        loaded = M.load_dual_encoder(tmp_path / "toy")
        assert isinstance(loaded, ToyAdapter)
        assert isinstance(M.load_dual_encoder(tmp_path / "toy", family="toy"), ToyAdapter)
        assert "toy" in M.family_choices()
        assert check_dataclass_values(ModelArguments, {"model_family": "toy"})
        with pytest.raises(SettingTypeError, match="model_family"):
            check_dataclass_values(ModelArguments, {"model_family": "nowhere"})
        info = CardInfo(family="toy", repo_id="org/toy")
        card = render_model_card(info)
        assert card.data.library_name == "toylib" and "toy layout" in card.text
    finally:
        unregister_family("toy")
