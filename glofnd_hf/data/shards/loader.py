"""The DataLoader over a :class:`ShardDataset`: epochs, resume and bad-sample totals."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..bad_samples import BadSampleCounter
from .dataset import ShardConfig, ShardDataset

__all__ = ["PRESHARDED_ATTR", "ShardDataLoader", "build_shard_loader", "is_presharded_loader"]

#: Attribute set on the loader and dataset: already split by rank, keep it out of
#: ``accelerator.prepare``.
PRESHARDED_ATTR = "glofnd_presharded"


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
