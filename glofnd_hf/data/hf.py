"""`datasets` image-caption data: column checks, the dataset index, and the collator."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

DIGITS_DATASET = "glofnd-digits"
BAD_SAMPLE_KINDS = ("corrupt_image", "missing_caption")


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


def to_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a datasets Image cell (bytes or path), a path or an array."""
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


def defer_image_decoding(dataset, image_column: str):
    """Let the collator decode images (and survive a corrupt one) instead of ``datasets``."""
    import datasets

    feature = dataset.features.get(image_column) if dataset.features else None
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


class ImageTextCollator:
    """Turns rows of an image-caption dataset into a model batch.

    Output keys: ``pixel_values``, the tokenizer's keys (``input_ids``, maybe
    ``attention_mask``), ``dataset_index`` and, when a label column is set, ``fn_labels``.
    A caption cell may hold a list of captions; training then draws one per visit.

    A row whose image cannot be decoded or whose caption is missing is replaced by a copy of
    another good row of the same batch: the batch keeps its size (distributed gathers need
    equal batches) and the copy carries the same dataset index, which the losses treat as a
    duplicate (neither a negative nor a false negative of its twin). Such rows are counted in
    ``bad_sample_counts`` and reported by a rate-limited warning. A batch without any good
    row is an error.
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
        self.bad_sample_counts: dict[str, int] = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        self._last_warning = 0.0

    def _caption(self, value: Any) -> str | None:
        if isinstance(value, str):
            return value if value.strip() else None
        if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
            options = [v for v in value if isinstance(v, str) and v.strip()]
            return self._rng.choice(options) if options else None
        return None

    def _decode(self, row: Mapping[str, Any]) -> tuple[torch.Tensor, str] | str:
        caption = self._caption(row[self.caption_column])
        if caption is None:
            return "missing_caption"
        try:
            return self.image_transform(to_rgb(row[self.image_column])), caption
        except Exception:  # noqa: BLE001 - any undecodable image is skipped alike
            return "corrupt_image"

    def _warn(self, problems: list[str]) -> None:
        import logging
        import time

        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            logging.getLogger(__name__).warning(
                "skipped %d bad sample(s) in a batch (%s); totals so far: %s",
                len(problems), ", ".join(sorted(set(problems))), self.bad_sample_counts,
            )

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        decoded = [self._decode(r) for r in rows]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        problems = [d for d in decoded if isinstance(d, str)]
        delta = {kind: problems.count(kind) for kind in self.bad_sample_counts}
        if problems:
            for kind, count in delta.items():
                self.bad_sample_counts[kind] += count
            if not good:
                raise ValueError(
                    f"no usable sample in a batch of {len(rows)}: {sorted(set(problems))}"
                )
            self._warn(problems)
            # Stand-ins: copies of good rows (same dataset index, so they are duplicates).
            source = [i if i in good else good[k % len(good)] for k, i in enumerate(range(len(rows)))]
        else:
            source = list(range(len(rows)))
        pixels = torch.stack([decoded[i][0] for i in source])
        batch: dict[str, torch.Tensor] = dict(self.tokenize([decoded[i][1] for i in source]))
        batch["pixel_values"] = pixels
        batch["dataset_index"] = torch.tensor(
            [int(rows[i][self.index_column]) for i in source], dtype=torch.long
        )
        if self.label_column is not None:
            batch["fn_labels"] = torch.tensor(
                [int(rows[i][self.label_column]) for i in source], dtype=torch.long
            )
        if problems:  # reaches the trainer also from dataloader worker processes
            batch["bad_sample_counts"] = torch.tensor(list(delta.values()), dtype=torch.long)
        return batch
