"""The interface the Trainer sees: :class:`DualEncoderAdapter` and its forward's output.

* ``adapter(model, batch)`` runs the (possibly DDP/accelerate-wrapped) model's forward once and
  returns L2-normalised image/text embeddings plus the exponentiated logit scale (and bias, for
  SigLIP-style models);
* ``encode_images`` / ``encode_texts`` give normalised embeddings for evaluation;
* ``image_transform`` / ``tokenize`` turn raw images and captions into batch tensors;
* ``save`` writes a folder in the family's native layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

__all__ = ["DualEncoderAdapter", "DualEncoderOutput"]


@dataclass
class DualEncoderOutput:
    """What one training forward gives the loss."""

    image_embeds: Tensor  # (B, D), L2-normalised
    text_embeds: Tensor  # (B, D), L2-normalised
    logit_scale: Tensor  # 0-d, exponentiated (= 1 / temperature), carries gradient
    logit_bias: Tensor | None = None  # 0-d or None


def _first_param(module: nn.Module) -> Tensor | None:
    return next(module.parameters(), None)


class DualEncoderAdapter(ABC):
    """Hides the model family from the Trainer. ``model`` is the trainable module."""

    model: nn.Module
    family: str

    # -- helpers ---------------------------------------------------------------------------------
    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        """Strip DDP / DataParallel / DeepSpeed / torch.compile wrappers off ``model``."""
        m = self.model if model is None else model
        for _ in range(10):
            if m is self.model:
                return m
            if hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
                m = m._orig_mod
            elif isinstance(getattr(m, "module", None), nn.Module):
                m = m.module
            else:
                break
        return m

    @property
    def device(self) -> torch.device:
        p = _first_param(self.model)
        return p.device if p is not None else torch.device("cpu")

    @staticmethod
    def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
        p = _first_param(module)
        if p is None:
            return torch.device("cpu"), torch.float32
        return p.device, p.dtype

    # -- interface -------------------------------------------------------------------------------
    @abstractmethod
    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> DualEncoderOutput:
        """Run ``model`` (``self.model`` or a wrapper of it) once on a batch."""

    @abstractmethod
    def encode_images(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """Normalised image embeddings (caller decides on ``torch.no_grad``)."""

    @abstractmethod
    def encode_texts(self, model: nn.Module, texts: Sequence[str]) -> Tensor:
        """Tokenise and return normalised text embeddings (caller decides on ``torch.no_grad``)."""

    @abstractmethod
    def image_transform(self, train: bool) -> Callable[[Image.Image], Tensor]:
        """PIL image -> (3, H, W) float tensor, with light augmentation when ``train``."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Fixed-length token tensors: ``input_ids`` (and ``attention_mask`` for HF)."""

    def logit_scale_parameter(self) -> nn.Parameter:
        """The raw (log-space) temperature parameter: ``logit_scale`` in both families."""
        return self.model.logit_scale

    def logit_bias_parameter(self) -> nn.Parameter | None:
        """The logit bias parameter of SigLIP-style models (``logit_bias``), else None."""
        bias = getattr(self.model, "logit_bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    @abstractmethod
    def save(self, output_dir: str | Path) -> None:
        """Write the model (and its processor/tokenizer/config) in the family's native layout."""

    def source_name(self) -> str | None:
        """The name or folder the model was loaded from, where it knows it."""
        return None

    def embedding_width(self) -> int | None:
        """The width of the embeddings the loss compares, read from the model's configuration
        (None where it does not say): sizes per-sample state that stores embeddings before
        the first step."""
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def architecture_description(self) -> str:
        """The model in one Markdown line (for model cards): class, variant, size."""
        return f"`{type(self.model).__name__}`, {self._size_description()}"

    def _size_description(self) -> str:
        params = self.num_parameters()
        return f"{params / 1e6:.1f}M parameters" if params >= 1e5 else f"{params:,} parameters"

    def __repr__(self) -> str:
        n = self.num_parameters()
        return (
            f"{type(self).__name__}(family={self.family!r}, "
            f"model={type(self.model).__name__}, params={n:,})"
        )
