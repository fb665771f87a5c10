"""The one conversion of an image cell or encoded bytes into a PIL RGB image."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["defer_image_decoding", "to_rgb"]


def _open_loaded(source: Any) -> Image.Image:
    image = Image.open(source)
    image.load()  # decode now, so a corrupt file fails here and not inside a transform
    return image


def to_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, encoded bytes, a ``datasets`` Image cell
    (``{"bytes"}`` or ``{"path"}``), a path or an array.

    Raises on undecodable data (callers count those as corrupt images).
    """
    if isinstance(image, Mapping) and image.get("bytes") is not None:
        image = image["bytes"]
    elif isinstance(image, Mapping) and image.get("path"):
        image = image["path"]
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = _open_loaded(io.BytesIO(bytes(image)))
    elif isinstance(image, str):
        image = _open_loaded(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    raise ValueError(f"cannot read an image from a {type(image).__name__}")


def defer_image_decoding(dataset: Any, image_column: str) -> Any:
    """A ``datasets`` dataset whose image column yields the stored ``{"bytes", "path"}`` cells
    instead of decoded images; anything else unchanged.

    The collator then decodes with :func:`to_rgb` (and survives a corrupt image), and the shard
    writer copies images already in the target format without re-encoding them.
    """
    features = getattr(dataset, "features", None)
    feature = features.get(image_column) if isinstance(features, Mapping) else None
    if (
        feature is not None
        and type(feature).__name__ == "Image"  # datasets.Image, without importing datasets
        and getattr(feature, "decode", False)
        and hasattr(dataset, "cast_column")
    ):
        return dataset.cast_column(image_column, type(feature)(decode=False))
    return dataset
