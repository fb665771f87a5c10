"""The one loader of image-caption datasets: the embedded digits demo, a folder written by
``save_to_disk``, or a Hugging Face Hub dataset.

Used by training (``glofnd-train``), the shard writer (``glofnd-shards from-dataset``) and
evaluation (``glofnd-eval``); each wraps the errors in its own words.
"""

from __future__ import annotations

import os
from typing import Any

from .digits import DIGITS_DATASET

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
    :class:`MissingSplitError` when a digits or folder dataset lacks ``split``.
    """
    import datasets

    if name == DIGITS_DATASET:
        from .digits import load_digits_pairs

        data = load_digits_pairs(config=config_name or "attributes")
    elif os.path.isdir(name):
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
