"""Evaluation data: a ``datasets`` dataset, WebDataset shards or the embedded digits, with the
split picked and the columns, class names and templates that describe it.

Shards are read with the same image and caption members as training
(:mod:`glofnd_hf.data.webdataset_io`); samples whose ``.json`` share an image id are one image
with several captions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ..data.digits import DIGITS_DATASET, DIGITS_EVAL_SPLIT, digits_classification_defaults
from ..data.loading import MissingSplitError, load_image_text_dataset
from ..data.webdataset_io import (
    CAPTION_KEYS,
    IMAGE_KEYS,
    expand_shards,
    find_image,
    is_local,
    iter_tar_samples,
    local_path,
    read_caption,
    read_dataset_index,
    read_metadata,
)
from .errors import EvalInputError

__all__ = ["DEFAULT_SPLITS", "load_eval_data", "load_shards_for_eval", "pick_split"]

#: Splits evaluated when none is named, in order of preference.
DEFAULT_SPLITS = ("test", "validation")


def _list_of_strings_feature():
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return list_type(datasets.Value("string"))


def load_shards_for_eval(
    shards: str | Sequence[str],
    *,
    image_id_field: str | None = "image_id",
    label_field: str | None = None,
    caption_keys: Sequence[str] = CAPTION_KEYS,
    index_source: str | None = None,
):
    """Read WebDataset shards into an in-memory ``datasets.Dataset`` for evaluation.

    Columns: ``image`` (the encoded bytes, ``datasets.Image``), ``caption`` (list of str) and,
    with ``label_field``, ``label`` (read from each sample's ``.json``). Samples whose ``.json``
    holds the same ``image_id_field`` value are one image with several captions (the image of
    the first such sample is kept); samples without it are one image each. Every sample needs
    a non-empty UTF-8 caption (the first of ``caption_keys`` present, as in training) and an
    image (``jpg``/``jpeg``/``png``/``webp``).

    ``index_source`` (``"field"`` or ``"key"``, as the training loader's): every sample is one
    row with its training dataset index in a ``dataset_index`` column (no grouping by image
    id), for tools that look up per-sample training state; a sample without one is an error.
    """
    # Long: one pass checks each sample as it reads it, so that an error names it.
    import datasets

    try:
        urls = expand_shards(shards)
    except ValueError as e:
        raise EvalInputError(str(e)) from e
    missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
    if missing:
        raise EvalInputError(
            f"{len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[0]!r}"
        )
    errors: list[str] = []

    def on_error(url: str, key: str | None, exc: Exception) -> None:
        errors.append(f"shard {url!r} near key {key!r}: {type(exc).__name__}: {exc}")

    slot_of: dict[Any, int] = {}
    images: list[dict[str, Any]] = []
    captions: list[list[str]] = []
    labels: list[Any] = []
    indices: list[int] = []
    for url in urls:
        for sample in iter_tar_samples(url, on_error):
            where = f"sample {sample['__key__']!r} of shard {url!r}"
            caption = read_caption(sample, caption_keys)
            if caption is None:
                members = "/".join(f".{k}" for k in caption_keys)
                raise EvalInputError(
                    f"{where} has no caption (empty, not UTF-8 or missing {members})"
                )
            try:
                meta = read_metadata(sample)
            except ValueError as e:
                raise EvalInputError(f"{where} has an unreadable .json: {e}") from e
            image_id = meta.get(image_id_field) if image_id_field and not index_source else None
            if index_source is not None:
                index, reason = read_dataset_index(sample, index_source)  # type: ignore[arg-type]
                if index is None:
                    raise EvalInputError(f"{where} has no dataset index: {reason}")
            group = (
                ("id", json.dumps(image_id, sort_keys=True))
                if image_id is not None
                else ("sample", url, sample["__key__"])
            )
            if group in slot_of:
                captions[slot_of[group]].append(caption)
                continue
            image = find_image(sample)
            if image is None:
                raise EvalInputError(f"{where} has no image (looked for {', '.join(IMAGE_KEYS)})")
            if label_field is not None:
                if label_field not in meta:
                    raise EvalInputError(f"{where}: its .json has no label field {label_field!r}")
                labels.append(meta[label_field])
            if index_source is not None:
                indices.append(index)
            slot_of[group] = len(images)
            images.append({"bytes": image, "path": None})
            captions.append([caption])
    if errors:
        raise EvalInputError("could not read the shards: " + "; ".join(errors[:3]))
    if not images:
        raise EvalInputError(f"shards {shards!r} hold no samples")
    columns: dict[str, list] = {"image": images, "caption": captions}
    features = {"image": datasets.Image(), "caption": _list_of_strings_feature()}
    if label_field is not None:
        columns["label"] = labels
        kind = "string" if all(isinstance(v, str) for v in labels) else "int64"
        features["label"] = datasets.Value(kind)
    if index_source is not None:
        columns["dataset_index"] = indices
        features["dataset_index"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def pick_split(data: Any, name: str, split: str | None) -> tuple[Any, str | None]:
    """``(dataset, split)``: ``split`` of a dataset dict, else ``test``, else ``validation``,
    else its only split; a single dataset is returned as is."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, dict)):
        return data, split
    splits = list(data)
    if split is not None:
        if split not in data:
            raise EvalInputError(f"dataset {name!r} has no split {split!r}; it has {splits}")
        return data[split], split
    for candidate in DEFAULT_SPLITS:
        if candidate in data:
            return data[candidate], candidate
    if len(splits) == 1:
        return data[splits[0]], splits[0]
    raise EvalInputError(f"dataset {name!r} has splits {splits}: choose one with --split")


def _split_name(data: Any) -> str | None:
    split = getattr(data, "split", None)
    return str(split) if split is not None else None


def load_eval_data(
    dataset: Any = None,
    *,
    shards: str | Sequence[str] | None = None,
    split: str | None = None,
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str | None = "caption",
    class_label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_id_field: str | None = "image_id",
    max_samples: int | None = None,
) -> dict[str, Any]:
    """The evaluation set and what describes it.

    Returns ``{"dataset": datasets.Dataset, "info": {...}}`` plus the effective
    ``image_column`` / ``caption_column`` / ``class_label_column`` / ``class_names`` /
    ``templates`` (``glofnd-digits`` fills in digit classification; shards use ``image`` /
    ``caption`` / ``label``). ``split`` defaults to ``test``, else ``validation``, else the only
    split (``validation`` for ``glofnd-digits``).
    """
    import datasets

    if (dataset is None) == (shards is None):
        raise EvalInputError("give exactly one of a dataset (--dataset) or shards (--shards)")
    info: dict[str, Any] = {"config": dataset_config}
    if shards is not None:
        data = load_shards_for_eval(
            shards, image_id_field=image_id_field, label_field=class_label_column
        )
        info.update(
            kind="webdataset",
            source=shards if isinstance(shards, str) else list(shards),
            split=None,
            image_id_field=image_id_field,
        )
        image_column, caption_column = "image", "caption"
        class_label_column = "label" if class_label_column else None
    elif isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "in-memory"
        data, split = pick_split(dataset, name, split)
        info.update(kind="datasets", source=name, split=split or _split_name(data))
    else:
        name = str(dataset)
        kind = "datasets"
        if name == DIGITS_DATASET:
            kind = DIGITS_DATASET
            split = split or DIGITS_EVAL_SPLIT
            class_label_column, class_names, templates = digits_classification_defaults(
                class_label_column, class_names, templates
            )
        try:
            loaded = load_image_text_dataset(name, dataset_config, split)
        except MissingSplitError as e:
            raise EvalInputError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - any loading failure is the user's input
            raise EvalInputError(
                f"cannot load dataset {name!r} (a Hub dataset id, a folder written by "
                f"save_to_disk, or {DIGITS_DATASET!r}): {type(e).__name__}: {e}"
            ) from e
        data, split = pick_split(loaded, name, split)
        info.update(kind=kind, source=name, split=split)
    if max_samples is not None:
        if max_samples < 1:
            raise EvalInputError(f"max_samples must be positive, got {max_samples}")
        data = data.select(range(min(max_samples, len(data))))
    info["max_samples"] = max_samples
    return {
        "dataset": data,
        "info": info,
        "image_column": image_column,
        "caption_column": caption_column,
        "class_label_column": class_label_column,
        "class_names": list(class_names) if class_names else None,
        "templates": list(templates) if templates else None,
    }
