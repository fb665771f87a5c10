"""Embedding the training pairs once (batched, with progress bars) and caching the result.

The embedding itself is the zero-shot evaluator's (:class:`~glofnd_hf.eval.zero_shot.
ZeroShotEvaluator`): the evaluation image transform (no augmentation) and one caption per row
(the first usable one where a row holds several; training draws one per visit). The cache
key covers the model (its folder and weight files' sizes and modification times, or its
name) and the data (``datasets``' fingerprint, the columns and the number of rows), so a
retrained model or another split is embedded afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import write_atomically
from ..data.hf import usable_captions
from ..eval.zero_shot import RETRIEVAL, ZeroShotEvaluator
from .errors import InspectionError

__all__ = ["default_cache_dir", "embed_pairs", "embedding_cache_key"]

logger = logging.getLogger(__name__)

_CAPTION = "_inspect_caption"
_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/glofnd_hf/inspect`` (``~/.cache/glofnd_hf/inspect``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glofnd_hf" / "inspect"


def _model_identity(model: Any) -> Any:
    path = Path(str(model))
    if not path.is_dir():
        return str(model)
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json")
    )
    return {"folder": str(path.resolve()), "files": files}


def embedding_cache_key(model: Any, dataset: Any, image_column: str, caption_column: str) -> str:
    """A hex digest naming the embeddings of ``dataset`` under ``model`` (a name or folder)."""
    description = {
        "format": _FORMAT,
        "model": _model_identity(model),
        "data": getattr(dataset, "_fingerprint", None),
        "rows": len(dataset),
        "columns": [image_column, caption_column],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def first_captions(dataset: Any, caption_column: str) -> list[str]:
    """One caption per row (the first usable one); rows without any are an error."""
    values = dataset.with_format(None)[caption_column]
    captions, bad = [], []
    for row, value in enumerate(values):
        usable = usable_captions(value)
        if not usable:
            bad.append(row)
        captions.append(usable[0] if usable else "")
    if bad:
        raise InspectionError(
            f"{len(bad)} row(s) have no usable caption in column {caption_column!r} "
            f"(first rows: {bad[:5]})"
        )
    return captions


def embed_pairs(
    adapter: Any,
    dataset: Any,
    image_column: str,
    caption_column: str,
    *,
    batch_size: int = 64,
    show_progress: bool = True,
    cache_file: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 CPU embeddings ``(images, texts)``, one row each per data set row;
    read from ``cache_file`` when it holds them, else computed (and written there)."""
    from safetensors.torch import load_file, save_file

    if cache_file is not None and Path(cache_file).is_file():
        try:
            cached = load_file(str(cache_file))
            if cached["images"].shape[0] == len(dataset) == cached["texts"].shape[0]:
                logger.info("embeddings read from the cache %s", cache_file)
                return cached["images"], cached["texts"]
        except Exception as err:  # noqa: BLE001 - a bad cache entry is recomputed
            logger.warning("ignoring unreadable embedding cache %s: %s", cache_file, err)
    captions = first_captions(dataset, caption_column)
    view = dataset.select_columns([image_column]).add_column(_CAPTION, captions)
    evaluator = ZeroShotEvaluator(
        view,
        image_column=image_column,
        caption_column=_CAPTION,
        tasks=[RETRIEVAL],
        batch_size=batch_size,
        show_progress=show_progress,
        distributed=False,
    )
    embeds = evaluator.embed(adapter)
    images, texts = embeds["images"].contiguous(), embeds["texts"].contiguous()
    if cache_file is not None:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tensors = {"images": images, "texts": texts}
        write_atomically(cache_file, lambda p: save_file(tensors, p))
    return images, texts
