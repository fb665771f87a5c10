"""``--set NAME=VALUE`` for the benchmark scripts: GloFND settings from the command line."""

from __future__ import annotations

import json
from typing import Any


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["drift_level=5", "common_test=across"]`` -> ``{"drift_level": 5, ...}``.

    A value is read as JSON (numbers, booleans, null, lists) and, where it is not JSON, kept
    as the plain string, so ``common_test=across`` and ``common_test='"across"'`` agree.
    """
    settings: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings
