"""benchmarks/draw_replay.py: GloFND replayed on one fixed similarity matrix."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import draw_replay


def _cosines(n: int, dim: int, seed: int) -> torch.Tensor:
    """(2, n, n) similarities of random image and text directions (and the transpose)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    sims = image @ text.t()
    return torch.stack([sims, sims.t()])


def test_on_a_matrix_that_never_moves_the_default_rule_converges_without_restarts():
    records = draw_replay.replay(_cosines(512, 24, 0), alpha=0.02, batch_size=128, visits=30)
    assert [r["visits"] for r in records] == [1, 2, 3, 5, 10, 20, 30]
    first, last = records[0], records[-1]
    assert first["restarted"] is None  # nothing visited before the first visit
    assert last["within_half_to_double"] > max(0.8, first["within_half_to_double"])
    assert 0.7 < last["filtered_over_alpha"] < 1.4
    # Independent tails: the drift tests hardly ever fire on still data.
    assert max(r["restarted"] for r in records[1:]) < 0.05
    # The iterate, scored the same way, is the average's input: near alpha too, and not
    # the threshold itself (the average has moved off it).
    assert 0.7 < last["iterate"]["filtered_over_alpha"] < 1.4
    assert last["iterate"]["filtered_over_alpha"] != last["filtered_over_alpha"]


def test_errors_are_read_in_local_scales_of_each_anchors_tail():
    records = draw_replay.replay(_cosines(512, 24, 3), alpha=0.02, batch_size=128, visits=10)
    first, last = records[0]["errors"], records[-1]["errors"]
    assert set(last) == {"image", "text"}
    for side in ("image", "text"):
        assert set(last[side]) == {"threshold", "iterate", "unit_over_local"}
        for values in last[side].values():
            assert values == sorted(values)  # 10th, 50th, 90th percentiles
        # On a smooth tail the fitted unit is of the order of the local scale, and ten
        # visits bring the thresholds within a few local scales, nearer than one visit did.
        assert 0.3 < last[side]["unit_over_local"][1] < 3.0
        assert abs(last[side]["threshold"][1]) < 1.0
        spread = last[side]["threshold"][2] - last[side]["threshold"][0]
        assert spread < first[side]["threshold"][2] - first[side]["threshold"][0]
    adam = draw_replay.replay(
        _cosines(256, 24, 1), alpha=0.02, batch_size=64, visits=1, update_rule="adam"
    )
    assert set(adam[-1]["errors"]["image"]) == {"threshold"}  # no iterate, no unit


def test_fresh_draws_are_visited_and_the_held_out_draw_is_scored():
    sims = _cosines(512, 24, 4)
    gen = torch.Generator().manual_seed(5)
    # Draws of a model that does not move: each pair's similarity jitters a little.
    jitter = [sims + 0.01 * torch.randn(sims.shape, generator=gen) for _ in range(4)]
    draws = torch.stack([torch.stack([d[0], d[0].t()]) for d in jitter])
    fresh = draw_replay.replay(sims, 0.02, 128, 20, visit_draws=draws)
    assert 0.6 < fresh[-1]["filtered_over_alpha"] < 1.6
    # Visits of other matrices altogether, scored on the held-out one: the thresholds
    # learned there filter nothing like alpha here.
    shifted = draw_replay.replay(sims, 0.02, 128, 5, visit_draws=draws + 0.3)
    assert shifted[-1]["filtered_over_alpha"] < 0.05
    with pytest.raises(ValueError, match="visit_draws"):
        draw_replay.replay(sims, 0.02, 128, 1, visit_draws=draws[:, :, :10])


def test_restarts_are_counted_where_the_drift_tests_fire():
    # A drift level of 1 (a z-score of 1.4) fires on the batches' noise alone.
    noisy = draw_replay.replay(
        _cosines(256, 24, 1), alpha=0.02, batch_size=64, visits=5, drift_level=1.0
    )
    assert noisy[-1]["restarted"] > 0.2
    adam = draw_replay.replay(
        _cosines(256, 24, 1), alpha=0.02, batch_size=64, visits=2, update_rule="adam"
    )
    assert "iterate" not in adam[-1]  # a rule without an iterate column


def test_the_command_line_reads_a_saved_draw_and_writes_its_figures(tmp_path):
    path = tmp_path / "draw_epoch3.pt"
    draw = {"similarities": _cosines(128, 16, 2).half(), "alpha": 0.05, "batch_size": 32}
    torch.save({**draw, "epoch": 3}, path)
    out = tmp_path / "replay.json"
    results = draw_replay.main(
        [str(path), "--visits", "3", "--set", "drift_level=5", "--output", str(out)]
    )
    assert results["settings"] == {"drift_level": 5} and results["epoch"] == 3
    assert [r["visits"] for r in results["records"]] == [1, 2, 3]
    assert out.read_text().count('"visits"') == 3
    assert (results["alpha"], results["batch_size"]) == (0.05, 32)
    other = draw_replay.main([str(path), "--visits", "1", "--alpha", "0.01", "--batch-size", "64"])
    assert (other["alpha"], other["batch_size"]) == (0.01, 64)
    with pytest.raises(ValueError, match="batch_size"):
        draw_replay.replay(draw["similarities"], 0.05, 1000, 1)
    assert results["fresh_draws"] is False
    with pytest.raises(SystemExit):  # no other draws saved with this one
        draw_replay.main([str(path), "--visits", "1", "--fresh-draws"])
    redrawn = torch.stack([_cosines(128, 16, 2), _cosines(128, 16, 2)]).half()
    torch.save({**draw, "other_draws": redrawn}, path)
    fresh = draw_replay.main([str(path), "--visits", "2", "--fresh-draws"])
    assert fresh["fresh_draws"] is True and len(fresh["records"]) == 2


def test_benchmark_settings_read_json_values_and_plain_strings_alike():
    from benchmarks._settings import parse_settings

    settings = parse_settings(
        ["drift_level=5", "gain_decay=0.7", "common_test=across", 'update_rule="tail"']
    )
    assert settings == {
        "drift_level": 5,
        "gain_decay": 0.7,
        "common_test": "across",
        "update_rule": "tail",
    }
    assert isinstance(settings["drift_level"], int)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_settings(["drift_level"])


def test_each_side_is_scored_beside_what_its_exact_quantiles_can_filter():
    sims = _cosines(256, 24, 3)
    # Image anchors see ten tied texts at the top (one caption repeated word for word): the
    # quantile at alpha 0.01 (2.6 negatives) falls on that atom.
    sims[0, :, :10] = 0.9
    records = draw_replay.replay(sims, alpha=0.01, batch_size=64, visits=3)
    sides = records[-1]["sides"]
    assert sides["text"]["attainable_within"] > 0.9
    assert sides["image"]["attainable_within"] < 0.1
    assert sides["image"]["within_half_to_double"] < 0.1  # nothing can be within there
