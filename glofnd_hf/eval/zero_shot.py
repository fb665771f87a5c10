"""Zero-shot evaluation of a dual encoder: retrieval recall@k and classification accuracy.

The evaluator embeds a dataset with any ``DualEncoderAdapter`` and scores it with the
chunked metrics of ``eval.metrics``. It is a plain callable, usable on its own and inside
``GloFNDTrainer.evaluate`` (which prefixes ``eval_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.hf import _to_rgb
from .metrics import average_template_embeddings, retrieval_recall, zero_shot_classification


class ZeroShotEvaluator:
    """Retrieval over (image, one or several captions) rows, and optional classification.

    Metric names: ``image_to_text_recall@k``, ``text_to_image_recall@k`` and, with class
    names, ``top1_accuracy`` / ``top5_accuracy``. ``primary_metric`` names the one to select
    checkpoints by.
    """

    primary_metric = "image_to_text_recall@1"

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        caption_column: str = "caption",
        class_label_column: str | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 64,
        show_progress: bool = True,
    ) -> None:
        columns = list(dataset.column_names)
        for column in [image_column, caption_column] + (
            [class_label_column] if class_label_column else []
        ):
            if column not in columns:
                raise ValueError(
                    f"evaluation data has no column {column!r}; its columns are {columns}"
                )
        if class_label_column and not class_names:
            raise ValueError("zero-shot classification needs class_names")
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.class_label_column = class_label_column
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else ["a photo of {}."]
        self.ks = tuple(ks)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.captions, self.text_to_image = self._flatten_captions()

    def _flatten_captions(self) -> tuple[list[str], torch.Tensor]:
        captions: list[str] = []
        owners: list[int] = []
        for i, value in enumerate(self.dataset.with_format(None)[self.caption_column]):
            group = [value] if isinstance(value, str) else list(value or [])
            if not group or not all(isinstance(c, str) for c in group):
                raise ValueError(f"evaluation row {i} has no caption (got {value!r})")
            captions.extend(group)
            owners.extend([i] * len(group))
        return captions, torch.tensor(owners, dtype=torch.long)

    @torch.no_grad()
    def embed(self, adapter: Any, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        model = adapter.unwrap(model)
        was_training = model.training
        model.eval()
        transform = adapter.image_transform(train=False)
        device = adapter.device
        images = []
        n = len(self.dataset)
        for start in tqdm(range(0, n, self.batch_size), desc="embedding images",
                          disable=not self.show_progress, leave=False):
            rows = self.dataset[start:start + self.batch_size][self.image_column]
            pixels = torch.stack([transform(_to_rgb(im)) for im in rows]).to(device)
            images.append(adapter.encode_images(model, pixels).float().cpu())
        texts = []
        for start in tqdm(range(0, len(self.captions), self.batch_size), desc="embedding texts",
                          disable=not self.show_progress, leave=False):
            chunk = self.captions[start:start + self.batch_size]
            texts.append(adapter.encode_texts(model, chunk).float().cpu())
        out = {"images": torch.cat(images), "texts": torch.cat(texts)}
        if self.class_names:
            prompts = [t.format(c) for c in self.class_names for t in self.templates]
            prompt_embeds = torch.cat([
                adapter.encode_texts(model, prompts[s:s + self.batch_size]).float().cpu()
                for s in range(0, len(prompts), self.batch_size)
            ])
            out["classes"] = average_template_embeddings(prompt_embeds, len(self.templates))
        model.train(was_training)
        return out

    def __call__(self, adapter: Any, model: torch.nn.Module | None = None) -> dict[str, float]:
        embeds = self.embed(adapter, model)
        metrics = retrieval_recall(embeds["images"], embeds["texts"], self.text_to_image, self.ks)
        if self.class_names and self.class_label_column:
            labels = torch.tensor(self.dataset.with_format(None)[self.class_label_column])
            metrics.update(zero_shot_classification(embeds["images"], embeds["classes"], labels,
                                                    ks=(1, min(5, len(self.class_names)))))
        return metrics
