"""Zero-shot evaluation of a dual encoder: retrieval recall@k and classification accuracy.

The evaluator embeds a dataset with any ``DualEncoderAdapter`` and scores it with the
chunked metrics of ``eval.metrics``. It is a plain callable, usable on its own, inside
``GloFNDTrainer.evaluate`` (which prefixes ``eval_``) and behind ``glofnd-eval``
(``eval.run``).

Under ``torch.distributed`` (e.g. inside a multi-process training run) every process must
call it: each embeds its own share of the batches (whole batches, the same ones a single
process forms, so the embeddings are those of one process), the embeddings are gathered,
the main process scores them once and every process receives the same metrics. Progress
bars show on the main process only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.images import to_rgb
from ..fnd import comm
from . import distributed
from .metrics import (
    DEFAULT_TIE_RULE,
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    accuracy_metric_name,
    average_template_embeddings,
    check_tie_rule,
    recall_metric_name,
    retrieval_recall,
    zero_shot_classification,
)

__all__ = ["CLASSIFICATION", "RETRIEVAL", "TASKS", "ZeroShotEvaluator", "resolve_tasks"]

RETRIEVAL = "retrieval"
CLASSIFICATION = "classification"
TASKS = (RETRIEVAL, CLASSIFICATION)


def resolve_tasks(
    tasks: Sequence[str] | str | None,
    caption_column: str | None,
    class_label_column: str | None,
    columns: Sequence[str] | None = None,
) -> list[str]:
    """The tasks to run, in :data:`TASKS` order.

    ``None`` / ``"auto"``: classification when a class label column is set; retrieval when a
    caption column is set, unless classification is possible and ``columns`` (when given)
    lack the caption column.  ``"both"``: every task.  Raises ``ValueError`` for unknown
    names.
    """
    if tasks is not None and not isinstance(tasks, str):
        tasks = list(tasks)
    if tasks in (None, "auto", ["auto"]):
        classification = bool(class_label_column)
        retrieval = bool(caption_column) and not (
            classification and columns is not None and caption_column not in columns
        )
        return ([RETRIEVAL] if retrieval else []) + ([CLASSIFICATION] if classification else [])
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if "both" in tasks:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}, both, auto")
    return [t for t in TASKS if t in tasks]


def _column_values(dataset: Any, column: str) -> list[Any]:
    return list(dataset.with_format(None)[column])


def _class_label_names(dataset: Any, column: str) -> list[str] | None:
    """Names of a ``datasets.ClassLabel`` column, else None."""
    feature = getattr(dataset, "features", None)
    feature = feature.get(column) if feature is not None else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


class ZeroShotEvaluator:
    """Retrieval over (image, one or several captions) rows, and optional classification.

    Metric names: ``image_to_text_recall@k``, ``text_to_image_recall@k`` (for ``ks``) and, with
    class names, ``top{k}_accuracy`` (for ``classification_ks``, default ``top1_accuracy`` /
    ``top5_accuracy``; a ``k`` above the number of classes counts as all classes).
    ``primary_metric`` names the one to select checkpoints by.

    ``tasks``: ``"retrieval"`` and/or ``"classification"`` (or ``"both"``); by default
    (``None`` / ``"auto"``, see :func:`resolve_tasks`) retrieval when ``caption_column`` is set
    and classification when ``class_label_column`` is set. Class
    names default to the names of a ``datasets.ClassLabel`` label column. Labels may be class
    ids or the class names themselves. Templates hold ``{}`` for the class name.
    ``dataset_name`` / ``split`` only describe the data (JSON results, model cards).
    ``ties``: how equal scores are ranked, ``"lower-index"`` (default) or
    ``"clip-benchmark"`` (``torch.topk``'s choice, on the model's device, as CLIP_benchmark;
    see :mod:`glofnd_hf.eval.metrics`).
    ``distributed``: under an initialised ``torch.distributed`` group with several processes,
    split the embedding work across them (every process must call the evaluator); False:
    each caller evaluates everything alone.
    """

    primary_metric = recall_metric_name(IMAGE_TO_TEXT, 1)

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        caption_column: str | None = "caption",
        class_label_column: str | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 64,
        show_progress: bool = True,
        *,
        tasks: Sequence[str] | None = None,
        classification_ks: Sequence[int] = (1, 5),
        chunk_size: int = 1024,
        dataset_name: str | None = None,
        split: str | None = None,
        ties: str = DEFAULT_TIE_RULE,
        distributed: bool = True,
    ) -> None:
        # Long: every check of the evaluation set runs here, before minutes of embedding.
        check_tie_rule(ties)
        tasks = resolve_tasks(tasks, caption_column, class_label_column)
        if not tasks:
            raise ValueError(
                "nothing to evaluate: set a caption column (retrieval) and/or a class label "
                "column with class names (classification)"
            )
        if RETRIEVAL in tasks and not caption_column:
            raise ValueError("zero-shot retrieval needs a caption column")
        if CLASSIFICATION in tasks and not class_label_column:
            raise ValueError("zero-shot classification needs a class label column")
        columns = list(dataset.column_names)
        needed = [("image", image_column)]
        if RETRIEVAL in tasks:
            needed.append(("caption", caption_column))
        if CLASSIFICATION in tasks:
            needed.append(("class label", class_label_column))
        for role, column in needed:
            if column not in columns:
                flag = role.replace(" ", "_")
                raise ValueError(
                    f"evaluation data has no {role} column {column!r}; its columns are "
                    f"{columns} (set {flag}_column / --{flag.replace('_', '-')}-column)"
                )
        if len(dataset) == 0:
            raise ValueError("evaluation data is empty")
        if CLASSIFICATION in tasks and not class_names:
            class_names = _class_label_names(dataset, class_label_column)
            if not class_names:
                raise ValueError(
                    f"zero-shot classification needs class_names (column "
                    f"{class_label_column!r} is not a datasets.ClassLabel with names)"
                )
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.class_label_column = class_label_column
        self.tasks = tuple(t for t in TASKS if t in tasks)
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else ["a photo of {}."]
        for template in self.templates:
            if "{}" not in template:
                raise ValueError(
                    f"prompt template {template!r} has no '{{}}' placeholder for the class name"
                )
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names holds duplicates")
        self.ks = tuple(ks)
        self.classification_ks = tuple(classification_ks)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.show_progress = show_progress
        self.dataset_name = dataset_name
        self.split = split
        self.ties = ties
        self.distributed = distributed
        self.topk_device: torch.device | None = None  # the model's, set by embed()
        if RETRIEVAL in self.tasks:
            self.captions, self.text_to_image = self._flatten_captions()
        else:
            self.captions, self.text_to_image = [], torch.zeros(0, dtype=torch.long)
        self.labels = self._labels() if CLASSIFICATION in self.tasks else None

    def metric_names(self) -> list[str]:
        """The names of the metrics a call returns (the trainer logs them with ``eval_``:
        what ``metric_for_best_model`` may name)."""
        names: list[str] = []
        if RETRIEVAL in self.tasks:
            for direction in (IMAGE_TO_TEXT, TEXT_TO_IMAGE):
                names += [recall_metric_name(direction, k) for k in self.ks]
        if CLASSIFICATION in self.tasks:
            names += [accuracy_metric_name(k) for k in self.classification_ks]
        return list(dict.fromkeys(names))

    # -- data --------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def _flatten_captions(self) -> tuple[list[str], torch.Tensor]:
        """Every caption with its image; a row whose caption is missing, empty or blank
        (or a list of captions that is empty or holds such a caption) is an error that
        names the rows: retrieval scores would silently change without them."""
        captions: list[str] = []
        owners: list[int] = []
        bad: list[tuple[int, Any]] = []
        values = _column_values(self.dataset, self.caption_column)
        for i, value in enumerate(values):
            group = list(value) if isinstance(value, (list, tuple)) else [value]
            usable = [c for c in group if isinstance(c, str) and c.strip()]
            if not usable or len(usable) != len(group):
                bad.append((i, value))
                continue
            captions.extend(usable)
            owners.extend([i] * len(usable))
        if bad:
            shown = ", ".join(f"row {i}: {value!r}" for i, value in bad[:3])
            more = ", ..." if len(bad) > 3 else ""
            raise ValueError(
                f"{len(bad)} of {len(values)} evaluation rows have a missing or empty caption "
                f"in column {self.caption_column!r} ({shown}{more}): every image needs "
                "non-empty captions; drop or fix these rows, or evaluate classification only"
            )
        return captions, torch.tensor(owners, dtype=torch.long)

    def _labels(self) -> torch.Tensor:
        values = _column_values(self.dataset, self.class_label_column)
        assert self.class_names is not None
        if values and all(isinstance(v, str) for v in values):
            lookup = {name: i for i, name in enumerate(self.class_names)}
            missing = sorted({v for v in values if v not in lookup})
            if missing:
                raise ValueError(
                    f"class label column {self.class_label_column!r} holds names that are not "
                    f"class names: {missing[:5]}"
                )
            return torch.tensor([lookup[v] for v in values], dtype=torch.long)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            example = next(v for v in values if not isinstance(v, int) or isinstance(v, bool))
            raise ValueError(
                f"class label column {self.class_label_column!r} must hold class ids or class "
                f"names, got {example!r}"
            )
        return torch.tensor(values, dtype=torch.long)

    # -- embedding ---------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the process group sharing the work (``(0, 1)``: alone;
        the launcher's environment alone does not share it, unlike a data loader's
        ``comm.rank_and_world``)."""
        return (comm.rank(), comm.world_size()) if self.distributed else (0, 1)

    def _bar(self, total: int, desc: str):
        return tqdm(
            total=total,
            desc=desc,
            unit="img" if "image" in desc else "txt",
            disable=not self.show_progress or self._world()[0] != 0,
            leave=False,
        )

    @torch.no_grad()
    def embed(
        self,
        adapter: Any,
        model: torch.nn.Module | None = None,
        training: bool = False,
        seed: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalised float32 CPU embeddings: ``images`` [I, D], ``texts`` [T, D] (retrieval),
        ``classes`` [C, D] (classification, template-averaged). Distributed: a collective,
        and every process gets all of them. ``training``: as a training step sees the data
        (the model in train mode, dropout on, and the training image transform), one random
        draw (from ``seed`` when given, else from the current random state), taken without
        consuming the global random state."""
        model = adapter.unwrap(model)
        was_training = model.training
        model.train(training)
        self.topk_device = adapter.device
        device = torch.device(adapter.device)
        fork = (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            if training
            else contextlib.nullcontext()
        )
        with fork:
            if training and seed is not None:
                torch.manual_seed(seed)
            try:
                transform = adapter.image_transform(train=training)

                def encode_images(start: int, stop: int) -> torch.Tensor:
                    rows = self.dataset[start:stop][self.image_column]
                    pixels = torch.stack([transform(to_rgb(im)) for im in rows]).to(adapter.device)
                    return adapter.encode_images(model, pixels).float().cpu()

                out = {"images": self._embed(len(self.dataset), encode_images, "embedding images")}
                if RETRIEVAL in self.tasks:
                    out["texts"] = self._embed_texts(
                        adapter, model, self.captions, "embedding texts"
                    )
                if CLASSIFICATION in self.tasks:
                    assert self.class_names is not None
                    prompts = [t.format(c) for c in self.class_names for t in self.templates]
                    prompt_embeds = self._embed_texts(adapter, model, prompts, "embedding prompts")
                    out["classes"] = average_template_embeddings(prompt_embeds, len(self.templates))
            finally:
                model.train(was_training)
            return out

    def _embed_texts(
        self, adapter: Any, model: torch.nn.Module, texts: list[str], desc: str
    ) -> torch.Tensor:
        def encode(start: int, stop: int) -> torch.Tensor:
            return adapter.encode_texts(model, texts[start:stop]).float().cpu()

        return self._embed(len(texts), encode, desc)

    def _embed(self, n: int, encode, desc: str) -> torch.Tensor:
        """``encode(start, stop)`` over the ``batch_size`` batches of ``n`` items: all of them
        alone; distributed, this process's contiguous share, then gathered in order."""
        rank, world = self._world()
        plan = distributed.share_batches(n, self.batch_size, rank, world)
        parts: list[torch.Tensor] = []
        error: Exception | None = None
        try:
            with self._bar(plan.local_items, desc) as bar:
                for start, stop in plan.local:
                    parts.append(encode(start, stop))
                    bar.update(stop - start)
                # Every process runs as many forward passes (sharded models need them in step).
                for start, stop in plan.padding:
                    parts.append(encode(start, stop)[:0])
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            if world == 1:
                raise
            error = e
        if world == 1:
            return torch.cat(parts)
        # A failure on one process stops them all (instead of leaving them in the gather).
        if distributed.any_process(error is not None):
            raise error or RuntimeError(f"{desc} failed on another process (see its error)")
        return distributed.gather_rows(torch.cat(parts), plan.rows_per_rank)

    # -- scoring -----------------------------------------------------------------------------
    def score(self, embeds: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of embeddings from :meth:`embed` (computed here, in this process)."""
        metrics: dict[str, float] = {}
        ties = {"ties": self.ties, "topk_device": self.topk_device}
        if RETRIEVAL in self.tasks:
            metrics.update(
                retrieval_recall(
                    embeds["images"],
                    embeds["texts"],
                    self.text_to_image,
                    self.ks,
                    chunk_size=self.chunk_size,
                    **ties,
                )
            )
        if CLASSIFICATION in self.tasks:
            metrics.update(
                zero_shot_classification(
                    embeds["images"],
                    embeds["classes"],
                    self.labels,
                    ks=self.classification_ks,
                    chunk_size=self.chunk_size,
                    **ties,
                )
            )
        return metrics

    def __call__(self, adapter: Any, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Embed and score. Distributed: every process calls it; the main process scores
        and every process returns its metrics."""
        embeds = self.embed(adapter, model)
        rank, world = self._world()
        if world == 1:
            return self.score(embeds)
        result: dict[str, float] | Exception | None = None
        if rank == 0:
            try:
                result = self.score(embeds)
            except Exception as e:  # noqa: BLE001 - raised on every process
                result = e
        result = distributed.broadcast_from_main(result)
        if isinstance(result, Exception):
            raise result
        return result
