"""The shard dataset: streams one rank's share of the shards as collated batches.

Semantics (partition, epoch length, dataset index, bad data, resume) are described in
:mod:`glofnd_hf.data.shards`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from ...fnd.comm import rank_and_world
from ..bad_samples import BadSampleCounter
from ..errors import DataError
from ..images import to_rgb
from ..index_space import check_index_space
from ..randomness import SampleRandomness, SharedInt, sample_seed
from ..webdataset_io import (
    CAPTION_KEYS,
    IMAGE_KEYS,
    SIZES_FILE,
    check_local_shards_exist,
    dataset_size_from_files,
    expand_shards,
    find_image,
    iter_tar_samples,
    read_caption,
    read_dataset_index,
    read_shard_sizes,
)
from .partition import (
    buffer_shuffle,
    epoch_batches_per_rank,
    resampled_shards,
    seeded_rng,
    shard_partition,
    worker_quota,
    worker_skip_batches,
)

logger = logging.getLogger(__name__)

__all__ = ["REPEATED_KEY", "SOURCE_KEY", "ShardConfig", "ShardDataset"]

#: Batch entries for the loader's duplicate-index check (popped by ``ShardDataLoader``):
#: per sample, whether it is read again on purpose (a re-read pass, resampled shards), and
#: where it comes from (``shard '...' key '...'``).
REPEATED_KEY = "repeated_sample"
SOURCE_KEY = "sample_source"


@dataclass
class ShardConfig:
    """Configuration of the streaming shard loader (see :mod:`glofnd_hf.data.shards`)."""

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
    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_keys: tuple[str, ...] = CAPTION_KEYS
    warn_interval_s: float = 60.0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int | None = 2


class ShardDataset(IterableDataset):
    """IterableDataset yielding collated batches (see :mod:`glofnd_hf.data.shards`).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=config.num_workers)``
    or simply :func:`~glofnd_hf.data.shards.build_shard_loader`.
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
        check_local_shards_exist(config.shards, self.urls)
        if not config.resampled:
            self._check_no_shard_twice()
        self.rank, self.world_size = rank_and_world(config.rank, config.world_size)

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
            if self.total_samples == 0:
                raise DataError(
                    f"the {len(self.urls)} shard(s) hold no samples according to their "
                    f"{SIZES_FILE} / _stats.json counts: check train_shards and the sizes files"
                )
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
        self._epoch = SharedInt(0)
        self._skip = SharedInt(0)
        self._counter: BadSampleCounter | None = None
        self._first_read_error: str | None = None

    # ------------------------------------------------------------------ setup helpers

    def _infer_dataset_size(self, sizes: dict[str, int | None], found: dict[str, Any]) -> int:
        """N, checked: an N whose per-sample state (and duplicate bitmap) cannot fit in
        memory is refused before anything is sized by it, naming where it came from."""
        n, source = self._dataset_size_and_source(sizes, found)
        if n < 1:
            raise DataError(
                f"the index space N is {n} (from {source}): the shards hold no indexed "
                "samples; check train_shards, or pass dataset_size (glofnd-train: num_samples)"
            )
        return check_index_space(n, source)

    def _dataset_size_and_source(
        self, sizes: dict[str, int | None], found: dict[str, Any]
    ) -> tuple[int, str]:
        cfg = self.config
        if cfg.dataset_size is not None:
            if cfg.dataset_size < 1:
                raise ValueError("dataset_size must be >= 1")
            return int(cfg.dataset_size), f"dataset_size={int(cfg.dataset_size)}"
        return dataset_size_from_files(sizes, found, cfg.index_source)

    def _check_no_shard_twice(self) -> None:
        seen: set[str] = set()
        for url in self.urls:
            if url in seen:
                raise DataError(
                    f"shard {url!r} is listed twice in train_shards: every sample would be read "
                    "twice per epoch; list each shard once (or set shard_resampled: true)"
                )
            seen.add(url)

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

    def _worker(self, skip: int = 0) -> tuple[int, int]:
        """The logical worker (whose shards, shuffle and quota this process serves) and the
        number of workers. Rank batch ``i`` of an epoch comes from logical worker
        ``i % W``; the DataLoader asks its workers in turn starting from worker 0, so after
        ``skip`` batches worker ``j`` serves logical worker ``(skip + j) % W``: the
        remaining batches then come in the uninterrupted run's order."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + skip) % info.num_workers, info.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        randomness = SampleRandomness()  # seeds each sample's augmentation
        try:
            yield from self._batches(randomness)
        finally:
            randomness.release()  # the consumer's RNG states, whatever happened

    def _batches(self, randomness: SampleRandomness) -> Iterator[dict[str, Any]]:
        cfg = self.config
        epoch, skip = self._epoch.get(), self._skip.get()
        worker_id, num_workers = self._worker(skip)
        if not cfg.resampled:
            self._check_enough_shards(num_workers)
        quota = worker_quota(self.batches_per_epoch, num_workers, worker_id)
        to_skip = min(quota, worker_skip_batches(skip, num_workers, worker_id))
        if self._counter is None:
            self._counter = BadSampleCounter(cfg.warn_interval_s, logger=logger)
        counter = self._counter
        counter.discard_delta()
        produced = 0
        batch: list[tuple[torch.Tensor, str, int, str, bool]] = []
        good_total = 0
        good_at_pass_start = -1
        shards: list[str] = []
        for pass_id in range(1 << 62):
            if produced >= quota:
                return
            if good_total == good_at_pass_start:
                self._no_usable_sample(worker_id, shards, counter)
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
            rng = seeded_rng(cfg.seed, epoch, self.rank, worker_id, pass_id, 2)
            raw = self._raw_samples(shards, counter)
            for image_bytes, caption, index, where in buffer_shuffle(raw, cfg.shuffle_buffer, rng):
                # Augmentation drawn from (seed, epoch, dataset index, pass): the same after
                # a resume and under any number of workers.
                randomness.seed(sample_seed(cfg.seed, epoch, index, pass_id))
                pixels = self._decode(image_bytes, where, counter)
                if pixels is None:
                    continue
                good_total += 1
                # Read again on purpose: a re-read pass, or shards drawn with replacement.
                batch.append((pixels, caption, index, where, cfg.resampled or pass_id > 0))
                if len(batch) < cfg.batch_size:
                    continue
                if produced >= to_skip:  # batches before to_skip: resume fast-forward
                    out = self._collate(batch)
                    out["bad_sample_counts"] = counter.take_delta()
                    randomness.release()  # the consumer sees its own RNG states
                    yield out
                batch = []
                produced += 1
                if produced >= quota:
                    return

    def _no_usable_sample(
        self, worker_id: int, shards: Sequence[str], counter: BadSampleCounter
    ) -> None:
        """A full pass over a worker's shards without one usable sample: the data, not a
        transient problem (looping again would never end)."""
        more = "..." if len(shards) > 4 else ""
        skipped = ", ".join(f"{k} {v}" for k, v in counter.as_dict().items() if v) or "none"
        first = (
            f"; the first read error: {self._first_read_error}" if self._first_read_error else ""
        )
        raise DataError(
            f"rank {self.rank} worker {worker_id}: a full pass over its shards {shards[:4]}{more} "
            f"produced no usable sample (skipped: {skipped}){first}: check that the shards "
            "exist, are readable and hold image-caption samples with a dataset index"
        )

    def _raw_samples(
        self, shards: Sequence[str], counter: BadSampleCounter
    ) -> Iterator[tuple[bytes, str, int, str]]:
        """Cheap checks before the shuffle buffer: index, caption, image presence."""
        cfg = self.config
        n = self.dataset_size

        def on_error(url: str, key: str | None, exc: Exception) -> None:
            detail = f"{type(exc).__name__}: {exc}"
            if self._first_read_error is None:
                self._first_read_error = f"shard {url!r}: {' '.join(detail.split())}"
            counter.add(
                "shard_read_error",
                f"shard {url!r} unreadable/truncated near key {key!r}, rest of shard skipped: "
                + detail,
            )

        for url in shards:
            for sample in iter_tar_samples(url, on_error):
                key = sample["__key__"]
                where = f"shard {url!r} key {key!r}"
                index, reason = read_dataset_index(sample, cfg.index_source)
                if index is not None and not 0 <= index < n:
                    reason = f"dataset index {index} outside [0, {n})"
                    index = None
                if index is None:
                    if cfg.on_bad_index == "raise":
                        raise ValueError(
                            f"bad dataset index in {where}: {reason} (set shard_on_bad_index: "
                            "skip to skip and count such samples; ShardConfig.on_bad_index)"
                        )
                    counter.add("bad_index", f"{where}: {reason}")
                    continue
                caption = read_caption(sample, cfg.caption_keys)
                if caption is None:
                    counter.add("missing_caption", where)
                    continue
                image_bytes = find_image(sample, cfg.image_keys)
                if image_bytes is None:
                    counter.add("missing_image", where)
                    continue
                yield image_bytes, caption, index, where

    def _decode(self, data: bytes, where: str, counter: BadSampleCounter) -> torch.Tensor | None:
        try:
            image = to_rgb(data)
        except Exception as exc:  # noqa: BLE001
            counter.add("corrupt_image", f"{where}: {type(exc).__name__}: {exc}")
            return None
        try:
            return self.image_transform(image)
        except Exception as exc:  # noqa: BLE001
            counter.add("transform_error", f"{where}: {type(exc).__name__}: {exc}")
            return None

    def _collate(self, items: list[tuple[torch.Tensor, str, int, str, bool]]) -> dict[str, Any]:
        pixels, captions, indices, sources, repeated = zip(*items, strict=True)
        tokens = self.tokenize(list(captions))
        out: dict[str, Any] = {
            "pixel_values": torch.stack(list(pixels)),
            "input_ids": torch.as_tensor(tokens["input_ids"]).long(),
        }
        if tokens.get("attention_mask") is not None:
            out["attention_mask"] = torch.as_tensor(tokens["attention_mask"]).long()
        out["dataset_index"] = torch.tensor(indices, dtype=torch.long)
        out[REPEATED_KEY] = torch.tensor(repeated, dtype=torch.bool)
        out[SOURCE_KEY] = list(sources)
        return out
