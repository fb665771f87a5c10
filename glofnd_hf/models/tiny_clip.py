"""The tiny CLIPs, transformers and open_clip, randomly initialised and built offline (the
tiny SigLIPs in ``tiny_siglip`` start from the same towers)."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch

from .clip_bpe import CLIP_BOS, CLIP_EOS, build_small_clip_tokenizer
from .hf_adapter import HFDualEncoder
from .open_clip_adapter import OpenClipDualEncoder

__all__ = ["build_tiny_hf_clip", "build_tiny_open_clip", "tiny_open_clip_config"]


def build_tiny_hf_clip(
    image_size: int = 32,
    embed_dim: int = 64,
    seed: int = 0,
    texts: list[str] | None = None,
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    patch_size: int = 4,
    context_length: int = 32,
    num_merges: int = 1000,
) -> HFDualEncoder:
    """A randomly initialised ``CLIPModel`` + ``CLIPProcessor``, built offline.

    The tokenizer is CLIP's BPE cut down to ``num_merges`` merges plus those ``texts`` need
    (see :func:`build_small_clip_tokenizer`), so the vocabulary stays small (~1.5k tokens).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_small_clip_tokenizer(
        texts, num_merges=num_merges, context_length=context_length
    )
    vocab = tokenizer.get_vocab()
    bos, eos = vocab[CLIP_BOS], vocab[CLIP_EOS]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context_length,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            projection_dim=embed_dim,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=embed_dim,
        ),
        # Also in each tower's config: CLIPTextModelWithProjection / CLIPVisionModelWithProjection
        # build their projection from the sub-config alone.
        projection_dim=embed_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return HFDualEncoder(model, processor, context_length=context_length)


def tiny_open_clip_config(
    image_size: int = 32,
    embed_dim: int = 64,
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    patch_size: int = 4,
    context_length: int = 32,
) -> dict[str, Any]:
    """open_clip ``model_cfg`` of a tiny ViT + text transformer (open_clip's 49408-token BPE)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def build_tiny_open_clip(
    image_size: int = 32,
    embed_dim: int = 64,
    seed: int = 0,
    **cfg_kwargs: Any,
) -> OpenClipDualEncoder:
    """A randomly initialised open_clip ``CLIP`` from :func:`tiny_open_clip_config`, built offline
    the way ``open_clip.create_model`` builds named architectures (same transforms, tokenizer)."""
    import open_clip as oc
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model_cfg = tiny_open_clip_config(image_size, embed_dim, **cfg_kwargs)
    torch.manual_seed(seed)
    model = oc.CLIP(**copy.deepcopy(model_cfg), output_dict=True)
    pp_cfg = asdict(PreprocessCfg(size=model.visual.image_size))
    oc.set_model_preprocess_cfg(model, pp_cfg)
    pp = PreprocessCfg(**oc.get_model_preprocess_cfg(model))
    tokenizer = oc.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    return OpenClipDualEncoder(
        model,
        image_transform_v2(pp, is_train=True),
        image_transform_v2(pp, is_train=False),
        tokenizer,
        model_cfg,
    )
