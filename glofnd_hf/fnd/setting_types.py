"""Checking a setting's value against its field's type, for values that come from YAML or
JSON (recipes, ``detector_kwargs``) and so were never converted by a command-line parser.

:func:`check_setting` accepts what a command-line flag would also accept (``"1e-3"`` for a
float, ``"true"`` for a bool, a number where a string is expected) and converts it; anything
else raises :class:`SettingTypeError` naming the setting and the expected type, before
anything is built from the value.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

__all__ = [
    "SettingTypeError",
    "check_dataclass_values",
    "check_setting",
    "describe_type",
    "setting",
]

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class SettingTypeError(ValueError):
    """A setting whose value does not have the field's type (the message names both)."""


class _Mismatch(Exception):
    pass


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def describe_type(annotation: Any) -> str:
    """The expected type in words: ``an integer``, ``a list of strings``, ``one of 'a',
    'b'``, ``a number or null``."""
    if annotation is Any or annotation is object:
        return "any value"
    if annotation is type(None) or annotation is None:
        return "null"
    origin = get_origin(annotation)
    if _is_union(annotation):
        args = get_args(annotation)
        parts = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(dict.fromkeys(parts))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(annotation):
            return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
        if not args:
            return "a list"
        return f"a list of {_plural(describe_type(args[0]))}"
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _plural(text: str) -> str:
    for single, plural in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
        ("true or false", "booleans"),
    ):
        text = text.replace(single, plural)
    return text


def _check(value: Any, annotation: Any, lenient: bool) -> Any:
    """``value`` (converted when ``lenient``) if it has type ``annotation``, else _Mismatch."""
    # Long: one branch per kind of setting type, each with its own message.
    if annotation is Any or annotation is object:
        return value
    if annotation is type(None) or annotation is None:
        if value is None:
            return None
        raise _Mismatch
    origin = get_origin(annotation)
    if _is_union(annotation):
        args = get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for strict_pass in (True, False) if lenient else (True,):
            for arg in args:
                try:
                    return _check(value, arg, lenient=not strict_pass)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in get_args(annotation)):
            return value
        raise _Mismatch
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if isinstance(value, annotation):
            return value
        if isinstance(value, str) and value in {m.value for m in annotation}:
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if annotation is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if lenient and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _Mismatch
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if lenient and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, os.PathLike):
            return os.fspath(value)
        if lenient and isinstance(value, bool):
            return "true" if value else "false"  # as written in YAML
        if lenient and isinstance(value, numbers.Real):
            return str(value)
        raise _Mismatch
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = get_args(annotation)
        if not args:
            return value
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_check(v, a, lenient) for v, a in zip(value, args, strict=True))
        checked = [_check(v, args[0], lenient) for v in value]
        return tuple(checked) if origin is tuple else checked
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        args = get_args(annotation)
        if len(args) == 2:
            return {
                _check(k, args[0], lenient): _check(v, args[1], lenient) for k, v in value.items()
            }
        return value
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if dataclasses.is_dataclass(annotation) and isinstance(value, (Mapping, str)):
            return value  # a config object given as a mapping (or JSON): built by its owner
        raise _Mismatch
    return value  # a type this check does not know: left to the field's owner


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        tuple: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def check_setting(name: str, value: Any, annotation: Any) -> Any:
    """``value`` for the setting ``name`` of type ``annotation``, converted as a command-line
    flag would be (strings of numbers or booleans); raises :class:`SettingTypeError`."""
    try:
        return _check(value, annotation, lenient=True)
    except _Mismatch:
        raise SettingTypeError(
            f"{name}: expected {describe_type(annotation)}, got {value!r} ({_type_name(value)})"
        ) from None


def check_dataclass_values(
    dataclass_type: type, values: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """``values`` (field name -> value) checked against ``dataclass_type``'s field types and
    converted (a field named in the dataclass's ``setting_choices`` ClassVar takes one of the
    values its callable returns). Names that are not fields, and values a dataclass lists in
    its ``value_aliases`` ClassVar (field -> older spellings its ``__post_init__`` still accepts,
    with a warning), are passed through."""
    hints = typing.get_type_hints(dataclass_type)
    # String fields whose values are known at run time (a registry's names, which grow as
    # modules register): the dataclass's ``setting_choices`` ClassVar, field -> names().
    choices: Mapping[str, Callable[[], Sequence[str]]] = getattr(
        dataclass_type, "setting_choices", {}
    )
    for name, names in choices.items():
        hints[name] = Literal.__getitem__(tuple(names()))
    aliases: Mapping[str, Sequence[Any]] = getattr(dataclass_type, "value_aliases", {})
    checked = {}
    for key, value in values.items():
        if key not in hints or _is_alias(value, aliases.get(key, ())):
            checked[key] = value  # the owner reports unknown keys and older spellings
        else:
            checked[key] = check_setting(prefix + key, value, hints[key])
    return checked


def _is_alias(value: Any, aliases: Sequence[Any]) -> bool:
    return any(value == a and type(value) is type(a) for a in aliases)


def setting(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with its help text (read by --help and docs/settings.md); every
    settings dataclass of the package (training arguments, detectors' settings) uses it."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
