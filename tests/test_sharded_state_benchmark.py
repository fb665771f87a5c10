"""benchmarks/sharded_state.py: its quick run (two gloo processes, N = 10^5) measures less
state per process sharded than replicated, and one extra all-reduce of the global batch's
rows per step."""

import json

import pytest

from benchmarks import sharded_state


@pytest.mark.slow
def test_quick_run_measures_memory_time_and_bytes(tmp_path):
    output = tmp_path / "sharded_state.json"
    batch = 256
    argv = ["--quick", "--global-batch", str(batch), "--dim", "64", "--repeats", "2"]
    sharded_state.main([*argv, "--output", str(output)])
    written = json.loads(output.read_text())
    (run,) = written["runs"]
    n, world = run["num_samples"], run["processes"]
    assert (n, world) == (10**5, 2)
    rep, shd = run["settings"]["replicated"], run["settings"]["sharded"]
    per_sample = written["settings"]["bytes_per_sample"]
    assert rep["formula_bytes"] == n * per_sample
    assert shd["formula_bytes"] == -(-n // world) * per_sample
    # The tables are filled when built: their pages count in the RSS difference.
    assert shd["rss_delta_max"] < rep["rss_delta_max"]
    assert 0.8 < run["sharded_rss_over_n_by_world"] < 1.2
    assert 0.8 < run["replicated_rss_over_n"] < 1.2
    assert all(t > 0 for s in (rep, shd) for t in s["step_ms"]) and run["time_ratio"] > 0
    # Every collective counted; sharded adds exactly one all-reduce per table (thresholds,
    # u) of the global batch's rows.
    assert rep["collectives"]["payload_total"] > 0
    assert rep["collectives"]["uncounted"] == shd["collectives"]["uncounted"] == []
    assert run["extra_bytes"]["payload"] == batch * per_sample
    # Thresholds and u read together: one all-reduce more than replicated per step.
    assert run["extra_bytes"]["calls"] == {"all_reduce": 1, "all_gather": 0, "reduce_scatter": 0}
    assert "| 2 | 10^5 |" in sharded_state.markdown_table(written["runs"])
