"""``inspect_checkpoint``: the Python API behind ``glofnd-inspect``.

Loads a checkpoint's detector state and model, embeds the training data (cached), lists for
each chosen anchor the samples its thresholds mark as false negatives against the whole data
set (and the nearest ones below), summarises the whole data set, and writes the report as
JSON, a self-contained HTML page and PNG grids::

    from glofnd_hf.inspection import inspect_checkpoint

    report = inspect_checkpoint("outputs/demo/checkpoint-360", dataset="glofnd-digits",
                                sample=16, output="report.html")
    report["anchors"][0]["sides"]["image"]["detected"]
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.run import load_eval_model, trained_config
from ..version import __version__
from .data import choose_anchor_rows, load_training_data
from .embeddings import default_cache_dir, embed_pairs, embedding_cache_key
from .neighbours import anchor_neighbours, scan_anchors
from .report import REPORT_FORMAT_VERSION, anchor_entry, save_json, summary_entry
from .thresholds import load_checkpoint_thresholds

__all__ = ["inspect_checkpoint", "output_paths"]


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """Where a report goes: ``report.html`` -> ``report.json`` and ``report_png/``."""
    output = Path(output)
    return {
        "html": output,
        "json": output.with_suffix(".json"),
        "png": output.with_name(output.stem + "_png"),
    }


def inspect_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    dataset: Any = None,
    shards: str | Sequence[str] | None = None,
    split: str | None = "train",
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    index_column: str = "dataset_index",
    label_column: str | None = None,
    index_source: str = "field",
    indices: Sequence[int] | None = None,
    sample: int | None = None,
    seed: int = 0,
    max_detected: int = 12,
    below: int = 6,
    summary_anchors: int = 10000,
    model: Any = None,
    pretrained: str | None = None,
    family: str = "auto",
    device: str | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    output: str | os.PathLike | None = None,
    png: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The inspection report of ``checkpoint`` (a ``checkpoint-N`` folder) on its training
    data; written as HTML to ``output`` (with ``.json`` beside it and, with ``png``, the
    grids and summary plot in ``<stem>_png/``) when given.

    ``model``: a name/folder for :func:`~glofnd_hf.eval.run.load_eval_model` (default: the
    checkpoint folder) or a loaded adapter. Anchors: dataset ``indices``, or ``sample``
    random rows (default 16). ``summary_anchors``: the summary scans every anchor up to
    this many rows, else a random subset of that size (each against the whole data set).
    """
    # Long: every option of glofnd-inspect is a keyword here; the body is named steps.
    started = time.perf_counter()
    if output is not None and png:
        from .plots import require_matplotlib

        require_matplotlib()  # before the minutes of embedding, not after
    state = load_checkpoint_thresholds(checkpoint)
    if dataset_config is None:  # the configuration the checkpoint's run used, if it says
        dataset_config = trained_config(checkpoint, dataset)
    data = load_training_data(
        state.num_samples,
        dataset,
        shards=shards,
        split=split,
        dataset_config=dataset_config,
        image_column=image_column,
        caption_column=caption_column,
        index_column=index_column,
        label_column=label_column,
        index_source=index_source,
    )
    anchor_rows = choose_anchor_rows(data, state.num_samples, indices, sample, seed)
    source = checkpoint if model is None else model
    t0 = time.perf_counter()
    adapter, (image, text) = _embed_training_pairs(
        source,
        data,
        pretrained=pretrained,
        family=family,
        device=device,
        batch_size=batch_size,
        cache_dir=cache_dir,
        use_cache=use_cache,
        show_progress=show_progress,
    )
    embed_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    scan, anchors = _scan_and_list(
        image, text, state, data, anchor_rows, summary_anchors, seed, max_detected, below
    )
    scan_seconds = time.perf_counter() - t0

    report = _report(checkpoint, source, adapter, data, state, scan, anchors)
    report["settings"] = {"max_detected": max_detected, "below": below, "seed": seed}
    report["timing"] = {
        "embed_seconds": round(embed_seconds, 3),
        "scan_seconds": round(scan_seconds, 3),
    }
    report["timing"]["before_output_seconds"] = round(time.perf_counter() - started, 3)
    if output is not None:
        write_outputs(report, scan, data, output, png=png)
    return report


def _report(
    checkpoint: str | os.PathLike,
    source: Any,
    adapter: Any,
    data: Any,
    state: Any,
    scan: Any,
    anchors: list[dict[str, Any]],
) -> dict[str, Any]:
    """The inspection report's header, anchors and summary (settings and timing are added
    by the caller)."""
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "glofnd_hf_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "model": {
            "name": str(source) if isinstance(source, (str, os.PathLike)) else None,
            "family": adapter.family,
            "class": type(adapter.model).__name__,
        },
        "data": data.info,
        "detector": {
            "name": state.detector,
            "alpha": state.alpha,
            "thresholds": "learned per sample"
            if state.learned
            else "the rule's (1 - alpha) quantile over the whole data set",
            "config": state.config,
        },
        "num_samples": state.num_samples,
        "settings": None,
        "anchors": anchors,
        "summary": summary_entry(scan, len(data.index)),
        "timing": None,
    }


def _embed_training_pairs(
    source: Any,
    data: Any,
    *,
    pretrained: str | None,
    family: str,
    device: str | None,
    batch_size: int,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    show_progress: bool,
) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The model (loaded when ``source`` is a name or folder) and its image and text
    embeddings of every training row, read from (or written to) the embedding cache when
    the model has a name to key it by."""
    named = isinstance(source, (str, os.PathLike))
    adapter = (
        load_eval_model(source, pretrained=pretrained, family=family, device=device)
        if named
        else source
    )
    cache_file = None
    if use_cache and named:
        key = embedding_cache_key(source, data.dataset, data.image_column, data.caption_column)
        cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
    pairs = embed_pairs(
        adapter,
        data.dataset,
        data.image_column,
        data.caption_column,
        batch_size=batch_size,
        show_progress=show_progress,
        cache_file=cache_file,
    )
    return adapter, pairs


def _scan_and_list(
    image: torch.Tensor,
    text: torch.Tensor,
    state: Any,
    data: Any,
    anchor_rows: Sequence[int],
    summary_anchors: int,
    seed: int,
    max_detected: int,
    below: int,
) -> tuple[Any, list[dict[str, Any]]]:
    """The summary scan (every row up to ``summary_anchors``, else a seeded subset) and the
    report entry of each listed anchor: its detected neighbours and the ones just below."""
    row_thresholds = None if state.thresholds is None else state.thresholds[data.index]
    rows = len(data.index)
    summary_rows = torch.arange(rows)
    if rows > summary_anchors:
        chosen = np.random.default_rng(seed).choice(rows, size=summary_anchors, replace=False)
        summary_rows = torch.as_tensor(np.sort(chosen))
    scan_args = (image, text, data.index)
    scan = scan_anchors(*scan_args, summary_rows, state.alpha, row_thresholds, labels=data.labels)
    listed = torch.tensor(anchor_rows)
    thresholds = (
        row_thresholds[listed]
        if row_thresholds is not None
        else scan_anchors(*scan_args, listed, state.alpha).threshold.t()
    )
    captions = list(data.dataset.with_format(None)[data.caption_column])

    def describe(row: int) -> dict[str, Any]:
        entry = {"index": int(data.index[row]), "row": row, "caption": captions[row]}
        if data.label_values is not None:
            entry["label"] = data.label_values[row]
        return entry

    anchors = []
    for k, row in enumerate(anchor_rows):
        sides = anchor_neighbours(*scan_args, row, thresholds[k], max_detected, below)
        visits = None if state.visits is None else state.visits[data.index[row]].tolist()
        anchors.append(anchor_entry(row, sides, describe, visits))
    return scan, anchors


def write_outputs(report: dict[str, Any], scan, data, output, *, png: bool) -> dict[str, Path]:
    """The JSON, the PNGs (when ``png``) and the HTML page of a report."""
    from .html import render_html
    from .thumbnails import thumbnails_for

    paths = output_paths(output)
    thumbs = thumbnails_for(report, data.dataset, data.image_column)
    figures: dict[str, Path] = {}
    if png:
        from .plots import anchor_grid, summary_figure

        paths["png"].mkdir(parents=True, exist_ok=True)
        figures["summary"] = summary_figure(report, scan, paths["png"] / "summary.png")
        for anchor in report["anchors"]:
            name = f"anchor-{anchor['index']}.png"
            figures[name] = anchor_grid(anchor, thumbs, paths["png"] / name)
    report["files"] = {
        "json": str(paths["json"]),
        "png": sorted(str(p) for p in figures.values()),
    }
    save_json(report, paths["json"])
    summary_png = figures.get("summary")
    html = render_html(report, thumbs, summary_png.read_bytes() if summary_png else None)
    paths["html"].parent.mkdir(parents=True, exist_ok=True)
    paths["html"].write_text(html, encoding="utf-8")
    return paths
