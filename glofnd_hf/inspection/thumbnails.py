"""Small images of the samples a report lists, and their ``data:`` URIs for the HTML."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from ..data.images import to_rgb

__all__ = ["data_uri", "listed_rows", "thumbnail", "thumbnails_for"]

THUMBNAIL_SIZE = 96


def thumbnail(image: Any, size: int = THUMBNAIL_SIZE) -> Image.Image:
    """RGB copy no larger than ``size`` pixels a side (small images keep their size; the
    page scales them up without smoothing)."""
    image = to_rgb(image).copy()
    image.thumbnail((size, size))
    return image


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def listed_rows(report: dict[str, Any]) -> list[int]:
    """Rows of every anchor and every listed candidate, in order of first mention."""
    rows: dict[int, None] = {}
    for anchor in report["anchors"]:
        rows[anchor["row"]] = None
        for side in anchor["sides"].values():
            for candidate in side["detected"] + side["below"]:
                rows[candidate["row"]] = None
    return list(rows)


def thumbnails_for(report: dict[str, Any], dataset: Any, image_column: str) -> dict[int, Any]:
    """Row -> thumbnail of every sample the report lists."""
    rows = listed_rows(report)
    images = dataset.select(rows)[image_column]
    return {row: thumbnail(image) for row, image in zip(rows, images, strict=True)}
