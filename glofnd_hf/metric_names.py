"""The names of the evaluation metrics, built and parsed here only: recall@k of each
retrieval direction and top-k accuracy, and their CLIP_benchmark names. A leaf module: the
evaluation, the model card and the Hub push all read these words."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CLIP_BENCHMARK_NAMES",
    "IMAGE_TO_TEXT",
    "TEXT_TO_IMAGE",
    "MetricName",
    "accuracy_metric_name",
    "clip_benchmark_names",
    "parse_metric_name",
    "recall_metric_name",
]

#: Retrieval directions: image queries retrieving captions, and caption queries images.
IMAGE_TO_TEXT = "image_to_text"
TEXT_TO_IMAGE = "text_to_image"

_METRIC_NAME_RE = re.compile(r"(image_to_text|text_to_image)_recall@(\d+)|top(\d+)_accuracy")

#: Our metric name pattern -> CLIP_benchmark's. Our image-to-text retrieval (image queries,
#: captions retrieved) is CLIP_benchmark's *text* retrieval, and vice versa.
CLIP_BENCHMARK_NAMES = {
    r"image_to_text_recall@(\d+)": r"text_retrieval_recall@\1",
    r"text_to_image_recall@(\d+)": r"image_retrieval_recall@\1",
    r"top(\d+)_accuracy": r"acc\1",
}


def recall_metric_name(direction: str, k: int) -> str:
    """``image_to_text_recall@k`` / ``text_to_image_recall@k``."""
    if direction not in (IMAGE_TO_TEXT, TEXT_TO_IMAGE):
        raise ValueError(f"unknown retrieval direction {direction!r}")
    return f"{direction}_recall@{k}"


def accuracy_metric_name(k: int) -> str:
    """``top{k}_accuracy`` (zero-shot classification)."""
    return f"top{k}_accuracy"


@dataclass(frozen=True)
class MetricName:
    """A parsed metric name: ``direction`` is set for retrieval recall, None for accuracy."""

    name: str
    k: int
    direction: str | None = None

    @property
    def is_retrieval(self) -> bool:
        return self.direction is not None

    @property
    def label(self) -> str:
        """Human-readable: ``Image-to-text recall@5``, ``Top-1 accuracy``."""
        if self.direction is None:
            return f"Top-{self.k} accuracy"
        first = "Image-to-text" if self.direction == IMAGE_TO_TEXT else "Text-to-image"
        return f"{first} recall@{self.k}"

    @property
    def clip_benchmark_name(self) -> str:
        """CLIP_benchmark's name (its text retrieval is our image-to-text retrieval)."""
        for pattern, replacement in CLIP_BENCHMARK_NAMES.items():
            if re.fullmatch(pattern, self.name):
                return re.sub(pattern, replacement, self.name)
        raise AssertionError(f"{self.name!r} matches no CLIP_benchmark pattern")


def parse_metric_name(name: str) -> MetricName | None:
    """The parsed form of one of our metric names (exact match), else None."""
    match = _METRIC_NAME_RE.fullmatch(name)
    if match is None:
        return None
    if match.group(1):
        return MetricName(name, int(match.group(2)), match.group(1))
    return MetricName(name, int(match.group(3)))


def clip_benchmark_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """The same metrics under CLIP_benchmark's names (unknown names are left out)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        parsed = parse_metric_name(name)
        if parsed is not None:
            out[parsed.clip_benchmark_name] = value
    return out
