"""benchmarks/fn_value.py: the quick study runs every detector end to end and writes the
per-seed results in the issue's format; the oracle's share is computed from the means."""

import json

import pytest

from benchmarks import fn_value


@pytest.mark.slow
def test_quick_study_writes_per_seed_results_of_every_detector(tmp_path):
    output = tmp_path / "fn_value.json"
    results = fn_value.main(["--quick", "--jobs", "1", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written["metric"] == "top1_accuracy"
    assert list(written["detectors"]) == list(fn_value.ORDER)
    for metric in fn_value.METRICS:
        for det, values in written["metrics"][metric].items():
            assert len(values) == 1 and 0.0 <= values[0] <= 1.0, (metric, det)
    detection = written["metrics"]
    # The oracle finds exactly the labelled false negatives; no detection filters nothing.
    assert detection["precision"]["oracle"] == [1.0] and detection["recall"]["oracle"] == [1.0]
    assert detection["filtered_over_alpha"]["none"] == [0.0]
    assert detection["filtered_over_alpha"]["glofnd"][0] > 0.0
    assert written["settings"]["role"] == "test" and written["settings"]["quick"]
    assert output.with_suffix(".png").stat().st_size > 0
    assert "| glofnd |" in fn_value.markdown_table(results)


def test_oracle_share_is_the_part_of_the_oracle_gain():
    runs = [
        {"seed": s, "detector": d, **dict.fromkeys(fn_value.METRICS + fn_value.DETECTION, v)}
        for s, per in enumerate([(0.5, 0.7, 0.6), (0.6, 0.8, 0.6)])
        for d, v in zip(("none", "oracle", "glofnd"), per, strict=True)
    ]
    results = fn_value.collect(runs, ["none", "oracle", "glofnd"])
    assert results["detectors"]["none"] == [0.5, 0.6]
    assert fn_value.oracle_share(results, "glofnd") == pytest.approx(0.25)
    runs = [r | {"top1_accuracy": 0.5} for r in runs]  # the oracle gains nothing
    assert (
        fn_value.oracle_share(fn_value.collect(runs, ["none", "oracle", "glofnd"]), "glofnd")
        is None
    )


def test_rejects_a_masking_start_after_the_last_epoch():
    with pytest.raises(SystemExit):
        fn_value.main(["--epochs", "5", "--start", "5", "--output", "/dev/null"])


def test_demo_semantics_scores_a_saved_model_on_its_data(tmp_path):
    """``demo_semantics.py --model DIR`` (its ``score_saved``; ``main`` also sets the
    process's threads and logging): the zero-shot top-1 and the digit probe of a saved model
    folder (here untrained: top-1 near chance), without training."""
    from benchmarks import demo_semantics
    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_hf_clip

    data = load_digits_pairs(seed=0, config="digit-captions")
    texts = list(data["train"]["caption"]) + list(data["validation"]["caption"])
    build_tiny_hf_clip(seed=0, texts=texts + ["a photo of the digit zero."]).save(tmp_path)
    figures = demo_semantics.score_saved(str(tmp_path), "digit-captions", seed=0)
    assert set(figures) == {"top1", "probe"}
    assert 0.0 <= figures["top1"] < 0.3  # chance is 0.1 for an untrained model
    assert 0.0 < figures["probe"] <= 1.0
