"""The DataLoader over a :class:`ShardDataset`: epochs, resume and bad-sample totals."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..bad_samples import BadSampleCounter
from ..errors import DuplicateIndexError, ShardResumeError
from .dataset import REPEATED_KEY, SOURCE_KEY, ShardConfig, ShardDataset
from .duplicates import SeenIndices

__all__ = [
    "PRESHARDED_ATTR",
    "STREAM_FILE",
    "ShardDataLoader",
    "build_shard_loader",
    "is_presharded_loader",
    "read_stream_settings",
]

#: Attribute set on the loader and dataset: already split by rank, keep it out of
#: ``accelerator.prepare``.
PRESHARDED_ATTR = "glofnd_presharded"

#: The file in a checkpoint folder recording what the shard stream's order depends on
#: (:meth:`ShardDataLoader.save_stream_settings`).
STREAM_FILE = "shard_stream.json"

#: What the order of a rank's stream depends on (besides the shards and the epoch), and the
#: setting of ``glofnd-train`` that sets it.
_STREAM_SETTINGS = {
    "num_workers": "dataloader_num_workers",
    "world_size": "the number of processes",
    "batch_size": "per_device_train_batch_size",
    "batches_per_epoch": "train_num_samples (batches per epoch)",
    "num_shards": "the number of shards in train_shards",
    "seed": "seed",
    "shuffle_buffer": "shard_shuffle_buffer",
    "shuffle_shards": "ShardConfig.shuffle_shards",
    "resampled": "shard_resampled",
}


def read_stream_settings(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stream settings recorded in ``checkpoint`` (None for a checkpoint without them)."""
    path = os.path.join(checkpoint, STREAM_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
        # Worker seeds from a generator of our own: iterating the loader leaves the global
        # torch RNG alone (a resumed Trainer restores it exactly). Nothing in the stream
        # depends on worker seeds (augmentation is seeded per sample).
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.config.seed))
        super().__init__(dataset, batch_size=None, **kwargs)
        self._resume: tuple[int, int] | None = None
        self._epoch_set_explicitly = False
        self._iterated = False
        self._bad_total = BadSampleCounter(log=False)
        self._bad_epoch = BadSampleCounter(log=False)
        self._seen: SeenIndices | None = None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if self._resume is not None and self._resume[0] == epoch and skip_batches == 0:
            skip_batches = self._resume[1]
        self._resume = None
        self.dataset.set_epoch(epoch, skip_batches)
        self._epoch_set_explicitly = True

    def resume_at(
        self, epoch: int, skip_batches: int, checkpoint: str | os.PathLike[str] | None = None
    ) -> None:
        """Make the next ``set_epoch(epoch)`` continue after ``skip_batches`` batches.

        For trainers that call ``set_epoch(epoch)`` themselves at each epoch start (the HF
        Trainer does): after a mid-epoch resume, the resumed epoch yields only its remaining
        batches, the same ones the uninterrupted run would have produced.

        ``checkpoint``: the folder resumed from. When it records the stream settings
        (:meth:`save_stream_settings`) and the resume is mid-epoch, settings that order the
        rest of the epoch differently (another ``num_workers``, say) are refused with
        :class:`~glofnd_hf.data.errors.ShardResumeError`.
        """
        if checkpoint is not None and skip_batches > 0:
            recorded = read_stream_settings(checkpoint)
            if recorded is not None:
                self.check_stream_settings(recorded, epoch, skip_batches)
        if not 0 <= skip_batches < self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch})")
        self._resume = (int(epoch), int(skip_batches))

    def stream_settings(self) -> dict[str, Any]:
        """What the order of this rank's stream depends on, besides the shards and the epoch:
        to record with a checkpoint (:meth:`save_stream_settings`)."""
        ds, cfg = self.dataset, self.dataset.config
        return {
            "num_workers": max(1, int(cfg.num_workers)),  # 0 and 1: one stream alike
            "world_size": ds.world_size,
            "batch_size": cfg.batch_size,
            "batches_per_epoch": ds.batches_per_epoch,
            "num_shards": len(ds.urls),
            "seed": cfg.seed,
            "shuffle_buffer": max(1, int(cfg.shuffle_buffer)),  # 0 and 1: no shuffle alike
            "shuffle_shards": bool(cfg.shuffle_shards),
            "resampled": bool(cfg.resampled),
        }

    def save_stream_settings(self, folder: str | os.PathLike[str]) -> str:
        """Write :meth:`stream_settings` to ``folder/shard_stream.json`` (a checkpoint);
        the path written."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, STREAM_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.stream_settings(), f, indent=1)
        os.replace(path + ".tmp", path)
        return path

    def check_stream_settings(
        self, recorded: Mapping[str, Any], epoch: int, skip_batches: int
    ) -> None:
        """Refuse to continue epoch ``epoch`` after ``skip_batches`` batches when a setting the
        stream's order depends on differs from the ``recorded`` one (one line: which setting,
        both values, what to do)."""
        current = self.stream_settings()
        for key, setting in _STREAM_SETTINGS.items():
            if key not in recorded or recorded[key] == current[key]:
                continue
            raise ShardResumeError(
                f"cannot continue epoch {epoch} after {skip_batches} batches: the checkpoint's "
                f"shard stream was read with {setting} = {recorded[key]!r} and this run has "
                f"{current[key]!r}, which orders the rest of the epoch differently (samples "
                f"would be repeated or missed); resume with {setting} = {recorded[key]!r}, or "
                "from a checkpoint saved at the end of an epoch"
            )

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
        if not self.dataset.config.resampled:  # resampled shards repeat samples by design
            if self._seen is None:
                self._seen = SeenIndices(self.dataset.dataset_size)
            self._seen.reset()
        return self._batches(super().__iter__())

    def _batches(self, it):
        try:
            for batch in it:
                counts = batch.pop("bad_sample_counts", None)
                if counts is not None:
                    self._bad_total.add_tensor(counts)
                    self._bad_epoch.add_tensor(counts)
                self._check_duplicates(batch)
                yield batch
        except Exception:
            # A worker raised (e.g. a bad index): stop the workers now rather than when the
            # iterator is garbage collected, and let the next iteration start fresh ones.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
            raise

    def _check_duplicates(self, batch: dict[str, Any]) -> None:
        """Refuse a dataset index read twice in this epoch (on this rank)."""
        repeated = batch.pop(REPEATED_KEY, None)
        sources = batch.pop(SOURCE_KEY, None)
        if self._seen is None:
            return
        at = self._seen.add(batch["dataset_index"], repeated)
        if at is None:
            return
        index = int(batch["dataset_index"][at])
        where = sources[at] if sources is not None else "a sample"
        raise DuplicateIndexError(
            f"dataset index {index} comes twice in epoch {self.epoch} (rank "
            f"{self.dataset.rank}): {where} has the index of a sample read earlier in the "
            "epoch, and both would share one per-sample state; give every sample its own index "
            "(glofnd-shards verify PATTERN names both; glofnd-shards add-index re-indexes)"
        )


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
