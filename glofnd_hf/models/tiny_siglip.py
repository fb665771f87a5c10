"""Tiny randomly initialised SigLIP models (sigmoid loss, logit bias), built offline.

SigLIP's own tokenizers (sentencepiece for SigLIP, Gemma's for SigLIP 2) cannot be built
without their vocabulary files, so the tiny models use the small CLIP BPE of ``clip_bpe``
(HF) or open_clip's CLIP BPE, with SigLIP's text conventions: no start token, an end token,
padding to 64 tokens with the end token, no attention mask (the text tower pools the last
position, padding included, as SigLIP was trained).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict
from typing import Any

import torch

from .clip_bpe import CLIP_EOS, build_small_clip_tokenizer
from .hf_adapter import HFDualEncoder
from .open_clip_adapter import OpenClipDualEncoder
from .tiny_clip import tiny_open_clip_config

__all__ = [
    "SIGLIP_CONTEXT_LENGTH",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOGIT_SCALE",
    "PORTABLE_TOKENIZER_CLASS",
    "build_siglip_style_tokenizer",
    "build_tiny_hf_siglip",
    "build_tiny_open_clip_siglip",
    "tiny_open_clip_siglip_config",
]

#: SigLIP's text length; transformers' zero-shot pipeline pads SigLIP text to it.
SIGLIP_CONTEXT_LENGTH = 64
#: The SigLIP paper's initialisation: temperature 1/10, bias -10 (few positives per row).
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def build_siglip_style_tokenizer(
    texts: list[str] | None = None, *, context_length: int = SIGLIP_CONTEXT_LENGTH
):
    """The small CLIP BPE (``build_small_clip_tokenizer``) as a plain fast tokenizer with
    SigLIP's conventions: ``text </s>``-style (end token appended, no start token), padded
    with the end token, ``input_ids`` only. Saves as ``tokenizer.json`` and loads with
    ``AutoTokenizer`` / ``AutoProcessor`` under transformers 4.x and 5.x (its
    ``tokenizer_class`` is :data:`PORTABLE_TOKENIZER_CLASS`)."""
    from tokenizers import processors

    clip = build_small_clip_tokenizer(texts, context_length=context_length)
    backend = copy.deepcopy(clip.backend_tokenizer)
    eos_id = clip.get_vocab()[CLIP_EOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {CLIP_EOS}", special_tokens=[(CLIP_EOS, eos_id)]
    )
    return _portable_fast_tokenizer_class()(
        tokenizer_object=backend,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=context_length,
        model_input_names=["input_ids"],
    )


#: The ``tokenizer_class`` a generic fast tokenizer is saved under so that every transformers
#: version loads it: 4.x knows ``PreTrainedTokenizerFast``, 5.x keeps it as an alias of its
#: ``TokenizersBackend`` (the name 5.x itself writes, which 4.x cannot load).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


@functools.cache
def _portable_fast_tokenizer_class() -> type:
    """transformers' generic fast tokenizer, saved with ``tokenizer_class``
    :data:`PORTABLE_TOKENIZER_CLASS` (``save_pretrained`` writes the class's ``__name__``)."""
    from transformers import PreTrainedTokenizerFast

    class PortableFastTokenizer(PreTrainedTokenizerFast):
        pass

    PortableFastTokenizer.__name__ = PORTABLE_TOKENIZER_CLASS
    # pickle (DataLoader workers) finds it as this module's attribute (see __getattr__)
    PortableFastTokenizer.__qualname__ = "_PortableFastTokenizer"
    PortableFastTokenizer.__module__ = __name__
    return PortableFastTokenizer


def __getattr__(name: str) -> Any:
    if name == "_PortableFastTokenizer":
        return _portable_fast_tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _siglip_init(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
        model.logit_bias.fill_(SIGLIP_INIT_LOGIT_BIAS)


def build_tiny_hf_siglip(
    image_size: int = 32,
    seed: int = 0,
    texts: list[str] | None = None,
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    patch_size: int = 4,
) -> HFDualEncoder:
    """A randomly initialised transformers ``SiglipModel`` + ``SiglipProcessor`` (the embedding
    size is ``width``: SigLIP's image embedding is the vision tower's width)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = build_siglip_style_tokenizer(texts)
    eos = tokenizer.eos_token_id
    tower = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=SIGLIP_CONTEXT_LENGTH,
            projection_size=width,
            pad_token_id=eos,
            bos_token_id=eos,
            eos_token_id=eos,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    _siglip_init(model)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return HFDualEncoder(model, processor, context_length=SIGLIP_CONTEXT_LENGTH)


def tiny_open_clip_siglip_config(
    image_size: int = 32, embed_dim: int = 64, **cfg_kwargs: Any
) -> dict[str, Any]:
    """open_clip ``model_cfg`` of a tiny SigLIP: the tiny ViT and text tower with the text
    settings of open_clip's ``ViT-B-16-SigLIP`` (no causal mask, last-token pooling, a
    projection bias) and ``init_logit_bias``; open_clip builds it as ``CustomTextCLIP``."""
    cfg = tiny_open_clip_config(
        image_size, embed_dim, context_length=SIGLIP_CONTEXT_LENGTH, **cfg_kwargs
    )
    cfg["custom_text"] = True
    cfg["init_logit_bias"] = SIGLIP_INIT_LOGIT_BIAS
    cfg["text_cfg"].update(
        no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6}
    )
    return cfg


def build_tiny_open_clip_siglip(
    image_size: int = 32, embed_dim: int = 64, seed: int = 0, **cfg_kwargs: Any
) -> OpenClipDualEncoder:
    """A randomly initialised open_clip SigLIP (``CustomTextCLIP`` with a logit bias)."""
    import open_clip as oc
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model_cfg = tiny_open_clip_siglip_config(image_size, embed_dim, **cfg_kwargs)
    arch = {k: v for k, v in copy.deepcopy(model_cfg).items() if k != "custom_text"}
    torch.manual_seed(seed)
    model = oc.CustomTextCLIP(**arch, output_dict=True)
    _siglip_init(model)
    oc.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size)))
    pp = PreprocessCfg(**oc.get_model_preprocess_cfg(model))
    return OpenClipDualEncoder(
        model,
        image_transform_v2(pp, is_train=True),
        image_transform_v2(pp, is_train=False),
        oc.SimpleTokenizer(context_length=SIGLIP_CONTEXT_LENGTH),
        model_cfg,
    )
