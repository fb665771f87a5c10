"""``glofnd-shards``: write WebDataset shards that carry a GloFND dataset index per sample.

Examples::

    glofnd-shards from-dataset SOURCE OUT [--split train] [--image-column image] ...
    glofnd-shards from-csv     CSV OUT --image-column filepath --caption-column title
    glofnd-shards add-index    '/data/{00000..00331}.tar' OUT [--index-source key]
    glofnd-shards verify       '/data/{00000..00331}.tar' [--index-source key] [--dataset-size N]

The writers print ``{"shards": PATTERN, "num_samples": n}``; ``verify`` prints a JSON report
and, when it found problems, exits with status 2 and one line naming the first (a dataset
index held by two samples names both). The library functions are in
:mod:`glofnd_hf.data.shard_writer` and :mod:`glofnd_hf.data.shard_verify`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from ..data.errors import DataError
from ..data.loading import MissingSplitError, load_image_text_dataset
from ..data.shard_verify import verify_shards
from ..data.shard_writer import (
    IMAGE_FORMATS,
    add_index_to_shards,
    write_shards_from_csv,
    write_shards_from_dataset,
)
from .errors import DEBUG_FLAG, DEBUG_HELP, UsageError, run_cli

__all__ = ["build_parser", "main"]

OVERWRITE_HELP = (
    "write into a folder that is not empty, replacing the shards, sizes.json and "
    "glofnd_index.json there (only once every shard was written)"
)


def _add_writer_options(p: argparse.ArgumentParser, image: str, caption: str) -> None:
    p.add_argument("output_dir")
    p.add_argument("--image-column", default=image)
    p.add_argument("--caption-column", default=caption)
    p.add_argument("--index-column", default=None)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-format", default="jpg", choices=sorted(IMAGE_FORMATS))
    p.add_argument("--extra-columns", nargs="*", default=[])
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glofnd-shards", description="Write WebDataset shards with GloFND dataset indices."
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("from-dataset", help="a datasets dir (save_to_disk) or a Hub dataset name")
    p.add_argument("source")
    _add_writer_options(p, "image", "caption")
    p.add_argument("--split", default="train")
    p.add_argument("--config-name", default=None)

    p = sub.add_parser("from-csv", help="a CSV/TSV of image paths (relative to it) and captions")
    p.add_argument("csv_path")
    _add_writer_options(p, "filepath", "title")
    p.add_argument("--sep", default=",", help="column separator, e.g. $'\\t'")

    p = sub.add_parser("add-index", help="copy existing shards adding KEY.idx")
    p.add_argument("input_pattern")
    p.add_argument("output_dir")
    p.add_argument("--start-index", type=int, default=0)
    p.add_argument("--index-source", choices=("sequential", "key"), default="sequential")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser(
        "verify",
        help="read every sample's index: duplicates (naming both), indices outside [0, N), "
        "unreadable or truncated shards, sizes.json counts",
    )
    p.add_argument("pattern")
    p.add_argument("--index-source", choices=("field", "key"), default="field")
    p.add_argument(
        "--dataset-size", type=int, default=None, help="N (default: glofnd_index.json's)"
    )
    p.add_argument("--sizes-file", default=None)
    return parser


def _verify(args: argparse.Namespace) -> int:
    report = verify_shards(args.pattern, args.index_source, args.dataset_size, args.sizes_file)
    print(json.dumps(report, indent=1))
    if report["num_problems"]:
        more = report["num_problems"] - 1
        raise DataError(
            report["problems"][0] + (f" (and {more} more problem(s), listed above)" if more else "")
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``glofnd-shards`` console entry point: an unreadable input, a non-empty output folder
    (without ``--overwrite``) or a Hub problem exits with status 2 and one line."""
    return run_cli("glofnd-shards", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "verify":
        return _verify(args)
    if args.command == "add-index":
        pattern, n = add_index_to_shards(
            args.input_pattern,
            args.output_dir,
            args.start_index,
            args.index_source,
            overwrite=args.overwrite,
        )
    else:
        kwargs = dict(
            image_column=args.image_column,
            caption_column=args.caption_column,
            index_column=args.index_column,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            extra_columns=tuple(args.extra_columns),
            jpeg_quality=args.jpeg_quality,
            on_error=args.on_error,
            overwrite=args.overwrite,
        )
        if args.command == "from-dataset":
            try:
                ds = load_image_text_dataset(args.source, args.config_name, args.split)
            except MissingSplitError as e:
                raise UsageError(f"split {e.split!r} not in {e.available}") from e
            pattern, n = write_shards_from_dataset(ds, args.output_dir, **kwargs)
        else:
            pattern, n = write_shards_from_csv(
                args.csv_path, args.output_dir, sep=args.sep, **kwargs
            )
    print(json.dumps({"shards": pattern, "num_samples": n}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
