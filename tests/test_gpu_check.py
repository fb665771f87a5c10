"""benchmarks/gpu_check.py works before a GPU is lent: its resume comparison at smoke size."""

import json

from benchmarks import gpu_check


def test_dry_run_compares_a_resumed_run_with_an_uninterrupted_one(tmp_path):
    report = gpu_check.main(
        ["--dry-run", "--out", str(tmp_path), "--skip", "gpu_tests", "train_step", "memory"]
    )
    resume = report["parts"]["resume"]
    assert resume["runs"]["uninterrupted"]["returncode"] == 0
    assert resume["runs"]["resumed"]["returncode"] == 0
    compared = resume["compared"]
    assert set(compared) == {"model.safetensors", "glofnd_state.safetensors"}
    for cmp in compared.values():
        assert cmp["same_keys"] and cmp["elements"] > 0
        assert 0 <= cmp["differing_elements"] <= cmp["elements"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["dry_run"] is True
    assert "resume glofnd_state.safetensors" in (tmp_path / "summary.txt").read_text()
