"""Embedded demo dataset: coloured handwritten digits with captions.

The images come from scikit-learn's handwritten digits (``sklearn.datasets.load_digits``:
1797 grey 8x8 glyphs shipped inside the installed package, so nothing is downloaded).
Each glyph is upscaled smoothly and drawn onto a small RGB canvas with per-sample
attributes chosen deterministically from a seed:

* ink colour: red, green, blue
* background colour: white, black
* position: top-left, bottom-right
* scale: small, large

That gives 3 * 2 * 2 * 2 = 24 attribute tuples and 10 * 24 = 240 semantic classes
``(digit, attributes)``. Attributes are assigned in a balanced way within every digit, so
each class holds about 7.5 samples overall and about 6 in the default train split. Pairs
of the same class "mean the same thing": they are the true false negatives of
contrastive image-text training.

Every sample is captioned from its digit word ("zero" .. "nine") and its attributes with
one of several templates, picked per sample.

A second configuration, ``digit-captions`` (``load_digits_pairs(config=...)``,
``--dataset_config_name``), is the one the demo trains on: the glyph is drawn large in the
centre of the canvas, ink and background colours still vary, and the caption names only the
digit. Measured with the demo's tiny CLIP (2-layer ViT, patches of 4 pixels, 30 epochs):
with the glyph at varying corners and scales it does not learn the digit at all (zero-shot
top-1 10 %, a linear probe on its image embeddings 12 %), and captions that also name the
colours let it match them first (centred: top-1 25 %, probe 46 %); centred with digit-only
captions, top-1 76 % and probe 78 %. Every pair of the same digit then means the same:
about a tenth of each anchor's negatives are false negatives, so detection matters.

A third, ``digit-ink-captions``, draws the same images and names the ink colour beside the
digit ("a drawing of a red seven."); ``semantic_label`` is still the digit. Pairs of the same
digit are then false negatives at the granularity of the digit task whose captions differ in
a detail (as two captions of one ImageNet class do): the setting in which removing false
negatives pays in the false-negative value study (docs/fn-value.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported when building, so that importing the names stays cheap
    import datasets

__all__ = [
    "ATTRIBUTE_COMBOS",
    "DIGITS_CONFIGS",
    "BACKGROUND_COLORS",
    "CLASSIFICATION_TEMPLATES",
    "DIGITS_DATASET",
    "DIGITS_EVAL_SPLIT",
    "DIGITS_LABEL_COLUMN",
    "DIGIT_NAMES",
    "INK_COLORS",
    "POSITIONS",
    "SCALES",
    "digits_classification_defaults",
    "load_digits_pairs",
]

DIGITS_DATASET = "glofnd-digits"
"""The dataset name (``--dataset_name``, ``glofnd-eval --dataset``) of this embedded demo."""

DIGITS_LABEL_COLUMN = "digit"
"""The class label column of zero-shot digit classification."""

DIGITS_EVAL_SPLIT = "validation"
"""The split evaluated by default."""

DIGIT_NAMES: list[str] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]
"""Digit words, indexed by the digit value."""

CLASSIFICATION_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a picture of a handwritten digit {}.",
    "a drawing of the number {}.",
    "a {} written by hand.",
]
"""Prompt templates (``{}`` takes a digit word) for zero-shot digit classification."""

INK_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 170, 60),
    "blue": (40, 80, 235),
}
"""Ink colour vocabulary: name -> RGB."""

BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Background colour vocabulary: name -> RGB."""

POSITIONS: list[str] = ["top-left", "bottom-right"]
"""Placement vocabulary: the corner of the canvas the glyph is anchored to."""

SCALES: dict[str, float] = {"small": 0.45, "large": 0.65}
"""Scale vocabulary: name -> glyph side as a fraction of the canvas side."""

ATTRIBUTE_COMBOS: list[tuple[str, str, str, str]] = list(
    itertools.product(INK_COLORS, BACKGROUND_COLORS, POSITIONS, SCALES)
)
"""All ``(ink, background, position, scale)`` tuples; the index is the attribute id."""

DIGITS_CONFIGS: tuple[str, ...] = ("attributes", "digit-captions", "digit-ink-captions")
"""Configurations of the data set: ``attributes`` (the default: glyphs at two corners and
two scales, captions naming digit and attributes, 240 semantic classes), ``digit-captions``
(glyphs large and centred, captions naming the digit only, 10 semantic classes: the digits)
and ``digit-ink-captions`` (the same images, captions naming the ink colour and the digit,
10 semantic classes: the digits)."""

_CENTRED = ("centre", "full")  # the digit-captions configuration's position and scale
_CENTRED_SIDE = 0.75  # its glyph side as a fraction of the canvas side
_CENTRED_COMBOS: list[tuple[str, str, str, str]] = [
    (ink, bg, *_CENTRED) for ink, bg in itertools.product(INK_COLORS, BACKGROUND_COLORS)
]


def digits_classification_defaults(
    class_label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> tuple[str, list[str], list[str]]:
    """``(class_label_column, class_names, templates)`` for zero-shot digit classification:
    the given values, with the digits' label column, digit words and templates where unset."""
    return (
        class_label_column or DIGITS_LABEL_COLUMN,
        list(class_names or DIGIT_NAMES),
        list(templates or CLASSIFICATION_TEMPLATES),
    )


_CAPTION_TEMPLATES: list[str] = [
    "a {ink} {digit} on a {bg} background in the {pos}, {scale}.",
    "handwritten digit {digit} ({num}), {ink} ink, {bg} background, {scale}, {pos}.",
    "a {scale} {ink} handwritten {digit} in the {pos} of a {bg} image.",
    "the number {digit} written in {ink} on {bg}, {scale}, at the {pos}.",
    "{scale} {ink} digit {digit} drawn on a {bg} square, {pos} corner.",
    "a {bg} picture with a {scale} {ink} {digit} in the {pos}.",
]


_DIGIT_CAPTION_TEMPLATES: list[str] = [
    "a handwritten {digit}.",
    "the digit {digit}.",
    "a drawing of a {digit}.",
    "the number {digit}, written by hand.",
    "a {digit} on a square.",
    "a picture of the digit {digit}.",
]


def _attribute_string(combo: tuple[str, str, str, str]) -> str:
    return "|".join(combo)


def _caption(
    digit: int, combo: tuple[str, str, str, str], template: int, name_ink: bool = False
) -> str:
    ink, bg, pos, scale = combo
    if (pos, scale) == _CENTRED:
        word = f"{ink} {DIGIT_NAMES[digit]}" if name_ink else DIGIT_NAMES[digit]
        return _DIGIT_CAPTION_TEMPLATES[template].format(digit=word)
    return _CAPTION_TEMPLATES[template].format(
        digit=DIGIT_NAMES[digit],
        num=digit,
        ink=ink,
        bg=bg,
        pos=pos.replace("-", " "),
        scale=scale,
    )


def _render(glyph: np.ndarray, combo: tuple[str, str, str, str], image_size: int) -> Image.Image:
    """Draw an 8x8 glyph (values 0..16) onto an RGB canvas according to ``combo``."""
    ink, bg, pos, scale = combo
    side = max(2, round((_CENTRED_SIDE if scale == "full" else SCALES[scale]) * image_size))
    margin = max(0, round(image_size / 16))
    side = min(side, image_size - 2 * margin)
    alpha8 = np.clip(glyph * (255.0 / 16.0), 0, 255).astype(np.uint8)
    mask = Image.fromarray(alpha8, mode="L").resize((side, side), Image.Resampling.BICUBIC)
    if pos == "top-left":
        x0 = y0 = margin
    elif pos == "centre":
        x0 = y0 = (image_size - side) // 2
    else:  # bottom-right
        x0 = y0 = max(0, image_size - side - margin)
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUND_COLORS[bg])
    canvas.paste(INK_COLORS[ink], (x0, y0, x0 + side, y0 + side), mask)
    return canvas


def _stratified_split(
    labels: np.ndarray, validation_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: ``round(n * fraction)`` of each class go to validation.

    Both returned index arrays are shuffled by ``rng``.
    """
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(members) * validation_fraction))
        val.append(members[:n_val])
        train.append(members[n_val:])
    train_idx = rng.permutation(np.concatenate(train)) if train else np.empty(0, np.int64)
    val_idx = rng.permutation(np.concatenate(val)) if val else np.empty(0, np.int64)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def load_digits_pairs(
    seed: int = 0,
    validation_fraction: float = 0.2,
    image_size: int = 32,
    config: str = "attributes",
) -> datasets.DatasetDict:
    """Build the coloured-digits image-caption dataset in memory.

    Args:
        seed: Seed for the attribute assignment, caption template choice, split and
            row order. The same seed gives identical datasets.
        validation_fraction: Fraction of every ``(digit, attributes)`` class placed in
            the validation split (rounded per class), in ``[0, 1)``.
        image_size: Side length in pixels of the square RGB images (at least 8).
        config: One of ``DIGITS_CONFIGS``: ``attributes`` (below), ``digit-captions``
            (glyphs large and centred, attributes ``ink|background|centre|full``, captions
            naming the digit only, ``semantic_label`` the digit) or ``digit-ink-captions``
            (the same, captions naming the ink colour and the digit).

    Returns:
        A ``datasets.DatasetDict`` with splits ``"train"`` and ``"validation"`` and columns
        ``image`` (``datasets.Image()``, RGB), ``caption`` (str), ``digit`` (0..9),
        ``attributes`` (str, ``"ink|background|position|scale"``, e.g.
        ``"red|white|top-left|small"``), ``semantic_label`` (id of the
        ``(digit, attributes)`` class, ``digit * len(ATTRIBUTE_COMBOS) + attribute id``,
        identical across splits and seeds; the digit in the centred configurations) and
        ``dataset_index`` (int64, ``0..len-1`` within each split, in row order).
    """
    # Long: the docstring documents every column the demo and the tests rely on.
    import datasets
    from sklearn.datasets import load_digits

    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if config not in DIGITS_CONFIGS:
        raise ValueError(
            f"unknown configuration {config!r} of {DIGITS_DATASET}; choose one of "
            f"{', '.join(DIGITS_CONFIGS)}"
        )
    centred = config != "attributes"
    name_ink = config == "digit-ink-captions"
    combos = _CENTRED_COMBOS if centred else ATTRIBUTE_COMBOS

    bunch = load_digits()
    glyphs = np.asarray(bunch.images, dtype=np.float64)
    digits = np.asarray(bunch.target, dtype=np.int64)
    n = len(digits)
    n_combos = len(combos)
    rng = np.random.default_rng(seed)

    # Balanced attribute assignment within every digit: cycle through all combos in a
    # random order so each (digit, attributes) class gets about n_digit / n_combos samples.
    combo_ids = np.empty(n, dtype=np.int64)
    for d in range(len(DIGIT_NAMES)):
        members = rng.permutation(np.flatnonzero(digits == d))
        order = rng.permutation(n_combos)
        combo_ids[members] = order[np.arange(len(members)) % n_combos]
    captions = _DIGIT_CAPTION_TEMPLATES if centred else _CAPTION_TEMPLATES
    templates = rng.integers(0, len(captions), size=n)
    # Same meaning: the same digit and attributes, or (captions naming the digit only) the
    # same digit. The split stays stratified by digit and attributes.
    strata = digits * n_combos + combo_ids
    semantic = digits if centred else strata

    train_idx, val_idx = _stratified_split(strata, validation_fraction, rng)

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "digit": datasets.Value("int64"),
            "attributes": datasets.Value("string"),
            "semantic_label": datasets.Value("int64"),
            "dataset_index": datasets.Value("int64"),
        }
    )

    def build(indices: np.ndarray) -> datasets.Dataset:
        columns: dict[str, list] = {name: [] for name in features}
        for row, i in enumerate(indices.tolist()):
            combo = combos[combo_ids[i]]
            columns["image"].append(_render(glyphs[i], combo, image_size))
            columns["caption"].append(_caption(int(digits[i]), combo, int(templates[i]), name_ink))
            columns["digit"].append(int(digits[i]))
            columns["attributes"].append(_attribute_string(combo))
            columns["semantic_label"].append(int(semantic[i]))
            columns["dataset_index"].append(row)
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict({"train": build(train_idx), "validation": build(val_idx)})
