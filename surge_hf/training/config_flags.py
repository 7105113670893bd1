"""Command-line flags derived from config dataclasses, so that each setting is declared once: in its dataclass.

A field `name: T = default` of a config becomes the flag `--{prefix}{name}` (or the name in `rename`), typed by the
field's annotation and documented by the field's entry in the class docstring (an indented `name: text` line and
its deeper-indented continuation lines, the `Args:` form this package's configs use). Choices come from the field's
metadata (`field(metadata={"choices": (...)})`), and so may the flag's type (`metadata={"flag_type": Path}`). A
`bool` field is a switch with its `--no-` form; a `T | None` field takes a `T`; a `str | list[str] | None` field
takes a string. `config_from_flags` builds the config back from the parsed flags, so a flag and its field cannot
drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")
_ENTRY = re.compile(r"^(\s*)(\w+): (.*)$")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """`field -> help text` from the class docstring: each indented `name: text` line whose name is a field, with
    the deeper-indented lines after it, joined by spaces."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    current, indent = None, 0
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        match = _ENTRY.match(line)
        if match and match.group(2) in names and (current is None or len(match.group(1)) <= indent):
            current, indent = match.group(2), len(match.group(1))
            docs[current] = match.group(3).strip()
        elif current is not None and line.strip() and len(line) - len(line.lstrip()) > indent:
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _flag_type(annotation: Any) -> type:
    """The argparse type of a field annotation: `bool`, `int`, `float` or `str` (`T | None` -> T; a union holding
    `str`, such as `str | list[str] | None`, -> str)."""
    if isinstance(annotation, type):
        return annotation
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and arguments:
        return str if str in arguments else _flag_type(arguments[0])
    raise TypeError(f"No flag type for the annotation {annotation!r}.")


def _selected_fields(config_class: type, only: Collection[str] | None,
                     skip: Collection[str]) -> list[dataclasses.Field]:
    """The fields of `config_class` in `only` (all without it) and not in `skip`, in declaration order."""
    return [f for f in dataclasses.fields(config_class) if f.name not in skip and (only is None or f.name in only)]


def flag_name(field_name: str, prefix: str = "", rename: Mapping[str, str] | None = None) -> str:
    """The flag's name (its `argparse` dest) for a config field."""
    return (rename or {}).get(field_name, prefix + field_name)


def add_config_flags(group: argparse._ActionsContainer, config_class: type, *, prefix: str = "",
                     rename: Mapping[str, str] | None = None, only: Collection[str] | None = None,
                     skip: Collection[str] = (), defaults: Mapping[str, Any] | None = None,
                     unset: bool = False) -> None:
    """Add one flag per field of the dataclass `config_class` to `group` (see the module docstring).

    `only`/`skip` select the fields; `defaults` replaces field defaults (per script); `unset=True` makes every
    default None, so that a flag left out keeps the value from elsewhere (a recipe file, the class default).
    """
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    defaults = defaults or {}
    for config_field in _selected_fields(config_class, only, skip):
        name = config_field.name
        kind = config_field.metadata.get("flag_type") or _flag_type(hints[name])
        if unset:
            default = None
        elif name in defaults:
            default = defaults[name]
        elif config_field.default is not dataclasses.MISSING:
            default = config_field.default
        else:
            default = None
        options: dict[str, Any] = {"default": default, "help": docs.get(name)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
            if "choices" in config_field.metadata:
                options["choices"] = config_field.metadata["choices"]
        group.add_argument(f"--{flag_name(name, prefix, rename)}", **options)


def flag_values(args: argparse.Namespace, config_class: type, *, prefix: str = "",
                rename: Mapping[str, str] | None = None, only: Collection[str] | None = None,
                skip: Collection[str] = ()) -> dict[str, Any]:
    """`field -> parsed value` for the fields whose flags `args` holds (the selection of `add_config_flags`)."""
    values = {}
    for config_field in _selected_fields(config_class, only, skip):
        dest = flag_name(config_field.name, prefix, rename)
        if hasattr(args, dest):
            values[config_field.name] = getattr(args, dest)
    return values


def config_from_flags(config_class: type[ConfigT], args: argparse.Namespace, *, prefix: str = "",
                      rename: Mapping[str, str] | None = None, **overrides: Any) -> ConfigT:
    """The config built from its parsed flags (fields without a flag keep their defaults), with `overrides`."""
    return config_class(**{**flag_values(args, config_class, prefix=prefix, rename=rename), **overrides})
