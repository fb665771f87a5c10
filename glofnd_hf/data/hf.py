"""`datasets` image-caption data: column checks, the dataset index, and the collator."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

DIGITS_DATASET = "glofnd-digits"


def load_image_text_dataset(name: str, config_name: str | None = None, split: str | None = None):
    """The embedded digits demo, a folder saved with ``save_to_disk``, or a Hub dataset."""
    import os

    import datasets

    if name == DIGITS_DATASET:
        from .digits import load_digits_pairs

        data = load_digits_pairs()
    elif os.path.isdir(name):
        data = datasets.load_from_disk(name)
    else:
        data = datasets.load_dataset(name, config_name)
    if split is None:
        return data
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {list(data)}")
        return data[split]
    return data


def prepare_image_text_dataset(
    dataset,
    image_column: str = "image",
    caption_column: str = "caption",
    index_column: str = "dataset_index",
    num_samples: int | None = None,
    extra_columns: Sequence[str] = (),
    what: str = "training data",
):
    """Check the columns and the dataset index; add the index as the row number if absent.

    Returns ``(dataset, num_samples)`` where ``num_samples`` is N (given, or largest index + 1).
    Raises ``ValueError`` with what to fix for missing columns, duplicate indices, indices
    outside [0, N) and an N smaller than the data.
    """
    columns = list(dataset.column_names)
    for role, column in [("image", image_column), ("caption", caption_column),
                         *[("extra", c) for c in extra_columns]]:
        if column not in columns:
            raise ValueError(
                f"{what} has no {role} column {column!r}; its columns are {columns}. "
                f"Set --{role}_column to the right name." if role != "extra" else
                f"{what} has no column {column!r}; its columns are {columns}."
            )
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty")
    if index_column not in columns:
        dataset = dataset.add_column(index_column, np.arange(len(dataset), dtype=np.int64))
        largest = len(dataset) - 1
    else:
        raw = dataset.with_format(None)[index_column]
        values = np.asarray(raw)
        if values.dtype.kind not in "iu":
            raise ValueError(
                f"index column {index_column!r} of the {what} must hold integers, got "
                f"{values.dtype} (e.g. {raw[0]!r})"
            )
        if values.min() < 0:
            raise ValueError(f"index column {index_column!r} holds negative values ({values.min()})")
        uniques, counts = np.unique(values, return_counts=True)
        if len(uniques) != len(values):
            dup = uniques[counts > 1][:5].tolist()
            raise ValueError(
                f"index column {index_column!r} of the {what} holds duplicates, e.g. {dup}: "
                f"every pair needs its own dataset index"
            )
        largest = int(values.max())
    if num_samples is None:
        num_samples = largest + 1
    elif largest >= num_samples:
        raise ValueError(
            f"num_samples={num_samples} is too small for the {what}: it holds "
            f"{len(dataset)} pairs with indices up to {largest}. Set num_samples to at least "
            f"{largest + 1} (or leave it unset)."
        )
    return dataset, num_samples


def _to_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, Mapping) and image.get("bytes") is not None:
        import io

        return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    if isinstance(image, Mapping) and image.get("path"):
        return Image.open(image["path"]).convert("RGB")
    if isinstance(image, str):
        return Image.open(image).convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(image).__name__}")


class ImageTextCollator:
    """Turns rows of an image-caption dataset into a model batch.

    Output keys: ``pixel_values``, the tokenizer's keys (``input_ids``, maybe
    ``attention_mask``), ``dataset_index`` and, when a label column is set, ``fn_labels``.
    A caption cell may hold a list of captions; training then draws one per visit.
    """

    def __init__(
        self,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], Mapping[str, torch.Tensor]],
        image_column: str = "image",
        caption_column: str = "caption",
        index_column: str = "dataset_index",
        label_column: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.image_column = image_column
        self.caption_column = caption_column
        self.index_column = index_column
        self.label_column = label_column
        self._rng = random.Random(seed)

    def _caption(self, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, Sequence) and len(value) > 0 and all(isinstance(v, str) for v in value):
            return self._rng.choice(list(value))
        raise ValueError(f"a caption must be a string or a non-empty list of strings, got {value!r}")

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([self.image_transform(_to_rgb(r[self.image_column])) for r in rows])
        batch: dict[str, torch.Tensor] = dict(
            self.tokenize([self._caption(r[self.caption_column]) for r in rows])
        )
        batch["pixel_values"] = pixels
        batch["dataset_index"] = torch.tensor([int(r[self.index_column]) for r in rows],
                                              dtype=torch.long)
        if self.label_column is not None:
            batch["fn_labels"] = torch.tensor([int(r[self.label_column]) for r in rows],
                                              dtype=torch.long)
        return batch
