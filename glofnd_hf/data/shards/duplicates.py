"""Duplicate dataset indices within an epoch: one bit per index of ``[0, N)``.

Two samples with one dataset index would share one per-sample state (one threshold), which
nothing downstream can notice. :class:`SeenIndices` records the indices a rank receives in an
epoch (``N / 8`` bytes, a few array operations per batch) and reports the first one that comes
twice. Samples read again on purpose (a worker's re-read pass, resampled shards) are not
checked: the batches flag them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SeenIndices"]


class SeenIndices:
    """A bitmap of the dataset indices seen since the last :meth:`reset`."""

    def __init__(self, num_samples: int) -> None:
        self.bits = np.zeros((int(num_samples) + 7) // 8, dtype=np.uint8)

    def reset(self) -> None:
        self.bits.fill(0)

    def add(self, indices: torch.Tensor, repeated: torch.Tensor | None = None) -> int | None:
        """Record ``indices`` (those not flagged in ``repeated``); the position in
        ``indices`` of the first one seen before (earlier or in this batch), else None."""
        idx = indices.detach().cpu().numpy().astype(np.int64, copy=False)
        positions = np.arange(len(idx))
        if repeated is not None:
            fresh = ~repeated.detach().cpu().numpy().astype(bool, copy=False)
            idx, positions = idx[fresh], positions[fresh]
        if idx.size == 0:
            return None
        byte = idx >> 3
        bit = np.left_shift(1, idx & 7).astype(np.uint8)
        dup = (self.bits[byte] & bit) != 0
        order = np.argsort(idx, kind="stable")
        twin = np.zeros(len(idx), dtype=bool)
        twin[order[1:]] = idx[order[1:]] == idx[order[:-1]]  # later of two equal indices
        dup |= twin
        np.bitwise_or.at(self.bits, byte, bit)
        if dup.any():
            return int(positions[np.flatnonzero(dup)[0]])
        return None
