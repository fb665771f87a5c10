"""PNG figures of a report (matplotlib, imported only here and only when asked for).

Figures use matplotlib's object API (``Figure`` + the Agg canvas): nothing touches pyplot's
global state or the caller's backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..fnd.interface import SIDES
from .errors import InspectionError

__all__ = ["anchor_grid", "require_matplotlib", "summary_figure"]

_DETECTED = "#c0392b"
_BELOW = "#7f8c8d"


def require_matplotlib():
    """``matplotlib.figure.Figure``, or a clear error naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise InspectionError(
            "PNG output needs matplotlib: pip install 'glofnd-hf[inspect]' (or pass --no-png "
            "for the HTML and JSON only)"
        ) from err
    return Figure


def _save(figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


_CELL_W, _CELL_H, _IMAGE = 150, 215, 96  # pixels of one sample's cell and its image


def _framed(image, colour: str, width: int) -> np.ndarray:
    """The thumbnail scaled to the cell's image size (no smoothing: pixels stay pixels)
    inside a frame of ``colour``."""
    from PIL import Image, ImageOps

    scale = _IMAGE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.convert("RGB").resize(size, Image.NEAREST)
    return np.asarray(ImageOps.expand(resized, border=width, fill=colour))


def anchor_grid(anchor: dict[str, Any], thumbs: dict[int, Any], path: Path, dpi: int = 100) -> Path:
    """One anchor: a row per side with the anchor, its detected false negatives (red) and
    the nearest negatives below its threshold (grey), each with similarity and caption.

    Images are placed with ``figimage`` and text with ``Figure.text`` (no axes: a grid of
    axes costs seconds per figure on a small CPU)."""
    Figure = require_matplotlib()
    columns = 1 + max(len(s["detected"]) + len(s["below"]) for s in anchor["sides"].values())
    width, height = columns * _CELL_W, len(SIDES) * _CELL_H + 30
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    figure.text(
        0.5,
        1 - 8 / height,
        f"anchor #{anchor['index']}: detected false negatives (red), nearest below the "
        "threshold (grey); ✓/✗: same/other label",
        ha="center",
        va="top",
        fontsize=9,
    )
    for s, side in enumerate(SIDES):
        entry = anchor["sides"][side]
        cells = [(anchor, "anchor", "#000000")]
        cells += [(c, "detected", _DETECTED) for c in entry["detected"]]
        cells += [(c, "below", _BELOW) for c in entry["below"]]
        top = height - 30 - s * _CELL_H  # pixels from the bottom
        for k, (sample, kind, colour) in enumerate(cells):
            left = k * _CELL_W
            framed = _framed(thumbs[sample["row"]], colour, 1 if kind == "below" else 3)
            x0 = left + (_CELL_W - framed.shape[1]) // 2
            figure.figimage(framed, xo=x0, yo=top - 32 - framed.shape[0], origin="upper")
            if kind == "anchor":
                title = f"{side} anchor #{sample['index']}\nthreshold {entry['threshold']:.3f}"
            else:
                mark = {True: " ✓", False: " ✗"}.get(sample.get("same_label"), "")
                title = f"#{sample['index']} s={sample['similarity']:.3f}{mark}"
            center = (left + _CELL_W / 2) / width
            figure.text(
                center, (top - 4) / height, title, ha="center", va="top", fontsize=7, color=colour
            )
            caption = textwrap.shorten(sample["caption"], 75, placeholder="…")
            figure.text(
                center,
                (top - 38 - _IMAGE - 6) / height,
                textwrap.fill(caption, 26),
                ha="center",
                va="top",
                fontsize=6,
            )
    return _save(figure, path, dpi)


def summary_figure(report: dict[str, Any], scan, path: Path, dpi: int = 100) -> Path:
    """Thresholds against the exact quantiles, detections per anchor, and precision and
    recall against the labels (when there are labels)."""
    Figure = require_matplotlib()
    with_labels = scan.num_same_label is not None
    columns = 3 if with_labels else 2
    figure = Figure(figsize=(4.0 * columns, 5.4), layout="constrained")
    grid = figure.subplots(len(SIDES), columns, squeeze=False)
    learned = report["detector"]["thresholds"].startswith("learned")
    alpha = report["detector"]["alpha"]
    for s, side in enumerate(SIDES):
        axis = grid[s][0]
        lam = scan.threshold[s].numpy()
        exact = scan.exact_quantile[s].numpy()
        bins = np.histogram_bin_edges(np.concatenate([lam, exact]), bins=40)
        if learned:
            axis.hist(lam, bins=bins, alpha=0.6, label="learned threshold", color=_DETECTED)
        axis.hist(exact, bins=bins, alpha=0.6, label=f"exact {1 - alpha:g} quantile")
        axis.set_title(f"{side} side: thresholds", fontsize=9)
        axis.set_xlabel("similarity", fontsize=8)
        axis.legend(fontsize=7)

        axis = grid[s][1]
        counts = scan.num_detected[s].numpy()
        axis.hist(counts, bins=np.arange(counts.max() + 2) - 0.5, color=_BELOW)
        axis.set_title(f"{side} side: detected false negatives per anchor", fontsize=9)
        axis.set_xlabel(f"count (mean {counts.mean():.1f})", fontsize=8)

        if with_labels:
            axis = grid[s][2]
            labels = report["summary"]["sides"][side]["labels"]
            names = ["precision", "recall"]
            thresholds = [labels[n] or 0.0 for n in names]
            exact_rule = [labels[f"exact_quantile_{n}"] or 0.0 for n in names]
            x = np.arange(len(names))
            axis.bar(x - 0.2, thresholds, 0.4, label="thresholds", color=_DETECTED)
            axis.bar(x + 0.2, exact_rule, 0.4, label="exact quantile rule")
            axis.set_xticks(x, names)
            axis.set_ylim(0, 1)
            axis.set_title(f"{side} side: against the labels", fontsize=9)
            axis.legend(fontsize=7)
    scope = "every anchor" if report["summary"]["all_anchors"] else "a random subset"
    figure.suptitle(
        f"{report['detector']['name']} (alpha {alpha:g}), {scope} "
        f"({report['summary']['num_anchors']}) against the whole data set",
        fontsize=10,
    )
    return _save(figure, path, dpi)
