"""The training data the checkpoint's state is keyed by: rows, dataset indices and labels.

Loading goes through the evaluation's loaders (:mod:`glofnd_hf.eval.data`): a ``datasets``
dataset (Hub id, ``save_to_disk`` folder, ``glofnd-digits`` or in memory; the ``train``
split by default) or WebDataset shards read with their training dataset index. The index
column is checked and added as training does (:func:`~glofnd_hf.data.hf.
prepare_image_text_dataset`), and the data must match the state's N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.hf import prepare_image_text_dataset
from ..eval.data import load_eval_data, load_shards_for_eval
from .errors import InspectionError

__all__ = ["DEFAULT_LABEL_COLUMN", "InspectionData", "choose_anchor_rows", "load_training_data"]

#: Used as ground truth when the data has it (the demo data set does).
DEFAULT_LABEL_COLUMN = "semantic_label"


@dataclass
class InspectionData:
    dataset: Any
    index: torch.Tensor
    """(R,) dataset index of each row."""
    image_column: str
    caption_column: str
    label_column: str | None
    labels: torch.Tensor | None
    """(R,) label ids (equal ids: the same meaning), when a label column is known."""
    label_values: list[Any] | None
    info: dict[str, Any]

    def row_of(self) -> dict[int, int]:
        return {int(i): r for r, i in enumerate(self.index.tolist())}


def _label_ids(values: Sequence[Any], column: str) -> torch.Tensor:
    if any(v is None for v in values):
        raise InspectionError(f"label column {column!r} has missing values")
    codes = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return torch.tensor([codes[v] for v in values], dtype=torch.long)


def load_training_data(
    num_samples: int,
    dataset: Any = None,
    *,
    shards: str | Sequence[str] | None = None,
    split: str | None = "train",
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    index_column: str = "dataset_index",
    label_column: str | None = None,
    index_source: str = "field",
) -> InspectionData:
    """The data set a checkpoint was trained on, checked against its N (``num_samples``).

    ``label_column``: ground-truth labels for precision and recall (default:
    ``semantic_label`` when the data has it; for shards a field of each sample's ``.json``).
    """
    if (dataset is None) == (shards is None):
        raise InspectionError("give exactly one of a dataset (--dataset) or shards (--shards)")
    if shards is not None:
        data = load_shards_for_eval(
            shards, image_id_field=None, label_field=label_column, index_source=index_source
        )
        info = {"kind": "webdataset", "source": shards, "split": None}
        image_column, caption_column, index_column = "image", "caption", "dataset_index"
        label_column = "label" if label_column else None
    else:
        loaded = load_eval_data(
            dataset,
            split=split,
            dataset_config=dataset_config,
            image_column=image_column,
            caption_column=caption_column,
        )
        data, info = loaded["dataset"], loaded["info"]
        if label_column is None and DEFAULT_LABEL_COLUMN in data.column_names:
            label_column = DEFAULT_LABEL_COLUMN
    info = {k: info.get(k) for k in ("kind", "source", "split", "config") if k in info}
    extra = [label_column] if label_column else []
    data, _ = prepare_image_text_dataset(
        data, image_column, caption_column, index_column, extra_columns=extra, what="data"
    )
    index = torch.as_tensor(np.asarray(data.with_format(None)[index_column]), dtype=torch.long)
    largest = int(index.max())
    if largest >= num_samples or len(data) != num_samples:
        raise InspectionError(
            f"the data has {len(data)} rows with dataset indices up to {largest}, the "
            f"checkpoint's state is for N={num_samples} samples: inspect it on the data set "
            "(and split) it was trained on"
        )
    labels = label_values = None
    if label_column:
        label_values = list(data.with_format(None)[label_column])
        labels = _label_ids(label_values, label_column)
    info.update(num_rows=len(data), index_column=index_column, label_column=label_column)
    return InspectionData(
        data, index, image_column, caption_column, label_column, labels, label_values, info
    )


def choose_anchor_rows(
    data: InspectionData,
    num_samples: int,
    indices: Sequence[int] | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Rows of the anchors: the given dataset ``indices`` (in that order), or ``sample``
    rows drawn at random with ``seed`` (in index order)."""
    if indices is not None and sample is not None:
        raise InspectionError("give either anchor indices (--indices) or a count (--sample)")
    if indices is not None:
        if not indices:
            raise InspectionError("no anchor indices given")
        bad = [i for i in indices if not 0 <= int(i) < num_samples]
        if bad:
            raise InspectionError(
                f"anchor indices {bad[:5]} are out of range: dataset indices lie in "
                f"[0, {num_samples})"
            )
        row_of = data.row_of()
        missing = [i for i in indices if int(i) not in row_of]
        if missing:
            raise InspectionError(f"no row of the data has dataset index {missing[:5]}")
        return [row_of[int(i)] for i in dict.fromkeys(indices)]
    count = 16 if sample is None else int(sample)
    rows = len(data.index)
    if not 1 <= count <= rows:
        raise InspectionError(f"--sample must lie in [1, {rows}] (the data's rows), got {count}")
    chosen = np.random.default_rng(seed).choice(rows, size=count, replace=False)
    return sorted(chosen.tolist(), key=lambda r: int(data.index[r]))
