"""`datasets` image-caption data: column checks, the dataset index, and the collator."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .bad_samples import DATASETS_BAD_SAMPLE_KINDS, BadSampleCounter
from .errors import DataError
from .images import to_rgb
from .index_space import check_index_space
from .randomness import SampleRandomness, SharedInt, sample_seed

__all__ = ["ImageTextCollator", "prepare_image_text_dataset", "usable_captions"]

logger = logging.getLogger(__name__)


def usable_captions(value: Any) -> list[str]:
    """The non-empty captions of a caption cell: a string, or a list of which any may be
    missing (None), empty or blank. ``[]`` means the row has no caption to train on."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


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
    Raises ``ValueError`` with what to fix for missing columns, an empty dataset, missing
    values in ``extra_columns`` (e.g. a label column), duplicate indices, indices outside
    [0, N), an N smaller than the data, and an N inferred from the indices whose per-sample
    state cannot fit in memory (:func:`~glofnd_hf.data.index_space.check_index_space`).
    """
    columns = list(dataset.column_names)
    for role, column in [
        ("image", image_column),
        ("caption", caption_column),
        *[("extra", c) for c in extra_columns],
    ]:
        if column not in columns:
            raise ValueError(
                f"{what} has no {role} column {column!r}; its columns are {columns}. "
                f"Set --{role}_column to the right name."
                if role != "extra"
                else f"{what} has no column {column!r}; its columns are {columns}."
            )
    if len(dataset) == 0:
        raise DataError(f"{what} is empty (0 rows): choose a split or data set with rows")
    for column in extra_columns:
        _check_no_missing_values(dataset, column, index_column, what)
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
            raise ValueError(
                f"index column {index_column!r} holds negative values ({values.min()})"
            )
        uniques, counts = np.unique(values, return_counts=True)
        if len(uniques) != len(values):
            dup = uniques[counts > 1][:5].tolist()
            raise ValueError(
                f"index column {index_column!r} of the {what} holds duplicates, e.g. {dup}: "
                f"every pair needs its own dataset index"
            )
        largest = int(values.max())
        if num_samples is None:
            row = int(values.argmax())
            check_index_space(
                largest + 1,
                f"index column {index_column!r} of the {what} holds dataset index {largest} "
                f"(row {row} of {len(values)})",
            )
    if num_samples is None:
        num_samples = largest + 1
    elif largest >= num_samples:
        raise ValueError(
            f"num_samples={num_samples} is too small for the {what}: it holds "
            f"{len(dataset)} pairs with indices up to {largest}. Set num_samples to at least "
            f"{largest + 1} (or leave it unset)."
        )
    return dataset, num_samples


def _check_no_missing_values(dataset: Any, column: str, index_column: str, what: str) -> None:
    """A column every row needs (a label column): refuse missing values (None), naming the
    first row that has one."""
    values = dataset.with_format("arrow")[column]
    if values.null_count == 0:
        return
    import pyarrow.compute as pc

    row = int(pc.index(pc.is_null(values), True).as_py())
    index = ""
    if index_column in dataset.column_names:
        index = f", dataset index {dataset.with_format(None)[row][index_column]!r}"
    raise DataError(
        f"column {column!r} of the {what} has {values.null_count} missing value(s), the first "
        f"in row {row}{index}: every row needs one (fill them in or drop those rows)"
    )


def _label_value(value: Any, column: str, index: Any) -> int:
    """A row's label as the integer class id the detectors compare."""
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = None
    if label is None or (not isinstance(value, str) and label != value):
        raise DataError(
            f"label column {column!r} must hold integer class ids; the row with dataset "
            f"index {index!r} holds {value!r}"
        )
    return label


class ImageTextCollator:
    """Turns rows of an image-caption dataset into a model batch.

    Output keys: ``pixel_values``, the tokenizer's keys (``input_ids``, maybe
    ``attention_mask``), ``dataset_index`` and, when a label column is set, ``fn_labels``.
    A caption cell may hold a list of captions; training then draws one per visit.

    Randomness (the training transform's augmentation, the caption drawn from a list) is a
    pure function of ``(seed, epoch, dataset index)`` (:mod:`~glofnd_hf.data.randomness`):
    the same in any DataLoader worker and after resuming from any step. ``set_epoch`` (the
    Trainer calls it at each epoch start) selects the epoch, also in persistent workers.

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
        self.seed = 0 if seed is None else int(seed)
        self._epoch = SharedInt(0)
        self.bad_samples = BadSampleCounter(kinds=DATASETS_BAD_SAMPLE_KINDS, logger=logger)

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Rows skipped so far by this process, by kind."""
        return self.bad_samples.as_dict()

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next rows belong to (part of every sample's random seed)."""
        self._epoch.set(int(epoch))

    def _caption(self, value: Any) -> str | None:
        options = usable_captions(value)
        if not options:
            return None
        # One of several captions: drawn from the generators seeded for this sample.
        return options[0] if isinstance(value, str) else random.choice(options)

    def _decode(
        self, row: Mapping[str, Any], randomness: SampleRandomness
    ) -> tuple[torch.Tensor, str] | str:
        randomness.seed(sample_seed(self.seed, self._epoch.get(), int(row[self.index_column])))
        caption = self._caption(row[self.caption_column])
        if caption is None:
            return "missing_caption"
        try:
            return self.image_transform(to_rgb(row[self.image_column])), caption
        except Exception:  # noqa: BLE001 - any undecodable image is skipped alike
            return "corrupt_image"

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        with SampleRandomness() as randomness:  # the caller's RNG states come back after
            decoded = [self._decode(r, randomness) for r in rows]
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        problems = [d for d in decoded if isinstance(d, str)]
        for row, problem in zip(rows, decoded, strict=True):
            if isinstance(problem, str):
                self.bad_samples.add(
                    problem,
                    f"row with dataset index {row.get(self.index_column)!r}, replaced by a copy "
                    "of a good row of its batch",
                )
        delta = self.bad_samples.take_delta()  # this batch's problems only
        if problems:
            if not good:
                raise ValueError(
                    f"no usable sample in a batch of {len(rows)}: {sorted(set(problems))}"
                )
            # Stand-ins: copies of good rows (same dataset index, so they are duplicates).
            source = [
                i if i in good else good[k % len(good)] for k, i in enumerate(range(len(rows)))
            ]
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
                [
                    _label_value(
                        rows[i][self.label_column],
                        self.label_column,
                        rows[i].get(self.index_column),
                    )
                    for i in source
                ],
                dtype=torch.long,
            )
        if problems:  # reaches the trainer also from dataloader worker processes
            batch["bad_sample_counts"] = delta
        return batch
