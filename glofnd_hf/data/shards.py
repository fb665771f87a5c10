"""Streaming WebDataset shard loader with a stable per-sample dataset index.

GloFND keeps per-sample state (one threshold per sample) keyed by a dataset index
in ``[0, N)``.  This module streams image-text pairs out of tar shards and attaches
that index to every sample, with partitioning, epoch length and bad-data handling
that are safe for multi-process / multi-node training.

Batches
-------
Every batch is a dict::

    pixel_values      float  B x 3 x H x W   (output of ``image_transform``)
    input_ids         long   B x L           (from ``tokenize(captions)``)
    attention_mask    long   B x L           (only if the tokenizer returns it)
    dataset_index     long   B
    bad_sample_counts long   len(BAD_SAMPLE_KINDS)   (see "Bad data" below)

:class:`ShardDataLoader` removes ``bad_sample_counts`` before handing the batch
out, so what a training loop receives has exactly the first four keys.

Shard specs
-----------
``ShardConfig.shards`` is a local path, a brace pattern
(``/data/{00000..00331}.tar``), a ``::``-joined list of those, any URL
webdataset's ``gopen`` opens (``pipe:aws s3 cp s3://b/00001.tar -``,
``file:``, ``http(s):``), or a Python list of any of these.  The expanded order
is the canonical shard order; shuffling is a permutation of it.

Partition (non-resampled mode)
------------------------------
For epoch ``e`` the canonical shard list is permuted with a RNG seeded by
``(seed, e)`` (identical on every rank), then rank ``r`` of ``R`` takes
``perm[r::R]`` and DataLoader worker ``w`` of ``W`` takes ``[w::W]`` of that,
i.e. ``perm[r + R*w :: R*W]`` - see :func:`shard_partition`.  Ranks and workers
see disjoint shards and together every shard.  ``num_shards >= R * W`` is
required (a worker with no shard would stall its rank), checked up front.

Epoch length
------------
``T = train_num_samples`` if set, else the number of samples in the selected
shards according to the sizes file(s) beside the shards (``sizes.json``
``{basename: count}`` written by :mod:`glofnd_hf.data.shard_writer`, else
img2dataset's per-shard ``NNNNN_stats.json`` ``successes``).  Every rank yields
exactly ``B = T // (R * batch_size)`` full batches per epoch (never a partial
batch), so distributed training never hangs on a rank with less data.  Worker
``w`` yields ``B // W + (1 if w < B % W else 0)`` batches (its quota); the
DataLoader's round-robin then gives batch ``i`` of an epoch from worker
``i % W``.  When shards are unevenly sized or do not divide evenly:

* samples a worker has beyond its quota are dropped for that epoch (they are
  reached in another epoch, since the shard assignment changes every epoch);
* a worker whose shards hold fewer usable samples than its quota re-reads its
  shards (a new sample-shuffle pass) to fill it, so a few samples are seen
  twice in that epoch (logged at INFO).  A full pass without a single usable
  sample raises ``RuntimeError`` instead of looping.

With equal-size shards, ``num_shards`` divisible by ``R*W`` and the per-worker
sample count divisible by ``batch_size`` (and ``B`` divisible by ``W``), each
sample is seen exactly once per epoch.

Resampled mode
--------------
``resampled=True``: every worker draws shards with replacement (RNG seeded by
seed, epoch, rank, worker, so also reproducible) and stops at its quota.  The
epoch length is ``train_num_samples`` (or the sizes total); ``num_shards`` may be
smaller than ``R * W``.

Dataset index
-------------
``index_source="field"`` (default): the ``KEY.idx`` text entry (decimal integer),
else ``"dataset_index"`` in ``KEY.json``.  ``index_source="key"``: ``int(key)`` of
the sample key's basename; img2dataset keys are zero-padded
``shard_id * 10**k + row`` strings (``"000123456"`` -> 123456), so the index space
is sparse and ``dataset_size`` must be given explicitly and be ``> max key``
(e.g. ``num_shards * 10**k``); GloFND state is then sized by that ``N``.

``N`` (``dataset_size``) defaults, in field mode, to ``glofnd_index.json``'s
``dataset_size`` beside the shards (written by the writer / ``add_index``), else
the sum of all entries of ``sizes.json``, else the sum of the selected shards'
``_stats.json`` counts.  Indices are never wrapped: a sample whose index is
missing, not an integer or outside ``[0, N)`` raises ``ValueError`` (naming the
shard and key) at its first occurrence, or with ``on_bad_index="skip"`` is
skipped and counted as ``bad_index``.

Bad data
--------
Corrupt/undecodable images (``corrupt_image``), samples without an image entry
(``missing_image``), missing or empty captions (``missing_caption``), bad
indices in skip mode (``bad_index``), exceptions raised by ``image_transform``
(``transform_error``) and unreadable or truncated shards (``shard_read_error``,
the rest of that shard is skipped) are skipped and counted per worker process.
Each worker logs one ``logging`` warning per kind at most every
``warn_interval_s`` seconds (with the number suppressed meanwhile).  Counts reach
the main process through the batches: ``bad_sample_counts`` holds the number of
samples of each kind the producing worker skipped since its previous batch, so
summing it over batches gives exact totals over all workers.
:class:`ShardDataLoader` does that summing (``loader.bad_sample_counts``, and
``loader.epoch_bad_sample_counts`` for the current epoch) and pops the key.

Distributed / accelerate
------------------------
The loader is already split by rank, so it must NOT be passed through
``accelerator.prepare`` (which would shard or dispatch it again).  Both the
loader and the dataset carry ``glofnd_presharded = True``; use
:func:`is_presharded_loader` in the Trainer's ``get_train_dataloader`` to return
it as is (the Trainer's ``_prepare_inputs`` still moves batches to the device).

Epochs and resume
-----------------
The whole stream (shard order, sample shuffle, batches) is a deterministic
function of ``(shards, seed, epoch, rank, world_size, num_workers, batch_size,
shuffle_buffer)``.  ``set_epoch(epoch)`` writes a value in shared memory, so
persistent workers see it.  If ``set_epoch`` is not called between two
iterations of a :class:`ShardDataLoader`, the epoch advances by one.

Resuming mid-epoch: ``set_epoch(epoch)`` alone restarts that epoch from the
beginning of its shard order (samples already seen in that epoch are seen
again).  ``set_epoch(epoch, skip_batches=k)`` continues exactly where a run
stopped after ``k`` batches of that epoch: each worker regenerates and discards
its share of the first ``k`` batches (decode cost, no transfer) and every rank
then yields ``B - k`` batches - the same batches the uninterrupted run would
have produced, possibly in a different order within a round of ``W``.  For a
run stopped after ``n`` batches in total: ``epoch, k = divmod(n, B)`` with
``B = loader.batches_per_epoch``.  With the HF Trainer, set
``ignore_data_skip=True`` and call ``set_epoch(epoch, skip_batches=k)`` yourself:
``accelerate.skip_first_batches`` would rebuild a plain DataLoader around the
dataset, which neither calls ``set_epoch`` nor removes ``bad_sample_counts``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing.context
import multiprocessing.sharedctypes
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

logger = logging.getLogger(__name__)

__all__ = [
    "BAD_SAMPLE_KINDS",
    "BadSampleCounter",
    "ShardConfig",
    "ShardDataLoader",
    "ShardDataset",
    "build_shard_loader",
    "epoch_batches_per_rank",
    "expand_shards",
    "is_presharded_loader",
    "iter_tar_samples",
    "read_shard_sizes",
    "resampled_shards",
    "shard_partition",
    "worker_quota",
]

#: Kinds of skipped samples, in the order used by the ``bad_sample_counts`` tensor.
BAD_SAMPLE_KINDS: tuple[str, ...] = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_index",
    "transform_error",
    "shard_read_error",
)

#: Attribute set on the loader and dataset: already split by rank, keep it out of
#: ``accelerator.prepare``.
PRESHARDED_ATTR = "glofnd_presharded"

SIZES_FILE = "sizes.json"
INDEX_INFO_FILE = "glofnd_index.json"

_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_TAR_SUFFIX_RE = re.compile(r"\.(tar|tgz)(\.[A-Za-z0-9]+)?$")


# --------------------------------------------------------------------------- config


@dataclass
class ShardConfig:
    """Configuration of the streaming shard loader (see the module docstring)."""

    shards: str | Sequence[str]
    batch_size: int
    #: N: every dataset index must lie in [0, N). Inferred in field mode if None.
    dataset_size: int | None = None
    #: samples per epoch over all ranks; default: sizes of the selected shards.
    train_num_samples: int | None = None
    resampled: bool = False
    shuffle_shards: bool = True
    #: sample shuffle buffer (raw, undecoded samples); 0 or 1 = off.
    shuffle_buffer: int = 1000
    seed: int = 0
    num_workers: int = 4
    #: None: torch.distributed if initialized, else env RANK / WORLD_SIZE, else 0 / 1.
    rank: int | None = None
    world_size: int | None = None
    index_source: Literal["field", "key"] = "field"
    on_bad_index: Literal["raise", "skip"] = "raise"
    #: explicit ``{shard basename: count}`` JSON; default: ``sizes.json`` beside the shards.
    sizes_file: str | None = None
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption_keys: tuple[str, ...] = ("txt", "text", "caption")
    warn_interval_s: float = 60.0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int | None = 2


# --------------------------------------------------------------------------- shard lists


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec (brace patterns, ``::`` lists, ``${WDS_VAR}``) into a list."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"shard spec entries must be str, got {type(item).__name__}")
        for url in expand_urls(item):
            url = url.strip()
            if url:
                urls.append(os.path.expanduser(url) if _is_local(url) else url)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def _shard_basename(url: str) -> str:
    if _is_local(url):
        return os.path.basename(_local_path(url))
    # pipe:/http: URLs: the last token that looks like a tar file name
    found = re.findall(r"([^/\s'\"]+\.(?:tar|tgz)(?:\.[A-Za-z0-9]+)?)", url)
    return found[-1] if found else os.path.basename(url.split()[-1] if url.split() else url)


def _seeded_rng(*parts: int) -> random.Random:
    # str seeds are hashed with sha512: stable across processes and Python versions
    return random.Random("glofnd-shards:" + ":".join(str(int(p)) for p in parts))


def shard_partition(
    urls: Sequence[str],
    rank: int,
    world_size: int,
    num_workers: int,
    worker_id: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
) -> list[str]:
    """Shards read by ``worker_id`` of ``rank`` in ``epoch`` (non-resampled mode), in order.

    The list is permuted with ``(seed, epoch)`` (same permutation on every rank),
    then split ``perm[rank::world_size][worker_id::num_workers]``.  Over all ranks
    and workers the result is a partition of ``urls``.
    """
    num_workers = max(1, num_workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id {worker_id} outside [0, {num_workers})")
    order = list(urls)
    if shuffle:
        _seeded_rng(seed, epoch).shuffle(order)
    return order[rank::world_size][worker_id::num_workers]


def resampled_shards(
    urls: Sequence[str], rank: int, worker_id: int, epoch: int, seed: int, pass_id: int = 0
) -> list[str]:
    """``len(urls)`` shards drawn with replacement for one pass of one worker (resampled mode)."""
    rng = _seeded_rng(seed, epoch, rank, worker_id, pass_id, 1)
    return [urls[rng.randrange(len(urls))] for _ in range(len(urls))]


def epoch_batches_per_rank(total_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank yields per epoch: ``total // (world_size * batch_size)``."""
    return total_samples // (world_size * batch_size)


def worker_quota(batches_per_rank: int, num_workers: int, worker_id: int) -> int:
    """Batches worker ``worker_id`` yields so that the rank yields ``batches_per_rank``."""
    num_workers = max(1, num_workers)
    return batches_per_rank // num_workers + (
        1 if worker_id < batches_per_rank % num_workers else 0
    )


def _worker_skip(skip_batches: int, num_workers: int, worker_id: int) -> int:
    # rank batch i comes from worker i % W; count i < skip_batches with i % W == worker_id
    return max(0, math.ceil((skip_batches - worker_id) / max(1, num_workers)))


# --------------------------------------------------------------------------- sizes


def _load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_shard_sizes(
    urls: Sequence[str], sizes_file: str | None = None
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Per-shard sample counts for ``urls`` (None where unknown) and what was found.

    Lookup per shard: ``sizes_file`` (by basename), ``sizes.json`` in the shard's
    directory, img2dataset's ``<stem>_stats.json`` (``successes``).  The second
    return value has ``dirs`` (directories holding sizes/index files),
    ``sizes_total`` (sum of all entries of the sizes files found),
    ``index_info`` (``glofnd_index.json`` contents per directory).
    """
    files: dict[str, dict[str, int]] = {}  # realpath -> {basename: count}, each read once
    index_info: dict[str, Any] = {}  # directory -> glofnd_index.json
    dirs_seen: set[str] = set()

    def load_sizes(path: str) -> dict[str, int]:
        real = os.path.realpath(path)
        if real not in files:
            files[real] = {str(k): int(v) for k, v in _load_json(path).items()}
        return files[real]

    def scan_dir(directory: str) -> None:
        if directory in dirs_seen:
            return
        dirs_seen.add(directory)
        if os.path.isfile(os.path.join(directory, SIZES_FILE)):
            load_sizes(os.path.join(directory, SIZES_FILE))
        info_path = os.path.join(directory, INDEX_INFO_FILE)
        if os.path.isfile(info_path):
            index_info[directory] = _load_json(info_path)

    explicit: dict[str, int] = {}
    if sizes_file is not None:
        explicit = load_sizes(sizes_file)
        scan_dir(os.path.dirname(os.path.realpath(sizes_file)))
    result: dict[str, int | None] = {}
    for url in urls:
        base = _shard_basename(url)
        result[url] = explicit.get(base)
        if result[url] is not None or not _is_local(url):
            continue
        directory = os.path.dirname(os.path.realpath(_local_path(url)))
        scan_dir(directory)
        sizes_path = os.path.realpath(os.path.join(directory, SIZES_FILE))
        if base in files.get(sizes_path, {}):
            result[url] = files[sizes_path][base]
            continue
        stats = os.path.join(directory, _TAR_SUFFIX_RE.sub("", base) + "_stats.json")
        if os.path.isfile(stats):
            result[url] = int(_load_json(stats)["successes"])
    found_dirs = sorted({os.path.dirname(f) for f in files} | set(index_info))
    sizes_total = sum(sum(f.values()) for f in files.values()) if files else None
    return result, {"dirs": found_dirs, "sizes_total": sizes_total, "index_info": index_info}


# --------------------------------------------------------------------------- bad samples


class BadSampleCounter:
    """Counts skipped samples by kind, with rate-limited ``logging`` warnings.

    One instance lives in each worker process (counts are per process); the
    per-batch deltas travel in the batch (``bad_sample_counts``) and
    :class:`ShardDataLoader` sums them with :meth:`add_tensor`.
    """

    def __init__(self, warn_interval_s: float = 60.0, log: bool = True):
        self.warn_interval_s = warn_interval_s
        self.log = log
        self.counts = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        self._reported = dict.fromkeys(BAD_SAMPLE_KINDS, 0)
        self._last_warn: dict[str, float] = {}
        self._suppressed = dict.fromkeys(BAD_SAMPLE_KINDS, 0)

    def add(self, kind: str, detail: str = "", n: int = 1) -> None:
        if kind not in self.counts:
            raise KeyError(f"unknown bad-sample kind {kind!r}; known: {BAD_SAMPLE_KINDS}")
        self.counts[kind] += n
        if not self.log:
            return
        now = time.monotonic()
        last = self._last_warn.get(kind)
        if last is None or now - last >= self.warn_interval_s:
            suppressed = self._suppressed[kind]
            logger.warning(
                "skipping sample (%s): %s [%d %s in this process so far%s; next warning of this "
                "kind in >= %.0fs]",
                kind,
                detail,
                self.counts[kind],
                kind,
                f", {suppressed} not logged" if suppressed else "",
                self.warn_interval_s,
            )
            self._last_warn[kind] = now
            self._suppressed[kind] = 0
        else:
            self._suppressed[kind] += n

    def take_delta(self) -> torch.Tensor:
        """Counts since the previous call, as a long tensor ordered like BAD_SAMPLE_KINDS."""
        delta = [self.counts[k] - self._reported[k] for k in BAD_SAMPLE_KINDS]
        self._reported = dict(self.counts)
        return torch.tensor(delta, dtype=torch.long)

    def discard_delta(self) -> None:
        self._reported = dict(self.counts)

    def add_tensor(self, counts: torch.Tensor) -> None:
        for kind, value in zip(BAD_SAMPLE_KINDS, counts.tolist(), strict=True):
            self.counts[kind] += int(value)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


# --------------------------------------------------------------------------- shared ints


class _SharedInt:
    """An int in shared memory (seen by forked/spawned DataLoader workers, persistent ones
    included); degrades to a plain int when pickled outside process spawning."""

    def __init__(self, value: int = 0):
        self._raw = multiprocessing.sharedctypes.RawValue("q", int(value))
        self._plain: int | None = None

    def get(self) -> int:
        return self._plain if self._raw is None else int(self._raw.value)

    def set(self, value: int) -> None:
        if self._raw is None:
            self._plain = int(value)
        else:
            self._raw.value = int(value)

    def __getstate__(self):
        if self._raw is not None and multiprocessing.context.get_spawning_popen() is not None:
            return {"raw": self._raw, "plain": None}
        return {"raw": None, "plain": self.get()}

    def __setstate__(self, state):
        self._raw = state["raw"]
        self._plain = state["plain"]


# --------------------------------------------------------------------------- tar reading


def iter_tar_samples(url: str, on_error: Callable[[str, str | None, Exception], None]):
    """Yield webdataset-style samples (``__key__``, ``__url__``, ``ext: bytes``) of one shard.

    Consecutive members sharing a key (``base_plus_ext``) form a sample.  If reading
    fails (truncated/corrupt tar, failing ``pipe:``), ``on_error(url, key, exc)`` is
    called, the incomplete sample is dropped and iteration of this shard stops.
    """
    stream = None
    current: dict[str, Any] | None = None
    try:
        stream = gopen(url, "rb")
        for member in tar_file_iterator(stream, handler=reraise_exception):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = member["data"]
        if current is not None:
            sample, current = current, None
            yield sample
    except Exception as exc:  # noqa: BLE001 - reported, shard skipped
        on_error(url, None if current is None else current["__key__"], exc)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - e.g. pipe exit status after early stop
                pass


# --------------------------------------------------------------------------- dataset


def _resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        pass
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
    else:
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} / world_size {world_size}")
    return int(rank), int(world_size)


def _parse_index(sample: Mapping[str, Any], source: str) -> tuple[int | None, str]:
    """(index, reason) where index is None if missing/not an integer."""
    if source == "key":
        key = os.path.basename(sample["__key__"])
        if _INT_RE.match(key) and key.isascii():
            return int(key), ""
        return None, f"key {key!r} is not an integer"
    raw = sample.get("idx")
    if raw is not None:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, "'.idx' entry is not UTF-8 text"
        if _INT_RE.match(text):
            return int(text), ""
        return None, f"'.idx' entry {text[:40]!r} is not an integer"
    meta = sample.get("json")
    if meta is not None:
        try:
            value = json.loads(meta).get("dataset_index")
        except (ValueError, AttributeError):
            return None, "no '.idx' entry and '.json' entry is not a JSON object"
        if value is None:
            return None, "no '.idx' entry and no 'dataset_index' in '.json'"
        if isinstance(value, int) and not isinstance(value, bool):
            return value, ""
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value.strip()), ""
        return None, f"'dataset_index' {value!r} in '.json' is not an integer"
    return None, "no '.idx' entry and no '.json' entry with 'dataset_index'"


class ShardDataset(IterableDataset):
    """IterableDataset yielding collated batches (see the module docstring).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=config.num_workers)``
    or simply :func:`build_shard_loader`.
    """

    glofnd_presharded = True

    def __init__(
        self,
        config: ShardConfig,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], Mapping[str, torch.Tensor]],
    ):
        super().__init__()
        if config.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if config.index_source not in ("field", "key"):
            raise ValueError(f"index_source must be 'field' or 'key', got {config.index_source!r}")
        if config.on_bad_index not in ("raise", "skip"):
            raise ValueError(f"on_bad_index must be 'raise' or 'skip', got {config.on_bad_index!r}")
        self.config = config
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.urls = expand_shards(config.shards)
        self.rank, self.world_size = _resolve_rank_world(config.rank, config.world_size)

        sizes, found = read_shard_sizes(self.urls, config.sizes_file)
        if config.train_num_samples is not None:
            self.total_samples = int(config.train_num_samples)
        else:
            missing = [u for u, n in sizes.items() if n is None]
            if missing:
                raise ValueError(
                    f"unknown sample count for {len(missing)} shard(s) (e.g. {missing[0]!r}): "
                    f"put a {SIZES_FILE} ({{basename: count}}) or img2dataset *_stats.json beside "
                    "the shards, pass sizes_file, or set train_num_samples"
                )
            self.total_samples = sum(n for n in sizes.values() if n is not None)
        self.dataset_size = self._infer_dataset_size(sizes, found)
        self.batches_per_epoch = epoch_batches_per_rank(
            self.total_samples, self.world_size, config.batch_size
        )
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{self.total_samples} samples per epoch < world_size * batch_size = "
                f"{self.world_size} * {config.batch_size}: no full batch per rank"
            )
        if not config.resampled:
            self._check_enough_shards(max(1, config.num_workers))
        self._epoch = _SharedInt(0)
        self._skip = _SharedInt(0)
        self._counter: BadSampleCounter | None = None

    # ------------------------------------------------------------------ setup helpers

    def _infer_dataset_size(self, sizes: dict[str, int | None], found: dict[str, Any]) -> int:
        cfg = self.config
        if cfg.dataset_size is not None:
            if cfg.dataset_size < 1:
                raise ValueError("dataset_size must be >= 1")
            return int(cfg.dataset_size)
        if cfg.index_source == "key":
            raise ValueError(
                "index_source='key' needs an explicit dataset_size N > the largest numeric key "
                "(img2dataset keys are shard_id * 10**k + row, e.g. N = num_shards * 10**k)"
            )
        if len(found["dirs"]) > 1:
            raise ValueError(
                f"shards come from several directories with their own index files {found['dirs']}: "
                "their indices may collide; pass dataset_size explicitly (and make indices "
                "disjoint, e.g. with add_index_to_shards(start_index=...))"
            )
        infos = list(found["index_info"].values())
        if infos and "dataset_size" in infos[0]:
            return int(infos[0]["dataset_size"])
        if found["sizes_total"] is not None:
            return int(found["sizes_total"])
        if all(n is not None for n in sizes.values()):
            return int(sum(n for n in sizes.values() if n is not None))
        raise ValueError(
            "cannot infer dataset_size (N): no glofnd_index.json / sizes.json beside the shards; "
            "pass dataset_size"
        )

    def _check_enough_shards(self, num_workers: int) -> None:
        need = self.world_size * num_workers
        if len(self.urls) < need:
            raise ValueError(
                f"{len(self.urls)} shards < world_size * num_workers = {self.world_size} * "
                f"{num_workers}: some DataLoader worker would get no shard. Use fewer workers, "
                "more (smaller) shards, or resampled=True"
            )

    # ------------------------------------------------------------------ epoch control

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (shard order); ``skip_batches`` resumes after that many batches."""
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}]")
        self._epoch.set(epoch)
        self._skip.set(skip_batches)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    @property
    def skip_batches(self) -> int:
        return self._skip.get()

    def __len__(self) -> int:
        return self.batches_per_epoch - self._skip.get()

    # ------------------------------------------------------------------ iteration

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        worker_id, num_workers = self._worker()
        if not cfg.resampled:
            self._check_enough_shards(num_workers)
        epoch, skip = self._epoch.get(), self._skip.get()
        quota = worker_quota(self.batches_per_epoch, num_workers, worker_id)
        to_skip = min(quota, _worker_skip(skip, num_workers, worker_id))
        if self._counter is None:
            self._counter = BadSampleCounter(cfg.warn_interval_s)
        counter = self._counter
        counter.discard_delta()
        produced = 0
        batch: list[tuple[torch.Tensor, str, int]] = []
        good_total = 0
        good_at_pass_start = -1
        shards: list[str] = []
        for pass_id in range(1 << 62):
            if produced >= quota:
                return
            if good_total == good_at_pass_start:
                more = "..." if len(shards) > 4 else ""
                raise RuntimeError(
                    f"rank {self.rank} worker {worker_id}: a full pass over its shards "
                    f"{shards[:4]}{more} produced no usable sample "
                    f"(skipped so far: {counter.as_dict()})"
                )
            if pass_id > 0 and not cfg.resampled:
                logger.info(
                    "rank %d worker %d: shards exhausted after %d usable samples before its quota "
                    "of %d batches; re-reading them (pass %d)",
                    self.rank,
                    worker_id,
                    good_total,
                    quota,
                    pass_id,
                )
            good_at_pass_start = good_total
            if cfg.resampled:
                shards = resampled_shards(self.urls, self.rank, worker_id, epoch, cfg.seed, pass_id)
            else:
                shards = shard_partition(
                    self.urls,
                    self.rank,
                    self.world_size,
                    num_workers,
                    worker_id,
                    epoch,
                    cfg.seed,
                    shuffle=cfg.shuffle_shards,
                )
            rng = _seeded_rng(cfg.seed, epoch, self.rank, worker_id, pass_id, 2)
            raw = self._raw_samples(shards, counter)
            for image_bytes, caption, index, where in _buffer_shuffle(raw, cfg.shuffle_buffer, rng):
                pixels = self._decode(image_bytes, where, counter)
                if pixels is None:
                    continue
                good_total += 1
                batch.append((pixels, caption, index))
                if len(batch) < cfg.batch_size:
                    continue
                if produced >= to_skip:  # batches before to_skip: resume fast-forward
                    out = self._collate(batch)
                    out["bad_sample_counts"] = counter.take_delta()
                    yield out
                batch = []
                produced += 1
                if produced >= quota:
                    return

    def _raw_samples(
        self, shards: Sequence[str], counter: BadSampleCounter
    ) -> Iterator[tuple[bytes, str, int, str]]:
        """Cheap checks before the shuffle buffer: index, caption, image presence."""
        cfg = self.config
        n = self.dataset_size

        def on_error(url: str, key: str | None, exc: Exception) -> None:
            counter.add(
                "shard_read_error",
                f"shard {url!r} unreadable/truncated near key {key!r}, rest of shard skipped: "
                f"{type(exc).__name__}: {exc}",
            )

        for url in shards:
            for sample in iter_tar_samples(url, on_error):
                key = sample["__key__"]
                where = f"shard {url!r} key {key!r}"
                index, reason = _parse_index(sample, cfg.index_source)
                if index is not None and not 0 <= index < n:
                    reason = f"dataset index {index} outside [0, {n})"
                    index = None
                if index is None:
                    if cfg.on_bad_index == "raise":
                        raise ValueError(
                            f"bad dataset index in {where}: {reason} "
                            "(use on_bad_index='skip' to skip such samples)"
                        )
                    counter.add("bad_index", f"{where}: {reason}")
                    continue
                caption = None
                for ext in cfg.caption_keys:
                    if ext in sample:
                        try:
                            caption = sample[ext].decode("utf-8").strip()
                        except UnicodeDecodeError:
                            caption = None
                        break
                if not caption:
                    counter.add("missing_caption", where)
                    continue
                image_bytes = next((sample[e] for e in cfg.image_keys if e in sample), None)
                if image_bytes is None:
                    counter.add("missing_image", where)
                    continue
                yield image_bytes, caption, index, where

    def _decode(self, data: bytes, where: str, counter: BadSampleCounter) -> torch.Tensor | None:
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001
            counter.add("corrupt_image", f"{where}: {type(exc).__name__}: {exc}")
            return None
        try:
            return self.image_transform(image)
        except Exception as exc:  # noqa: BLE001
            counter.add("transform_error", f"{where}: {type(exc).__name__}: {exc}")
            return None

    def _collate(self, items: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
        pixels, captions, indices = zip(*items, strict=True)
        tokens = self.tokenize(list(captions))
        out = {
            "pixel_values": torch.stack(list(pixels)),
            "input_ids": torch.as_tensor(tokens["input_ids"]).long(),
        }
        if tokens.get("attention_mask") is not None:
            out["attention_mask"] = torch.as_tensor(tokens["attention_mask"]).long()
        out["dataset_index"] = torch.tensor(indices, dtype=torch.long)
        return out


def _buffer_shuffle(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``bufsize`` items (``<= 1``: pass through)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(bufsize)
        out, buf[k] = buf[k], item
        yield out
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------- loader


class ShardDataLoader(DataLoader):
    """DataLoader over a :class:`ShardDataset` (``batch_size=None``: the dataset batches).

    Adds ``set_epoch`` (forwarded to the dataset's shared epoch; auto-advance by one
    when not called between iterations), ``batches_per_epoch``, and bad-sample
    totals (``bad_sample_counts`` over the loader's lifetime,
    ``epoch_bad_sample_counts`` for the current iteration), popping the
    ``bad_sample_counts`` key from the batches.  ``glofnd_presharded`` is True:
    keep it out of ``accelerator.prepare``.
    """

    glofnd_presharded = True

    def __init__(self, dataset: ShardDataset, **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._resume: tuple[int, int] | None = None
        self._epoch_set_explicitly = False
        self._iterated = False
        self._bad_total = BadSampleCounter(log=False)
        self._bad_epoch = BadSampleCounter(log=False)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if self._resume is not None and self._resume[0] == epoch and skip_batches == 0:
            skip_batches = self._resume[1]
        self._resume = None
        self.dataset.set_epoch(epoch, skip_batches)
        self._epoch_set_explicitly = True

    def resume_at(self, epoch: int, skip_batches: int) -> None:
        """Make the next ``set_epoch(epoch)`` continue after ``skip_batches`` batches.

        For trainers that call ``set_epoch(epoch)`` themselves at each epoch start (the HF
        Trainer does): after a mid-epoch resume, the resumed epoch yields only its remaining
        batches, the same ones the uninterrupted run would have produced.
        """
        if not 0 <= skip_batches < self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch})")
        self._resume = (int(epoch), int(skip_batches))

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.batches_per_epoch

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        return self._bad_total.as_dict()

    @property
    def epoch_bad_sample_counts(self) -> dict[str, int]:
        return self._bad_epoch.as_dict()

    def __iter__(self):
        if self._iterated and not self._epoch_set_explicitly:
            self.dataset.set_epoch(self.dataset.epoch + 1)
        self._iterated = True
        self._epoch_set_explicitly = False
        self._bad_epoch = BadSampleCounter(log=False)
        return self._batches(super().__iter__())

    def _batches(self, it):
        try:
            for batch in it:
                counts = batch.pop("bad_sample_counts", None)
                if counts is not None:
                    self._bad_total.add_tensor(counts)
                    self._bad_epoch.add_tensor(counts)
                yield batch
        except Exception:
            # A worker raised (e.g. a bad index): stop the workers now rather than when the
            # iterator is garbage collected, and let the next iteration start fresh ones.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
            raise


def build_shard_loader(
    config: ShardConfig,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], Mapping[str, torch.Tensor]],
) -> ShardDataLoader:
    """Build the streaming loader; see the module docstring for its semantics."""
    dataset = ShardDataset(config, image_transform, tokenize)
    kwargs: dict[str, Any] = {"num_workers": config.num_workers, "pin_memory": config.pin_memory}
    if config.num_workers > 0:
        kwargs["persistent_workers"] = config.persistent_workers
        kwargs["prefetch_factor"] = config.prefetch_factor
    return ShardDataLoader(dataset, **kwargs)


def is_presharded_loader(obj: Any) -> bool:
    """True for loaders/datasets already split by rank (must bypass ``accelerator.prepare``)."""
    return bool(getattr(obj, PRESHARDED_ATTR, False)) or bool(
        getattr(getattr(obj, "dataset", None), PRESHARDED_ATTR, False)
    )
