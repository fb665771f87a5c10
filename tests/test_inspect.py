"""glofnd-inspect: which samples are listed as detected false negatives, on constructed
similarities and on tiny offline models (HF and open_clip, datasets and shards)."""

import io
import json
import math
import re
import shutil
import sys

import pytest
import torch
import webdataset as wds
from safetensors.torch import save_file
from test_state_shards import write_shards_of

from glofnd_hf.checkpoints import STATE_FILE
from glofnd_hf.cli.inspect_cmd import main as inspect_main
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.fnd import registry
from glofnd_hf.fnd.registry import SharedSettings
from glofnd_hf.inspection import InspectionError, inspect_checkpoint
from glofnd_hf.inspection.neighbours import anchor_neighbours, scan_anchors, similarities
from glofnd_hf.losses import ClipLoss
from glofnd_hf.models import build_tiny_hf_clip, build_tiny_open_clip
from glofnd_hf.state_file import load_state_file
from glofnd_hf.state_shards import shard_file_name

N = 32  # rows of the end-to-end data set


# -- the rule on constructed similarities ------------------------------------------------------
def constructed():
    """Image i is the unit vector e_i, so s^I_0j = text_j[0] and s^T_0j = text_0[j]."""
    image = torch.eye(5)
    text = torch.tensor(
        [
            [0.6, 0.8, 0.0, 0.0, 0.0],
            [0.8, 0.0, 0.6, 0.0, 0.0],
            [0.5, 0.0, 0.0, math.sqrt(0.75), 0.0],
            [0.9, 0.0, 0.0, 0.0, math.sqrt(0.19)],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    return image, text, torch.arange(5)


def rows_of(pairs):
    return [row for row, _ in pairs]


def test_image_side_lists_texts_above_the_threshold_most_similar_first():
    image, text, index = constructed()
    image_side, text_side = anchor_neighbours(
        image, text, index, 0, torch.tensor([0.6, 0.95]), max_detected=10, num_below=10
    )
    assert rows_of(image_side.detected) == [3, 1]  # s = 0.9, 0.8
    assert rows_of(image_side.below) == [2, 4]  # s = 0.5, 0.0
    assert image_side.num_detected == 2 and image_side.num_negatives == 4
    assert image_side.positive_similarity == pytest.approx(0.6)
    assert [s for _, s in image_side.detected] == pytest.approx([0.9, 0.8], abs=1e-6)
    # the text side reads the anchor's own text against the images: s = text_0[j]
    assert rows_of(text_side.detected) == [] and rows_of(text_side.below)[0] == 1


def test_text_side_excludes_the_own_pair_and_compares_strictly():
    image, text, index = constructed()
    _, text_side = anchor_neighbours(
        image, text, index, 0, torch.tensor([1.0, 0.5]), max_detected=10, num_below=10
    )
    # image 0 scores 0.6 > 0.5 against text 0, but it is the anchor's own pair
    assert rows_of(text_side.detected) == [1]
    assert 0 not in rows_of(text_side.below)
    assert text_side.num_negatives == 4
    # a similarity equal to the threshold is not above it
    at = float(similarities(image, text, torch.tensor([0]), 0)[0, 1])
    image_side, _ = anchor_neighbours(
        image, text, index, 0, torch.tensor([at, 1.0]), max_detected=10, num_below=10
    )
    assert rows_of(image_side.detected) == [3]
    assert rows_of(image_side.below)[0] == 1


def test_rows_sharing_the_anchor_index_are_not_negatives_and_lists_are_capped():
    image, text, _ = constructed()
    index = torch.tensor([7, 8, 9, 7, 11])  # row 3 is a duplicate of the anchor's pair
    image_side, _ = anchor_neighbours(
        image, text, index, 0, torch.tensor([0.0, 1.0]), max_detected=1, num_below=10
    )
    assert image_side.num_negatives == 3 and image_side.num_detected == 2
    assert rows_of(image_side.detected) == [1]  # capped at one, row 3 (0.9) is not a negative
    assert rows_of(image_side.below) == [4]


def test_scan_counts_quantiles_and_label_precision_recall():
    image, text, index = constructed()
    labels = torch.tensor([0, 0, 1, 1, 0])
    lam = torch.tensor([[0.6, 0.5]] * 5)  # every anchor: image 0.6, text 0.5
    scan = scan_anchors(image, text, index, torch.arange(5), 0.25, lam, labels, chunk_size=2)
    sims = [similarities(image, text, torch.arange(5), s) for s in (0, 1)]
    for s in (0, 1):
        for i in range(5):
            negatives = [j for j in range(5) if j != i]
            values = sims[s][i, negatives]
            assert scan.num_detected[s, i] == int((values > lam[i, s]).sum())
            assert scan.exact_quantile[s, i] == pytest.approx(
                float(torch.quantile(values, 0.75)), abs=1e-6
            )
            same = [j for j in negatives if labels[j] == labels[i]]
            hits = [j for j in same if sims[s][i, j] > lam[i, s]]
            assert scan.num_same_label[s, i] == len(same)
            assert scan.detected_same_label[s, i] == len(hits)
    # anchor 0, image side: detected {1, 3}; label 0 shares {1, 4}: one hit
    assert scan.num_detected[0, 0] == 2 and scan.detected_same_label[0, 0] == 1
    # no thresholds: the quantile rule over the whole data set
    rule = scan_anchors(image, text, index, torch.arange(5), 0.25)
    assert torch.equal(rule.threshold, rule.exact_quantile)
    assert torch.equal(rule.num_detected, rule.exact_detected)


# -- end to end on tiny models -----------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    train = load_digits_pairs(seed=0)["train"].select(range(N))
    return train.remove_columns("dataset_index")  # rows are the dataset indices


def _embed(adapter, data):
    """The pairs' embeddings computed here, independently of the package's embedding."""
    transform = adapter.image_transform(train=False)
    with torch.no_grad():
        pixels = torch.stack([transform(im.convert("RGB")) for im in data["image"]])
        image = adapter.encode_images(adapter.model, pixels).float()
        text = adapter.encode_texts(adapter.model, list(data["caption"])).float()
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    return torch.stack([image @ text.t(), text @ image.t()])  # (2, N, N)


def _expected_by_gap(sims):
    """Per anchor and side a threshold in the widest gap among the top 2..5 negatives, and
    the rows above it (most similar first)."""
    thresholds = torch.empty(N, 2)
    detected = {}
    for s in range(2):
        for i in range(N):
            row = sims[s, i].clone()
            row[i] = -math.inf
            values, order = row.sort(descending=True)
            k = max(range(2, 6), key=lambda k: values[k - 1] - values[k])
            assert values[k - 1] - values[k] > 1e-5, "degenerate tiny model"
            thresholds[i, s] = (values[k - 1] + values[k]) / 2
            detected[(i, s)] = order[:k].tolist()
    return thresholds, detected


def _write_checkpoint(folder, adapter, detector_name, thresholds=None, alpha=0.1):
    adapter.save(folder)
    spec = registry.get(detector_name)
    detector = spec.build(None, SharedSettings(alpha=alpha), num_samples=N)
    if thresholds is not None:
        detector.state.table.data[:, :, 0] = thresholds
        detector.state.table.data[:, :, -1] = 3.0  # visits
    loss = ClipLoss(detector)
    meta = {"config": json.dumps(loss.config_dict()), "num_samples": str(N)}
    save_file(loss.state_dict(), str(folder / STATE_FILE), metadata=meta)
    return folder


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory, data):
    adapter = build_tiny_hf_clip(seed=0, texts=list(data["caption"]))
    adapter.model.eval()
    sims = _embed(adapter, data)
    thresholds, detected = _expected_by_gap(sims)
    folder = _write_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), adapter, "glofnd", thresholds)
    return folder, sims, thresholds, detected


def _listed(report, key="detected"):
    return {
        (a["index"], s): [c["index"] for c in a["sides"][side][key]]
        for a in report["anchors"]
        for s, side in enumerate(("image", "text"))
    }


def test_report_lists_the_samples_above_the_learned_thresholds(hf_case, data, tmp_path):
    folder, sims, thresholds, detected = hf_case
    out = tmp_path / "report.html"
    report = inspect_checkpoint(
        folder,
        dataset=data,
        indices=[5, 0, 17],
        max_detected=10,
        below=3,
        label_column="digit",
        output=out,
        cache_dir=tmp_path / "cache",
        show_progress=False,
    )
    assert [a["index"] for a in report["anchors"]] == [5, 0, 17]
    for (i, s), listed in _listed(report).items():
        assert listed == detected[(i, s)]
    for (i, s), listed in _listed(report, "below").items():
        row = sims[s, i].clone()
        row[i] = -math.inf
        row[detected[(i, s)]] = -math.inf
        assert listed == row.argsort(descending=True)[:3].tolist()
    anchor = report["anchors"][0]
    assert anchor["sides"]["image"]["threshold"] == pytest.approx(float(thresholds[5, 0]))
    assert anchor["sides"]["text"]["visits"] == 3
    digits = list(data["digit"])
    for side in anchor["sides"].values():
        for c in side["detected"] + side["below"]:
            assert c["same_label"] == (digits[c["index"]] == digits[5])
    # the summary covers every anchor, each against the whole data set
    summary = report["summary"]
    assert summary["num_anchors"] == N and summary["all_anchors"]
    for s, side in enumerate(("image", "text")):
        counts = [len(detected[(i, s)]) for i in range(N)]
        assert summary["sides"][side]["detected_per_anchor"]["mean"] == pytest.approx(
            sum(counts) / N, abs=1e-6
        )
        hits = sum(digits[j] == digits[i] for i in range(N) for j in detected[(i, s)])
        same = sum(digits[j] == digits[i] for i in range(N) for j in range(N) if j != i)
        labels = summary["sides"][side]["labels"]
        assert labels["precision"] == pytest.approx(hits / sum(counts), abs=1e-6)
        assert labels["recall"] == pytest.approx(hits / same, abs=1e-6)
    # the JSON holds the same content; the page is self-contained
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["anchors"] == report["anchors"]
    html = out.read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert html.count("data:image/png;base64,") >= 1 + 3 * (1 + 2 * 3)
    assert data[17]["caption"] in html
    pngs = sorted(p.name for p in (tmp_path / "report_png").iterdir())
    assert pngs == ["anchor-0.png", "anchor-17.png", "anchor-5.png", "summary.png"]
    assert (tmp_path / "report_png" / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_reuses_cached_embeddings_and_reports_bad_input(
    hf_case, data, tmp_path, monkeypatch, capsys
):
    folder, _, _, detected = hf_case
    saved = tmp_path / "data"
    data.save_to_disk(str(saved))
    common = [str(folder), "--dataset", str(saved), "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "r.html"
    assert inspect_main([*common, "--sample", "2", "--no-png", "--output", str(out)]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again despite the cache")

    monkeypatch.setattr("glofnd_hf.eval.zero_shot.ZeroShotEvaluator.embed", no_embedding)
    assert inspect_main([*common, "--indices", "3", "--no-png", "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert _listed(report)[(3, 0)] == detected[(3, 0)]
    assert not (tmp_path / "r_png").exists()

    def fails(argv, expected):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            inspect_main([*argv, "--output", str(out)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("glofnd-inspect: error:") and "\n" not in err
        assert re.search(expected, err), err

    fails([*common, "--indices", "3", str(N)], rf"out of range.*\[0, {N}\)")
    fails([*common, "--sample", str(N + 1)], "--sample must lie in")
    fails([str(tmp_path), "--dataset", str(saved)], f"no {STATE_FILE}")
    smaller = tmp_path / "smaller"
    data.select(range(N - 1)).save_to_disk(str(smaller))
    fails([str(folder), "--dataset", str(smaller)], f"{N - 1} rows.*N={N}")


def test_a_sharded_checkpoint_reports_as_its_single_file(hf_case, data, tmp_path, capsys):
    """The checkpoint of a run with state_sharding: sharded in 3 processes (a shard per
    process, the state file their manifest) gives the report of the single file holding the
    same rows; a missing shard is one line naming it."""
    folder = hf_case[0]
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / STATE_FILE).unlink()
    loss = ClipLoss(registry.get("glofnd").build(None, SharedSettings(alpha=0.1), num_samples=N))
    load_state_file(folder / STATE_FILE, loss, N)
    write_shards_of(sharded, loss, 3)
    args = dict(dataset=data, indices=[5, 0], model=folder, cache_dir=tmp_path / "cache")
    one = inspect_checkpoint(folder, show_progress=False, **args)
    three = inspect_checkpoint(sharded, show_progress=False, **args)
    for key in ("detector", "num_samples", "anchors", "summary"):
        assert three[key] == one[key], key

    (sharded / shard_file_name(2, 3)).unlink()
    capsys.readouterr()
    argv = [str(sharded), "--dataset", "glofnd-digits", "--output", str(tmp_path / "r.html")]
    with pytest.raises(SystemExit) as stop:
        inspect_main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{shard_file_name(2, 3)} is missing" in err, err


@pytest.mark.parametrize("name", ["none", "oracle"])
def test_detectors_without_thresholds_are_refused(name, hf_case, data, tmp_path):
    folder = tmp_path / name
    folder.mkdir()
    loss = ClipLoss(registry.get(name).build(None, num_samples=N))
    meta = {"config": json.dumps(loss.config_dict()), "num_samples": str(N)}
    save_file({}, str(folder / STATE_FILE), metadata=meta)
    with pytest.raises(InspectionError, match=f"{name!r} detector.*no per-sample thresholds"):
        inspect_checkpoint(folder, dataset=data, model=hf_case[0], show_progress=False)


def test_png_needs_matplotlib_but_html_does_not(hf_case, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    args = dict(dataset=data, indices=[1], cache_dir=tmp_path, show_progress=False)
    with pytest.raises(InspectionError, match=r"glofnd-hf\[inspect\].*--no-png"):
        inspect_checkpoint(hf_case[0], output=tmp_path / "a.html", **args)
    inspect_checkpoint(hf_case[0], output=tmp_path / "b.html", png=False, **args)
    assert (tmp_path / "b.html").is_file() and (tmp_path / "b.json").is_file()


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_open_clip_shards_and_the_quantile_rule(data, tmp_path):
    """batch_quantile's rule over the whole data set, an open_clip model, and shards written
    in reverse order (rows are found by their dataset index, not their position)."""
    adapter = build_tiny_open_clip(seed=0)
    adapter.model.eval()
    # alpha 0.15: the quantile falls between two of the 31 negatives (no tie at float noise)
    folder = _write_checkpoint(tmp_path / "ckpt", adapter, "batch_quantile", alpha=0.15)
    sims = _embed(adapter, data)
    shard = tmp_path / "train-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in reversed(range(N)):
            row = data[i]
            meta = {"dataset_index": i, "semantic_label": row["digit"]}
            sink.write(
                {"__key__": f"s{i:04d}", "png": _png_bytes(row["image"]), "txt": row["caption"]}
                | {"json": meta}
            )
    report = inspect_checkpoint(
        folder,
        shards=str(shard),
        label_column="semantic_label",
        indices=[4, 9],
        max_detected=N,
        below=2,
        use_cache=False,
        show_progress=False,
    )
    assert report["model"]["family"] == "open_clip"
    for (i, s), listed in _listed(report).items():
        negatives = [j for j in range(N) if j != i]
        q = torch.quantile(sims[s, i, negatives], 0.85)
        above = [j for j in negatives if sims[s, i, j] > q]
        assert sorted(listed) == sorted(above) and len(listed) == 5
        side = report["anchors"][[4, 9].index(i)]["sides"][("image", "text")[s]]
        assert side["threshold"] == pytest.approx(float(q), abs=1e-5)
        assert side["visits"] is None
    assert report["data"]["label_column"] == "label"


def test_the_checkpoint_data_configuration_comes_from_its_card(hf_case, monkeypatch):
    """With a data set named and no configuration, the inspection loads the configuration
    the checkpoint's card records (the demo's digit-captions); a given one wins."""
    from glofnd_hf.inspection import run as inspection_run
    from glofnd_hf.model_card import CardInfo

    folder = hf_case[0]
    seen = []

    class Stop(Exception):
        pass

    def capture(num_samples, dataset, **kwargs):
        seen.append(kwargs["dataset_config"])
        raise Stop

    monkeypatch.setattr(inspection_run, "load_training_data", capture)
    info_file = folder / "glofnd_card.json"
    CardInfo(family="hf", eval_dataset="glofnd-digits", eval_dataset_config="digit-captions").save(
        folder
    )
    try:
        for config in (None, "attributes"):
            with pytest.raises(Stop):
                inspect_checkpoint(folder, dataset="glofnd-digits", dataset_config=config)
    finally:
        info_file.unlink()
    assert seen == ["digit-captions", "attributes"]
