"""Check a set of WebDataset shards before training on them (``glofnd-shards verify``).

One pass over every sample (tar members only, no image decoding) finds what training would
meet later or never notice: shards that do not exist or are unreadable or truncated, samples
without a usable dataset index or with one outside ``[0, N)``, dataset indices held by two
samples (they would share one per-sample state; training checks only what one rank reads in
an epoch), and ``sizes.json`` counts that differ from the shards.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .errors import IndexSpaceError
from .index_space import check_index_space
from .webdataset_io import (
    SIZES_FILE,
    check_local_shards_exist,
    dataset_size_from_files,
    expand_shards,
    find_image,
    iter_tar_samples,
    read_caption,
    read_dataset_index,
    read_shard_sizes,
    shard_basename,
)

__all__ = ["verify_shards"]

#: Problems listed in the report (all are counted).
MAX_LISTED = 10


def verify_shards(
    spec: str | Sequence[str],
    index_source: Literal["field", "key"] = "field",
    dataset_size: int | None = None,
    sizes_file: str | None = None,
) -> dict[str, Any]:
    """A report of the shards of ``spec``: counts, the index space and ``problems`` (one line
    each, the first :data:`MAX_LISTED`; ``num_problems`` counts them all). ``dataset_size``:
    N (default: ``glofnd_index.json``'s beside the shards, else none is checked).

    Raises :class:`~glofnd_hf.data.errors.DataError` when a local shard does not exist.
    """
    urls = expand_shards(spec)
    check_local_shards_exist(spec, urls, setting="the shard pattern")
    sizes, found = read_shard_sizes(urls, sizes_file)
    n, n_source = dataset_size, "given"
    if n is None:
        try:  # as the training loader infers it
            n, n_source = dataset_size_from_files(sizes, found, index_source)
        except ValueError:
            n, n_source = None, None
    scan = _Scan(n, index_source)
    for position, url in enumerate(urls):
        scan.read(url, position, sizes.get(url))
    problems, counts, shard_of = scan.problems, scan.counts, scan.shard_of
    indices = scan.indices
    values = np.frombuffer(indices, dtype=np.int64) if len(indices) else np.zeros(0, np.int64)
    duplicated = _duplicated(values)
    if len(duplicated):
        problems.insert(
            0, _name_duplicate(int(duplicated[0]), values, shard_of, urls, index_source)
        )
        if len(duplicated) > 1:
            problems.insert(
                1, f"{len(duplicated)} dataset indices are each held by several samples"
            )
    if n is None and len(values):
        largest = int(values.max())
        try:
            check_index_space(largest + 1, f"the largest dataset index is {largest}")
        except IndexSpaceError as err:
            problems.append(str(err))
    return {
        "shards": len(urls),
        "samples": len(values) + counts["bad_index"],
        "dataset_size": n,
        "dataset_size_source": n_source,
        "largest_index": int(values.max()) if len(values) else None,
        "duplicated_indices": len(duplicated),
        **counts,
        "num_problems": len(problems),
        "problems": problems[:MAX_LISTED],
    }


class _Scan:
    """What one pass over the shards found: per sample its index and shard, counts of bad
    samples, and the problems, each one line."""

    def __init__(self, n: int | None, index_source: Literal["field", "key"]) -> None:
        self.n, self.index_source = n, index_source
        self.problems: list[str] = []
        self.counts = dict.fromkeys(
            ("read_errors", "bad_index", "missing_image", "missing_caption"), 0
        )
        self.indices = array("q")
        self.shard_of = array("q")

    def on_error(self, url: str, key: str | None, exc: Exception) -> None:
        self.counts["read_errors"] += 1
        text = " ".join(f"{type(exc).__name__}: {exc}".split())
        self.problems.append(f"shard {url!r} is unreadable or truncated near key {key!r}: {text}")

    def read(self, url: str, position: int, expected: int | None) -> None:
        n, read = self.n, 0
        for sample in iter_tar_samples(url, self.on_error):
            read += 1
            index, reason = read_dataset_index(sample, self.index_source)
            if index is not None and (index < 0 or (n is not None and index >= n)):
                reason, index = f"dataset index {index} outside [0, {n})", None
            if index is None:
                self.counts["bad_index"] += 1
                self.problems.append(f"shard {url!r} key {sample['__key__']!r}: {reason}")
            else:
                self.indices.append(index)
                self.shard_of.append(position)
            self.counts["missing_image"] += find_image(sample) is None
            self.counts["missing_caption"] += read_caption(sample) is None
        if expected is not None and expected != read:
            self.problems.append(
                f"{SIZES_FILE} gives {expected} samples for {shard_basename(url)!r}, the shard "
                f"holds {read}"
            )


def _duplicated(values: np.ndarray) -> np.ndarray:
    """The values held more than once, in order of their second occurrence."""
    if len(values) < 2:
        return values[:0]
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    again = order[1:][sorted_values[1:] == sorted_values[:-1]]  # positions of later copies
    if not len(again):
        return values[:0]
    later = np.sort(again)
    _, first = np.unique(values[later], return_index=True)
    return values[later[np.sort(first)]]


def _name_duplicate(
    value: int, values: np.ndarray, shard_of: array, urls: Sequence[str], index_source: str
) -> str:
    """Where the first two samples holding ``value`` are (the shards are read again)."""
    positions = np.flatnonzero(values == value)[:2]
    shards = [urls[shard_of[int(p)]] for p in positions]
    places: list[str] = []
    for url in dict.fromkeys(shards):
        for sample in iter_tar_samples(url, lambda *_: None):
            index, _ = read_dataset_index(sample, index_source)  # type: ignore[arg-type]
            if index == value:
                places.append(f"shard {url!r} key {sample['__key__']!r}")
                if len(places) == 2:
                    break
        if len(places) == 2:
            break
    return f"dataset index {value} is held by {' and by '.join(places)}"
