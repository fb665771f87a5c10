"""Model adapters: one small interface over Hugging Face CLIP-family models and open_clip models.

The Trainer only talks to a :class:`DualEncoderAdapter`:

* ``adapter(model, batch)`` runs the (possibly DDP/accelerate-wrapped) model's forward once and returns
  L2-normalised image/text embeddings plus the exponentiated logit scale (and bias, for SigLIP-style models);
* ``encode_images`` / ``encode_texts`` give normalised embeddings for evaluation;
* ``image_transform`` / ``tokenize`` turn raw images and captions into batch tensors;
* ``save`` writes a folder in the family's native layout (``save_pretrained`` for Hugging Face,
  ``open_clip_config.json`` + weights for open_clip) so the trained model loads with the family's
  own tools.

:func:`load_dual_encoder` picks the family from a name or folder; :func:`build_tiny_hf_clip` and
:func:`build_tiny_open_clip` build small randomly initialised models fully offline (tests, CPU demo).
"""

from __future__ import annotations

import copy
import functools
import gzip
import inspect
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "DualEncoderOutput",
    "DualEncoderAdapter",
    "HFDualEncoder",
    "OpenClipDualEncoder",
    "load_dual_encoder",
    "infer_family",
    "build_tiny_hf_clip",
    "build_tiny_open_clip",
    "OPEN_CLIP_CONFIG_NAME",
    "OPEN_CLIP_SAFE_WEIGHTS_NAME",
    "OPEN_CLIP_WEIGHTS_NAME",
]

# File names of open_clip's Hugging Face Hub layout (open_clip.constants).
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_pytorch_model.bin"

_FAMILY_ALIASES = {
    "hf": "hf",
    "huggingface": "hf",
    "transformers": "hf",
    "open_clip": "open_clip",
    "openclip": "open_clip",
    "open-clip": "open_clip",
}


@dataclass
class DualEncoderOutput:
    """What one training forward gives the loss."""

    image_embeds: Tensor  # (B, D), L2-normalised
    text_embeds: Tensor  # (B, D), L2-normalised
    logit_scale: Tensor  # 0-d, exponentiated (= 1 / temperature), carries gradient
    logit_bias: Tensor | None = None  # 0-d or None


def _open_clip():
    import open_clip

    return open_clip


def _as_scalar(t: Tensor) -> Tensor:
    return t.reshape(())


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

    @abstractmethod
    def logit_scale_parameter(self) -> nn.Parameter:
        """The raw (log-space) temperature parameter."""

    @abstractmethod
    def logit_bias_parameter(self) -> nn.Parameter | None:
        """The logit bias parameter of SigLIP-style models, else None."""

    @abstractmethod
    def save(self, output_dir: str | Path) -> None:
        """Write the model (and its processor/tokenizer/config) in the family's native layout."""

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{type(self).__name__}(family={self.family!r}, model={type(self.model).__name__}, params={n:,})"


# =================================================================================================
# Hugging Face CLIP family
# =================================================================================================


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


class _ToRGB:
    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB") if image.mode != "RGB" else image


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
        _ToRGB(),
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
    SigLIP (``logit_bias``), ...

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
        """``AutoModel`` + ``AutoProcessor`` (falls back to ``AutoTokenizer`` + ``AutoImageProcessor``).

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
        scale = _as_scalar(inner.logit_scale.exp())
        bias = getattr(inner, "logit_bias", None)
        bias = _as_scalar(bias) if isinstance(bias, Tensor) else None
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

    def logit_scale_parameter(self) -> nn.Parameter:
        return self.model.logit_scale

    def logit_bias_parameter(self) -> nn.Parameter | None:
        bias = getattr(self.model, "logit_bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def save(self, output_dir: str | Path) -> None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(output_dir)
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(output_dir)
        else:  # processor assembled from separate parts
            self.image_processor.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)


# =================================================================================================
# open_clip
# =================================================================================================


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return obj


def _state_dict_for_saving(model: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous tensors; tensors sharing storage are cloned (safetensors refuses them)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if key in seen:
            v = v.clone()
        else:
            seen.add(key)
        out[k] = v
    return out


class OpenClipDualEncoder(DualEncoderAdapter):
    """open_clip models (``CLIP``, ``CustomTextCLIP``, ``CoCa``; SigLIP ones have a logit bias).

    ``model_cfg`` is the architecture dict (the ``model_cfg`` of ``open_clip_config.json``); it is
    needed by :meth:`save`.
    """

    family = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        preprocess_train: Callable,
        preprocess_val: Callable,
        tokenizer: Callable,
        model_cfg: Mapping[str, Any] | None,
        *,
        model_name: str | None = None,
    ):
        if not isinstance(getattr(model, "logit_scale", None), nn.Parameter):
            raise ValueError(f"{type(model).__name__} has no `logit_scale` parameter")
        self.model = model
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val
        self.tokenizer = tokenizer
        self.model_cfg = copy.deepcopy(dict(model_cfg)) if model_cfg is not None else None
        self.model_name = model_name
        if hasattr(model, "output_dict"):
            model.output_dict = True

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or self.model.context_length)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, **kwargs: Any
    ) -> OpenClipDualEncoder:
        """``open_clip.create_model_and_transforms(model_name, pretrained, **kwargs)``.

        ``model_name``: an architecture (``"ViT-B-32"``, with ``pretrained`` a tag or a checkpoint
        file), ``"hf-hub:org/name"``, ``"local-dir:/path"`` or a folder holding
        ``open_clip_config.json``.
        """
        oc = _open_clip()
        if os.path.isdir(model_name) and (Path(model_name) / OPEN_CLIP_CONFIG_NAME).is_file():
            model_name = f"local-dir:{model_name}"
        model, preprocess_train, preprocess_val = oc.create_model_and_transforms(
            model_name, pretrained=pretrained, output_dict=True, **kwargs
        )
        tok_kwargs = {}
        if kwargs.get("force_context_length"):
            tok_kwargs["context_length"] = kwargs["force_context_length"]
        if kwargs.get("cache_dir"):
            tok_kwargs["cache_dir"] = kwargs["cache_dir"]
        tokenizer = oc.get_tokenizer(model_name, **tok_kwargs)
        model_cfg = cls._resolve_model_cfg(model_name, kwargs)
        return cls(
            model, preprocess_train, preprocess_val, tokenizer, model_cfg, model_name=model_name
        )

    @staticmethod
    def _resolve_model_cfg(model_name: str, kwargs: Mapping[str, Any]) -> dict | None:
        """The architecture dict as built, i.e. the named config plus ``force_*``/model overrides."""
        oc = _open_clip()
        schema = model_name.split(":", 1)[0] if ":" in model_name else None
        lookup = model_name if schema in ("hf-hub", "local-dir") else model_name.replace("/", "-")
        try:
            cfg = oc.get_model_config(lookup)
        except Exception:  # e.g. hub config unreachable: save() will say model_cfg is missing
            cfg = None
        if cfg is None:
            return None
        cfg = copy.deepcopy(cfg)
        if kwargs.get("force_quick_gelu"):
            cfg["quick_gelu"] = True
        if kwargs.get("force_custom_text"):
            cfg["custom_text"] = True
        if kwargs.get("force_patch_dropout") is not None:
            cfg["vision_cfg"]["patch_dropout"] = kwargs["force_patch_dropout"]
        if kwargs.get("force_image_size") is not None:
            cfg["vision_cfg"]["image_size"] = kwargs["force_image_size"]
        if kwargs.get("force_context_length") is not None:
            cfg["text_cfg"]["context_length"] = kwargs["force_context_length"]
        known = set(inspect.signature(oc.create_model_and_transforms).parameters)
        known |= set(inspect.signature(oc.create_model).parameters)
        for k, v in kwargs.items():
            if k not in known:  # forwarded to the model class: part of the architecture
                cfg[k] = v
        return cfg

    # -- interface -------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> DualEncoderOutput:
        out = model(image=batch["pixel_values"], text=batch["input_ids"])
        if isinstance(out, Mapping):
            image, text = out["image_features"], out["text_features"]
            scale, bias = out["logit_scale"], out.get("logit_bias")
        else:
            image, text, scale = out[0], out[1], out[2]
            bias = out[3] if len(out) > 3 else None
        return DualEncoderOutput(
            image_embeds=F.normalize(image, dim=-1),
            text_embeds=F.normalize(text, dim=-1),
            logit_scale=_as_scalar(scale),
            logit_bias=_as_scalar(bias) if isinstance(bias, Tensor) else None,
        )

    def encode_images(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        inner = self.unwrap(model)
        device, dtype = self._module_device_dtype(inner)
        feats = inner.encode_image(pixel_values.to(device=device, dtype=dtype), normalize=True)
        return F.normalize(feats, dim=-1)

    def encode_texts(self, model: nn.Module, texts: Sequence[str]) -> Tensor:
        inner = self.unwrap(model)
        device, _ = self._module_device_dtype(inner)
        ids = self.tokenize(texts)["input_ids"].to(device)
        return F.normalize(inner.encode_text(ids, normalize=True), dim=-1)

    def image_transform(self, train: bool) -> Callable[[Image.Image], Tensor]:
        return self.preprocess_train if train else self.preprocess_val

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        ids = self.tokenizer(list(texts))
        if isinstance(ids, Mapping):  # defensive: some tokenizers return a dict
            ids = ids["input_ids"]
        return {"input_ids": torch.as_tensor(ids, dtype=torch.long)}

    def logit_scale_parameter(self) -> nn.Parameter:
        return self.model.logit_scale

    def logit_bias_parameter(self) -> nn.Parameter | None:
        bias = getattr(self.model, "logit_bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def open_clip_config(self) -> dict[str, Any]:
        """The content of ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``)."""
        if self.model_cfg is None:
            raise ValueError(
                "this open_clip adapter has no model_cfg (architecture dict); pass model_cfg= "
                "when constructing it so that save() can write open_clip_config.json"
            )
        oc = _open_clip()
        pp = dict(oc.get_model_preprocess_cfg(self.model))
        return {"model_cfg": _jsonable(self.model_cfg), "preprocess_cfg": _jsonable(pp)}

    def save(self, output_dir: str | Path, *, safe_serialization: bool | str = "both") -> None:
        """open_clip's Hub layout: ``open_clip_config.json`` + ``open_clip_model.safetensors``
        and/or ``open_clip_pytorch_model.bin`` (+ tokenizer files for HF-tokenizer models).

        Loads back with ``open_clip.create_model_and_transforms("local-dir:<dir>")`` or, once the
        folder is uploaded to the Hub, ``"hf-hub:org/name"``.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config = self.open_clip_config()
        tensors = _state_dict_for_saving(self.model)
        if safe_serialization is True or safe_serialization == "both":
            from safetensors.torch import save_file

            save_file(
                tensors, str(output_dir / OPEN_CLIP_SAFE_WEIGHTS_NAME), metadata={"format": "pt"}
            )
        if safe_serialization is False or safe_serialization == "both":
            torch.save(tensors, output_dir / OPEN_CLIP_WEIGHTS_NAME)
        if hasattr(self.tokenizer, "save_pretrained"):  # open_clip HFTokenizer
            self.tokenizer.save_pretrained(str(output_dir))
        with open(output_dir / OPEN_CLIP_CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


# =================================================================================================
# Loading by name
# =================================================================================================


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or name in (".", "..")
    )


def infer_family(model_name_or_path: str) -> str:
    """``"open_clip"`` or ``"hf"`` for a name/folder, without loading anything.

    open_clip: ``hf-hub:``/``local-dir:`` names, ``open_clip.list_models()`` architectures and
    folders with ``open_clip_config.json``. HF: folders with ``config.json`` and anything else that
    could be a Hub id. Raises ``FileNotFoundError``/``ValueError`` for unusable paths.
    """
    name = str(model_name_or_path)
    if name.startswith(("hf-hub:", "local-dir:")):
        return "open_clip"
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG_NAME).is_file():
            return "open_clip"
        if (path / "config.json").is_file():
            return "hf"
        raise ValueError(
            f"folder {name!r} has neither {OPEN_CLIP_CONFIG_NAME} (open_clip) nor config.json "
            "(Hugging Face transformers); cannot load a dual encoder from it"
        )
    if path.is_file():
        raise ValueError(
            f"{name!r} is a file; pass an open_clip architecture name with pretrained={name!r}, "
            "or a folder"
        )
    oc = _open_clip()
    known = set(oc.list_models())
    if name in known or name.replace("/", "-") in known:
        return "open_clip"
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"{name!r} looks like a local path but does not exist (tried: folder with "
            f"{OPEN_CLIP_CONFIG_NAME} or config.json)"
        )
    return "hf"


def load_dual_encoder(
    model_name_or_path: str | Path,
    *,
    family: str = "auto",
    pretrained: str | None = None,
    **kwargs: Any,
) -> DualEncoderAdapter:
    """Load a CLIP-style model as a :class:`DualEncoderAdapter`.

    ``family="auto"``: open_clip for ``hf-hub:``/``local-dir:`` names, open_clip architecture
    names (``open_clip.list_models()``, with ``pretrained`` = tag or checkpoint file) and folders
    with ``open_clip_config.json``; Hugging Face ``AutoModel``/``AutoProcessor`` for folders with
    ``config.json`` and Hub ids. ``kwargs`` go to the family's loader.
    """
    name = str(model_name_or_path)
    fam = _FAMILY_ALIASES.get(family.lower()) if family != "auto" else infer_family(name)
    if fam is None:
        raise ValueError(f"unknown family {family!r}; use 'auto', 'hf' or 'open_clip'")
    if fam == "open_clip":
        return OpenClipDualEncoder.from_pretrained(name, pretrained=pretrained, **kwargs)
    if pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r} only applies to open_clip architectures; {name!r} resolved "
            "to the Hugging Face family (put the weights' Hub id or folder in model_name_or_path)"
        )
    try:
        return HFDualEncoder.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        if family != "auto":
            raise
        raise OSError(
            f"could not load {name!r} as a dual encoder. Tried: open_clip (not an hf-hub:/local-dir: "
            f"name, not one of the {len(_open_clip().list_models())} open_clip.list_models() "
            f"architectures, not a folder with {OPEN_CLIP_CONFIG_NAME}); Hugging Face transformers "
            f"(AutoModel/AutoProcessor.from_pretrained failed: {type(e).__name__}: {e})"
        ) from e


# =================================================================================================
# Tiny offline models
# =================================================================================================

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _clip_bpe_merges() -> tuple[tuple[str, str], ...]:
    """All CLIP BPE merges, in rank order, from the vocabulary file open_clip ships."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the version header, keep 49152 - 256 - 2 merges.
    lines = lines[1 : 49152 - 256 - 2 + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary for (a subset of) its merges: bytes, bytes + '</w>', merges, specials."""
    from open_clip.tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


def _bpe_ranks_used(word: str, ranks: Mapping[tuple[str, str], int]) -> set[int]:
    """Ranks of the merges that byte-level BPE applies to one pre-tokenised word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used: set[int] = set()
    while len(parts) > 1:
        best = min(
            (
                (ranks.get(pair, math.inf), i)
                for i, pair in enumerate(zip(parts, parts[1:], strict=False))
            ),
        )
        if best[0] == math.inf:
            break
        used.add(int(best[0]))
        a, b = parts[best[1]], parts[best[1] + 1]
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def _make_clip_tokenizer(merges: Sequence[tuple[str, str]], context_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=_clip_vocab(merges),
        merges=[tuple(m) for m in merges],
        model_max_length=context_length,
    )


def build_small_clip_tokenizer(
    texts: Iterable[str] | None = None, *, num_merges: int = 1000, context_length: int = 32
):
    """A real CLIP byte-level BPE tokenizer (``transformers.CLIPTokenizer``) with a small vocabulary.

    Keeps the ``num_merges`` most frequent CLIP merges plus every merge CLIP applies to ``texts``,
    in CLIP's rank order, so ``texts`` tokenise exactly as with the full CLIP tokenizer while any
    other text still tokenises (into smaller pieces, down to bytes). Built offline from the
    ``bpe_simple_vocab_16e6.txt.gz`` file in the open_clip package.
    """
    all_merges = _clip_bpe_merges()
    keep = set(range(min(num_merges, len(all_merges))))
    texts = [t for t in (texts or []) if t]
    if texts:
        ranks = {m: i for i, m in enumerate(all_merges)}
        base = _make_clip_tokenizer([], context_length).backend_tokenizer
        for text in texts:
            normalized = base.normalizer.normalize_str(text)
            for word, _ in base.pre_tokenizer.pre_tokenize_str(normalized):
                if word:
                    keep |= _bpe_ranks_used(word, ranks)
    merges = [all_merges[i] for i in sorted(keep)]
    return _make_clip_tokenizer(merges, context_length)


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
    bos, eos = vocab[_CLIP_BOS], vocab[_CLIP_EOS]
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
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
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
    """An open_clip ``model_cfg`` for a tiny ViT + text transformer (open_clip's 49408-token BPE)."""
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
    oc = _open_clip()
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
