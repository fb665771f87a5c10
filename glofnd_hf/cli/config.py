"""``CONFIG.yaml [--flag value ...]`` parsing over dataclasses: YAML keys equal field names,
flags override the YAML, unknown keys are errors that say what was meant."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_config_and_flags(
    dataclass_types: Sequence[type], argv: Sequence[str] | None
) -> tuple[Any, ...]:
    argv = list(argv or [])
    config: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise SystemExit(f"error: config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of field names to values")
        config = loaded
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SystemExit(f"error: unknown key(s) in the config file: {', '.join(hints)}")
    parser = HfArgumentParser(dataclass_types)
    # YAML values become the parser's defaults, so command-line flags override them.
    parser.set_defaults(**config)
    for action in parser._actions:
        if action.dest in config:
            action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
