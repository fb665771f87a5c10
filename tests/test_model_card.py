"""Model card pieces that need no training: template, descriptions, metrics, Hub ids."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from glofnd_hf.fnd import available_detectors
from glofnd_hf.hub_ids import check_hub_repo_id, is_hub_repo_id
from glofnd_hf.model_card import (
    CardInfo,
    describe_detector,
    normalize_eval_metrics,
    read_template,
    render_model_card,
    resolve_base_model,
    template_path,
)
from glofnd_hf.model_card.descriptions import hub_datasets

ROOT = Path(__file__).resolve().parents[1]


def test_template_is_package_data():
    resource = resources.files("glofnd_hf.model_card").joinpath("template.md")
    assert resource.is_file()
    text = resource.read_text(encoding="utf-8")
    assert "{{ card_data }}" in text and "{{ detector_description }}" in text
    assert read_template() == text
    assert template_path().read_text(encoding="utf-8") == text


def test_custom_template_by_argument_and_environment(tmp_path, monkeypatch):
    custom = tmp_path / "card.md"
    custom.write_text("---\n{{ card_data }}\n---\n\nCustom card of {{ model_name }}.\n")
    info = CardInfo(family="hf", model_name="tiny")
    assert "Custom card of tiny." in render_model_card(info, template=custom).text
    assert "Custom card" not in render_model_card(info).text
    monkeypatch.setenv("GLOFND_CARD_TEMPLATE", str(custom))
    assert "Custom card of tiny." in render_model_card(info).text


def test_model_cards_readme_points_at_existing_files():
    text = (ROOT / "model_cards" / "README.md").read_text(encoding="utf-8")
    paths = re.findall(r"`(glofnd_hf/[\w/.]+)`", text)
    assert paths, "model_cards/README.md names no file of the package"
    for path in paths:
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("name", available_detectors())
def test_every_detector_is_described(name):
    assert describe_detector(name) != name  # not the fallback
    info = CardInfo(family="hf", training_recorded=True, loss_type="clip", detector=name)
    assert describe_detector(name) in render_model_card(info).text


def test_hub_repo_ids():
    for good in ("org/name", "openai/clip-vit-base-patch32", "timm/vit_b.openai"):
        assert is_hub_repo_id(good)
        check_hub_repo_id(good)
    for bad in ("name", "a/b/c", "not a repo id", "org/a--b", "org/..x", "", None, 3):
        assert not is_hub_repo_id(bad)
        with pytest.raises(ValueError, match="ORG/NAME"):
            check_hub_repo_id(bad)
    assert is_hub_repo_id("mnist", require_namespace=False)
    assert not is_hub_repo_id("a/b/c", require_namespace=False)


def test_base_model_and_datasets_use_the_repo_id_check(tmp_path, monkeypatch):
    assert resolve_base_model("hf-hub:org/base") == "org/base"
    assert resolve_base_model("org/base") == "org/base"
    assert resolve_base_model("hf-hub:org/a--b") is None
    assert resolve_base_model("glofnd-tiny-hf-clip") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_base_model("org/local") is None  # a local folder, not a Hub id
    assert hub_datasets(["org/ds", "mnist", "org/local", "a/b/c", None, "org/ds"]) == [
        "org/ds",
        "mnist",
    ]


def test_normalize_eval_metrics_keeps_only_our_metrics():
    metrics = {
        "eval_text_to_image_recall@1": 0.5,
        "eval_image_to_text_recall@10": 0.9,
        "eval_top5_accuracy": 0.25,
        "eval_before_top1_accuracy": 0.1,
        "eval_loss": 1.0,
        "epoch": 2.0,
        "eval_top1_accuracy": "n/a",
    }
    assert normalize_eval_metrics(metrics) == {
        "text_to_image_recall@1": 0.5,
        "image_to_text_recall@10": 0.9,
        "top5_accuracy": 0.25,
    }


def test_evaluation_data_names_in_the_model_index(tmp_path):
    from glofnd_hf.model_card import eval_dataset_fields, eval_results_from_metrics, is_local_path

    for local in (str(tmp_path), "/data/coco", "./val", "~/val", "a/b/c", "https://x.org/a.tar"):
        assert is_local_path(local), local
    for hub in ("org/coco-karpathy", "mnist"):
        assert not is_local_path(hub), hub
    # A Hub id is kept; a local path is dropped with a warning and named neutrally.
    assert eval_dataset_fields("org/coco") == {
        "eval_dataset": "org/coco",
        "eval_dataset_name": None,
        "eval_dataset_type": None,
    }
    with pytest.warns(UserWarning, match="not a Hub dataset id"):
        fields = eval_dataset_fields(str(tmp_path))
    assert fields == {
        "eval_dataset": None,
        "eval_dataset_name": "local evaluation data",
        "eval_dataset_type": "local",
    }
    (result,) = eval_results_from_metrics(
        {"top1_accuracy": 0.5}, "org/coco", "test", config="2014", dataset_name="COCO"
    )
    assert (result.dataset_type, result.dataset_name) == ("org/coco", "COCO")
    assert (result.dataset_split, result.dataset_config) == ("test", "2014")


def test_a_card_info_with_an_old_local_path_renders_without_it(tmp_path):
    info = CardInfo(
        family="hf",
        model_name="tiny",
        eval_metrics={"top1_accuracy": 0.5},
        eval_dataset=str(tmp_path),  # as written by an older version
        eval_split="test",
    )
    with pytest.warns(UserWarning, match="not a Hub dataset id"):
        card = render_model_card(info)
    assert str(tmp_path) not in str(card)
    (result,) = card.data.eval_results
    assert result.dataset_name == "local evaluation data" and result.dataset_split == "test"
