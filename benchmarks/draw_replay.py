"""Does a threshold rule converge on a real model's tails? Replays one saved training-mode draw.

The stationary benchmark (``threshold_stationary.py``) draws every anchor's negatives
independently, so one batch's anchors share nothing. In training they share their
negatives: a batch that happens to hold a few "hub" samples, similar to many anchors,
raises every anchor's tail at once. This script keeps what is real (the similarities of a
model from a demo run, ``demo_ceiling.py --save-draws``) and what is stationary (the same
(2, N, N) matrix at every visit): each visit shuffles the data set into batches of the
run's size and feeds them to GloFND, which is then scored on the same matrix in rank
units (``fnstudy.snapshots.rank_figures``) together with the share of anchor visits that
restarted (an age that fell: a drift test fired, which on a matrix that never moves is a
false alarm).

    .venv/bin/python benchmarks/demo_ceiling.py recipes/demo_attributes.yaml \\
        --model_name_or_path glofnd-tiny-siglip --loss_type sigmoid \\
        --save-draws /tmp/draws --draw-epochs 5 30
    .venv/bin/python benchmarks/draw_replay.py /tmp/draws/draw_epoch5.pt --visits 50

``--alpha`` and ``--batch-size`` replay the same tails at another alpha x B (the paper's
0.1, say) than the run's own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's glofnd_hf

from benchmarks._settings import parse_settings  # noqa: E402
from benchmarks.fnstudy.snapshots import (  # noqa: E402
    local_scale,
    rank_figures,
    side_figures,
)
from glofnd_hf.fnd import DetectionBatch, GloFNDConfig, GloFNDDetector  # noqa: E402
from glofnd_hf.fnd.quantiles import masked_quantile  # noqa: E402

REPORT_AT = (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500)


def replay(
    similarities: torch.Tensor,
    alpha: float,
    batch_size: int,
    visits: int,
    seed: int = 0,
    visit_draws: torch.Tensor | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Figures after each of ``REPORT_AT``'s visit counts (up to ``visits``) of GloFND with
    ``settings`` on batches of ``batch_size`` reshuffled every visit from the (2, N, N)
    ``similarities`` (image anchors against texts, text anchors against images), scored on
    them. With ``visit_draws`` (K, 2, N, N), other draws of the same model, the visits
    cycle through those instead (a fresh draw per visit, as in training, of a model that
    does not move) and ``similarities`` is the held-out draw they are scored on."""
    sims = similarities.float()
    if visit_draws is not None and visit_draws.shape[1:] != sims.shape:
        raise ValueError(
            f"visit_draws must be (K, {', '.join(map(str, sims.shape))}), "
            f"got {tuple(visit_draws.shape)}"
        )
    n = sims.shape[1]
    if batch_size < 2 or batch_size > n:
        raise ValueError(f"batch_size must lie in [2, {n}], got {batch_size}")
    detector = GloFNDDetector(n, GloFNDConfig(alpha=alpha, **settings))
    negatives = ~torch.eye(n, dtype=torch.bool)
    exact = masked_quantile(sims, negatives, 1.0 - alpha)  # the matrix never moves
    local = local_scale(sims, negatives, alpha, exact).clamp(min=1e-6)  # ``_errors``' unit
    columns = detector.state.columns
    age = columns.index("age") if "age" in columns else None
    gen = torch.Generator().manual_seed(seed)
    square = ~torch.eye(batch_size, dtype=torch.bool)
    records, restarts, anchor_visits = [], 0, 0
    for visit in range(1, visits + 1):
        seen = sims if visit_draws is None else visit_draws[(visit - 1) % len(visit_draws)].float()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            before = None if age is None else detector.state.rows(index)[..., age]
            batch = DetectionBatch(index, index, square, visit - 1 + start / n)
            detector.detect(seen[:, index][:, :, index], batch)
            if before is not None:
                after = detector.state.rows(index)[..., age]
                restarts += int((after < before + 1.0).logical_and(before > 0).sum())
                anchor_visits += int((before > 0).sum())
        if visit in REPORT_AT or visit == visits:
            rows = detector.state.rows(torch.arange(n))
            thresholds = detector.state.thresholds_of(rows).t()
            record = {
                "visits": visit,
                **rank_figures(sims, thresholds, negatives, alpha, exact),
                "restarted": restarts / anchor_visits if anchor_visits else None,
                "sides": _per_side(sims, thresholds, negatives, alpha, exact),
            }
            iterates = detector.state.iterates_of(rows)
            if iterates is not None:  # the pinball rule's iterate, before its averaging
                iterates = iterates.t()
                record["iterate"] = rank_figures(sims, iterates, negatives, alpha, exact)
            units = rows[..., columns.index("unit")].t() if "unit" in columns else None
            record["errors"] = _errors(thresholds, iterates, units, exact, local)
            records.append(record)
            restarts = anchor_visits = 0
    return records


def _errors(
    thresholds: torch.Tensor,
    iterates: torch.Tensor | None,
    units: torch.Tensor | None,
    exact: torch.Tensor,
    local: torch.Tensor,
) -> dict[str, dict[str, list[float]]]:
    """Where the per-anchor error lives, per side: the 10th, 50th and 90th percentiles
    across anchors of the (2, N) threshold less the exact quantile, and of the (2, N)
    iterate's (where the rule has one), in local scales of the tail (``local``: a factor e in the
    share filtered is one), and of the rule's step unit over the local scale (where it
    keeps one: the pinball and tail rules)."""
    levels = torch.tensor([0.1, 0.5, 0.9])
    columns = {"threshold": (thresholds - exact) / local}
    if iterates is not None:
        columns["iterate"] = (iterates - exact) / local
    if units is not None:
        columns["unit_over_local"] = units / local
    return {
        name: {
            column: [round(float(v), 2) for v in values[i].float().nanquantile(levels)]
            for column, values in columns.items()
        }
        for i, name in enumerate(("image", "text"))
    }


def _per_side(
    sims: torch.Tensor,
    thresholds: torch.Tensor,
    negatives: torch.Tensor,
    alpha: float,
    exact: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """``side_figures``, each beside what the ``exact`` quantiles themselves filter: on
    tied similarities (captions repeated word for word embed alike) a quantile can fall
    on an atom, where no threshold filters within [0.5, 2] x alpha."""
    attainable = side_figures(sims, exact, negatives, alpha, exact)
    figures = side_figures(sims, thresholds, negatives, alpha, exact)
    return {
        name: {**side, "attainable_within": best["within_half_to_double"]}
        for name, side, best in zip(("image", "text"), figures, attainable, strict=True)
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draw", type=Path, help="a draw_epoch<E>.pt of demo_ceiling.py")
    parser.add_argument("--visits", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, help="replay at this alpha instead of the run's own")
    parser.add_argument(
        "--batch-size", type=int, help="replay at this batch size instead of the run's own"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="GloFND settings (detector_kwargs), e.g. update_rule=tail drift_level=5",
    )
    parser.add_argument(
        "--fresh-draws",
        action="store_true",
        help="visit the draw's other_draws in turn (demo_ceiling.py --other-draws) and score "
        "on its first draw, which no visit saw",
    )
    parser.add_argument("--output", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    draw = torch.load(args.draw)
    logging.disable(logging.WARNING)  # the health warnings repeat what the figures say
    settings = parse_settings(args.set)
    alpha = draw["alpha"] if args.alpha is None else args.alpha
    batch_size = draw["batch_size"] if args.batch_size is None else args.batch_size
    if args.fresh_draws and "other_draws" not in draw:
        parser.error(f"{args.draw} holds no other draws: save it with --other-draws K")
    records = replay(
        draw["similarities"],
        alpha,
        batch_size,
        args.visits,
        args.seed,
        visit_draws=draw["other_draws"] if args.fresh_draws else None,
        **settings,
    )
    for r in records:
        restarted = "-" if r["restarted"] is None else f"{100 * r['restarted']:.1f} %"
        iterate = (
            ""
            if "iterate" not in r
            else (
                f" (iterate {r['iterate']['filtered_over_alpha']:.2f} x, "
                f"{100 * r['iterate']['within_half_to_double']:.0f} %)"
            )
        )
        sides = "; ".join(
            f"{name} {f['filtered_over_alpha']:.2f} x, {100 * f['within_half_to_double']:.0f} % "
            f"(attainable {100 * f['attainable_within']:.0f} %)"
            for name, f in r["sides"].items()
        )
        errors = "; ".join(
            f"{name} "
            + ", ".join(
                f"{c} " + "/".join(f"{v:.1f}" if c == "unit_over_local" else f"{v:+.1f}" for v in p)
                for c, p in e.items()
            )
            for name, e in r["errors"].items()
        )
        print(
            f"visit {r['visits']:4d}: filtered {r['filtered_over_alpha']:.2f} x alpha, "
            f"{100 * r['within_half_to_double']:.0f} % within [0.5, 2], "
            f"F1 {r['mask_f1']:.2f}, restarted {restarted}{iterate}; {sides}\n"
            f"    p10/p50/p90 in local scales: {errors}"
        )
    results = {
        "draw": str(args.draw),
        "epoch": draw.get("epoch"),
        "alpha": alpha,
        "batch_size": batch_size,
        "fresh_draws": args.fresh_draws,
        "settings": settings,
        "records": records,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
