"""Tests for glofnd_hf.eval.metrics against a brute-force (full matrix + stable sort) reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from glofnd_hf.eval.metrics import (
    DEFAULT_TIE_RULE,
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    TIE_RULES,
    accuracy_metric_name,
    average_template_embeddings,
    clip_benchmark_names,
    format_metrics_table,
    parse_metric_name,
    recall_metric_name,
    retrieval_recall,
    zero_shot_classification,
)
from glofnd_hf.eval.zero_shot import CLASSIFICATION, RETRIEVAL, resolve_tasks

# --------------------------------------------------------------------------- #
# brute-force references: full score matrix, full stable descending argsort
# --------------------------------------------------------------------------- #


def _scores(queries: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    q = F.normalize(queries.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    return (q @ c.t()).cpu().numpy()


def _stable_desc_order(row: np.ndarray) -> np.ndarray:
    # Stable sort of the negated scores: descending, equal scores keep index order.
    return np.argsort(-row, kind="stable")


def reference_retrieval(image_embeds, text_embeds, text_to_image, ks):
    t2i = text_to_image.cpu().numpy()
    s_it = _scores(image_embeds, text_embeds)  # [I, T]
    s_ti = _scores(text_embeds, image_embeds)  # [T, I]
    num_i, num_t = s_it.shape
    out = {}
    for k in ks:
        hits = 0
        for i in range(num_i):
            top = _stable_desc_order(s_it[i])[:k]
            hits += bool(np.any(t2i[top] == i))
        out[f"image_to_text_recall@{k}"] = hits / num_i
    for k in ks:
        hits = 0
        for t in range(num_t):
            top = _stable_desc_order(s_ti[t])[:k]
            hits += bool(np.any(top == t2i[t]))
        out[f"text_to_image_recall@{k}"] = hits / num_t
    return out


def reference_classification(image_embeds, class_embeds, labels, ks):
    s = _scores(image_embeds, class_embeds)
    lab = labels.cpu().numpy()
    out = {}
    for k in ks:
        hits = sum(bool(np.any(_stable_desc_order(s[i])[:k] == lab[i])) for i in range(len(lab)))
        out[f"top{k}_accuracy"] = hits / len(lab)
    return out


# --------------------------------------------------------------------------- #
# data generators
# --------------------------------------------------------------------------- #


def make_gaussian_data(seed: int, num_images: int = 40, dim: int = 24, noise: float = 2.0):
    """Images + 1..5 noisy captions each, captions shuffled (not grouped by image)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    per_image = torch.randint(1, 6, (num_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(num_images), per_image)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    texts = images[t2i] + noise * torch.randn(t2i.numel(), dim, generator=g)
    # Arbitrary (non-unit) norms: the metric must normalise itself.
    images = images * torch.rand(num_images, 1, generator=g).add(0.2)
    return images, texts, t2i


def make_tied_data(seed: int, num_images: int = 30, dim: int = 16):
    """Sign vectors scaled by 1/4 (unit norm, exactly representable dot products).

    Scores take only 33 values, so ties are everywhere; duplicate images are added
    on purpose. Both the reference and the implementation see exactly equal scores.
    """
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_images, dim), generator=g).float() * 2 - 1
    signs[1::4] = signs[0::4][: signs[1::4].shape[0]]  # exact duplicate images
    images = signs / 4.0
    per_image = torch.randint(1, 6, (num_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(num_images), per_image)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    flips = torch.rand(t2i.numel(), dim, generator=g) < 0.3
    texts = torch.where(flips, -images[t2i], images[t2i])
    return images, texts, t2i


# --------------------------------------------------------------------------- #
# retrieval vs brute force
# --------------------------------------------------------------------------- #

KS = (1, 2, 5, 10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("chunk_kind", ["one", "small", "eq_images", "eq_texts", "large"])
def test_retrieval_matches_brute_force_gaussian(seed, chunk_kind):
    images, texts, t2i = make_gaussian_data(seed)
    num_i, num_t = images.shape[0], texts.shape[0]
    chunk = {"one": 1, "small": 7, "eq_images": num_i, "eq_texts": num_t, "large": num_t + 13}[
        chunk_kind
    ]
    got = retrieval_recall(images, texts, t2i, ks=KS, chunk_size=chunk)
    want = reference_retrieval(images, texts, t2i, KS)
    assert got == pytest.approx(want, abs=1e-12)
    # Sanity: the data is not degenerate (some hits and some misses at k=1).
    assert 0.0 < got["text_to_image_recall@1"] < 1.0
    assert 0.0 < got["image_to_text_recall@1"] < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 5, 30, 1000])
def test_retrieval_matches_brute_force_with_heavy_ties(seed, chunk):
    images, texts, t2i = make_tied_data(seed)
    s = _scores(texts, images)
    # Make sure the data really exercises the tie rule.
    assert any(len(np.unique(row)) < len(row) for row in s)
    ks = (1, 2, 3, 5, 10)
    got = retrieval_recall(images, texts, t2i, ks=ks, chunk_size=chunk)
    want = reference_retrieval(images, texts, t2i, ks)
    assert got == pytest.approx(want, abs=1e-12)


def test_tie_rule_lower_index_first():
    """Duplicate embeddings: equal scores rank the lower candidate index first.

    images: img0 = e0, img1 = e0 (duplicate of img0), img2 = e1
    texts:  t0 = e0 -> img1, t1 = e1 -> img2, t2 = e1 -> img0

    text->image ranks of the own image:
      t0: scores (1, 1, 0), img0 precedes img1 in the tie       -> rank 1
      t1: scores (0, 0, 1)                                      -> rank 0
      t2: scores (0, 0, 1), img2 first, then img0 (tie with img1, lower index) -> rank 1
    image->text ranks of the best own caption:
      img0: scores (1, 0, 0); own t2 ties t1, which has the lower index -> rank 2
      img1: own t0 scores 1                                     -> rank 0
      img2: scores (0, 1, 1); own t1 is first of the tie        -> rank 0
    Breaking ties the other way would give t2i@1 = 2/3 and i2t@2 = 1.
    """
    e = torch.eye(3)
    images = torch.stack([e[0], e[0], e[1]])
    texts = torch.stack([e[0], e[1], e[1]])
    t2i = torch.tensor([1, 2, 0])
    ks = (1, 2, 3)
    got = retrieval_recall(images, texts, t2i, ks=ks)
    assert got["text_to_image_recall@1"] == pytest.approx(1 / 3)
    assert got["text_to_image_recall@2"] == pytest.approx(1.0)
    assert got["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert got["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert got["image_to_text_recall@3"] == pytest.approx(1.0)
    assert got == pytest.approx(reference_retrieval(images, texts, t2i, ks))


def test_image_hit_via_third_caption_only():
    """img0 has captions t0, t1, t2; only t2 (its third caption) makes the top 1."""
    e = torch.eye(3)
    images = torch.stack([e[0], e[1]])
    texts = torch.stack(
        [
            e[2],  # t0 -> img0, score 0 with img0
            -e[0] + 0.1 * e[2],  # t1 -> img0, negative score with img0
            e[0],  # t2 -> img0, score 1 with img0 (its best caption)
            e[1] + 0.5 * e[0],  # t3 -> img1, scores 0.447 with img0: beats t0 and t1
        ]
    )
    t2i = torch.tensor([0, 0, 0, 1])
    got = retrieval_recall(images, texts, t2i, ks=(1,))
    assert got["image_to_text_recall@1"] == pytest.approx(1.0)

    # Reassign t2 to img1: img0's remaining captions are beaten by t2 and t3.
    t2i_alt = torch.tensor([0, 0, 1, 1])
    got_alt = retrieval_recall(images, texts, t2i_alt, ks=(1, 2, 3))
    assert got_alt["image_to_text_recall@1"] == pytest.approx(0.5)
    assert got_alt["image_to_text_recall@2"] == pytest.approx(0.5)
    assert got_alt["image_to_text_recall@3"] == pytest.approx(1.0)
    assert got_alt == pytest.approx(reference_retrieval(images, texts, t2i_alt, (1, 2, 3)))


def test_chunking_identical_to_single_chunk():
    images, texts, t2i = make_gaussian_data(seed=11, num_images=120, dim=32, noise=1.5)
    ks = (1, 3, 5, 10, 50)
    full = retrieval_recall(images, texts, t2i, ks=ks, chunk_size=10**9)
    for chunk in (1, 2, 17, 119, 120, 121, texts.shape[0] - 1, texts.shape[0]):
        assert retrieval_recall(images, texts, t2i, ks=ks, chunk_size=chunk) == full


def test_k_larger_than_candidates_is_clamped():
    images, texts, t2i = make_gaussian_data(seed=5, num_images=6)
    got = retrieval_recall(images, texts, t2i, ks=(1, 1000))
    assert got["image_to_text_recall@1000"] == 1.0
    assert got["text_to_image_recall@1000"] == 1.0
    assert set(got) == {
        "image_to_text_recall@1",
        "image_to_text_recall@1000",
        "text_to_image_recall@1",
        "text_to_image_recall@1000",
    }


class _MaxOutputNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_never_materialises_full_score_matrix():
    images, texts, t2i = make_gaussian_data(seed=3, num_images=60, dim=8)
    num_i, num_t = images.shape[0], texts.shape[0]
    chunk = 4
    with _MaxOutputNumel() as mode:
        retrieval_recall(images, texts, t2i, ks=(1, 5), chunk_size=chunk)
    # Largest tensor: one chunk of scores (or the inputs themselves), never I x T.
    bound = max(chunk * max(num_i, num_t), images.numel(), texts.numel())
    assert mode.max_numel <= bound < num_i * num_t


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


def test_image_without_caption_raises_and_names_it():
    images = torch.randn(4, 8)
    texts = torch.randn(5, 8)
    t2i = torch.tensor([0, 1, 3, 3, 0])  # image 2 has no caption
    with pytest.raises(ValueError, match=r"\[2\]"):
        retrieval_recall(images, texts, t2i)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda i, t, m: (i, t, torch.tensor([0, 1, 2, 3, 4])), r"\[0, 4\)"),
        (lambda i, t, m: (i, t, torch.tensor([0, 1, 2, 3, -1])), r"\[0, 4\)"),
        (lambda i, t, m: (i, t, m[:3]), "length"),
        (lambda i, t, m: (i, t, m.float()), "integer"),
        (lambda i, t, m: (i, t[:, :7], m), "dimension"),
        (lambda i, t, m: (i[0], t, m), "2-D"),
        (
            lambda i, t, m: (i, t.masked_fill(torch.eye(5, 8, dtype=torch.bool), float("nan")), m),
            "non-finite",
        ),
        (
            lambda i, t, m: (i.masked_fill(torch.eye(4, 8, dtype=torch.bool), float("inf")), t, m),
            "non-finite",
        ),
        (lambda i, t, m: (i[:0], t, m), "empty"),
    ],
)
def test_retrieval_validation(mutate, pattern):
    images = torch.randn(4, 8)
    texts = torch.randn(5, 8)
    t2i = torch.tensor([0, 1, 2, 3, 0])
    i, t, m = mutate(images, texts, t2i)
    with pytest.raises(ValueError, match=pattern):
        retrieval_recall(i, t, m)


@pytest.mark.parametrize("kwargs", [{"ks": (0,)}, {"ks": ()}, {"chunk_size": 0}])
def test_retrieval_bad_arguments(kwargs):
    images, texts, t2i = make_gaussian_data(seed=0, num_images=5)
    with pytest.raises(ValueError):
        retrieval_recall(images, texts, t2i, **kwargs)


def test_half_precision_inputs_are_upcast():
    images, texts, t2i = make_tied_data(seed=4)
    ks = (1, 5)
    got = retrieval_recall(images.half(), texts.bfloat16(), t2i, ks=ks)
    # Entries are +-1/4: exactly representable in fp16/bf16, so results are unchanged.
    assert got == retrieval_recall(images, texts, t2i, ks=ks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    for images, texts, t2i in (make_tied_data(seed=1), make_gaussian_data(seed=2)):
        cpu = retrieval_recall(images, texts, t2i, ks=(1, 5, 10), chunk_size=7)
        gpu = retrieval_recall(images.cuda(), texts.cuda(), t2i.cuda(), ks=(1, 5, 10), chunk_size=7)
        assert gpu == pytest.approx(cpu)
    images, texts, t2i = make_tied_data(seed=1)
    labels = t2i[: images.shape[0]]
    cls = zero_shot_classification(texts[: images.shape[0]].cuda(), images.cuda(), labels.cuda())
    assert cls == pytest.approx(
        reference_classification(texts[: images.shape[0]], images, labels, (1, 5))
    )


# --------------------------------------------------------------------------- #
# zero-shot classification
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 9, 50, 4096])
def test_classification_matches_brute_force(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    num_classes, num_images, dim = 17, 50, 20
    classes = torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    images = classes[labels] + 1.3 * torch.randn(num_images, dim, generator=g)
    ks = (1, 2, 5, 100)
    got = zero_shot_classification(images, classes, labels, ks=ks, chunk_size=chunk)
    assert got == pytest.approx(reference_classification(images, classes, labels, ks), abs=1e-12)
    assert 0.0 < got["top1_accuracy"] < 1.0
    assert got["top100_accuracy"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_with_ties_matches_brute_force(seed):
    images, _, _ = make_tied_data(seed, num_images=40)
    classes, _, _ = make_tied_data(seed + 100, num_images=12)  # contains duplicate classes
    labels = torch.randint(0, 12, (40,), generator=torch.Generator().manual_seed(seed))
    ks = (1, 2, 5)
    got = zero_shot_classification(images, classes, labels, ks=ks, chunk_size=3)
    assert got == pytest.approx(reference_classification(images, classes, labels, ks), abs=1e-12)


def test_classification_default_keys_and_tie():
    # Classes 0 and 1 are identical: an image of class 1 loses the tie to class 0.
    e = torch.eye(2)
    classes = torch.stack([e[0], e[0], e[1]])
    images = torch.stack([e[0], e[0]])
    got = zero_shot_classification(images, classes, torch.tensor([0, 1]))
    assert set(got) == {"top1_accuracy", "top5_accuracy"}
    assert got["top1_accuracy"] == pytest.approx(0.5)
    assert got["top5_accuracy"] == pytest.approx(1.0)


def test_classification_label_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        zero_shot_classification(torch.randn(3, 4), torch.randn(2, 4), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- #
# template averaging
# --------------------------------------------------------------------------- #


def test_average_template_embeddings_matches_loop_and_layouts():
    g = torch.Generator().manual_seed(0)
    num_classes, num_templates, dim = 5, 7, 12
    x = torch.randn(num_classes, num_templates, dim, generator=g)
    x = x * torch.rand(num_classes, num_templates, 1, generator=g).mul(10).add(0.1)
    expected = []
    for c in range(num_classes):
        prompts = [x[c, p] / x[c, p].norm() for p in range(num_templates)]
        mean = torch.stack(prompts).mean(0)
        expected.append(mean / mean.norm())
    expected = torch.stack(expected)

    out3 = average_template_embeddings(x)
    out2 = average_template_embeddings(x.reshape(-1, dim), num_templates=num_templates)
    assert out3.shape == (num_classes, dim)
    torch.testing.assert_close(out3, expected)
    torch.testing.assert_close(out2, expected)
    torch.testing.assert_close(out3.norm(dim=-1), torch.ones(num_classes))
    # Normalising per prompt first is not the same as averaging raw embeddings.
    raw = F.normalize(x.mean(1), dim=-1)
    assert not torch.allclose(out3, raw, atol=1e-3)


def test_average_template_embeddings_validation():
    with pytest.raises(ValueError, match="num_templates"):
        average_template_embeddings(torch.randn(6, 4))
    with pytest.raises(ValueError, match="multiple"):
        average_template_embeddings(torch.randn(7, 4), num_templates=3)
    with pytest.raises(ValueError):
        average_template_embeddings(torch.randn(2, 3, 4), num_templates=2)
    with pytest.raises(ValueError):
        average_template_embeddings(torch.randn(4))


# --------------------------------------------------------------------------- #
# table formatting
# --------------------------------------------------------------------------- #


def test_format_metrics_table():
    metrics = {"image_to_text_recall@1": 0.45678, "text_to_image_recall@10": 1.0, "top1": 0.0}
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 2 + len(metrics)
    assert len({len(line) for line in lines}) == 1  # aligned: equal widths
    for line, (name, value) in zip(lines[2:], metrics.items(), strict=True):
        assert line.startswith(name)
        assert line.endswith(f"{100 * value:.2f}%")
    assert "45.68%" in table and "100.00%" in table


# --------------------------------------------------------------------------- #
# metric names and task defaults
# --------------------------------------------------------------------------- #
def test_every_metric_the_scorers_emit_parses_back():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 3), torch.randn(4, 3)
    names = list(retrieval_recall(images, texts, torch.arange(4), ks=(1, 3)))
    names += list(zero_shot_classification(images, texts[:3], torch.tensor([0, 1, 2, 0]), ks=(2,)))
    assert names == [
        recall_metric_name(IMAGE_TO_TEXT, 1),
        recall_metric_name(IMAGE_TO_TEXT, 3),
        recall_metric_name(TEXT_TO_IMAGE, 1),
        recall_metric_name(TEXT_TO_IMAGE, 3),
        accuracy_metric_name(2),
    ]
    parsed = [parse_metric_name(n) for n in names]
    assert [(p.direction, p.k) for p in parsed] == [
        (IMAGE_TO_TEXT, 1),
        (IMAGE_TO_TEXT, 3),
        (TEXT_TO_IMAGE, 1),
        (TEXT_TO_IMAGE, 3),
        (None, 2),
    ]
    assert [p.label for p in parsed] == [
        "Image-to-text recall@1",
        "Image-to-text recall@3",
        "Text-to-image recall@1",
        "Text-to-image recall@3",
        "Top-2 accuracy",
    ]
    assert [p.is_retrieval for p in parsed] == [True] * 4 + [False]
    assert clip_benchmark_names(dict.fromkeys(names, 0.5)) == dict.fromkeys(
        [
            "text_retrieval_recall@1",
            "text_retrieval_recall@3",
            "image_retrieval_recall@1",
            "image_retrieval_recall@3",
            "acc2",
        ],
        0.5,
    )


@pytest.mark.parametrize(
    "name",
    [
        "loss",
        "eval_top1_accuracy",
        "top_accuracy",
        "image_to_text_recall@",
        "image_to_image_recall@1",
    ],
)
def test_other_names_do_not_parse(name):
    assert parse_metric_name(name) is None


def test_unknown_retrieval_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        recall_metric_name("image_to_image", 1)


def test_task_defaults_and_names():
    assert resolve_tasks(None, "caption", None) == [RETRIEVAL]
    assert resolve_tasks("auto", "caption", "label") == [RETRIEVAL, CLASSIFICATION]
    # classification data without captions: no retrieval when the columns say so
    assert resolve_tasks(None, "caption", "label", columns=["image", "label"]) == [CLASSIFICATION]
    assert resolve_tasks(None, "caption", None, columns=["image"]) == [RETRIEVAL]
    assert resolve_tasks(None, None, None) == []
    assert resolve_tasks(["classification", "retrieval"], None, None) == [RETRIEVAL, CLASSIFICATION]
    assert resolve_tasks("both", None, None) == [RETRIEVAL, CLASSIFICATION]
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks(["detection"], "caption", None)


# --------------------------------------------------------------------------- #
# the clip-benchmark tie rule: torch.topk's choice
# --------------------------------------------------------------------------- #


def topk_retrieval(image_embeds, text_embeds, text_to_image, ks):
    """CLIP_benchmark's computation, written out directly: the caption x image score matrix,
    one ``torch.topk`` per k over its rows (caption queries) and over the rows of its
    transpose (image queries)."""
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.float(), dim=-1)
    scores = texts @ images.t()
    positive = torch.zeros(scores.shape, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True
    out = {}
    for k in ks:
        top = torch.topk(scores.t(), k, dim=1).indices
        out[f"image_to_text_recall@{k}"] = float(positive.t().gather(1, top).any(1).double().mean())
    for k in ks:
        top = torch.topk(scores, k, dim=1).indices
        out[f"text_to_image_recall@{k}"] = float(positive.gather(1, top).any(1).double().mean())
    return out


def duplicate_caption_data(seed=0, num_images=60, dim=16):
    """Images and captions where many captions are the same caption (the same embedding:
    "a photo of a dog" under several images) and some images repeat: exact ties straddle
    the k-th place for many queries. Sign vectors / 4 make every score exact."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randint(0, 2, (8, dim), generator=g).float() * 2 - 1) / 4.0
    images = pool[torch.randint(0, len(pool), (num_images,), generator=g)]
    per_image = torch.randint(1, 4, (num_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(num_images), per_image)
    # Each caption is one of the pool's vectors: mostly its image's own, else another.
    other = pool[torch.randint(0, len(pool), (t2i.numel(),), generator=g)]
    own = torch.rand(t2i.numel(), generator=g) < 0.7
    texts = torch.where(own[:, None], images[t2i], other)
    return images, texts, t2i


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_clip_benchmark_ties_reproduce_topk_and_differ_from_the_default(chunk):
    images, texts, t2i = duplicate_caption_data()
    assert len(torch.unique(texts, dim=0)) < len(texts) / 10  # duplicate captions
    ks = (1, 2, 5, 10)
    default = retrieval_recall(images, texts, t2i, ks=ks, chunk_size=chunk)
    clip_benchmark = retrieval_recall(
        images, texts, t2i, ks=ks, chunk_size=chunk, ties="clip-benchmark"
    )
    # The default is the stable order (lower index first), the other exactly torch.topk.
    assert default == pytest.approx(reference_retrieval(images, texts, t2i, ks), abs=1e-12)
    assert clip_benchmark == topk_retrieval(images, texts, t2i, ks)
    # With duplicate captions the two rules give different numbers.
    assert clip_benchmark != default
    assert set(clip_benchmark) == set(default)


def test_the_tie_rules_agree_without_ties():
    images, texts, t2i = make_gaussian_data(0)
    ks = (1, 5, 10)
    default = retrieval_recall(images, texts, t2i, ks=ks)
    assert retrieval_recall(images, texts, t2i, ks=ks, ties="clip-benchmark") == default
    assert default == topk_retrieval(images, texts, t2i, ks)


def test_clip_benchmark_ties_in_classification_follow_topk():
    images, classes, _ = duplicate_caption_data(seed=1, num_images=50)
    classes = classes[:12]  # duplicate class embeddings among them
    labels = torch.randint(
        0, len(classes), (len(images),), generator=torch.Generator().manual_seed(3)
    )
    ks = (1, 2, 5)
    got = zero_shot_classification(images, classes, labels, ks=ks, ties="clip-benchmark")
    # CLIP_benchmark: logits = 100 * image_features @ classifier, one topk for the largest k.
    logits = (100.0 * F.normalize(images, dim=-1)) @ F.normalize(classes, dim=-1).t()
    top = torch.topk(logits, max(ks), dim=1).indices
    correct = top == labels[:, None]
    want = {f"top{k}_accuracy": float(correct[:, :k].any(1).double().mean()) for k in ks}
    assert got == want
    default = zero_shot_classification(images, classes, labels, ks=ks)
    assert default == pytest.approx(reference_classification(images, classes, labels, ks))


def test_unknown_tie_rule_is_refused():
    images, texts, t2i = make_gaussian_data(0)
    assert DEFAULT_TIE_RULE == "lower-index" and "clip-benchmark" in TIE_RULES
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_recall(images, texts, t2i, ties="random")
    with pytest.raises(ValueError, match="ties must be one of"):
        zero_shot_classification(
            images, texts[:3], torch.zeros(len(images), dtype=torch.long), ties="x"
        )
