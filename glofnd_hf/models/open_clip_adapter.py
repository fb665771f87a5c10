"""Adapter for open_clip models, saved in open_clip's Hub layout."""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .base import DualEncoderAdapter, DualEncoderOutput
from .families import ModelFamily, register_family

__all__ = [
    "OPEN_CLIP_CONFIG_NAME",
    "OPEN_CLIP_SAFE_WEIGHTS_NAME",
    "OPEN_CLIP_WEIGHTS_NAME",
    "OpenClipDualEncoder",
]

# File names of open_clip's Hugging Face Hub layout (open_clip.constants).
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_pytorch_model.bin"


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
        import open_clip as oc

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
        """The architecture dict as built: the named config plus ``force_*``/model overrides."""
        import open_clip as oc

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
            logit_scale=scale.reshape(()),
            logit_bias=bias.reshape(()) if isinstance(bias, Tensor) else None,
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

    def source_name(self) -> str | None:
        return self.model_name

    def embedding_width(self) -> int | None:
        width = (self.model_cfg or {}).get("embed_dim")
        return int(width) if width else None

    def architecture_description(self) -> str:
        embed = self.embedding_width()
        return (
            f"open_clip `{type(self.model).__name__}`"
            + (f" `{self.model_name}`" if self.model_name else "")
            + (f", embedding dim {embed}" if embed else "")
            + f", {self._size_description()}"
        )

    def open_clip_config(self) -> dict[str, Any]:
        """The content of ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``)."""
        if self.model_cfg is None:
            raise ValueError(
                "this open_clip adapter has no model_cfg (architecture dict); pass model_cfg= "
                "when constructing it so that save() can write open_clip_config.json"
            )
        import open_clip as oc

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


register_family(
    ModelFamily(
        name="open_clip",
        adapter=OpenClipDualEncoder,
        library_name="open_clip",
        folder_marker=OPEN_CLIP_CONFIG_NAME,
        layout="open_clip (`open_clip_config.json` + `open_clip_model.safetensors`)",
        aliases=("openclip", "open-clip"),
        hub_prefix="hf-hub:",
        tags=("open_clip",),
        release_save_kwargs={"safe_serialization": True},
        saves_beside_trainer=True,
        takes_pretrained=True,
    )
)
