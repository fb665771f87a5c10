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
        "eval_dataset_type": None,  # no Hub id: no model-index type (issue 31)
    }
    (result,) = eval_results_from_metrics(
        {"top1_accuracy": 0.5}, "org/coco", "test", config="2014", dataset_name="COCO"
    )
    assert (result.dataset_type, result.dataset_name) == ("org/coco", "COCO")
    assert (result.dataset_split, result.dataset_config) == ("test", "2014")


def test_data_not_on_the_hub_stays_out_of_the_model_index():
    """Issue 31, item 2: EvalResult's dataset.type is the Hub id of the data. The embedded
    digits, local data and the 'local' type older versions wrote have none: their results
    are in the card's text only, and the card says why."""
    from glofnd_hf.model_card import eval_results_from_metrics

    metrics = {"top1_accuracy": 0.5}
    for dataset, dataset_type in (
        ("glofnd-digits", None),
        (None, None),
        (None, "local"),
        (None, "/data/coco"),
        ("glofnd-digits", "glofnd-digits"),
    ):
        assert eval_results_from_metrics(metrics, dataset, dataset_type=dataset_type) == []
    (result,) = eval_results_from_metrics(metrics, None, dataset_type="org/coco")
    assert (result.dataset_type, result.dataset_name) == ("org/coco", "org/coco")
    for eval_dataset, eval_type in (("glofnd-digits", None), (None, "local")):
        info = CardInfo(
            family="hf",
            eval_metrics=metrics,
            eval_dataset=eval_dataset,
            eval_dataset_name="local evaluation data" if eval_type else None,
            eval_dataset_type=eval_type,
        )
        card = render_model_card(info)
        assert card.data.eval_results is None and "model-index:" not in str(card)
        assert "| `top1_accuracy` | 50.00% |" in card.text
        assert "not in the card's `model-index`" in card.text
    hub = render_model_card(CardInfo(family="hf", eval_metrics=metrics, eval_dataset="org/coco"))
    assert hub.data.eval_results[0].dataset_type == "org/coco"
    assert "not in the card's `model-index`" not in hub.text


@pytest.mark.parametrize(
    ("family", "kind", "tag", "scoring"),
    [
        ("hf", "clip", "clip", "outputs.logits_per_image.softmax(dim=-1)"),
        ("hf", "siglip", "siglip", "torch.sigmoid(outputs.logits_per_image)"),
        ("open_clip", "clip", "clip", "logits.softmax(dim=-1)"),
        ("open_clip", "siglip", "siglip", "torch.sigmoid(logits)"),
    ],
)
def test_tags_and_usage_follow_the_model_kind(family, kind, tag, scoring):
    """Issue 31, item 2: SigLIP cards are tagged siglip (not clip) and score with a sigmoid,
    the bias included; HF SigLIP text is padded to its full length as it was trained."""
    card = render_model_card(CardInfo(family=family, model_kind=kind, repo_id="org/m"))
    tags = card.data.tags
    assert tag in tags and ({"clip", "siglip"} - {tag}).isdisjoint(tags)
    assert scoring in card.text
    if kind == "siglip":
        assert "softmax" not in card.text
        if family == "hf":
            assert 'padding="max_length"' in card.text and "max_length=64" in card.text
            assert "padding=True" not in card.text
        else:
            assert "+ model.logit_bias" in card.text
    else:
        assert "sigmoid" not in card.text and "logit_bias" not in card.text
    # an older card (no kind recorded) is a CLIP's
    assert "clip" in render_model_card(CardInfo(family=family)).data.tags


def test_the_base_model_row_names_where_the_weights_came_from():
    """Issue 31, item 2: a model fine-tuned from a local folder says so (no path), never
    "from scratch"."""
    from glofnd_hf.model_card import base_model_origin

    def row(**fields):
        text = render_model_card(CardInfo(family="hf", training_recorded=True, **fields)).text
        return next(line for line in text.splitlines() if line.startswith("| Base model |"))

    assert "[org/base](https://huggingface.co/org/base)" in row(base_model="org/base")
    local = row(base_model_origin="local")
    assert "a local model" in local and "scratch" not in local
    assert "from scratch" in row(base_model_origin="scratch")
    assert "not recorded" in row()
    assert (
        "fine-tuned from a local model"
        in render_model_card(CardInfo(family="hf", base_model_origin="local")).text
    )
    assert base_model_origin("glofnd-tiny-siglip") == "scratch"
    assert base_model_origin("ViT-B-32") == "scratch"
    assert base_model_origin("hf-hub:org/base") == "hub"
    assert base_model_origin(str(ROOT)) == "local"
    assert base_model_origin(f"local-dir:{ROOT}") == "local"
    assert base_model_origin("ViT-B-32", pretrained=str(ROOT / "pyproject.toml")) == "local"
    assert base_model_origin(None) is None


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
    # no Hub id for the data: the results are in the text, not in the model-index
    assert card.data.eval_results is None
    assert "Zero-shot results on `local evaluation data`, `test` split" in card.text
