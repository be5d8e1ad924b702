"""Command-line flags generated from the trainer's config dataclasses (trainer/config.py).

    TRAIN_FLAGS = (ConfigFlag("--min-feedback", "min_feedback"), ConfigFlag("--objective", "ppo.objective"))
    add_config_flags(parser, TrainerConfig, TRAIN_FLAGS, with_defaults=False)
    values = flag_values(args, TRAIN_FLAGS)            # {"min_feedback": 16, "ppo.objective": "sft"} as given
    config = build_config(TrainerConfig, values)

A flag's type, choices and default come from its field, its help is the doc string under the field
(the text docs/operations.md shows), so no default or description is copied into the CLI. With
`with_defaults=False` a flag left out is None: the caller's other sources (environment variables)
or the field's default apply, and the help still names the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from voxloop.core.attribute_docs import attribute_docs


@dataclass(frozen=True)
class ConfigFlag:
    """One flag of a command and the config field it sets."""

    flag: str
    """The option string, e.g. "--max-wait-s"; for a bool field, the flag sets it to the opposite of its
    default (e.g. "--no-adapt-lexicon" turns adapt_lexicon off)."""
    field: str
    """The field it sets; "ppo.objective" for a field of a nested config dataclass."""
    metavar: str | None = None
    default: Any = None
    """The flag's default where the field has none (a required field: the command's own default directory)."""

    @property
    def dest(self) -> str:
        return self.field.replace(".", "__")


@dataclass(frozen=True)
class FieldInfo:
    owner: type
    name: str
    kind: Any
    """The field's type, Optional unwrapped (int, float, str, Path, bool or a Literal)."""
    default: Any
    doc: str


def field_info(config_class: type, dotted: str) -> FieldInfo:
    """The field `dotted` ("min_feedback", "ppo.objective") of `config_class`, with its nested owner class."""
    owner, *path, name = [config_class, *dotted.split(".")]
    for part in path:
        owner = typing.get_type_hints(owner)[part]
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if name not in fields:
        raise ValueError(f"{owner.__name__} has no field {name!r}")
    field = fields[name]
    default = field.default if field.default is not dataclasses.MISSING else None
    kind = typing.get_type_hints(owner)[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return FieldInfo(owner, name, kind, default, attribute_docs(owner).get(name, ""))


def _help(info: FieldInfo, default: Any) -> str:
    text = info.doc + ("" if default is None else f" (default: {default})")
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, flags: Sequence[ConfigFlag], *,
                     with_defaults: bool) -> None:
    """Add `flags` to `parser`, each typed, documented and defaulted by its field of `config_class`."""
    for flag in flags:
        info = field_info(config_class, flag.field)
        default = flag.default if flag.default is not None else info.default
        given = default if with_defaults else None
        if info.kind is bool:  # the flag flips the default
            parser.add_argument(flag.flag, dest=flag.dest, action="store_const", const=not default, default=given,
                                help=("Off: " if default else "On: ") + _help(info, None))
        elif typing.get_origin(info.kind) is Literal:
            parser.add_argument(flag.flag, dest=flag.dest, choices=typing.get_args(info.kind), default=given,
                                help=_help(info, default))
        else:
            parser.add_argument(flag.flag, dest=flag.dest, type=info.kind, default=given, metavar=flag.metavar,
                                help=_help(info, default))


def flag_values(args: argparse.Namespace, flags: Sequence[ConfigFlag]) -> dict[str, Any]:
    """{field: value} of the flags given (not None) in `args`."""
    return {flag.field: value for flag in flags if (value := getattr(args, flag.dest)) is not None}


def build_config(config_class: type, values: Mapping[str, Any]):
    """`config_class` with `values` ({"min_feedback": 16, "ppo.objective": "sft"}) over its defaults."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    hints = typing.get_type_hints(config_class)
    for name, group in nested.items():
        top[name] = build_config(hints[name], group)
    return config_class(**top)


__all__ = ["ConfigFlag", "FieldInfo", "add_config_flags", "build_config", "field_info", "flag_values"]
