"""Errors for training data the loaders cannot use.

Each is a ``ValueError``: the command-line tools answer it with one line and exit status 2
(:mod:`glofnd_hf.cli.errors`). Each takes its message only, so that torch can re-raise one
that a DataLoader worker raised in the main process.
"""

from __future__ import annotations

__all__ = ["DataError", "DuplicateIndexError", "IndexSpaceError", "ShardResumeError"]


class DataError(ValueError):
    """Training data that cannot be used as it is (the message says what to change)."""


class DuplicateIndexError(DataError):
    """Two samples carry the same dataset index (they would share one per-sample state)."""


class IndexSpaceError(DataError):
    """The dataset indices imply an index space N whose per-sample state cannot fit."""


class ShardResumeError(DataError):
    """A mid-epoch resume whose loader settings would not continue the checkpoint's stream."""
