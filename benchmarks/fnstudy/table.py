"""The study's markdown summary of a results file (what ``--table`` prints, and what the
runs print at the end), kept apart so that reading a results file needs no training code.
"""

from __future__ import annotations

from typing import Any


def markdown_table(results: dict[str, Any]) -> str:
    """The study's summary table (final epoch detection, final zero-shot scores)."""
    lines = []
    for name, entry in results["datasets"].items():
        s = entry["settings"]
        lines += [
            f"**{name}** (N = {s['num_train']}, {s['num_semantic_classes']} semantic classes, "
            f"{s['epochs']} epochs, masking from epoch {s['mask_start']:g}, alpha = {s['alpha']:g})",
            "",
            "| detector | P | R | F1 | filtered | true FN share | I→T R@1 | I→T R@5 | T→I R@1 "
            "| T→I R@5 | class-aware R@1 I→T / T→I | top-1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for det, run in entry["runs"].items():
            f, z = run["final"], run["zero_shot"]
            lines.append(
                f"| {det} | {fmt(f['precision'])} | {fmt(f['recall'])} | {fmt(f['f1'])} "
                f"| {100 * f['filtered_fraction']:.2f} % | {100 * f['true_fn_fraction']:.2f} % "
                f"| {z['image_to_text_recall@1']:.3f} | {z['image_to_text_recall@5']:.3f} "
                f"| {z['text_to_image_recall@1']:.3f} | {z['text_to_image_recall@5']:.3f} "
                f"| {z['image_to_text_class_r@1']:.3f} / {z['text_to_image_class_r@1']:.3f} "
                f"| {z['top1_accuracy']:.3f} |"
            )
        lines.append("")
        lines += training_mode_table(entry["runs"].get("glofnd", {}))
    return "\n".join(lines)


def training_mode_table(run: dict[str, Any]) -> list[str]:
    """GloFND's thresholds in rank units on fresh training-mode similarities, each snapshot
    beside the exact quantiles of another draw (same epoch; previous epoch)."""
    snaps = run.get("training_mode", [])
    if not snaps:
        return []
    names = ("learned", "exact_other_draw", "exact_previous_epoch")
    if any("visits_best" in snap for snap in snaps):
        names += ("visits_best",)
    moved = any("motion" in snap for snap in snaps)
    header = [*names, "quantiles moved (image; text)"] if moved else list(names)
    lines = [
        "GloFND in training mode (filtered / alpha, share of anchors within [0.5, 2] x alpha, "
        "mask F1 against the exact rule on the same similarities"
        + (
            "; the exact quantiles' move since the previous epoch in local scales of the "
            "tail: mean, sd across anchors, sd after a common affine map"
            if moved
            else ""
        )
        + "):",
        "",
        "| epoch | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for snap in snaps:
        cells = []
        for name in names:
            f = snap.get(name)
            cells.append(
                "n/a"
                if f is None
                else f"{f['filtered_over_alpha']:.2f} / {100 * f['within_half_to_double']:.0f} % "
                f"/ {f['mask_f1']:.2f}" + (f" (K {f['window']})" if "window" in f else "")
            )
        if moved:
            cells.append(
                "; ".join(
                    "n/a"
                    if m["mean"] is None
                    else f"{m['mean']:+.1f}, {m['sd']:.1f}, {m['sd_after_affine']:.1f}"
                    for m in snap["motion"]
                )
                if "motion" in snap
                else "n/a"
            )
        lines.append(f"| {snap['epoch']} | " + " | ".join(cells) + " |")
    return lines + [""]


def fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:.3f}"
