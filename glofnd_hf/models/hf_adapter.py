"""Adapter for `transformers` CLIP-family dual encoders (CLIPModel, SigLIP, ...)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..data.images import to_rgb
from .base import DualEncoderAdapter, DualEncoderOutput
from .families import ModelFamily, register_family

__all__ = ["HFDualEncoder"]


def _model_output_tensor(out: Any, keys: Iterable[str]) -> Tensor:
    """Features from ``get_*_features``: a tensor in transformers 4.x, a model output in 5.x."""
    if isinstance(out, Tensor):
        return out
    for key in keys:
        value = getattr(out, key, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(key)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], Tensor):
        return out[1]
    raise TypeError(f"cannot find features in {type(out).__name__} (looked for {list(keys)})")


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, Mapping):
        value = size.get(key)
    else:
        value = getattr(size, key, None)
        if value is None:
            try:
                value = size[key]
            except (KeyError, TypeError, IndexError):
                value = None
    return None if value is None else int(value)


def _hf_output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the images the processor produces."""
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        h, w = _size_get(crop, "height"), _size_get(crop, "width")
        if h and w:
            return h, w
    size = getattr(image_processor, "size", None)
    if isinstance(size, int):
        return size, size
    h, w = _size_get(size, "height"), _size_get(size, "width")
    if h and w:
        return h, w
    s = _size_get(size, "shortest_edge")
    if s:
        return s, s
    raise ValueError(f"cannot infer the output image size of {type(image_processor).__name__}")


class _HFProcessorImageTransform:
    """Eval transform: exactly the model's image processor (picklable, for DataLoader workers)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> Tensor:
        out = self.image_processor(images=image, return_tensors="pt")
        return out["pixel_values"][0]


class _Scale:
    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.factor


def _hf_train_transform(image_processor: Any, scale: tuple[float, float]) -> Callable:
    from torchvision import transforms as T

    size = _hf_output_size(image_processor)
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample) if resample is not None else 3)
    interp = {
        0: T.InterpolationMode.NEAREST,
        2: T.InterpolationMode.BILINEAR,
        3: T.InterpolationMode.BICUBIC,
    }.get(resample, T.InterpolationMode.BICUBIC)
    steps: list[Callable] = [
        to_rgb,
        T.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True),
        T.ToTensor(),  # -> [0, 1], i.e. rescale by 1/255
    ]
    if getattr(image_processor, "do_rescale", True):
        factor = float(getattr(image_processor, "rescale_factor", 1 / 255))
        if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
            steps.append(_Scale(factor * 255))
    else:
        steps.append(_Scale(255.0))
    if getattr(image_processor, "do_normalize", True):
        mean = [float(x) for x in image_processor.image_mean]
        std = [float(x) for x in image_processor.image_std]
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


class HFDualEncoder(DualEncoderAdapter):
    """`transformers` dual encoders whose forward returns ``image_embeds``/``text_embeds`` and that
    have a ``logit_scale`` parameter: CLIPModel, VisionTextDualEncoderModel, AltCLIP, ChineseCLIP,
    SiglipModel (``logit_bias``; SigLIP and the fixed-resolution SigLIP 2 checkpoints), ...
    Variable-resolution models (``Siglip2Model``, NaFlex) need per-image patch masks that
    this adapter's image path does not produce: they are refused.

    ``processor`` must expose ``image_processor`` and ``tokenizer`` (an ``AutoProcessor`` does).
    """

    family = "hf"
    _TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        context_length: int | None = None,
        train_crop_scale: tuple[float, float] = (0.8, 1.0),
    ):
        if not isinstance(getattr(model, "logit_scale", None), nn.Parameter):
            raise ValueError(
                f"{type(model).__name__} has no `logit_scale` parameter; HFDualEncoder needs a "
                "CLIP-style dual encoder (CLIPModel, VisionTextDualEncoderModel, SiglipModel, ...)"
            )
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(f"{type(model).__name__} lacks get_image_features/get_text_features")
        if "spatial_shapes" in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"{type(model).__name__} takes variable-resolution patches (NaFlex), which "
                "glofnd-hf does not produce; use a fixed-resolution checkpoint (SigLIP 2's "
                "google/siglip2-*-patch16-224 and the like load as SiglipModel)"
            )
        self.model = model
        self.processor = processor
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.context_length = context_length or self._default_context_length()
        self.train_crop_scale = tuple(train_crop_scale)

    def _default_context_length(self) -> int:
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 100_000:
            limits.append(tok_max)
        text_cfg = getattr(self.model.config, "text_config", None)
        pos = getattr(text_cfg, "max_position_embeddings", None)
        if isinstance(pos, int) and pos > 0:
            # RoBERTa-style text towers reserve padding_idx + 1 positions
            if getattr(text_cfg, "model_type", "") in ("roberta", "xlm-roberta"):
                pos -= (getattr(text_cfg, "pad_token_id", 1) or 1) + 1
            limits.append(pos)
        return min(limits) if limits else 77

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> HFDualEncoder:
        """``AutoModel`` + ``AutoProcessor`` (else ``AutoTokenizer`` + ``AutoImageProcessor``).

        Keyword arguments go to ``AutoModel.from_pretrained`` except ``context_length`` and
        ``train_crop_scale`` (adapter settings) and ``processor_kwargs`` (for the processor).
        """
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

        adapter_kwargs = {
            k: kwargs.pop(k) for k in ("context_length", "train_crop_scale") if k in kwargs
        }
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        for k in ("cache_dir", "revision", "token", "local_files_only", "trust_remote_code"):
            if k in kwargs:
                processor_kwargs.setdefault(k, kwargs[k])
        name = str(name_or_path)
        model = AutoModel.from_pretrained(name, **kwargs)
        try:
            processor = AutoProcessor.from_pretrained(name, **processor_kwargs)
            if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
                raise TypeError(f"{type(processor).__name__} lacks image_processor/tokenizer")
        except (OSError, ValueError, TypeError, KeyError):
            from types import SimpleNamespace

            processor = SimpleNamespace(
                image_processor=AutoImageProcessor.from_pretrained(name, **processor_kwargs),
                tokenizer=AutoTokenizer.from_pretrained(name, **processor_kwargs),
            )
        return cls(model, processor, **adapter_kwargs)

    # -- interface -------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> DualEncoderOutput:
        inputs = {k: batch[k] for k in self._TEXT_KEYS if batch.get(k) is not None}
        inputs["pixel_values"] = batch["pixel_values"]
        out = model(**inputs, return_loss=False)
        image_embeds = F.normalize(_model_output_tensor(out, ("image_embeds",)), dim=-1)
        text_embeds = F.normalize(_model_output_tensor(out, ("text_embeds",)), dim=-1)
        inner = self.unwrap(model)
        scale = inner.logit_scale.exp().reshape(())
        bias = getattr(inner, "logit_bias", None)
        bias = bias.reshape(()) if isinstance(bias, Tensor) else None
        return DualEncoderOutput(image_embeds, text_embeds, scale, bias)

    def encode_images(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        inner = self.unwrap(model)
        device, dtype = self._module_device_dtype(inner)
        out = inner.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype))
        return F.normalize(_model_output_tensor(out, ("image_embeds", "pooler_output")), dim=-1)

    def encode_texts(self, model: nn.Module, texts: Sequence[str]) -> Tensor:
        inner = self.unwrap(model)
        device, _ = self._module_device_dtype(inner)
        tokens = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        out = inner.get_text_features(**tokens)
        return F.normalize(_model_output_tensor(out, ("text_embeds", "pooler_output")), dim=-1)

    def image_transform(self, train: bool) -> Callable[[Image.Image], Tensor]:
        if train:
            return _hf_train_transform(self.image_processor, self.train_crop_scale)
        return _HFProcessorImageTransform(self.image_processor)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        out = {"input_ids": enc["input_ids"]}
        if "attention_mask" in enc:
            out["attention_mask"] = enc["attention_mask"]
        return out

    def source_name(self) -> str | None:
        return getattr(self.model, "name_or_path", None) or None

    def embedding_width(self) -> int | None:
        # CLIP-like models project to projection_dim; SigLIP's text head maps to its
        # projection_size (its hidden size by default), which the vision side matches.
        config = getattr(self.model, "config", None)
        width = getattr(config, "projection_dim", None)
        if width is None:
            text = getattr(config, "text_config", None)
            width = getattr(text, "projection_size", None) or getattr(text, "hidden_size", None)
        return int(width) if width else None

    def architecture_description(self) -> str:
        kind = getattr(getattr(self.model, "config", None), "model_type", None)
        return (
            f"`{type(self.model).__name__}`"
            + (f" ({kind})" if kind else "")
            + f", {self._size_description()}"
        )

    def save(self, output_dir: str | Path) -> None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(output_dir)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(output_dir)
        else:  # processor assembled from separate parts
            self.image_processor.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)


register_family(
    ModelFamily(
        name="hf",
        adapter=HFDualEncoder,
        library_name="transformers",
        folder_marker="config.json",
        layout="Hugging Face transformers (`AutoModel` / `AutoProcessor`)",
        aliases=("huggingface", "transformers"),
        folder_priority=1,  # an open_clip folder may hold a config.json too
    )
)
