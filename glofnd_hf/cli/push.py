"""``glofnd-push OUTPUT_DIR --repo-id ORG/NAME``: upload a trained model folder to the Hub.

Renders the model card (``README.md``) when the folder has none (or with ``--render-card``),
then creates the repository if needed and uploads the model's files (weights, configs,
processor and tokenizer files, the card): other files only with ``--include GLOB``, the
training state (per-sample GloFND state, optimizer, scheduler, RNG states) only with
``--include-training-state``, dotfiles never. What stays local is printed. The token comes
from ``HF_TOKEN`` or ``hf auth login``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..hub import DEFAULT_COMMIT_MESSAGE, push_to_hub
from .errors import DEBUG_FLAG, DEBUG_HELP, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glofnd-push",
        description="Upload a GloFND-trained model folder (with its model card) to the "
        "Hugging Face Hub.",
    )
    p.add_argument("output_dir", help="the model folder (a training output or a checkpoint)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME of the model repository")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    p.add_argument(
        "--include-training-state",
        action="store_true",
        help="also upload glofnd_state.safetensors, optimizer, scheduler, RNG states",
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="also upload the files matching GLOB, relative to the folder (repeatable; a "
        "folder's name takes its files); dotfiles are never uploaded",
    )
    card = p.add_mutually_exclusive_group()
    card.add_argument(
        "--render-card",
        action="store_true",
        help="render README.md again even if the folder has one",
    )
    card.add_argument(
        "--keep-card",
        action="store_true",
        help="upload README.md as it is (default: render it when missing, or "
        "again with the repo id when it is our unedited card)",
    )
    p.add_argument(
        "--eval-results",
        default=None,
        help="a glofnd-eval JSON report to put in the card (implies --render-card)",
    )
    p.add_argument("--license", default=None, help="license id for the card metadata")
    p.add_argument("--base-model", default=None, help="Hub id of the model fine-tuned from")
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        dest="datasets",
        help="Hub id of a training dataset (repeatable)",
    )
    p.add_argument(
        "--dataset-name",
        default=None,
        help="name of the evaluation data set in the card's model-index (e.g. 'Flickr30k'); "
        "default: its Hub id, or 'local evaluation data' for a local folder",
    )
    p.add_argument(
        "--dataset-type",
        default=None,
        help="Hub id of the evaluation data set for the card's model-index (e.g. "
        "nlphuji/flickr_1k_test_image_text_retrieval), when the report names a local copy "
        "(without one, results on data that is not on the Hub stay out of the model-index)",
    )
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    p.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``glofnd-push``: a bad folder, a file holding a token, or a Hub or network failure
    exits with status 2 and one line; the local folder is then left as it was."""
    return run_cli("glofnd-push", _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    eval_report = None
    if args.eval_results:
        try:
            with open(args.eval_results, encoding="utf-8") as f:
                eval_report = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.exit(2, f"glofnd-push: error: cannot read {args.eval_results!r}: {e}\n")
        if not isinstance(eval_report, dict) or "metrics" not in eval_report:
            parser.exit(
                2,
                f"glofnd-push: error: {args.eval_results!r} is not a glofnd-eval "
                "report (no 'metrics')\n",
            )
    card_fields = {
        "license": args.license,
        "base_model": args.base_model,
        "datasets": args.datasets,
        "eval_dataset_name": args.dataset_name,
        "eval_dataset_type": args.dataset_type,
    }
    rerender = (
        args.render_card
        or eval_report is not None
        or any(v is not None for v in card_fields.values())
    )
    push_to_hub(
        args.output_dir,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        include_training_state=args.include_training_state,
        include=args.include,
        render_card=False if args.keep_card else (True if rerender else None),
        card_fields={k: v for k, v in card_fields.items() if v is not None},
        eval_report=eval_report,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
