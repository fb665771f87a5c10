"""The error ``glofnd-inspect`` answers with one line (exit status 2) instead of a traceback."""

from __future__ import annotations

__all__ = ["InspectionError"]


class InspectionError(ValueError):
    """A checkpoint, data set or choice of anchors the inspection cannot use (says why)."""
