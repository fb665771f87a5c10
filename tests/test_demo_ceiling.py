"""benchmarks/demo_ceiling.py: the once-per-epoch ceiling beside GloFND's thresholds."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import demo_ceiling
from benchmarks.fnstudy.snapshots import VisitWindows, quantile_motion, visit_negatives
from glofnd_hf.fnd import masked_quantile

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
            "--other-draws",
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
        # The learned thresholds per side: their mean is the pooled figure.
        sides = record["learned"]["sides"]
        assert len(sides) == 2
        assert record["learned"]["filtered_over_alpha"] == pytest.approx(
            sum(side["filtered_over_alpha"] for side in sides) / 2, rel=1e-5
        )
        # Two draws of one epoch differ (augmentation, dropout): the other draw's exact
        # quantiles are not the exact rule on this one.
        assert record["exact_other_draw"]["mask_f1"] < 1.0
    # What the visits hold: the previous epoch's batches, from the second epoch.
    assert not any(name.startswith("visits_") for name in records[0])
    assert "visits_last_1" in records[1] and "visits_last_2" not in records[1]
    assert records[1]["visits_best"]["window"] == 1
    # How far each side's exact quantiles moved, in local scales of the tail.
    assert "motion" not in records[0] and len(records[1]["motion"]) == 2
    assert all(m["local_scale"] > 0 and m["sd"] >= 0 for m in records[1]["motion"])
    assert json.loads(out.read_text())["training_mode"] == records
    # The kept draw is what draw_replay.py reads: image anchors against texts and the
    # transpose, with the run's alpha and batch size.
    assert [p.name for p in (tmp_path / "draws").iterdir()] == ["draw_epoch2.pt"]
    draw = torch.load(tmp_path / "draws" / "draw_epoch2.pt")
    sims = draw["similarities"].float()
    assert sims.shape == (2, 256, 256) and (draw["alpha"], draw["batch_size"]) == (0.1, 64)
    assert torch.allclose(sims[0], sims[1].t()) and draw["epoch"] == 2
    # Two more draws of the same model (draw_replay.py --fresh-draws): the epoch's second
    # draw and one of its own, each unlike the first and unlike each other.
    others = draw["other_draws"].float()
    assert others.shape == (2, 2, 256, 256)
    assert not torch.equal(others[0], sims) and not torch.equal(others[0], others[1])
    assert (others - sims).abs().mean() < 0.5 * sims.std()  # the same model, redrawn


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


def test_each_anchor_visits_the_other_members_of_one_batch():
    n, size = 10, 4
    # Similarity i * n + j identifies the pair (i, j).
    sims = torch.arange(n * n, dtype=torch.float32).view(n, n)
    sims = torch.stack([sims, sims + n * n])
    seen = visit_negatives(sims, size, torch.Generator().manual_seed(0))
    assert seen.shape == (2, n, size - 1)
    batch_of = {}
    for i in range(n):
        values = seen[0, i][torch.isfinite(seen[0, i])]
        others = {int(v) - i * n for v in values}
        assert all(0 <= j < n for j in others) and i not in others
        assert torch.equal(seen[1, i], seen[0, i] + n * n)  # the same batch on both sides
        batch_of[i] = frozenset(others | {i})
    # The batches partition the samples: two full ones and the last of n - 2 size.
    batches = set(batch_of.values())
    assert sorted(len(b) for b in batches) == [n - 2 * size, size, size]
    assert set().union(*batches) == set(range(n))


def test_the_windows_pool_the_visits_of_the_epochs_before():
    torch.manual_seed(0)
    n, size, alpha = 40, 8, 0.1
    windows = VisitWindows(size, alpha, windows=(1, 2, 4))
    draws = [torch.randn(2, n, n) for _ in range(4)]
    assert windows.thresholds(1, draws[0], seed=1) == {}
    assert list(windows.thresholds(2, draws[1], seed=2)) == ["visits_last_1"]
    third = windows.thresholds(3, draws[2], seed=3)
    assert list(third) == ["visits_last_1", "visits_last_2"]
    pooled = torch.cat(
        [
            visit_negatives(draws[1], size, torch.Generator().manual_seed(2)),
            visit_negatives(draws[0], size, torch.Generator().manual_seed(1)),
        ],
        dim=-1,
    )
    expected = masked_quantile(pooled, torch.isfinite(pooled), 1.0 - alpha)
    assert torch.equal(third["visits_last_2"], expected)
    # A gap in the epochs (a resumed run) starts the windows over.
    assert windows.thresholds(5, draws[3], seed=5) == {}


def test_the_motion_of_the_quantiles_is_told_apart_from_a_common_map():
    torch.manual_seed(0)
    before = torch.randn(2, 200)
    local = torch.full((2, 200), 0.5)
    # Every anchor moved by one affine map: nothing is left after it.
    common = quantile_motion(before, 2.0 * before + 1.0, local)
    for side, moved in zip(before, common, strict=True):
        assert moved["local_scale"] == 0.5
        assert moved["mean"] == pytest.approx(float(side.mean() + 1.0) / 0.5, rel=1e-5)
        assert moved["sd"] == pytest.approx(float(side.std()) / 0.5, rel=1e-5)
        assert moved["sd_after_affine"] < 1e-5
    # Each anchor moved its own way: the map removes almost nothing.
    own = quantile_motion(before, before + 0.5 * torch.randn(2, 200), local)
    assert all(0.8 < m["sd_after_affine"] / m["sd"] <= 1.0 for m in own)
    assert all(0.8 < m["sd"] < 1.2 for m in own)


def test_the_motion_is_read_in_the_scale_of_the_anchors_that_have_one():
    torch.manual_seed(1)
    before = torch.randn(2, 100)
    local = torch.full((2, 100), 0.5)
    local[0, :60] = 0.0  # image quantiles on an atom of tied texts: no local scale
    local[1] = 0.0  # a side tied everywhere
    image, text = quantile_motion(before, before + 1.0, local)
    assert image["local_scale"] == 0.5
    assert image["mean"] == pytest.approx(2.0, rel=1e-5)
    assert text == {"local_scale": 0.0, "mean": None, "sd": None, "sd_after_affine": None}


def test_the_table_says_n_a_for_a_side_with_no_scale_to_move_in():
    from benchmarks.fnstudy.table import training_mode_table

    cell = {"filtered_over_alpha": 1.0, "within_half_to_double": 0.5, "mask_f1": 0.5}
    snap = {
        "epoch": 2,
        **{name: cell for name in ("learned", "exact_other_draw", "exact_previous_epoch")},
        "motion": [
            {"local_scale": 0.1, "mean": 1.0, "sd": 2.0, "sd_after_affine": 1.5},
            {"local_scale": 0.0, "mean": None, "sd": None, "sd_after_affine": None},
        ],
    }
    row = training_mode_table({"training_mode": [snap]})[-2]
    assert row.endswith("| +1.0, 2.0, 1.5; n/a |")
