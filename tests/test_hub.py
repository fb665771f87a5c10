"""Hub layout, model cards and pushing (the Hub API is intercepted: nothing leaves the machine)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard import metadata_load
from PIL import Image

from glofnd_hf.args import GloFNDTrainingArguments
from glofnd_hf.cli.push import main as push_main
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.hub import (
    TRAINING_STATE_PATTERNS,
    plan_upload,
    push_to_hub,
    save_for_hub,
)
from glofnd_hf.losses import registry as loss_registry
from glofnd_hf.model_card import (
    CITATIONS,
    card_info_from_trainer,
    default_settings,
    non_default_settings,
    resolve_base_model,
    set_model_card_info,
    write_model_card,
)
from glofnd_hf.models import build_tiny_hf_clip, build_tiny_open_clip
from glofnd_hf.trainer import STATE_FILE, GloFNDTrainer

SECRET = "hf_glofndTestSecretToken0123456789abcdef"
TEXTS = ["a red circle", "a blue square", "a green seven on a black background"]
METRICS = {
    "eval_image_to_text_recall@1": 0.25,
    "eval_text_to_image_recall@5": 0.5,
    "eval_top1_accuracy": 0.125,
    "eval_loss": 3.0,
    "epoch": 1.0,
}


def metadata_load_text(card_text: str) -> dict:
    """The YAML metadata of a card's text."""
    import yaml

    return yaml.safe_load(card_text.split("---\n", 2)[1])


def _images(n=2):
    torch.manual_seed(0)
    return [
        Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()) for _ in range(n)
    ]


def _embed(adapter, images, texts):
    pixels = torch.stack([adapter.image_transform(False)(im) for im in images])
    with torch.no_grad():
        return adapter.encode_images(adapter.model, pixels), adapter.encode_texts(
            adapter.model, texts
        )


def test_hf_folder_reloads_with_auto_classes_and_pipeline(tmp_path):
    from transformers import AutoModel, AutoProcessor, pipeline

    adapter = build_tiny_hf_clip(seed=0, texts=TEXTS)
    adapter.model.eval()
    folder = save_for_hub(
        adapter,
        tmp_path / "hf",
        repo_id="org/tiny-hf",
        license="mit",
        base_model="openai/clip-vit-base-patch32",
        eval_metrics=METRICS,
        eval_dataset="org/eval-set",
        eval_split="test",
    )
    images = _images()
    ref_img, ref_txt = _embed(adapter, images, TEXTS)

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(
        text=TEXTS, images=images, return_tensors="pt", padding="max_length", max_length=32
    )
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(
        torch.nn.functional.normalize(out.image_embeds, dim=-1), ref_img, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        torch.nn.functional.normalize(out.text_embeds, dim=-1), ref_txt, atol=1e-5, rtol=0
    )
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    result = pipe(images[0], candidate_labels=["circle", "square"])
    assert sorted(r["label"] for r in result) == ["circle", "square"]

    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert data["base_model"] == "openai/clip-vit-base-patch32" and data["license"] == "mit"
    assert {"glofnd", "clip", "contrastive-learning"} <= set(data["tags"])
    assert 'pipeline("zero-shot-image-classification", model="org/tiny-hf")' in card.text
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"image_to_text_recall@1", "text_to_image_recall@5", "top1_accuracy"}
    assert results["top1_accuracy"].task_type == "zero-shot-image-classification"
    assert results["text_to_image_recall@5"].task_type == "zero-shot-retrieval"
    assert results["text_to_image_recall@5"].metric_value == 0.5
    assert results["text_to_image_recall@5"].dataset_type == "org/eval-set"
    assert results["text_to_image_recall@5"].dataset_split == "test"


def test_open_clip_folder_reloads_with_local_dir(tmp_path):
    import open_clip

    adapter = build_tiny_open_clip(seed=0)
    adapter.model.eval()
    folder = save_for_hub(adapter, tmp_path / "oc", repo_id="org/tiny-oc")
    names = {p.name for p in folder.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= names
    assert "open_clip_pytorch_model.bin" not in names  # safetensors only
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images = _images()
    ref_img, ref_txt = _embed(adapter, images, TEXTS)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "open_clip"
    assert 'create_model_and_transforms("hf-hub:org/tiny-oc")' in card.text
    assert "No evaluation results" in card.text and card.data.eval_results is None


def test_default_settings_match_a_default_instance():
    defaults = GloFNDTrainingArguments()
    assert default_settings() == {k: getattr(defaults, k) for k in default_settings()}
    assert "fn_alpha" in default_settings() and "learning_rate" not in default_settings()
    assert non_default_settings(defaults) == []


def test_resolve_base_model(tmp_path):
    assert resolve_base_model("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert resolve_base_model("hf-hub:laion/CLIP-x") == "laion/CLIP-x"
    assert resolve_base_model("ViT-B-32", "laion2b_s34b_b79k") == (
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    )
    assert resolve_base_model("ViT-B-32") is None  # from scratch
    assert resolve_base_model(str(tmp_path)) is None  # local folder
    assert resolve_base_model("glofnd-tiny-hf-clip") is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny open_clip model trained 4 steps (FastCLIP loss, non-default GloFND settings),
    evaluated and checkpointed every 2 steps, with the card callback."""
    out = tmp_path_factory.mktemp("run")
    digits = load_digits_pairs(seed=0)
    evaluator = ZeroShotEvaluator(
        digits["validation"].select(range(24)),
        class_label_column="digit",
        class_names=[str(i) for i in range(10)],
        show_progress=False,
        dataset_name="glofnd-digits",
        split="validation",
    )
    args = GloFNDTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        loss_type="fastclip",
        fn_alpha=0.05,
        detector_kwargs={"init_quantile": True},
        gamma=0.5,
        gamma_schedule="constant",
        logging_steps=2,
        dataloader_num_workers=0,
    )
    trainer = GloFNDTrainer(
        build_tiny_open_clip(seed=0),
        args,
        train_dataset=digits["train"].select(range(32)),
        evaluator=evaluator,
    )
    set_model_card_info(
        trainer,
        model_name_or_path="hf-hub:org/base-clip",
        datasets=["glofnd-digits", "org/pairs"],
        license="apache-2.0",
    )
    trainer.train()
    trainer.save_model(str(out))
    final = trainer.evaluate()
    write_model_card(trainer, out, final)
    return trainer, out, final


def test_checkpoint_and_final_cards(trained):
    trainer, out, final = trained
    # checkpoint-2 was saved without an evaluation at step 2: no results in its card
    early = ModelCard.load(out / "checkpoint-2" / "README.md")
    assert early.data.eval_results is None and "No evaluation results" in early.text
    late = ModelCard.load(out / "checkpoint-4" / "README.md")
    assert "| `top1_accuracy` |" in late.text

    card = ModelCard.load(out / "README.md")
    meta = metadata_load(out / "README.md")
    assert meta == card.data.to_dict()
    assert meta["library_name"] == "open_clip"
    assert meta["base_model"] == "org/base-clip"
    assert meta["datasets"] == ["org/pairs"]  # the embedded demo data is no Hub dataset
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    expected = {
        k.removeprefix("eval_"): v
        for k, v in final.items()
        if k.startswith("eval_") and ("recall@" in k or "accuracy" in k)
    }
    assert len(expected) == 8
    # evaluated on the embedded digits, which are not on the Hub: no model-index (its
    # dataset.type must be a Hub id), the results are the card's table
    assert "model-index" not in meta
    for name, value in expected.items():
        assert f"| `{name}` | {100 * value:.2f}% |" in card.text
    # evaluated on data with a Hub id: the same results in the model-index
    from glofnd_hf.model_card import render_model_card

    hub_eval = card_info_from_trainer(
        trainer, final, eval_dataset_name="digits", eval_dataset_type="org/digits"
    )
    index = metadata_load_text(str(render_model_card(hub_eval)))["model-index"][0]
    assert index["name"] == "glofnd-model"
    reported = {m["type"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert reported == pytest.approx(expected, abs=1e-6)
    tasks = {r["task"]["type"] for r in index["results"]}
    assert tasks == {"zero-shot-retrieval", "zero-shot-image-classification"}
    assert {r["dataset"]["type"] for r in index["results"]} == {"org/digits"}

    text = card.text
    for row in (
        "| `loss_type` | `fastclip` | `clip` |",
        "| `fn_alpha` | `0.05` | `0.001` |",
        "| `detector_kwargs.init_quantile` | `True` | `False` |",
        "| `gamma` | `0.5` | `0.2` |",
    ):
        assert row in text
    assert (
        "`detector_kwargs.lr`" not in text
        and "`glofnd_alpha`" not in text
        and "`detector`" not in text
    )  # defaults are not listed
    assert "N = 32 samples" in text and "1 epoch" in text
    for key in ("glofnd", "clip"):
        assert CITATIONS[key]["bibtex"] in text
    fastclip, sogclr = loss_registry.get("sogclr").citations  # the global losses' papers
    assert fastclip.bibtex in text and sogclr.bibtex not in text
    assert "@inproceedings{balmaseda2025glofnd" in text and "2502.20612" in text

    info = card_info_from_trainer(trainer)
    info = dataclasses.replace(info, loss_type="sogclr")
    assert sogclr.bibtex in render_model_card(info).text
    plain = render_model_card(dataclasses.replace(info, loss_type="clip")).text
    assert fastclip.bibtex not in plain


class FakeHub:
    """Records create_repo / create_commit calls (with the bytes of every uploaded file);
    ``fail`` makes create_commit raise it instead."""

    def __init__(self, fail: Exception | None = None):
        self.calls = []
        self.tokens = []
        self.fail = fail

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.tokens.append(api.token)
            hub.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def create_commit(api, repo_id, operations, **kwargs):
            if hub.fail is not None:
                raise hub.fail
            sent = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            hub.calls.append(("create_commit", repo_id, {**kwargs, "files": sent}))
            return None

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)


def _all_written_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_push_uploads_the_model_without_training_state(trained, tmp_path, monkeypatch, capsys):
    import shutil

    _, out, _ = trained
    folder = tmp_path / "model"
    shutil.copytree(out / "checkpoint-4", folder)  # a folder with all the training files
    (folder / "README.md").unlink()
    (folder / "glofnd_card.json").unlink()
    (folder / "checkpoint-9").mkdir()
    (folder / "checkpoint-9" / "x.bin").write_bytes(b"0")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    fake = FakeHub()
    fake.install(monkeypatch)

    push_to_hub(folder, "org/glofnd-tiny", private=True, commit_message="first")
    (kind, repo, create_kwargs), (kind2, repo2, upload) = fake.calls
    assert (kind, repo, kind2, repo2) == (
        "create_repo",
        "org/glofnd-tiny",
        "create_commit",
        "org/glofnd-tiny",
    )
    assert create_kwargs["exist_ok"] is True and create_kwargs["private"] is True
    assert upload["commit_message"] == "first"
    plan = plan_upload(folder)
    sent = set(upload["files"])
    assert sent == set(plan.files)
    for name in ("glofnd_state.safetensors", "optimizer.pt", "model.safetensors"):
        assert plan.skipped[name].startswith("training state"), name  # (open_clip's copy)
    assert "checkpoint-9/x.bin" in plan.skipped and "training_args.bin" in TRAINING_STATE_PATTERNS
    assert {"README.md", "open_clip_config.json", "open_clip_model.safetensors"} <= sent
    assert upload["files"]["README.md"] == (folder / "README.md").read_bytes()
    for name in (
        STATE_FILE,
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
        "model.safetensors",
        "checkpoint-9/x.bin",
    ):
        assert name not in sent, name
    # the card was missing: rendered with the repo id, from what the folder shows
    card = ModelCard.load(folder / "README.md")
    assert 'create_model_and_transforms("hf-hub:org/glofnd-tiny")' in card.text
    printed = capsys.readouterr().out
    assert "glofnd_state" not in printed.split("uploading", 1)[1].split("\n")[0]

    # with the training state, via the CLI
    fake.calls.clear()
    assert push_main([str(folder), "--repo-id", "org/glofnd-tiny", "--include-training-state"]) == 0
    upload = fake.calls[1][2]
    assert STATE_FILE in upload["files"] and "training_args.bin" in upload["files"]
    assert fake.calls[0][2]["private"] is False

    printed += capsys.readouterr().out
    assert SECRET not in printed
    assert SECRET not in _all_written_text(folder)
    assert fake.tokens == [None, None]  # huggingface_hub resolves HF_TOKEN itself


def test_push_rerenders_only_unedited_cards(trained, tmp_path, monkeypatch):
    import shutil

    _, out, _ = trained
    folder = tmp_path / "final"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    fake = FakeHub()
    fake.install(monkeypatch)
    assert ModelCard.load(folder / "README.md").data.model_name == out.name  # before
    push_to_hub(folder, "org/final", token=SECRET, verbose=False)
    assert fake.tokens == [SECRET]
    text = (folder / "README.md").read_text()
    assert "hf-hub:org/final" in text and "| `top1_accuracy` |" in text  # results kept
    # Title, usage snippets and model name all say ORG/NAME, not the folder's name (the
    # model-index's name too: test_push_cli_puts_an_eval_report_into_the_card).
    pushed = ModelCard.load(folder / "README.md")
    assert pushed.data.model_name == "org/final"
    assert "\n# org/final\n" in text
    assert f"# {out.name}" not in text
    assert 'create_model_and_transforms("hf-hub:org/final")' in text
    assert "glofnd-eval --model hf-hub:org/final" in text
    assert SECRET not in _all_written_text(folder)
    info = json.loads((folder / "glofnd_card.json").read_text())
    assert info["repo_id"] == "org/final"

    (folder / "README.md").write_text(text + "\nEdited by hand.\n")
    push_to_hub(folder, "org/other", verbose=False)
    edited = (folder / "README.md").read_text()
    assert edited.endswith("Edited by hand.\n") and "org/other" not in edited  # left as it is

    with pytest.raises(ValueError, match="ORG/NAME"):
        push_to_hub(folder, "not a repo id", verbose=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        push_main([str(empty), "--repo-id", "org/x"])
    assert info.value.code == 2


def test_push_cli_puts_an_eval_report_into_the_card(trained, tmp_path, monkeypatch):
    import shutil

    _, out, _ = trained
    folder = tmp_path / "final"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    report = {
        "metrics": {"text_to_image_recall@1": 0.75, "top5_accuracy": 0.5},
        "data": {"source": "org/coco-karpathy", "split": "test"},
    }
    (tmp_path / "results.json").write_text(json.dumps(report))
    fake = FakeHub()
    fake.install(monkeypatch)
    assert (
        push_main(
            [
                str(folder),
                "--repo-id",
                "org/final",
                "--eval-results",
                str(tmp_path / "results.json"),
                "--private",
            ]
        )
        == 0
    )
    card = ModelCard.load(folder / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"text_to_image_recall@1", "top5_accuracy"}
    assert results["text_to_image_recall@1"].dataset_type == "org/coco-karpathy"
    assert metadata_load(folder / "README.md")["model-index"][0]["name"] == "org/final"
    assert fake.calls[0][2]["private"] is True


def test_a_local_evaluation_set_never_names_its_path(trained, tmp_path, monkeypatch):
    """A glofnd-eval report on a local copy of the data: the card warns, names it neutrally
    (or as --dataset-name / --dataset-type say) and records split and config; no path."""
    import shutil

    _, out, _ = trained
    local = tmp_path / "private" / "coco_val_copy"
    local.mkdir(parents=True)
    report = {
        "metrics": {"text_to_image_recall@1": 0.75},
        "data": {"kind": "datasets", "source": str(local), "split": "test", "config": "2014"},
    }
    (tmp_path / "results.json").write_text(json.dumps(report))
    fake = FakeHub()
    fake.install(monkeypatch)
    for extra, name in (
        ([], "local evaluation data"),
        (["--dataset-name", "COCO 5k", "--dataset-type", "org/coco-karpathy"], "COCO 5k"),
    ):
        folder = tmp_path / f"final{len(extra)}"
        shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        argv = [str(folder), "--repo-id", "org/final", "--eval-results"]
        argv += [str(tmp_path / "results.json"), *extra]
        with pytest.warns(UserWarning, match="not a Hub dataset id"):
            assert push_main(argv) == 0
        for written in (folder / "README.md", folder / "glofnd_card.json"):
            assert str(tmp_path) not in written.read_text(), written
        text = (folder / "README.md").read_text()
        assert f"Zero-shot results on `{name}` (`2014` configuration), `test` split" in text
        results = ModelCard.load(folder / "README.md").data.eval_results
        if not extra:  # no Hub id for the data: no model-index, no fake dataset type
            assert results is None and "model-index:" not in text
            assert "not in the card's `model-index`" in text
            continue
        (result,) = results
        assert (result.dataset_name, result.dataset_type) == ("COCO 5k", "org/coco-karpathy")
        assert (result.dataset_split, result.dataset_config) == ("test", "2014")
    # A path is never accepted as the dataset type (a Hub id is kept: see above).
    with pytest.raises(ValueError, match="local path"):
        push_to_hub(tmp_path / "final0", "org/final", card_fields={"eval_dataset_type": str(local)})


def test_local_training_and_evaluation_data_stay_out_of_trainer_cards(trained, tmp_path):
    from glofnd_hf.model_card import card_info_from_trainer, render_model_card

    trainer, _, final = trained
    local = tmp_path / "my_pairs"
    local.mkdir()
    with pytest.warns(UserWarning, match="not a Hub dataset id"):
        info = card_info_from_trainer(
            trainer, final, datasets=[str(local), "org/pairs"], eval_dataset=str(local)
        )
    assert info.datasets == ["org/pairs"] and info.eval_dataset is None
    assert info.eval_dataset_name == "local evaluation data"
    text = str(render_model_card(info))
    assert str(tmp_path) not in text and "my_pairs" not in text
    assert "a local image-caption data set" in text

    # Issue 31, item 2: fine-tuned from a local folder: "a local model", not "from scratch"
    base = tmp_path / "my_base_model"
    base.mkdir()
    info = card_info_from_trainer(trainer, final, model_name_or_path=f"local-dir:{base}")
    assert (info.base_model, info.base_model_origin) == (None, "local")
    text = str(render_model_card(info))
    assert "fine-tuned from a local model" in text and "| Base model | a local model" in text
    assert "scratch" not in text and "my_base_model" not in text and str(tmp_path) not in text
    scratch = card_info_from_trainer(trainer, final, model_name_or_path="ViT-B-32")
    assert "| Base model | none (trained from scratch) |" in str(render_model_card(scratch))


def test_saved_tiny_hf_folders_load_with_every_tower_class(tmp_path):
    """Issue 31, item 3: every sub-config agrees with the weights (the projection of the tiny
    CLIP is in text_config and vision_config too), and the SigLIP tokenizer is saved under a
    class name that transformers 4.x knows as well (not 5.x's TokenizersBackend)."""
    from transformers import (
        AutoProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
        SiglipTextModel,
        SiglipVisionModel,
    )

    from glofnd_hf.models import build_tiny_hf_siglip
    from glofnd_hf.models.tiny_siglip import PORTABLE_TOKENIZER_CLASS

    clip = save_for_hub(build_tiny_hf_clip(seed=0, texts=TEXTS), tmp_path / "clip")
    config = json.loads((clip / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        assert config[tower]["projection_dim"] == config["projection_dim"] == 64
    text = CLIPTextModelWithProjection.from_pretrained(clip).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(clip).eval()
    assert text.text_projection.weight.shape == vision.visual_projection.weight.shape == (64, 64)
    adapter = build_tiny_hf_clip(seed=0, texts=TEXTS)  # the same weights (same seed)
    adapter.model.eval()
    images = _images()
    ref_img, ref_txt = _embed(adapter, images, TEXTS)
    tokens = adapter.tokenize(TEXTS)
    pixels = torch.stack([adapter.image_transform(False)(im) for im in images])
    with torch.no_grad():
        txt = torch.nn.functional.normalize(text(**tokens).text_embeds, dim=-1)
        img = torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)

    siglip = save_for_hub(build_tiny_hf_siglip(seed=0, texts=TEXTS), tmp_path / "siglip")
    assert SiglipTextModel.from_pretrained(siglip).config.projection_size == 64
    assert SiglipVisionModel.from_pretrained(siglip).config.hidden_size == 64
    saved = json.loads((siglip / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    processor = AutoProcessor.from_pretrained(siglip)
    assert (
        processor.tokenizer(["a red circle"])["input_ids"][0][-1]
        == processor.tokenizer.eos_token_id
    )
