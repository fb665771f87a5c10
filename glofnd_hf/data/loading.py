"""The one loader of image-caption datasets: the embedded digits demo, a folder written by
``save_to_disk``, or a Hugging Face Hub dataset.

Used by training (``glofnd-train``), the shard writer (``glofnd-shards from-dataset``) and
evaluation (``glofnd-eval``); each wraps the errors in its own words.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .digits import DIGITS_DATASET
from .errors import DataError

__all__ = ["MissingSplitError", "load_image_text_dataset"]


class MissingSplitError(ValueError):
    """The dataset has no such split; ``available`` lists the splits it has."""

    def __init__(self, name: str, split: str, available: list[str]) -> None:
        super().__init__(f"dataset {name!r} has no split {split!r}; it has {available}")
        self.name, self.split, self.available = name, split, available


def load_image_text_dataset(
    name: str, config_name: str | None = None, split: str | None = None
) -> Any:
    """A ``datasets.Dataset`` (``split`` given) or what the source holds (``split=None``:
    usually a ``DatasetDict``).

    ``name`` is ``glofnd-digits`` (built in memory, nothing downloaded; ``config_name`` one of
    its ``DIGITS_CONFIGS``), a folder written by
    ``save_to_disk`` or a Hub dataset id; for a Hub dataset with a ``split`` only that split
    is requested (so split slices such as ``train[:1000]`` work too).  Raises
    :class:`MissingSplitError` when a digits or folder dataset lacks ``split``, and
    :class:`~glofnd_hf.data.errors.DataError` for a folder split with no rows (which
    ``datasets`` cannot load).
    """
    import datasets

    if name == DIGITS_DATASET:
        from .digits import load_digits_pairs

        data = load_digits_pairs(config=config_name or "attributes")
    elif os.path.isdir(name):
        if _only_split_loadable(name, split):
            return datasets.load_from_disk(os.path.join(name, split))
        data = datasets.load_from_disk(name)
    elif split is not None:
        return datasets.load_dataset(name, config_name, split=split)
    else:
        return datasets.load_dataset(name, config_name)
    if split is None or not isinstance(data, datasets.DatasetDict):
        return data
    if split not in data:
        raise MissingSplitError(name, split, list(data))
    return data[split]


def _rows_files(folder: str) -> list[Any] | None:
    """The data files a ``save_to_disk`` dataset folder lists (None when it lists none)."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            return list(json.load(f).get("_data_files") or []) or None
    except (OSError, ValueError, AttributeError):
        return []  # not a folder we can read: let datasets report it


def _only_split_loadable(name: str, split: str | None) -> bool:
    """Whether ``split`` of the folder has to be loaded alone: ``save_to_disk`` writes a
    split with no rows without a data file, and ``load_from_disk`` of the folder then fails
    with an ``IndexError`` deep inside ``datasets``. Raises :class:`DataError` naming the
    split when the one asked for (or, with ``split=None``, any) holds no rows."""
    try:
        with open(os.path.join(name, "dataset_dict.json"), encoding="utf-8") as f:
            splits = list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        splits = None
    if splits is None:
        if _rows_files(name) is None:
            raise DataError(f"dataset folder {name!r} holds no rows: give a data set with rows")
        return False
    empty = [s for s in splits if _rows_files(os.path.join(name, s)) is None]
    if not empty:
        return False
    if split in empty or split is None:
        raise DataError(
            f"split {split or empty[0]!r} of dataset folder {name!r} holds no rows: give a "
            "split with rows"
        )
    if split not in splits:
        raise MissingSplitError(name, split, splits)
    return True
