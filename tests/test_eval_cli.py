"""glofnd-eval: the Python API and the CLI on tiny offline models and data."""

import io
import json
import math
import shutil

import datasets
import pytest
import torch
import webdataset as wds

from glofnd_hf.cli.eval import main as eval_main
from glofnd_hf.data.digits import CLASSIFICATION_TEMPLATES, DIGIT_NAMES, load_digits_pairs
from glofnd_hf.eval.data import load_shards_for_eval
from glofnd_hf.eval.errors import EvalInputError
from glofnd_hf.eval.metrics import (
    average_template_embeddings,
    clip_benchmark_names,
    retrieval_recall,
    zero_shot_classification,
)
from glofnd_hf.eval.run import evaluate
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.models import build_tiny_hf_clip, load_dual_encoder

N_DIGITS = 96  # validation images used by the digits tests (keeps the file fast)


@pytest.fixture(scope="module")
def digits():
    return load_digits_pairs(seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits):
    texts = list(digits["validation"]["caption"])
    texts += [t.format(n) for n in DIGIT_NAMES for t in CLASSIFICATION_TEMPLATES]
    folder = tmp_path_factory.mktemp("tiny_hf")
    build_tiny_hf_clip(seed=0, texts=texts).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter(model_dir):
    a = load_dual_encoder(model_dir)
    a.model.eval()
    return a


def embed_images(adapter, images, batch_size=64):
    transform = adapter.image_transform(train=False)
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            pixels = torch.stack(
                [transform(im.convert("RGB")) for im in images[s : s + batch_size]]
            )
            out.append(adapter.encode_images(adapter.model, pixels).float())
    return torch.cat(out)


def embed_texts(adapter, texts, batch_size=64):
    with torch.no_grad():
        return torch.cat(
            [
                adapter.encode_texts(adapter.model, texts[s : s + batch_size]).float()
                for s in range(0, len(texts), batch_size)
            ]
        )


def assert_metrics_equal(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_cli_on_digits_writes_json_equal_to_direct_metrics(
    tmp_path, model_dir, adapter, digits, capsys
):
    out = tmp_path / "res" / "results.json"
    code = eval_main(
        [
            "--model",
            model_dir,
            "--dataset",
            "glofnd-digits",
            "--max-samples",
            str(N_DIGITS),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "text_to_image_recall@1" in printed and "top5_accuracy" in printed
    assert f"{N_DIGITS} images" in printed

    report = json.loads(out.read_text())
    for key in (
        "model",
        "data",
        "task",
        "metrics",
        "glofnd_hf_version",
        "ks",
        "num_images",
        "num_captions",
        "metrics_clip_benchmark",
        "classification_ks",
    ):
        assert key in report, key
    import glofnd_hf

    assert report["glofnd_hf_version"] == glofnd_hf.__version__
    assert report["model"]["name"] == model_dir and report["model"]["family"] == "hf"
    assert report["data"]["source"] == "glofnd-digits"
    assert report["data"]["split"] == "validation"
    assert report["data"]["class_label_column"] == "digit"
    assert report["data"]["num_classes"] == 10
    assert report["data"]["num_templates"] == len(CLASSIFICATION_TEMPLATES)
    assert report["task"] == ["zero_shot_retrieval", "zero_shot_classification"]
    assert report["ks"] == [1, 5, 10] and report["classification_ks"] == [1, 5]
    assert report["num_images"] == report["num_captions"] == N_DIGITS
    metrics = report["metrics"]
    expected_names = {
        f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
    } | {"top1_accuracy", "top5_accuracy"}
    assert set(metrics) == expected_names
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in metrics.values())
    for d in ("image_to_text", "text_to_image"):  # recall grows with k
        assert metrics[f"{d}_recall@1"] <= metrics[f"{d}_recall@5"] <= metrics[f"{d}_recall@10"]
    assert (
        report["metrics_clip_benchmark"]["image_retrieval_recall@5"]
        == metrics["text_to_image_recall@5"]
    )

    # the same numbers from embeddings computed here
    rows = digits["validation"].select(range(N_DIGITS))
    images = embed_images(adapter, list(rows["image"]))
    texts = embed_texts(adapter, list(rows["caption"]))
    direct = retrieval_recall(images, texts, torch.arange(N_DIGITS), ks=(1, 5, 10))
    prompts = [t.format(c) for c in DIGIT_NAMES for t in CLASSIFICATION_TEMPLATES]
    classes = average_template_embeddings(
        embed_texts(adapter, prompts), len(CLASSIFICATION_TEMPLATES)
    )
    direct.update(
        zero_shot_classification(images, classes, torch.tensor(list(rows["digit"])), ks=(1, 5))
    )
    assert_metrics_equal(metrics, direct)


@pytest.fixture(scope="module")
def list_caption_folder(tmp_path_factory, digits):
    rows = digits["validation"].select(range(12))
    captions = []
    for i, caption in enumerate(rows["caption"]):
        group = [caption, f"digit {DIGIT_NAMES[rows['digit'][i]]}", "an image"][: 1 + i % 3]
        captions.append(group)
    data = datasets.Dataset.from_dict(
        {"picture": list(rows["image"]), "captions": captions, "label": list(rows["digit"])},
        features=datasets.Features(
            {
                "picture": datasets.Image(),
                "captions": datasets.List(datasets.Value("string")),
                "label": datasets.ClassLabel(names=DIGIT_NAMES),
            }
        ),
    )
    folder = tmp_path_factory.mktemp("list_captions")
    datasets.DatasetDict({"test": data, "train": data.select(range(2))}).save_to_disk(folder)
    return str(folder), data


def test_api_dataset_with_list_captions(model_dir, adapter, list_caption_folder):
    folder, data = list_caption_folder
    report = evaluate(
        model_dir,
        dataset=folder,
        image_column="picture",
        caption_column="captions",
        class_label_column="label",
        ks=(1, 2, 100),
        classification_ks=(1, 3),
        show_progress=False,
        device="cpu",
    )
    assert report["data"]["split"] == "test"  # the default split
    assert report["num_images"] == 12
    assert report["num_captions"] == sum(len(c) for c in data["captions"]) == 24
    owners = torch.tensor([i for i, c in enumerate(data["captions"]) for _ in c])
    flat = [c for group in data["captions"] for c in group]
    images = embed_images(adapter, list(data["picture"]))
    direct = retrieval_recall(images, embed_texts(adapter, flat), owners, ks=(1, 2, 100))
    # class names come from the ClassLabel feature; default template
    classes = embed_texts(adapter, [f"a photo of {n}." for n in DIGIT_NAMES])
    direct.update(
        zero_shot_classification(images, classes, torch.tensor(list(data["label"])), ks=(1, 3))
    )
    assert_metrics_equal(report["metrics"], direct)
    assert report["metrics"]["image_to_text_recall@100"] == 1.0  # k clamped to all captions


def test_cli_ties_rule_is_applied_and_recorded(
    tmp_path, model_dir, adapter, list_caption_folder, capsys
):
    """Duplicate captions ("an image" under several images): --ties clip-benchmark scores with
    torch.topk exactly as CLIP_benchmark does, the default stays the lower-index rule, and
    the report says which rule it used."""
    folder, data = list_caption_folder
    reports = {}
    for rule in ("lower-index", "clip-benchmark"):
        out = tmp_path / f"{rule}.json"
        argv = ["--model", model_dir, "--dataset", folder, "--image-column", "picture"]
        argv += ["--caption-column", "captions", "--task", "retrieval", "--ks", "1", "2"]
        argv += ["--device", "cpu", "--no-progress", "--output", str(out)]
        if rule != "lower-index":
            argv += ["--ties", rule]
        assert eval_main(argv) == 0
        reports[rule] = json.loads(out.read_text())
        assert reports[rule]["ties"] == rule
    assert "(ties: clip-benchmark)" in capsys.readouterr().out
    owners = torch.tensor([i for i, c in enumerate(data["captions"]) for _ in c])
    flat = [c for group in data["captions"] for c in group]
    images = embed_images(adapter, list(data["picture"]))
    texts = embed_texts(adapter, flat)
    assert_metrics_equal(
        reports["lower-index"]["metrics"], retrieval_recall(images, texts, owners, ks=(1, 2))
    )
    # CLIP_benchmark's recall: topk over the rows of texts @ images.T and of its transpose.
    scores = (
        torch.nn.functional.normalize(texts, dim=-1)
        @ torch.nn.functional.normalize(images, dim=-1).t()
    )
    positive = owners[:, None] == torch.arange(len(images))[None, :]
    for k in (1, 2):
        t2i = positive.gather(1, torch.topk(scores, k, dim=1).indices).any(1)
        i2t = positive.t().gather(1, torch.topk(scores.t(), k, dim=1).indices).any(1)
        got = reports["clip-benchmark"]["metrics"]
        assert got[f"text_to_image_recall@{k}"] == float(t2i.double().mean())
        assert got[f"image_to_text_recall@{k}"] == float(i2t.double().mean())


def test_api_takes_a_loaded_adapter_and_an_in_memory_dataset(adapter, list_caption_folder):
    _, data = list_caption_folder
    report = evaluate(
        adapter,
        dataset=data,
        image_column="picture",
        caption_column="captions",
        tasks="retrieval",
        ks=(1,),
        show_progress=False,
    )
    assert report["task"] == ["zero_shot_retrieval"]
    assert set(report["metrics"]) == {"image_to_text_recall@1", "text_to_image_recall@1"}


def _png_bytes(image):
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_shards_group_captions_by_image_id(tmp_path, model_dir, adapter, digits):
    rows = digits["validation"].select(range(4))
    # image 0: 3 captions spread over the shard, image 1: 2, images 2 and 3 without image id
    plan = [(0, "a"), (1, "b"), (0, "c"), (2, "d"), (1, "e"), (0, "f"), (3, "g")]
    path = tmp_path / "eval-000.tar"
    with wds.TarWriter(str(path)) as sink:
        for key, (img, caption) in enumerate(plan):
            meta = {"image_id": f"img{img}"} if img < 2 else {"other": 1}
            sink.write(
                {
                    "__key__": f"{key:06d}",
                    "png": _png_bytes(rows[img]["image"]),
                    "txt": f"{rows[img]['caption']} {caption}",
                    "json": meta,
                }
            )
    report = evaluate(model_dir, shards=str(path), show_progress=False, device="cpu", ks=(1, 2))
    assert report["data"]["kind"] == "webdataset"
    assert report["num_images"] == 4 and report["num_captions"] == 7
    groups = [[f"{rows[i]['caption']} {c}" for j, c in plan if j == i] for i in range(4)]
    owners = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    flat = [c for g in groups for c in g]
    images = embed_images(adapter, [rows[i]["image"] for i in range(4)])
    direct = retrieval_recall(images, embed_texts(adapter, flat), owners, ks=(1, 2))
    assert_metrics_equal(report["metrics"], direct)

    bad = tmp_path / "bad-000.tar"
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "000000", "png": _png_bytes(rows[0]["image"]), "txt": "x"})
        sink.write({"__key__": "000001", "png": _png_bytes(rows[1]["image"]), "json": {}})
    with pytest.raises(EvalInputError, match="000001.*no caption"):
        evaluate(model_dir, shards=str(bad), show_progress=False)
    with pytest.raises(EvalInputError, match="do not exist"):
        evaluate(model_dir, shards=str(tmp_path / "missing-{000..001}.tar"), show_progress=False)


@pytest.mark.parametrize("caption_key", ["caption", "text", "txt"])
def test_shards_evaluate_with_every_caption_key_training_reads(
    tmp_path, model_dir, digits, caption_key
):
    rows = digits["validation"].select(range(3))
    path = tmp_path / "eval-000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            sink.write(
                {
                    "__key__": f"{i:06d}",
                    "png": _png_bytes(rows[i]["image"]),
                    caption_key: rows[i]["caption"],
                }
            )
    data = load_shards_for_eval(str(path))
    assert data["caption"] == [[c] for c in rows["caption"]]
    report = evaluate(model_dir, shards=str(path), show_progress=False, device="cpu", ks=(1,))
    assert report["num_images"] == 3 and report["num_captions"] == 3


def test_missing_column_is_a_clear_error(model_dir, list_caption_folder, capsys):
    folder, _ = list_caption_folder
    with pytest.raises(EvalInputError) as info:
        evaluate(
            model_dir,
            dataset=folder,
            image_column="picture",
            caption_column="text",
            show_progress=False,
        )
    message = str(info.value)
    assert "'text'" in message and "picture" in message and "captions" in message
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", model_dir, "--dataset", folder, "--no-progress"])  # no 'image'
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "glofnd-eval: error:" in err and "no image column 'image'" in err
    with pytest.raises(EvalInputError, match="no split 'validation'"):
        evaluate(
            model_dir,
            dataset=folder,
            split="validation",
            image_column="picture",
            caption_column="captions",
            show_progress=False,
        )


def test_empty_caption_list_is_a_clear_error(digits):
    rows = digits["validation"].select(range(3))
    data = datasets.Dataset.from_dict(
        {"image": list(rows["image"]), "caption": [["one"], [], ["three"]]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}
        ),
    )
    with pytest.raises(ValueError, match=r"1 of 3 evaluation rows .* \(row 1: \[\]\)"):
        ZeroShotEvaluator(data, show_progress=False)
    with pytest.raises(EvalInputError, match=r"missing or empty caption .* \(row 1: \[\]\)"):
        evaluate("unused-model-name", dataset=data, show_progress=False)


def test_unknown_model_is_a_clear_error(capsys):
    data = "glofnd-digits"
    with pytest.raises(EvalInputError) as info:
        evaluate("glofnd-test-org/no-such-model", dataset=data, max_samples=2, show_progress=False)
    assert "no-such-model" in str(info.value) and "open_clip" in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        eval_main(
            [
                "--model",
                "ViT-B-99",
                "--pretrained",
                "laion2b_s34b_b79k",
                "--dataset",
                data,
                "--max-samples",
                "2",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown open_clip architecture 'ViT-B-99'" in err and "ViT-B-" in err


def test_classification_needs_labels_and_good_templates(model_dir, digits):
    data = digits["validation"].select(range(4))
    with pytest.raises(EvalInputError, match="class label column"):
        evaluate(model_dir, dataset=data, tasks="classification", show_progress=False)
    with pytest.raises(EvalInputError, match="placeholder"):
        evaluate(
            model_dir,
            dataset=data,
            class_label_column="digit",
            class_names=DIGIT_NAMES,
            templates=["no placeholder"],
            show_progress=False,
        )
    with pytest.raises(EvalInputError, match="class_names"):
        evaluate(model_dir, dataset=data, class_label_column="digit", show_progress=False)


def test_clip_benchmark_names():
    ours = {
        "image_to_text_recall@5": 0.1,
        "text_to_image_recall@1": 0.2,
        "top5_accuracy": 0.3,
        "other": 1.0,
    }
    assert clip_benchmark_names(ours) == {
        "text_retrieval_recall@5": 0.1,
        "image_retrieval_recall@1": 0.2,
        "acc5": 0.3,
    }


def test_a_model_is_evaluated_in_the_dataset_configuration_it_was_trained_on(tmp_path, model_dir):
    """A glofnd-hf folder whose card says it was evaluated on glofnd-digits/digit-captions
    in training is evaluated there when no configuration is given; a given one wins, and
    another data set takes none from the card."""
    from glofnd_hf.model_card import CardInfo

    folder = tmp_path / "trained"
    shutil.copytree(model_dir, folder)
    CardInfo(family="hf", eval_dataset="glofnd-digits", eval_dataset_config="digit-captions").save(
        folder
    )
    common = dict(dataset="glofnd-digits", max_samples=16, show_progress=False)
    report = evaluate(str(folder), **common)
    assert report["data"]["config"] == "digit-captions"
    assert report["data"]["num_templates"] and report["num_images"] == 16
    assert evaluate(str(folder), dataset_config="attributes", **common)["data"]["config"] == (
        "attributes"
    )
    assert evaluate(model_dir, **common)["data"]["config"] is None  # no card: the default


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_damaged_weight_file_is_one_line_naming_it(tmp_path, model_dir, capsys, keep):
    import shutil

    from glofnd_hf.models.loading import DamagedWeightsError, load_dual_encoder

    folder = tmp_path / "damaged"
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    with pytest.raises(DamagedWeightsError, match="damaged or incomplete") as info:
        load_dual_encoder(folder)
    assert str(weights) in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(folder), "--dataset", "glofnd-digits", "--max-samples", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "damaged or incomplete" in err[0]
