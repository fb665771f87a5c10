"""The dataset index space N, as the data implies it, checked before anything is sized by it.

The per-sample state has N rows (N = the largest dataset index + 1 unless given), so one wild
index (``10**12`` in an index column or a shard's ``.idx``) would size an allocation of
terabytes. The data layer refuses such an N where it computes it, naming where it came from;
the state's own budget (with its real bytes per sample) is checked when the loss is built
(:mod:`glofnd_hf.state_budget`).
"""

from __future__ import annotations

import torch

from ..state_budget import GIB, memory_of
from .errors import IndexSpaceError

__all__ = ["MIN_STATE_BYTES_PER_SAMPLE", "check_index_space"]

#: The least per-sample state any GloFND training keeps: one float32 threshold per side.
#: Detectors and global losses keep more; this bound only refuses the absurd.
MIN_STATE_BYTES_PER_SAMPLE = 8


def check_index_space(
    num_samples: int,
    source: str,
    *,
    bytes_per_sample: int = MIN_STATE_BYTES_PER_SAMPLE,
    memory: int | None = None,
) -> int:
    """``num_samples`` when its per-sample state (``bytes_per_sample`` each) fits in this
    machine's memory (``memory`` overrides the measured one), else
    :class:`~glofnd_hf.data.errors.IndexSpaceError` naming ``source`` (where N came from)."""
    needed = int(num_samples) * int(bytes_per_sample)
    available = memory_of(torch.device("cpu")) if memory is None else int(memory)
    if needed <= available:
        return int(num_samples)
    raise IndexSpaceError(
        f"{source}: N = {int(num_samples):,} samples, whose per-sample state needs at least "
        f"{needed / GIB:,.1f} GiB ({bytes_per_sample} bytes per sample) but this machine has "
        f"{available / GIB:,.1f} GiB; dataset indices must number the samples from 0 (N is the "
        "largest index + 1): check them, or re-index the data"
    )
