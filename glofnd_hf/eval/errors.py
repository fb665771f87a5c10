"""The error ``glofnd-eval`` reports as a usage error (exit status 2), not a traceback."""

from __future__ import annotations

__all__ = ["EvalInputError"]


class EvalInputError(ValueError):
    """A model name, dataset, column or caption the evaluation cannot use (message says why)."""
