"""Tests for the embedded coloured-digits demo dataset."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
from sklearn.datasets import load_digits

from glofnd_hf.data import digits as dg

N_DIGITS_SAMPLES = len(load_digits().target)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _attribute_words(attributes: str) -> list[str]:
    return [w for w in re.split(r"[|\-]", attributes) if w]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def dd():
    return dg.load_digits_pairs(seed=0)


@pytest.fixture(scope="module")
def rows(dd):
    """Both splits as plain dicts of columns (images decoded)."""
    return {name: dd[name][:] for name in ("train", "validation")}


def test_classification_defaults_describe_the_data(dd):
    column, names, templates = dg.digits_classification_defaults()
    validation = dd[dg.DIGITS_EVAL_SPLIT]
    labels = set(validation[column])
    assert labels == set(range(len(names)))  # every class id names a class, and vice versa
    prompts = [t.format(n) for n in names for t in templates]
    assert len(set(prompts)) == len(prompts)  # one placeholder per template, distinct classes
    # a caption names its digit with the word the classifier prompts with
    row = validation[0]
    assert names[row[column]] in _words(row["caption"])
    # explicit settings win over the digits' defaults
    assert dg.digits_classification_defaults("label", ["a", "b"], ["{}!"]) == (
        "label",
        ["a", "b"],
        ["{}!"],
    )


def test_splits_columns_and_features(dd):
    import datasets

    assert set(dd) == {"train", "validation"}
    expected = {"image", "caption", "digit", "attributes", "semantic_label", "dataset_index"}
    for split in dd.values():
        assert set(split.column_names) == expected
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["dataset_index"].dtype == "int64"
        assert split.features["semantic_label"].dtype == "int64"
        assert split.features["digit"].dtype == "int64"
        assert split.features["caption"].dtype == "string"
        assert split.features["attributes"].dtype == "string"


def test_split_sizes_follow_fraction(dd):
    n_train, n_val = len(dd["train"]), len(dd["validation"])
    assert n_train + n_val == N_DIGITS_SAMPLES
    assert abs(n_val / N_DIGITS_SAMPLES - 0.2) < 0.05


def test_dataset_index_is_arange(dd):
    for split in dd.values():
        idx = np.asarray(split["dataset_index"])
        assert idx.dtype == np.int64
        np.testing.assert_array_equal(idx, np.arange(len(split)))


def test_images_rgb_and_size(rows):
    for split in rows.values():
        for image in split["image"]:
            assert image.mode == "RGB"
            assert image.size == (32, 32)


def test_custom_image_size_and_fraction():
    dd = dg.load_digits_pairs(seed=3, validation_fraction=0.3, image_size=20)
    assert len(dd["train"]) + len(dd["validation"]) == N_DIGITS_SAMPLES
    assert abs(len(dd["validation"]) / N_DIGITS_SAMPLES - 0.3) < 0.05
    for split in dd.values():
        image = split[0]["image"]
        assert image.mode == "RGB"
        assert image.size == (20, 20)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_invalid_validation_fraction(fraction):
    with pytest.raises(ValueError):
        dg.load_digits_pairs(validation_fraction=fraction)


def test_deterministic_for_same_seed(dd):
    again = dg.load_digits_pairs(seed=0)
    for name in ("train", "validation"):
        a, b = dd[name], again[name]
        assert len(a) == len(b)
        for column in ("caption", "digit", "attributes", "semantic_label", "dataset_index"):
            assert a[column] == b[column], column
        for i in range(0, len(a), 37):
            assert a[i]["image"].tobytes() == b[i]["image"].tobytes()


def test_different_seed_differs(dd):
    other = dg.load_digits_pairs(seed=1)
    assert dd["train"]["attributes"] != other["train"]["attributes"]
    assert dd["train"]["caption"] != other["train"]["caption"]
    # The split itself (which glyphs are in validation) changes too.
    assert dd["validation"]["digit"] != other["validation"]["digit"]


def test_disjoint_splits_cover_all_samples(rows):
    """Map every row back to its sklearn glyph by re-rendering; each glyph appears once."""
    bunch = load_digits()
    combo_of = {"|".join(c): c for c in dg.ATTRIBUTE_COMBOS}
    rendered: dict[tuple[int, str], dict[bytes, int]] = {}
    sources: dict[str, list[int]] = {}
    for name, split in rows.items():
        sources[name] = []
        for image, digit, attributes in zip(
            split["image"], split["digit"], split["attributes"], strict=True
        ):
            key = (digit, attributes)
            if key not in rendered:
                table = {}
                for i in np.flatnonzero(bunch.target == digit):
                    img = dg._render(bunch.images[i], combo_of[attributes], 32)
                    table[img.tobytes()] = int(i)
                rendered[key] = table
            source = rendered[key].get(image.convert("RGB").tobytes())
            assert source is not None, f"row of {name} matches no digit glyph"
            sources[name].append(source)
    train, val = set(sources["train"]), set(sources["validation"])
    assert len(train) == len(sources["train"])
    assert len(val) == len(sources["validation"])
    assert not train & val
    assert train | val == set(range(N_DIGITS_SAMPLES))
    # The digit column agrees with sklearn's labels.
    for name, split in rows.items():
        np.testing.assert_array_equal(bunch.target[sources[name]], split["digit"])


def test_captions_mention_digit_and_attributes(rows):
    for split in rows.values():
        for caption, digit, attributes in zip(
            split["caption"], split["digit"], split["attributes"], strict=True
        ):
            words = _words(caption)
            assert dg.DIGIT_NAMES[digit] in words, caption
            for word in _attribute_words(attributes):
                assert word in words, (word, caption)
            assert len(caption.split()) < 25
            # No other digit word sneaks in.
            others = set(dg.DIGIT_NAMES) - {dg.DIGIT_NAMES[digit]}
            assert not others & set(words), caption


def test_caption_templates_vary(rows):
    """At least four caption templates are in use (digit and attribute words masked)."""
    shapes = collections.Counter()
    for caption, digit, attributes in zip(
        rows["train"]["caption"], rows["train"]["digit"], rows["train"]["attributes"], strict=True
    ):
        masked = {dg.DIGIT_NAMES[digit], *_attribute_words(attributes)}
        shape = " ".join("_" if w in masked else w for w in _words(caption))
        shapes[shape] += 1
    assert len(shapes) >= 4
    # No single template dominates.
    assert max(shapes.values()) < 0.5 * len(rows["train"]["caption"])


def test_attributes_well_formed(rows):
    for split in rows.values():
        for attributes in split["attributes"]:
            ink, bg, pos, scale = attributes.split("|")
            assert ink in dg.INK_COLORS
            assert bg in dg.BACKGROUND_COLORS
            assert pos in dg.POSITIONS
            assert scale in dg.SCALES
    used = set(rows["train"]["attributes"])
    assert len(used) == len(dg.ATTRIBUTE_COMBOS)


def test_semantic_label_iff_same_class(rows):
    label_to_class: dict[int, tuple[int, str]] = {}
    class_to_label: dict[tuple[int, str], int] = {}
    for split in rows.values():  # shared across both splits
        for label, digit, attributes in zip(
            split["semantic_label"], split["digit"], split["attributes"], strict=True
        ):
            cls = (digit, attributes)
            assert label_to_class.setdefault(label, cls) == cls
            assert class_to_label.setdefault(cls, label) == label
    assert len(label_to_class) == len(class_to_label)
    assert all(0 <= d <= 9 for d, _ in class_to_label)


def test_semantic_labels_consistent_across_seeds(rows):
    train = rows["train"]
    mine = {
        (digit, attributes): label
        for digit, attributes, label in zip(
            train["digit"], train["attributes"], train["semantic_label"], strict=True
        )
    }
    other = dg.load_digits_pairs(seed=5)["train"][:]
    checked = 0
    for digit, attributes, label in zip(
        other["digit"], other["attributes"], other["semantic_label"], strict=True
    ):
        if (digit, attributes) in mine:
            assert mine[(digit, attributes)] == label
            checked += 1
    assert checked > len(other["digit"]) // 2


def test_class_sizes_in_intended_range(rows):
    sizes = np.array(list(collections.Counter(rows["train"]["semantic_label"]).values()))
    assert 3.0 <= sizes.mean() <= 12.0
    assert sizes.min() >= 2  # every class has at least one false-negative partner
    # Every validation class also occurs in train.
    assert set(rows["validation"]["semantic_label"]) <= set(rows["train"]["semantic_label"])


def test_ink_differs_from_background_and_placement(rows):
    """Rendered pixels: background colour dominates, ink colour is present, in the right place."""
    size = 32
    extents = {name: [] for name in dg.SCALES}
    centroids = collections.defaultdict(list)
    for image, attributes in zip(rows["train"]["image"], rows["train"]["attributes"], strict=True):
        ink_name, bg_name, pos, scale = attributes.split("|")
        px = _pixels(image)
        ink = np.asarray(dg.INK_COLORS[ink_name], dtype=np.float64)
        bg = np.asarray(dg.BACKGROUND_COLORS[bg_name], dtype=np.float64)
        assert np.linalg.norm(ink - bg) > 100
        d_ink = np.linalg.norm(px - ink, axis=-1)
        d_bg = np.linalg.norm(px - bg, axis=-1)
        ink_mask = d_ink < 0.35 * np.linalg.norm(ink - bg)
        assert ink_mask.sum() >= 5, attributes
        assert (d_bg < 1).mean() > 0.4, attributes
        # The image is not flat: per-channel spread is large.
        assert px.std(axis=(0, 1)).max() > 20
        ys, xs = np.nonzero(ink_mask)
        # The glyph sits in its corner: the strip along the opposite edges holds no ink.
        strip = size // 8
        if pos == "top-left":
            assert ys.max() < size - strip and xs.max() < size - strip, attributes
        else:
            assert ys.min() >= strip and xs.min() >= strip, attributes
        centroids[(pos, scale)].append((ys.mean(), xs.mean()))
        extents[scale].append(ys.max() - ys.min() + 1)
    assert np.mean(extents["large"]) > np.mean(extents["small"]) + 3
    for scale in dg.SCALES:
        top_left = np.mean(centroids[("top-left", scale)], axis=0)
        bottom_right = np.mean(centroids[("bottom-right", scale)], axis=0)
        assert np.all(bottom_right - top_left > 4), (scale, top_left, bottom_right)


@pytest.fixture(scope="module")
def centred():
    return dg.load_digits_pairs(seed=0, config="digit-captions")


def test_digit_captions_name_only_the_digit_and_group_pairs_by_it(centred, dd):
    """The demo's configuration: the caption names the digit and no attribute, the
    semantic class is the digit, colours still vary, and every glyph is used once."""
    attribute_words = {
        w for combo in dg.ATTRIBUTE_COMBOS for a in combo for w in _attribute_words(a)
    }
    for name in ("train", "validation"):
        split = centred[name]
        assert split["semantic_label"] == split["digit"]
        for row in split.select(range(40)):
            words = set(_words(row["caption"]))
            assert dg.DIGIT_NAMES[row["digit"]] in words
            assert not words & attribute_words, row["caption"]
            ink, bg, pos, scale = row["attributes"].split("|")
            assert ink in dg.INK_COLORS and bg in dg.BACKGROUND_COLORS
            assert (pos, scale) == ("centre", "full")
    assert len(centred["train"]) + len(centred["validation"]) == N_DIGITS_SAMPLES
    inks = {a.split("|")[0] for a in centred["train"]["attributes"]}
    assert inks == set(dg.INK_COLORS)


def test_digit_ink_captions_name_the_ink_beside_the_digit_on_the_same_images(centred):
    """The study's configuration: the same images, rows and digit classes as
    ``digit-captions``; each caption is the same template with the ink colour before the
    digit word, and names no other attribute."""
    inked = dg.load_digits_pairs(seed=0, config="digit-ink-captions")
    for name in ("train", "validation"):
        plain, split = centred[name], inked[name]
        assert split["semantic_label"] == split["digit"] == plain["digit"]
        assert split["attributes"] == plain["attributes"]
        for a, b in zip(plain.select(range(60)), split.select(range(60)), strict=True):
            ink = b["attributes"].split("|")[0]
            word = dg.DIGIT_NAMES[b["digit"]]
            assert b["caption"] == a["caption"].replace(word, f"{ink} {word}"), b["caption"]
            assert np.array_equal(_pixels(a["image"]), _pixels(b["image"]))
    assert len({c.split()[-2] for c in inked["train"]["caption"]} & set(dg.INK_COLORS)) == 3


def test_digit_captions_draw_the_glyph_large_in_the_centre(centred):
    """Ink covers the middle of the canvas and reaches past where the small corner glyphs
    of the default configuration would lie, and its centre of mass is near the middle."""
    for row in centred["train"].select(range(30)):
        pixels = _pixels(row["image"])
        background = np.array(dg.BACKGROUND_COLORS[row["attributes"].split("|")[1]], float)
        ink = np.abs(pixels - background).sum(-1) > 60
        ys, xs = np.nonzero(ink)
        side = pixels.shape[0]
        assert abs(ys.mean() - side / 2) < side * 0.2 and abs(xs.mean() - side / 2) < side * 0.2
        assert ys.max() - ys.min() > side * 0.45  # a large glyph, not a corner one


def test_an_unknown_digits_configuration_is_refused_with_the_choices():
    from glofnd_hf.data.loading import load_image_text_dataset

    with pytest.raises(ValueError, match="digit-captions"):
        dg.load_digits_pairs(config="colours")
    with pytest.raises(ValueError, match="attributes"):
        load_image_text_dataset(dg.DIGITS_DATASET, "colours", "train")
    loaded = load_image_text_dataset(dg.DIGITS_DATASET, "digit-captions", "train")
    assert loaded["semantic_label"] == loaded["digit"]
