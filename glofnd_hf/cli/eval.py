"""``glofnd-eval``: zero-shot retrieval and classification of a CLIP-style model.

Examples::

    glofnd-eval --model outputs/demo --dataset glofnd-digits --output results.json
    glofnd-eval --model openai/clip-vit-base-patch32 --dataset nlphuji/flickr_1k_test_image_text_retrieval \\
        --split test --image-column image --caption-column caption
    glofnd-eval --model ViT-B-32 --pretrained laion2b_s34b_b79k --shards '/data/coco/{0..4}.tar'
    glofnd-eval --model hf-hub:ORG/NAME --dataset ORG/imagenet-val --task classification \\
        --class-label-column label --templates-file templates.txt

Prints a table and, with ``--output``, writes the JSON report of
:func:`glofnd_hf.eval.run.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..eval.errors import EvalInputError
from ..eval.metrics import DEFAULT_TIE_RULE, TIE_RULES
from ..eval.run import evaluate, format_report
from ..models import family_choices
from .errors import DEBUG_FLAG, DEBUG_HELP, run_cli


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                values = json.load(f)
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise EvalInputError(f"{what} file {path!r} must hold a JSON list of strings")
                return values
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise EvalInputError(f"cannot read the {what} file {path!r}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    # Long: one add_argument per option of glofnd-eval, in the order --help lists them.
    p = argparse.ArgumentParser(
        prog="glofnd-eval",
        description="Zero-shot image-text retrieval (recall@k) and zero-shot classification "
        "(top-k accuracy) of a CLIP-style model.",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        required=True,
        help="training output folder, Hugging Face CLIP-family checkpoint (folder or "
        "Hub id), open_clip architecture (with --pretrained), hf-hub:ORG/NAME or "
        "local-dir:PATH",
    )
    m.add_argument(
        "--pretrained",
        default=None,
        help="open_clip pretrained tag or checkpoint file (e.g. laion2b_s34b_b79k)",
    )
    m.add_argument("--family", default="auto", choices=family_choices())
    d = p.add_argument_group("data (one of --dataset / --shards)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--dataset", default=None, help="Hub dataset id, save_to_disk folder, or glofnd-digits"
    )
    src.add_argument(
        "--shards", default=None, help="WebDataset shards: path, brace pattern or '::'-joined list"
    )
    d.add_argument("--dataset-config", default=None)
    d.add_argument(
        "--split", default=None, help="default: test, else validation, else the only split"
    )
    d.add_argument("--image-column", default="image")
    d.add_argument(
        "--caption-column", default="caption", help="one caption or a list of captions per row"
    )
    d.add_argument(
        "--class-label-column",
        default=None,
        help="class ids or names per row (shards: a field of each sample's .json)",
    )
    d.add_argument(
        "--image-id-field",
        default="image_id",
        help="shards: .json field grouping captions of the same image",
    )
    d.add_argument("--max-samples", type=int, default=None, help="evaluate the first N images")
    c = p.add_argument_group("zero-shot classification")
    names = c.add_mutually_exclusive_group()
    names.add_argument("--class-names", nargs="+", default=None)
    names.add_argument("--class-names-file", default=None, help="one name a line, or JSON list")
    tmpl = c.add_mutually_exclusive_group()
    tmpl.add_argument(
        "--templates", nargs="+", default=None, help="prompt templates with {} for the class name"
    )
    tmpl.add_argument("--templates-file", default=None, help="one template a line, or JSON list")
    r = p.add_argument_group("run")
    r.add_argument(
        "--task",
        nargs="+",
        default=["auto"],
        choices=["auto", "retrieval", "classification", "both"],
    )
    r.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10], help="retrieval recall@k")
    r.add_argument("--classification-ks", nargs="+", type=int, default=[1, 5])
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        help="queries scored at once (bounds the score buffer)",
    )
    r.add_argument(
        "--ties",
        default=DEFAULT_TIE_RULE,
        choices=TIE_RULES,
        help="how candidates with equal scores rank: lower-index (default: the lower index "
        "first, the same on every device) or clip-benchmark (whatever torch.topk picks on "
        "the model's device, as CLIP_benchmark does: to match its published numbers)",
    )
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument("--output", default=None, help="write the JSON report here")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``glofnd-eval``: an input, file or Hub problem exits with status 2 and one line."""
    return run_cli("glofnd-eval", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        class_names = args.class_names or (
            _read_lines(args.class_names_file, "class names") if args.class_names_file else None
        )
        templates = args.templates or (
            _read_lines(args.templates_file, "templates") if args.templates_file else None
        )
        report = evaluate(
            args.model,
            pretrained=args.pretrained,
            family=args.family,
            dataset=args.dataset,
            shards=args.shards,
            split=args.split,
            dataset_config=args.dataset_config,
            image_column=args.image_column,
            caption_column=args.caption_column,
            class_label_column=args.class_label_column,
            class_names=class_names,
            templates=templates,
            tasks=args.task,
            ks=args.ks,
            classification_ks=args.classification_ks,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            device=args.device,
            max_samples=args.max_samples,
            image_id_field=args.image_id_field or None,
            output=args.output,
            show_progress=not args.no_progress,
            ties=args.ties,
        )
    except EvalInputError:
        raise  # run_cli: one line and exit status 2
    print(format_report(report))
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
