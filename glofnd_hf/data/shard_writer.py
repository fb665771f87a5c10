"""Write WebDataset shards that carry a stable GloFND dataset index per sample.

Every written sample ``KEY`` (zero-padded running number) has

* ``KEY.<image_format>`` - the image (bytes already in that format are copied as is),
* ``KEY.txt``            - the caption (UTF-8),
* ``KEY.json``           - ``{"dataset_index": i, "key": KEY, <extra columns>}``,
* ``KEY.idx``            - ``i`` as decimal text (what the loader reads first).

Beside the shards: ``sizes.json`` (``{shard basename: sample count}``, as used by
open_clip and :mod:`glofnd_hf.data.shards` for the epoch length) and
``glofnd_index.json`` (``{"dataset_size": N, "num_samples": n, ...}`` where ``N``
is one more than the largest index; the loader takes ``N`` from it).

Console entry (``glofnd-shards``, :mod:`glofnd_hf.cli.shards`)::

    glofnd-shards from-dataset SOURCE OUT [--split train] [--image-column image] ...
    glofnd-shards from-csv     CSV OUT --image-column filepath --caption-column title
    glofnd-shards add-index    '/data/{00000..00331}.tar' OUT [--index-source key]
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import webdataset as wds
from PIL import Image

from .images import defer_image_decoding
from .webdataset_io import (
    CAPTION_KEY,
    INDEX_FIELD,
    INDEX_INFO_FILE,
    INDEX_KEY,
    META_KEY,
    SIZES_FILE,
    expand_shards,
    iter_tar_samples,
    shard_basename,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_FORMATS",
    "add_index_to_shards",
    "write_shards_from_csv",
    "write_shards_from_dataset",
]

#: Image member name (``KEY.<name>``) -> PIL format the writer encodes to.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_KEY_WIDTH = 9


class _IndexSet:
    """Duplicate detector for non-negative ints: a bitmap of max_index/8 bytes."""

    def __init__(self) -> None:
        self.bits = bytearray()
        self.max_index = -1

    def add(self, i: int) -> bool:
        byte, bit = divmod(i, 8)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
        if self.bits[byte] >> bit & 1:
            return False
        self.bits[byte] |= 1 << bit
        self.max_index = max(self.max_index, i)
        return True


def _as_index(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: index {value!r} is not an integer")
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # numpy / torch scalars
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: index {value!r} is not an integer")
    if value < 0:
        raise ValueError(f"{where}: index {value} is negative")
    return value


def _image_bytes(value: Any, image_format: str, quality: int) -> bytes:
    """Encode an image cell (PIL image, bytes, path, {"bytes"/"path"} dict, array) as bytes."""
    target = IMAGE_FORMATS[image_format]
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        image = Image.open(io.BytesIO(data))
        if image.format == target:
            image.verify()  # cheap integrity check; keep the original bytes
            return data
        image.load()
    elif isinstance(value, Image.Image):
        image = value
    elif hasattr(value, "__array__"):
        import numpy as np

        image = Image.fromarray(np.asarray(value))
    else:
        raise TypeError(f"cannot interpret image value of type {type(value).__name__}")
    if target == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    kwargs = {"quality": quality} if target in ("JPEG", "WEBP") else {}
    out = io.BytesIO()
    try:
        image.save(out, format=target, **kwargs)
    except OSError:  # mode the format cannot store (e.g. CMYK as PNG)
        out = io.BytesIO()
        image.convert("RGB").save(out, format=target, **kwargs)
    return out.getvalue()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _brace_pattern(output_dir: str, names: Sequence[str]) -> str:
    """``dir/{00000..00012}.tar`` for contiguous equal-width numeric names, else a ``::`` list."""
    paths = [os.path.join(output_dir, n) for n in names]
    if len(names) == 1:
        return paths[0]
    m = [re.fullmatch(r"([0-9]+)(\.tar(?:\.[A-Za-z0-9]+)?)", n) for n in names]
    if all(m) and len({x.group(2) for x in m}) == 1 and len({len(x.group(1)) for x in m}) == 1:
        nums = [int(x.group(1)) for x in m]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            first, last = m[0].group(1), m[-1].group(1)
            return os.path.join(output_dir, "{" + first + ".." + last + "}" + m[0].group(2))
    return "::".join(paths)


class _StagedOutput:
    """Shards and index files written into a hidden staging folder inside ``output_dir`` and
    moved into place only when everything was written: a run that fails (bad row, unreadable
    input shard, interruption) leaves ``output_dir`` as it was.

    ``output_dir`` must be empty (or not exist) unless ``overwrite``; then, on success, the
    shards (``*.tar``, ``*.tar.gz``, ``*.tgz``), ``sizes.json`` and ``glofnd_index.json``
    already there are replaced, and other files are left alone.
    """

    def __init__(self, output_dir: str, overwrite: bool) -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.created = not os.path.exists(output_dir)
        if not self.created:
            if not os.path.isdir(output_dir):
                raise NotADirectoryError(f"output folder {output_dir} is a file")
            existing = sorted(n for n in os.listdir(output_dir) if not n.startswith(_STAGING))
            if existing and not overwrite:
                shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
                raise FileExistsError(
                    f"output folder {output_dir} is not empty (it holds {shown}): choose a new "
                    "folder, or pass --overwrite (overwrite=True) to replace the shards there"
                )
        os.makedirs(output_dir, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=_STAGING, dir=output_dir)

    def __enter__(self) -> _StagedOutput:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self._commit()
        shutil.rmtree(self.path, ignore_errors=True)
        if kind is not None and self.created and not os.listdir(self.output_dir):
            os.rmdir(self.output_dir)

    def _commit(self) -> None:
        if self.overwrite:
            for name in os.listdir(self.output_dir):
                if _REPLACED_RE.fullmatch(name) and os.path.isfile(
                    os.path.join(self.output_dir, name)
                ):
                    os.remove(os.path.join(self.output_dir, name))
        for name in sorted(os.listdir(self.path)):
            os.replace(os.path.join(self.path, name), os.path.join(self.output_dir, name))
        for name in os.listdir(self.output_dir):  # left behind by runs that were killed
            path = os.path.join(self.output_dir, name)
            if name.startswith(_STAGING) and path != self.path:
                shutil.rmtree(path, ignore_errors=True)


_STAGING = ".glofnd-shards-staging-"
_REPLACED_RE = re.compile(
    rf"(.+\.(tar|tar\.gz|tgz)|{re.escape(SIZES_FILE)}|{re.escape(INDEX_INFO_FILE)})"
)


def _write_metadata(
    output_dir: str, sizes: Mapping[str, int], dataset_size: int, extra: Mapping[str, Any]
) -> None:
    with open(os.path.join(output_dir, SIZES_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(sizes), f, indent=1, sort_keys=True)
    info = {"dataset_size": dataset_size, "num_samples": sum(sizes.values()), **extra}
    with open(os.path.join(output_dir, INDEX_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)


def write_shards_from_dataset(
    dataset: Iterable[Mapping[str, Any]],
    output_dir: str,
    image_column: str = "image",
    caption_column: str = "caption",
    index_column: str | None = None,
    samples_per_shard: int = 1000,
    image_format: str = "jpg",
    extra_columns: Sequence[str] = (),
    *,
    jpeg_quality: int = 95,
    on_error: str = "raise",
    overwrite: bool = False,
) -> tuple[str, int]:
    """Write rows (a ``datasets.Dataset`` or any iterable of dicts) into tar shards.

    The dataset index is ``row[index_column]`` (non-negative, unique integers) or the
    row number.  Rows with a missing caption or an unreadable image raise, or with
    ``on_error="skip"`` are logged and skipped (their row number is not used).
    Returns ``(brace pattern of the shards, number of samples written)``.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    with _StagedOutput(output_dir, overwrite) as staged:
        sizes, written, skipped, largest = _write_rows(
            dataset,
            staged.path,
            image_column,
            caption_column,
            index_column,
            samples_per_shard,
            image_format,
            extra_columns,
            jpeg_quality,
            on_error,
        )
        _write_metadata(
            staged.path,
            sizes,
            largest + 1,
            {"index_source": "field", "index_column": index_column, "skipped_rows": skipped},
        )
    return _brace_pattern(output_dir, sorted(sizes)), written


def _write_rows(
    dataset: Iterable[Mapping[str, Any]],
    output_dir: str,
    image_column: str,
    caption_column: str,
    index_column: str | None,
    samples_per_shard: int,
    image_format: str,
    extra_columns: Sequence[str],
    jpeg_quality: int,
    on_error: str,
) -> tuple[dict[str, int], int, int, int]:
    """Shards of the rows in ``output_dir``: ``(sizes, written, skipped, largest index)``."""
    dataset = defer_image_decoding(dataset, image_column)  # copy stored bytes as is
    pattern = os.path.join(output_dir, "%05d.tar")
    writer: wds.ShardWriter | None = None
    sizes: dict[str, int] = {}
    seen = _IndexSet()
    written = skipped = 0
    try:
        for row_number, row in enumerate(dataset):
            where = f"row {row_number}"
            index = (
                row_number
                if index_column is None
                else _as_index(row[index_column], f"{where} column {index_column!r}")
            )
            try:
                caption = row[caption_column]
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError(f"missing or empty caption {caption!r}")
                image = _image_bytes(row[image_column], image_format, jpeg_quality)
            except Exception as exc:
                if on_error == "raise":
                    raise ValueError(f"{where}: {exc}") from exc
                logger.warning("skipping %s: %s: %s", where, type(exc).__name__, exc)
                skipped += 1
                continue
            if not seen.add(index):
                raise ValueError(f"{where}: duplicate dataset index {index}")
            key = f"{written:0{_KEY_WIDTH}d}"
            meta = {INDEX_FIELD: index, "key": key}
            meta.update({c: row[c] for c in extra_columns})
            sample = {
                "__key__": key,
                image_format: image,
                CAPTION_KEY: caption.encode("utf-8"),
                META_KEY: json.dumps(meta, default=_json_default).encode("utf-8"),
                INDEX_KEY: str(index).encode("ascii"),
            }
            if writer is None:
                writer = wds.ShardWriter(
                    pattern,
                    maxcount=samples_per_shard,
                    maxsize=float("inf"),
                    verbose=0,
                    encoder=False,
                )
            writer.write(sample)
            name = os.path.basename(writer.fname)
            sizes[name] = sizes.get(name, 0) + 1
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written == 0:
        raise ValueError("no samples written (empty dataset or every row skipped)")
    return sizes, written, skipped, seen.max_index


def write_shards_from_csv(
    csv_path: str,
    output_dir: str,
    image_column: str = "filepath",
    caption_column: str = "title",
    index_column: str | None = None,
    sep: str = ",",
    **kwargs: Any,
) -> tuple[str, int]:
    """Shard a CSV/TSV of (image path, caption[, index]) rows.

    Relative image paths are resolved against the CSV's folder.  Other keyword
    arguments go to :func:`write_shards_from_dataset` (``extra_columns`` name CSV
    columns, stored as strings).
    """
    base = os.path.dirname(os.path.abspath(csv_path))

    def rows():
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            missing = {image_column, caption_column} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}")
            for row in reader:
                path = row[image_column]
                if path and not os.path.isabs(path):
                    row[image_column] = os.path.join(base, path)
                yield row

    return write_shards_from_dataset(
        rows(), output_dir, image_column, caption_column, index_column, **kwargs
    )


def add_index_to_shards(
    input_pattern: str | Sequence[str],
    output_dir: str,
    start_index: int = 0,
    index_source: str = "sequential",
    *,
    overwrite: bool = False,
) -> tuple[str, int]:
    """Copy existing (e.g. img2dataset) shards to ``output_dir`` adding ``KEY.idx``.

    ``index_source="sequential"``: indices ``start_index, start_index + 1, ...`` over
    the samples of the shards sorted by path, in tar order.  ``"key"``: ``int(key)``
    of each sample key (img2dataset's ``shard_id * 10**k + row``).  Every member of
    the input is kept (an existing ``.idx`` is replaced); the output shards keep
    their basenames.  Writes ``sizes.json`` and ``glofnd_index.json``
    (``dataset_size`` = largest index + 1).  A truncated/unreadable input shard
    raises.  Returns ``(pattern of the output shards, number of samples)``.
    """
    if index_source not in ("sequential", "key"):
        raise ValueError("index_source must be 'sequential' or 'key'")
    if start_index < 0:
        raise ValueError("start_index must be >= 0")
    urls = sorted(expand_shards(input_pattern))
    names = [shard_basename(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards have duplicate basenames; they would overwrite each other")

    def fail(url: str, key: str | None, exc: Exception) -> None:
        raise ValueError(
            f"cannot read shard {url!r} (near key {key!r}): {type(exc).__name__}: {exc}; "
            "nothing was written"
        ) from exc

    seen = _IndexSet()
    sizes: dict[str, int] = {}
    next_index = start_index
    with _StagedOutput(output_dir, overwrite) as staged:
        for url, name in zip(urls, names, strict=True):
            count = 0
            target = os.path.join(staged.path, name)
            with wds.TarWriter(target, encoder=False, compress=name.endswith("gz")) as sink:
                for sample in iter_tar_samples(url, fail):
                    key = sample["__key__"]
                    if index_source == "key":
                        base = os.path.basename(key)
                        if not re.fullmatch(r"[0-9]+", base):
                            raise ValueError(f"shard {url!r}: key {key!r} is not numeric")
                        index = int(base)
                    else:
                        index = next_index
                        next_index += 1
                    if not seen.add(index):
                        raise ValueError(f"shard {url!r} key {key!r}: duplicate index {index}")
                    out = {k: v for k, v in sample.items() if not k.startswith("__")}
                    out[INDEX_KEY] = str(index).encode("ascii")
                    out["__key__"] = key
                    sink.write(out)
                    count += 1
            sizes[name] = count
        total = sum(sizes.values())
        if total == 0:
            raise ValueError(f"no samples found in {input_pattern!r}")
        _write_metadata(
            staged.path,
            sizes,
            seen.max_index + 1,
            {
                "index_source": "key" if index_source == "key" else "field",
                "start_index": start_index if index_source == "sequential" else None,
            },
        )
    return _brace_pattern(output_dir, names), total
