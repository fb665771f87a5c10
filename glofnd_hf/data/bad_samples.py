"""The one vocabulary of skipped training samples and the one counter of them.

Both training paths skip bad samples instead of failing: the ``datasets`` collator
(:class:`glofnd_hf.data.hf.ImageTextCollator`) and the shard loader
(:mod:`glofnd_hf.data.shards`).  Each counts them with a :class:`BadSampleCounter` over the
kinds it can meet; the per-batch deltas travel in the batch as a ``bad_sample_counts`` tensor
ordered like the counter's kinds, and the trainer logs the totals as ``bad_samples_<kind>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

__all__ = ["BAD_SAMPLE_KINDS", "DATASETS_BAD_SAMPLE_KINDS", "BadSampleCounter"]

#: Every kind of skipped sample, in the order of the shard loader's ``bad_sample_counts``:
#: an image that does not decode, a sample without an image, a missing or empty caption, a
#: dataset index that is missing or out of range (shards, skip mode), an exception raised by
#: the image transform, an unreadable or truncated shard (the rest of it is skipped).
BAD_SAMPLE_KINDS: tuple[str, ...] = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_index",
    "transform_error",
    "shard_read_error",
)

#: The kinds the ``datasets`` collator meets (a row always has an image cell and an index),
#: in the order of its ``bad_sample_counts``.
DATASETS_BAD_SAMPLE_KINDS: tuple[str, ...] = ("corrupt_image", "missing_caption")

_logger = logging.getLogger(__name__)


class BadSampleCounter:
    """Counts skipped samples by kind, with rate-limited ``logging`` warnings.

    ``kinds`` is a subset of :data:`BAD_SAMPLE_KINDS` and orders the delta tensors.  One
    instance lives in each process that skips samples (a DataLoader worker counts its own);
    :meth:`take_delta` gives what it skipped since the previous call, to ship in a batch, and
    the receiving side sums those with :meth:`add_tensor`.  Each kind is logged at most once
    every ``warn_interval_s`` seconds, with the number not logged meanwhile.
    """

    def __init__(
        self,
        warn_interval_s: float = 60.0,
        log: bool = True,
        *,
        kinds: Sequence[str] = BAD_SAMPLE_KINDS,
        logger: logging.Logger | None = None,
    ) -> None:
        unknown = [k for k in kinds if k not in BAD_SAMPLE_KINDS]
        if unknown:
            raise ValueError(f"unknown bad-sample kind(s) {unknown}; known: {BAD_SAMPLE_KINDS}")
        self.kinds = tuple(kinds)
        self.warn_interval_s = warn_interval_s
        self.log = log
        self.logger = logger or _logger
        self.counts = dict.fromkeys(self.kinds, 0)
        self._reported = dict.fromkeys(self.kinds, 0)
        self._last_warn: dict[str, float] = {}
        self._suppressed = dict.fromkeys(self.kinds, 0)

    def add(self, kind: str, detail: str = "", n: int = 1) -> None:
        if kind not in self.counts:
            raise KeyError(f"unknown bad-sample kind {kind!r}; known: {self.kinds}")
        self.counts[kind] += n
        if not self.log:
            return
        now = time.monotonic()
        last = self._last_warn.get(kind)
        if last is None or now - last >= self.warn_interval_s:
            suppressed = self._suppressed[kind]
            self.logger.warning(
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
        """Counts since the previous call, as a long tensor ordered like ``kinds``."""
        delta = [self.counts[k] - self._reported[k] for k in self.kinds]
        self._reported = dict(self.counts)
        return torch.tensor(delta, dtype=torch.long)

    def discard_delta(self) -> None:
        self._reported = dict(self.counts)

    def add_tensor(self, counts: torch.Tensor) -> None:
        """Add a delta tensor from :meth:`take_delta` of a counter with the same kinds."""
        for kind, value in zip(self.kinds, counts.tolist(), strict=True):
            self.counts[kind] += int(value)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
