"""benchmarks/demo_ceiling.py: the once-per-epoch ceiling beside GloFND's thresholds."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import demo_ceiling

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

SHORT = [
    "--num_train_epochs",
    "2",
    "--max_train_samples",
    "256",
    "--per_device_train_batch_size",
    "64",
    "--do_eval",
    "false",
    "--disable_tqdm",
    "true",
]


def test_each_epoch_scores_the_thresholds_beside_both_ceilings(tmp_path):
    out = tmp_path / "ceiling.json"
    results = demo_ceiling.main(
        [
            str(RECIPES / "demo.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            *SHORT,
            "--output",
            str(out),
            "--save-draws",
            str(tmp_path / "draws"),
            "--draw-epochs",
            "2",
        ]
    )
    records = results["training_mode"]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "exact_previous_epoch" not in records[0] and "exact_previous_epoch" in records[1]
    for record in records:
        for name in ("learned", "exact_other_draw", "iterate"):  # the pinball rule's too
            figures = record[name]
            assert figures["filtered_over_alpha"] >= 0.0
            assert 0.0 <= figures["within_half_to_double"] <= 1.0
        # Two draws of one epoch differ (augmentation, dropout): the other draw's exact
        # quantiles are not the exact rule on this one.
        assert record["exact_other_draw"]["mask_f1"] < 1.0
    assert json.loads(out.read_text())["training_mode"] == records
    # The kept draw is what draw_replay.py reads: image anchors against texts and the
    # transpose, with the run's alpha and batch size.
    assert [p.name for p in (tmp_path / "draws").iterdir()] == ["draw_epoch2.pt"]
    draw = torch.load(tmp_path / "draws" / "draw_epoch2.pt")
    sims = draw["similarities"].float()
    assert sims.shape == (2, 256, 256) and (draw["alpha"], draw["batch_size"]) == (0.1, 64)
    assert torch.allclose(sims[0], sims[1].t()) and draw["epoch"] == 2


def test_a_run_without_glofnd_says_what_it_needs(tmp_path):
    with pytest.raises(SystemExit, match="detector: glofnd"):
        demo_ceiling.main(
            [
                str(RECIPES / "demo.yaml"),
                "--output_dir",
                str(tmp_path / "run"),
                *SHORT,
                "--detector",
                "none",
            ]
        )
