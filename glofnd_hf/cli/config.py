"""Settings as dataclasses, three ways: ``CONFIG.yaml [--flag value ...]`` parsing (YAML keys
equal field names, flags override the YAML, unknown keys are errors that say what was meant),
``--help`` in sections, and the settings reference ``docs/settings.md``.

A dataclass groups its fields with ``help_sections`` (first field of a section -> its title;
a section runs to the next one). Regenerate the reference with
``python -m glofnd_hf.cli.config > docs/settings.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..fnd.setting_types import SettingTypeError, check_dataclass_values

REGENERATE_COMMAND = "python -m glofnd_hf.cli.config > docs/settings.md"


def own_fields(dataclass_type: type) -> list[dataclasses.Field]:
    """Fields a dataclass adds to ``TrainingArguments`` or redefines (all fields of any other
    dataclass), in field order."""
    base = (
        {f.name for f in dataclasses.fields(TrainingArguments)}
        if issubclass(dataclass_type, TrainingArguments)
        else set()
    )
    redefined = set(vars(dataclass_type).get("__annotations__", {}))
    fields = [
        f
        for f in dataclasses.fields(dataclass_type)
        if f.init and (f.name not in base or f.name in redefined)
    ]
    # A redefined field keeps its base position: list the class's own order.
    order = list(vars(dataclass_type).get("__annotations__", {}))
    return sorted(fields, key=lambda f: order.index(f.name) if f.name in order else -1)


def sections(dataclass_type: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """``(title, fields)`` of the dataclass's own fields, in field order."""
    starts: Mapping[str, str] = getattr(dataclass_type, "help_sections", {})
    out: list[tuple[str, list[dataclasses.Field]]] = []
    for f in own_fields(dataclass_type):
        if f.name in starts or not out:
            out.append((starts.get(f.name, dataclass_type.__name__), []))
        out[-1][1].append(f)
    return out


class SectionedArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose ``--help`` shows each dataclass's sections as groups."""

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        if not getattr(dtype, "help_sections", None):
            super()._add_dataclass_arguments(dtype)
            return
        own = {f.name for f in own_fields(dtype)}
        type_hints = get_type_hints(dtype)
        inherited = self.add_argument_group(f"{dtype.__name__} (inherited)")
        for f in dataclasses.fields(dtype):
            if f.init and f.name not in own:
                f.type = type_hints[f.name]
                self._parse_dataclass_field(inherited, f)
        for title, fields in sections(dtype):
            group = self.add_argument_group(title)
            for f in fields:
                f.type = type_hints[f.name]
                self._parse_dataclass_field(group, f)


def build_parser(
    dataclass_types: Sequence[type], help_overrides: Mapping[str, str] | None = None
) -> SectionedArgumentParser:
    """The parser of ``dataclass_types``; ``help_overrides`` replace the help of some fields
    (texts known only at run time, such as the registered detectors)."""
    parser = SectionedArgumentParser(
        dataclass_types, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for action in parser._actions:
        if help_overrides and action.dest in help_overrides:
            action.help = help_overrides[action.dest]
    return parser


class ConfigError(ValueError):
    """A configuration file or value that cannot be used (the message says which and why)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of field names to values in a YAML configuration file."""
    path = Path(path)
    if path.is_dir():
        recipes = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f" (it holds {', '.join(recipes)})" if recipes else ""
        raise ConfigError(f"config file {path} is a folder, not a YAML recipe{hint}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{path} is not valid YAML{line}: {problem}") from err
    loaded = loaded or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of field names to values")
    return loaded


def check_config_values(
    dataclass_types: Sequence[type], config: Mapping[str, Any], source: str = "config"
) -> dict[str, Any]:
    """``config`` with every value checked against its field's type (and converted as a
    command-line flag would be: ``"1e-3"`` for a float); raises :class:`ConfigError` naming
    the first unknown key (with the closest field) or the field and the expected type."""
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in {source}: {', '.join(hints)}")
    checked = dict(config)
    for cls in dataclass_types:
        own = {f.name for f in dataclasses.fields(cls) if f.init} & set(config)
        try:
            checked.update(check_dataclass_values(cls, {k: config[k] for k in own}))
        except SettingTypeError as err:
            raise ConfigError(f"{source}: {err}") from err
    return checked


def parse_config_and_flags(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None,
    help_overrides: Mapping[str, str] | None = None,
) -> tuple[Any, ...]:
    """The dataclasses from ``[CONFIG.yaml] [--flag value ...]``: every YAML value is checked
    against its field's type here, before anything is built (flags are checked by the
    parser); raises :class:`ConfigError` (a ``ValueError``) naming the field."""
    argv = list(argv or [])
    config: dict[str, Any] = {}
    source = "the command line"
    if argv and not argv[0].startswith("-"):
        source = argv[0]
        config = read_config_file(argv.pop(0))
    config = check_config_values(dataclass_types, config, source)
    parser = build_parser(dataclass_types, help_overrides)
    # YAML values become the parser's defaults, so command-line flags override them.
    parser.set_defaults(**config)
    for action in parser._actions:
        if action.dest in config:
            action.required = False
    return parser.parse_args_into_dataclasses(args=argv)


# -- the settings reference -----------------------------------------------------------------
def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value in ("", (), [], {}):
        return f"`{value!r}`"
    return f"`{value}`"


def _type_text(annotation: Any) -> str:
    """``tail \\| adam`` for a Literal, else the annotation as written (resolved: parsers
    overwrite ``Field.type``, so it is never read)."""
    if getattr(annotation, "__origin__", None) is Literal:
        return " \\| ".join(str(a) for a in annotation.__args__)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return _cell(text or str(annotation).replace("typing.", ""))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def fields_table(
    fields: Sequence[dataclasses.Field], types: Mapping[str, Any] | None = None
) -> str:
    """A Markdown table of fields: name, default, type (when ``types`` are given), help."""
    with_type = types is not None
    head = (
        "| setting | default | type | meaning |\n|---|---|---|---|"
        if with_type
        else ("| setting | default | meaning |\n|---|---|---|")
    )
    rows = []
    for f in fields:
        help_text = _cell(f.metadata.get("help", ""))
        if with_type:
            type_text = _type_text(types[f.name])
            rows.append(f"| `{f.name}` | {_default_text(f)} | {type_text} | {help_text} |")
        else:
            rows.append(f"| `{f.name}` | {_default_text(f)} | {help_text} |")
    return "\n".join([head, *rows])


def dataclass_reference(dataclass_type: type, level: int = 2) -> str:
    """Markdown of a dataclass's own settings, one table per section."""
    parts = []
    for title, fields in sections(dataclass_type):
        parts.append(f"{'#' * level} {title}\n\n{fields_table(fields)}")
    return "\n\n".join(parts)


def settings_reference() -> str:
    """The text of ``docs/settings.md``: every training setting and every detector's own
    settings, generated from the dataclasses' ``help`` metadata and the detector registry."""
    from ..args import DataArguments, GloFNDTrainingArguments, ModelArguments
    from ..fnd import registry

    parts = [
        "# Settings",
        f"<!-- Generated from the dataclasses' help metadata: do not edit. Regenerate with\n"
        f"     {REGENERATE_COMMAND} -->",
        "`glofnd-train CONFIG.yaml [--flag value ...]` reads these settings: YAML keys and "
        "flags are the field names below. `transformers.TrainingArguments` settings "
        "(`learning_rate`, `per_device_train_batch_size`, ...) work as in any Trainer run; "
        "`glofnd-train --help` lists them all.",
        dataclass_reference(ModelArguments),
        dataclass_reference(DataArguments),
        dataclass_reference(GloFNDTrainingArguments),
        "## Detectors and their settings\n\n"
        "`detector` names one of the detectors below. Every detector reads the shared "
        "`fn_alpha` and `fn_start_epoch`; its own settings go in `detector_kwargs`, e.g.\n\n"
        "```yaml\ndetector: glofnd\nfn_alpha: 1.0e-3\ndetector_kwargs:\n"
        "  update_rule: adam\n  lr: 0.05\n```",
    ]
    for name in registry.names():
        spec = registry.get(name)
        fields = spec.setting_fields()
        labels = " Needs a label column (`label_column`)." if spec.requires_labels else ""
        body = (
            fields_table(fields, get_type_hints(spec.settings))
            if fields
            else "No settings of its own."
        )
        parts.append(
            f"### `{name}`\n\n{spec.description[0].upper()}{spec.description[1:]}."
            f"{labels}\n\n{body}"
        )
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_reference())
