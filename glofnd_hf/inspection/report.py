"""The inspection report as plain data (what the JSON holds and the HTML and PNGs show)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fnd.interface import SIDES
from .neighbours import AnchorScan, SideNeighbours

__all__ = ["REPORT_FORMAT_VERSION", "anchor_entry", "save_json", "summary_entry"]

REPORT_FORMAT_VERSION = 1


def _candidate(
    row: int, similarity: float, describe: Callable[[int], dict[str, Any]], anchor_label: Any
) -> dict[str, Any]:
    entry = {**describe(row), "similarity": similarity}
    if anchor_label is not None:
        entry["same_label"] = entry.get("label") == anchor_label
    return entry


def anchor_entry(
    row: int,
    sides: Sequence[SideNeighbours],
    describe: Callable[[int], dict[str, Any]],
    visits: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One anchor: its sample and, per side, its threshold, detected false negatives and the
    nearest negatives below the threshold. ``describe(row)``: index, row, caption, label."""
    anchor = describe(row)
    label = anchor.get("label")
    out: dict[str, Any] = {**anchor, "sides": {}}
    for s, (side, found) in enumerate(zip(SIDES, sides, strict=True)):
        out["sides"][side] = {
            # Exact float32 values (not rounded): a listed similarity is above or at/below
            # its threshold in the JSON as it was in the comparison.
            "threshold": found.threshold,
            "visits": None if visits is None else int(visits[s]),
            "positive_similarity": found.positive_similarity,
            "num_negatives": found.num_negatives,
            "num_detected": found.num_detected,
            "detected": [_candidate(r, v, describe, label) for r, v in found.detected],
            "below": [_candidate(r, v, describe, label) for r, v in found.below],
        }
    return out


def _spread(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return {}
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype))
    return {
        "mean": round(float(values.mean()), 6),
        "p10": round(float(q[0]), 6),
        "p50": round(float(q[1]), 6),
        "p90": round(float(q[2]), 6),
        "max": round(float(values.max()), 6),
    }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    total = float(den.sum())
    return round(float(num.sum()) / total, 6) if total > 0 else None


def summary_entry(scan: AnchorScan, num_rows: int) -> dict[str, Any]:
    """Data set statistics of the scanned anchors, per side."""
    sides = {}
    for s, side in enumerate(SIDES):
        entry: dict[str, Any] = {
            "threshold": _spread(scan.threshold[s]),
            "exact_quantile": _spread(scan.exact_quantile[s]),
            "threshold_minus_exact": _spread(scan.threshold[s] - scan.exact_quantile[s]),
            "median_abs_threshold_error": round(
                float((scan.threshold[s] - scan.exact_quantile[s]).abs().median()), 6
            ),
            "detected_per_anchor": _spread(scan.num_detected[s].float()),
            "anchors_without_detections": int((scan.num_detected[s] == 0).sum()),
            "detected_fraction": _ratio(scan.num_detected[s], scan.num_negatives[s]),
        }
        if scan.num_same_label is not None:
            entry["labels"] = {
                "precision": _ratio(scan.detected_same_label[s], scan.num_detected[s]),
                "recall": _ratio(scan.detected_same_label[s], scan.num_same_label[s]),
                "exact_quantile_precision": _ratio(
                    scan.exact_detected_same_label[s], scan.exact_detected[s]
                ),
                "exact_quantile_recall": _ratio(
                    scan.exact_detected_same_label[s], scan.num_same_label[s]
                ),
                "same_label_per_anchor": _spread(scan.num_same_label[s].float()),
            }
        sides[side] = entry
    return {
        "num_anchors": len(scan.rows),
        "all_anchors": len(scan.rows) == num_rows,
        "sides": sides,
    }


def save_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
