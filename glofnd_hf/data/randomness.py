"""Per-sample randomness of the data path: a pure function of ``(seed, epoch, sample)``.

Augmentation (random crops, flips, ...), the choice among several captions and the like
draw from generators seeded by the training seed, the epoch and the sample's dataset index
(plus, for streaming shards, the pass over the shards). The same sample in the same epoch
therefore gets the same augmentation whatever happened before: which process or
DataLoader worker decodes it, how many workers there are, and whether the run was
interrupted and resumed in between. No random-number state has to be saved or restored
for the data path.

Image transforms written for torchvision, open_clip or timm draw from the global generators
(``torch``, ``random``, ``numpy``); :class:`SampleRandomness` seeds those for each sample
and puts back the caller's states afterwards, so the global streams used elsewhere (dropout,
the Trainer's saved RNG state) are left exactly as they were.
"""

from __future__ import annotations

import hashlib
import multiprocessing.context
import multiprocessing.sharedctypes
import random
from typing import Any

import numpy as np
import torch

__all__ = ["SampleRandomness", "SharedInt", "sample_seed"]


def sample_seed(seed: int, epoch: int, index: int, *more: int) -> int:
    """A 63-bit seed from integers: the same in every process, platform and Python version."""
    text = "glofnd-sample:" + ":".join(str(int(p)) for p in (seed, epoch, index, *more))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleRandomness:
    """Seeds the global ``torch`` (CPU), ``random`` and ``numpy`` generators for one sample at
    a time, and puts back the states they had before the first :meth:`seed` on
    :meth:`release` (or at the end of a ``with`` block). Saving and restoring the states
    costs far more than seeding (numpy's), so a batch does it once, not once per sample.
    """

    def __init__(self) -> None:
        self._saved: tuple[Any, Any, Any] | None = None

    def seed(self, seed: int) -> None:
        if self._saved is None:
            self._saved = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
        torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA streams untouched
        random.seed(seed)
        np.random.seed(seed % (1 << 32))

    def release(self) -> None:
        if self._saved is not None:
            torch_state, python_state, numpy_state = self._saved
            self._saved = None
            torch.random.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __enter__(self) -> SampleRandomness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SharedInt:
    """An int in shared memory, seen by forked or spawned DataLoader workers (persistent
    ones included) once they exist; degrades to a plain int when pickled outside process
    spawning (e.g. by ``copy.deepcopy``)."""

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
