"""Tiny randomly initialised models, built offline, for demos and tests: the names that stand
for them in ``model_name_or_path`` and one builder by name (the models themselves are in
``tiny_clip`` and ``tiny_siglip``)."""

from __future__ import annotations

from .base import DualEncoderAdapter
from .tiny_clip import build_tiny_hf_clip, build_tiny_open_clip, tiny_open_clip_config
from .tiny_siglip import build_tiny_hf_siglip, build_tiny_open_clip_siglip

__all__ = [
    "TINY_HF_CLIP",
    "TINY_MODEL_NAMES",
    "TINY_OPEN_CLIP",
    "TINY_OPEN_CLIP_SIGLIP",
    "TINY_SIGLIP",
    "build_tiny_hf_clip",
    "build_tiny_model",
    "build_tiny_open_clip",
    "tiny_open_clip_config",
]

#: The names that stand for the tiny models in ``model_name_or_path`` (``glofnd-train``, recipes).
TINY_HF_CLIP = "glofnd-tiny-hf-clip"
TINY_OPEN_CLIP = "glofnd-tiny-open-clip"
#: Tiny SigLIP models (sigmoid loss: ``loss_type: sigmoid``), transformers and open_clip.
TINY_SIGLIP = "glofnd-tiny-siglip"
TINY_OPEN_CLIP_SIGLIP = "glofnd-tiny-open-clip-siglip"
TINY_MODEL_NAMES = (TINY_HF_CLIP, TINY_OPEN_CLIP, TINY_SIGLIP, TINY_OPEN_CLIP_SIGLIP)


def build_tiny_model(
    name: str, *, image_size: int = 32, seed: int = 0, texts: list[str] | None = None
) -> DualEncoderAdapter:
    """The tiny model called ``name`` (one of :data:`TINY_MODEL_NAMES`). ``texts``: captions the
    HF models' small tokenizers must cover (the open_clip ones use CLIP's full vocabulary)."""
    if name == TINY_HF_CLIP:
        return build_tiny_hf_clip(image_size=image_size, seed=seed, texts=texts)
    if name == TINY_OPEN_CLIP:
        return build_tiny_open_clip(image_size=image_size, seed=seed)
    if name == TINY_SIGLIP:
        return build_tiny_hf_siglip(image_size=image_size, seed=seed, texts=texts)
    if name == TINY_OPEN_CLIP_SIGLIP:
        return build_tiny_open_clip_siglip(image_size=image_size, seed=seed)
    raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODEL_NAMES)}")
