"""``glofnd-inspect``: the false negatives a checkpoint's detector marks, as HTML, PNG and JSON.

Examples::

    glofnd-inspect outputs/demo/checkpoint-360 --dataset glofnd-digits --sample 16 \\
        --output report.html
    glofnd-inspect outputs/run/checkpoint-5000 --shards '/data/cc3m/{00000..00331}.tar' \\
        --indices 17 4242 --output cc3m.html --model outputs/run/checkpoint-5000

(The module is not called ``inspect``: it would shadow the standard library's when a file of
this folder is run by path.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..inspection import inspect_checkpoint, output_paths
from ..models import family_choices
from .errors import DEBUG_FLAG, DEBUG_HELP, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glofnd-inspect",
        description="For chosen anchors of the training data, the samples a checkpoint's "
        "per-sample thresholds mark as false negatives against the whole data set (and the "
        "nearest ones below), plus data-set summaries; writes HTML, JSON and PNG grids.",
    )
    p.add_argument("checkpoint", help="a checkpoint-N folder (holds glofnd_state.safetensors)")
    d = p.add_argument_group("training data (one of --dataset / --shards)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--dataset", default=None, help="Hub dataset id, save_to_disk folder, or glofnd-digits"
    )
    src.add_argument(
        "--shards", default=None, help="WebDataset shards: path, brace pattern or '::'-joined list"
    )
    d.add_argument("--split", default="train", help="the split trained on (default: train)")
    d.add_argument("--dataset-config", default=None)
    d.add_argument("--image-column", default="image")
    d.add_argument("--caption-column", default="caption")
    d.add_argument(
        "--index-column",
        default="dataset_index",
        help="dataset index column (absent: the row number, as in training)",
    )
    d.add_argument(
        "--label-column",
        default=None,
        help="ground-truth labels for precision/recall (default: semantic_label if present; "
        "shards: a field of each sample's .json)",
    )
    d.add_argument(
        "--index-source",
        default="field",
        choices=["field", "key"],
        help="shards: where each sample's dataset index is (as shard_index_source in training)",
    )
    a = p.add_argument_group("anchors (default: --sample 16)")
    pick = a.add_mutually_exclusive_group()
    pick.add_argument("--indices", nargs="+", type=int, default=None, help="dataset indices")
    pick.add_argument("--sample", type=int, default=None, help="this many random anchors")
    a.add_argument("--seed", type=int, default=0, help="seed of --sample and of the summary")
    a.add_argument(
        "--max-detected", type=int, default=12, help="detected false negatives listed per side"
    )
    a.add_argument(
        "--below", type=int, default=6, help="nearest negatives below the threshold per side"
    )
    a.add_argument(
        "--summary-anchors",
        type=int,
        default=10000,
        help="summary over every anchor up to this many rows, else a random subset this large",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="default: the checkpoint folder itself")
    m.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file")
    m.add_argument("--family", default="auto", choices=family_choices())
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    m.add_argument("--batch-size", type=int, default=64)
    o = p.add_argument_group("output")
    o.add_argument(
        "--output",
        required=True,
        help="the HTML page; report.html also writes report.json and report_png/",
    )
    o.add_argument("--no-png", action="store_true", help="no PNG grids (needs no matplotlib)")
    o.add_argument(
        "--cache-dir",
        default=None,
        help="embedding cache (default: ~/.cache/glofnd_hf/inspect)",
    )
    o.add_argument("--no-cache", action="store_true", help="embed afresh, cache nothing")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``glofnd-inspect``: an input problem exits with status 2 and one line."""
    return run_cli("glofnd-inspect", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report = inspect_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        shards=args.shards,
        split=args.split,
        dataset_config=args.dataset_config,
        image_column=args.image_column,
        caption_column=args.caption_column,
        index_column=args.index_column,
        label_column=args.label_column,
        index_source=args.index_source,
        indices=args.indices,
        sample=args.sample,
        seed=args.seed,
        max_detected=args.max_detected,
        below=args.below,
        summary_anchors=args.summary_anchors,
        model=args.model,
        pretrained=args.pretrained,
        family=args.family,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        output=args.output,
        png=not args.no_png,
        show_progress=not args.no_progress,
    )
    paths = output_paths(args.output)
    for side, entry in report["summary"]["sides"].items():
        line = (
            f"{side} side: {entry['detected_per_anchor'].get('mean', 0):.2f} detected per "
            f"anchor, median |threshold - exact quantile| {entry['median_abs_threshold_error']:.4f}"
        )
        labels = entry.get("labels")
        if labels:
            line += f", precision {_pct(labels['precision'])}, recall {_pct(labels['recall'])}"
        print(line)
    print(f"wrote {paths['html']}, {paths['json']}" + ("" if args.no_png else f", {paths['png']}/"))
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
