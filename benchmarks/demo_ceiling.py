"""How near alpha could a once-per-epoch rule filter in a demo run? The ceiling beside the rule.

Runs a recipe as ``glofnd-train`` does and, at every epoch end, embeds the training set
twice as a training step sees it (train mode, the training transform; two seeded draws),
then scores in rank units on the second draw (``fnstudy.snapshots.TrainingModeFigures``):

* ``learned``: GloFND's thresholds as they stand;
* ``exact_other_draw``: each anchor's exact (1 - alpha) quantile of the first draw of the
  same epoch (augmentation and dropout alone: no rule does better);
* ``exact_previous_epoch``: the exact quantiles of the previous epoch's draw, held for an
  epoch (what a rule that knew each quantile exactly at its last visit would filter);
* ``visits_last_<K>`` / ``visits_best``: each anchor's empirical quantile of the negatives
  its visits of the K epochs before showed it (random batches of the run's size from each
  epoch's first draw), held for an epoch; the best K of 1, 2, 4, 8, 16 per epoch: what the
  visits themselves hold, without a model of the tail;
* ``motion``: per side, how far the exact quantiles moved since the previous epoch in
  local scales of the tail (mean, sd across anchors, sd after a common affine map).

Each: the mean share of negatives above the thresholds over alpha, the share of anchors
within [0.5, 2] x alpha, and the mask F1 against the exact rule on the same similarities.

    .venv/bin/python benchmarks/demo_ceiling.py recipes/demo_attributes.yaml \\
        --model_name_or_path glofnd-tiny-siglip --loss_type sigmoid \\
        --output benchmarks/results/demo_ceiling_siglip.json

Every flag after the recipe but ``--output``, ``--save-draws``, ``--draw-epochs`` and
``--other-draws`` goes to the training run (``save_strategy: no`` and a temporary
``output_dir`` unless given).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's glofnd_hf

from benchmarks.fnstudy.snapshots import TrainingModeFigures  # noqa: E402
from benchmarks.fnstudy.table import training_mode_table  # noqa: E402
from glofnd_hf.cli.train import run  # noqa: E402


class EpochCeiling(TrainerCallback):
    """``TrainingModeFigures`` at every epoch end, printed as they come."""

    def __init__(self, figures: TrainingModeFigures) -> None:
        self.figures = figures

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        record = self.figures.record(round(state.epoch or 0), model)
        cells = ", ".join(
            f"{name} {f['filtered_over_alpha']:.2f}"
            for name, f in record.items()
            if name not in ("epoch", "motion") and not name.startswith("visits_last_")
        )
        print(f"ceiling epoch {record['epoch']}: {cells}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--output", type=Path, help="results JSON")
    parser.add_argument(
        "--save-draws",
        type=Path,
        metavar="DIR",
        help="write the first draw of each of --draw-epochs as DIR/draw_epoch<E>.pt "
        "(its similarities, alpha and batch size: the input of draw_replay.py)",
    )
    parser.add_argument("--draw-epochs", type=int, nargs="*", default=[])
    parser.add_argument(
        "--other-draws",
        type=int,
        default=0,
        metavar="K",
        help="with --save-draws, also K more draws of the same model at each of "
        "--draw-epochs (the file's other_draws: draw_replay.py --fresh-draws)",
    )
    args, flags = parser.parse_known_args(argv)
    if not any(flag.startswith("--output_dir") for flag in flags):
        flags += ["--output_dir", tempfile.mkdtemp(prefix="demo_ceiling_")]
    if not any(flag.startswith("--save_strategy") for flag in flags):
        flags += ["--save_strategy", "no"]
    seen: list[TrainingModeFigures] = []
    batch_sizes: list[int] = []

    def ceiling(trainer, train) -> TrainerCallback:
        if train is None:
            raise SystemExit("demo_ceiling.py needs a map-style training split, not shards")
        detector = trainer.contrastive_loss.detector
        if not hasattr(detector, "state"):
            raise SystemExit("demo_ceiling.py scores GloFND's thresholds: use detector: glofnd")
        batch_size = trainer.args.per_device_train_batch_size * trainer.args.world_size
        figures = TrainingModeFigures(
            trainer.adapter,
            detector,
            train,
            trainer.args.fn_alpha,
            trainer.args.seed,
            keep_draws=set(args.draw_epochs) if args.save_draws else set(),
            batch_size=batch_size,
            extra_draws=args.other_draws if args.save_draws else 0,
        )
        seen.append(figures)
        batch_sizes.append(batch_size)
        return EpochCeiling(figures)

    zero_shot = run([args.recipe, *flags], callbacks=[ceiling])
    results = {
        "recipe": args.recipe,
        "flags": flags,
        "training_mode": seen[0].records if seen else [],
        "zero_shot": zero_shot.get("after", {}),
    }
    print("\n".join(training_mode_table(results)))
    if args.save_draws is not None and seen:
        args.save_draws.mkdir(parents=True, exist_ok=True)
        for epoch, sims in seen[0].draws.items():
            draw = {
                "similarities": sims.half(),
                "alpha": seen[0].alpha,
                "batch_size": batch_sizes[0],
                "epoch": epoch,
                "recipe": args.recipe,
                "flags": flags,
            }
            if epoch in seen[0].other_draws:
                draw["other_draws"] = seen[0].other_draws[epoch]
            torch.save(draw, args.save_draws / f"draw_epoch{epoch}.pt")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
