"""The study's figures: detection precision / recall / F1 per epoch (``fn_f1*.png``) and
GloFND's learned thresholds beside the exact quantiles (``fn_lambda*.png``).

Plotting is kept apart so that matplotlib is imported only when a figure is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLOURS_PLOT = {
    "none": "#888888",
    "batch_quantile": "#d62728",
    "glofnd": "#1f77b4",
    "ifnd": "#2ca02c",
    "oracle": "#000000",
}
"""Each built-in detector's line colour; any other registered detector takes the next of
matplotlib's cycle."""


def plot_f1(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(len(names), 3, figsize=(12, 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        runs = results["datasets"][name]["runs"]
        start = results["datasets"][name]["settings"]["mask_start"]
        for col, metric in enumerate(("precision", "recall", "f1")):
            ax = axes[row, col]
            for det, run in runs.items():
                if det in ("none",):
                    continue
                xs = [p["epoch"] for p in run["per_epoch"] if p[metric] is not None]
                ys = [p[metric] for p in run["per_epoch"] if p[metric] is not None]
                style = "--" if det == "oracle" else "-"
                ax.plot(xs, ys, style, color=COLOURS_PLOT.get(det), label=det, marker=".")
            ax.axvline(start, color="#bbbbbb", lw=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{name}: {metric}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=8)
    fig.suptitle("False negatives detected in the batch vs the label oracle (both sides)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lambda(results: dict[str, Any], arrays: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in arrays if arrays[n]]
    if not names:
        return
    cols = max(len(arrays[n]) for n in names)
    fig, axes = plt.subplots(
        len(names), cols, figsize=(3.6 * cols, 3.0 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        alpha = results["datasets"][name]["settings"]["alpha"]
        for col, snap in enumerate(arrays[name]):
            ax = axes[row, col]
            lo = float(min(snap["lambda"].min(), snap["exact"].min()))
            hi = float(max(snap["lambda"].max(), snap["exact"].max()))
            bins = np.linspace(lo, hi, 40)
            ax.hist(
                snap["exact"],
                bins=bins,
                alpha=0.5,
                color="#ff7f0e",
                label=f"exact (1-{alpha:g}) quantile",
            )
            ax.hist(snap["lambda"], bins=bins, alpha=0.5, color="#1f77b4", label="GloFND lambda")
            ax.set_title(f"{name}, end of epoch {snap['epoch']} (image side)", fontsize=9)
            ax.set_xlabel("threshold")
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
