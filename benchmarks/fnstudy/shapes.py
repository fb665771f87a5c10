"""The generated ``shapes`` data set: rendered shapes whose true false negatives are known.

It exists beside the embedded digits so that the study sees a second labelled set with more
pairs per class (6 shapes x 6 colours x 2 sizes = 72 classes, ~42 train pairs each, ~1.4 % of
the data per anchor) and nuisances the captions do not mention (position, rotation,
background grey level, colour jitter).
"""

from __future__ import annotations

import math

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 70, 225),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
SIZES = {"small": 0.22, "large": 0.4}  # radius as a fraction of the canvas side
SHAPE_CAPTIONS = (
    "a {size} {colour} {shape}.",
    "a picture of a {colour} {shape}, {size}.",
    "{size} {shape} painted {colour}.",
    "the {shape} is {colour} and {size}.",
    "an image showing a {size} {colour} {shape}.",
)
SHAPE_TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.", "an image of a {}.")


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    def rotate(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        return rotate(
            [(-r * 0.8, -r * 0.8), (r * 0.8, -r * 0.8), (r * 0.8, r * 0.8), (-r * 0.8, r * 0.8)]
        )
    if shape == "triangle":
        return rotate(
            [
                (r * math.cos(a), r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        )
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "cross":
        w = r * 0.35
        return rotate(
            [
                (-w, -r),
                (w, -r),
                (w, -w),
                (r, -w),
                (r, w),
                (w, w),
                (w, r),
                (-w, r),
                (-w, w),
                (-r, w),
                (-r, -w),
                (-w, -w),
            ]
        )
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return rotate(pts)
    raise ValueError(shape)


def _render_shape(
    shape: str, colour, size: float, rng: np.random.Generator, side: int
) -> Image.Image:
    scale = 4  # draw large, downsample: anti-aliased edges
    big = side * scale
    grey = int(rng.integers(0, 256))
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    r = size * big
    margin = r + 0.04 * big
    cx, cy = rng.uniform(margin, big - margin, size=2)
    jitter = rng.integers(-25, 26, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
    if shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    else:
        angle = float(rng.uniform(-0.3, 0.3))
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)
    return canvas.resize((side, side), Image.Resampling.LANCZOS)


def load_shapes_pairs(
    per_class: int = 50, val_per_class: int = 8, seed: int = 0, image_size: int = 32
) -> datasets.DatasetDict:
    """Shapes x colours x sizes (72 semantic classes), ``per_class`` pairs each, captioned
    from shape, colour and size only. Columns as the digits pairs: image, caption,
    semantic_label, object (shape x colour: the 36 zero-shot classes), dataset_index."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"train": [], "validation": []}
    n_col, n_size = len(COLOURS), len(SIZES)
    for s, shape in enumerate(SHAPES):
        for c, (colour, rgb) in enumerate(COLOURS.items()):
            for z, (size_name, size) in enumerate(SIZES.items()):
                label = (s * n_col + c) * n_size + z
                for i in range(per_class):
                    template = SHAPE_CAPTIONS[int(rng.integers(len(SHAPE_CAPTIONS)))]
                    row = {
                        "image": _render_shape(shape, rgb, size, rng, image_size),
                        "caption": template.format(size=size_name, colour=colour, shape=shape),
                        "semantic_label": label,
                        "object": s * n_col + c,
                    }
                    rows["validation" if i < val_per_class else "train"].append(row)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "semantic_label": datasets.Value("int64"),
            "object": datasets.Value("int64"),
            "dataset_index": datasets.Value("int64"),
        }
    )
    out = {}
    for split, items in rows.items():
        order = rng.permutation(len(items))
        cols: dict[str, list] = {k: [] for k in features}
        for new, old in enumerate(order.tolist()):
            for key, value in items[old].items():
                cols[key].append(value)
            cols["dataset_index"].append(new)
        out[split] = datasets.Dataset.from_dict(cols, features=features)
    return datasets.DatasetDict(out)


def shape_class_names() -> list[str]:
    return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
