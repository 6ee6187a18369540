"""Command-line options generated from the settings classes (``lora_ranks.settings``), so that each option has
one definition: its flag, type, choices, default and help text all come from the settings field.

A field ``max_rank`` becomes ``--max-rank`` (``--<prefix>-max-rank`` where a command takes two classes with the
same field names, e.g. fine-tune and LoRA-training steps in ``compare``); booleans get ``--x/--no-x``; tuples take
several values; ``Literal`` choices are checked by argparse. Values are validated by constructing the settings
object, and a failure is reported as one line naming the flag, the value and the allowed range.

This module imports pydantic and the settings only: no torch, no Prefect, so a bad value is answered at once.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import ValidationError

from lora_ranks.errors import LoraRanksError
from lora_ranks.settings import Settings

__all__ = ["SettingsGroup", "add_settings_options", "settings_from_args", "flag_for", "OptionError", "ALIASES"]

#: Short spellings kept from earlier versions of the command line.
ALIASES = {"energy_threshold": ["--energy"], "max_steps": ["--steps"], "learning_rate": ["--lr"]}


class OptionError(LoraRanksError):
    """An option value that its settings class refuses (the message names the flag)."""


@dataclass(frozen=True)
class SettingsGroup:
    """One settings class as a group of options of a command.

    Attributes:
        cls: the settings class.
        param: the flow parameter it fills (``allocation``, ``finetune``, ...).
        prefix: flag prefix, for commands that take two classes sharing field names.
        fields: the fields offered (None: all); e.g. only ``allow_pickle`` of the safety settings where remote code
            cannot matter.
    """

    cls: type[Settings]
    param: str
    prefix: str = ""
    fields: tuple[str, ...] | None = None

    def field_names(self) -> list[str]:
        return [n for n in self.cls.model_fields if self.fields is None or n in self.fields]


def flag_for(name: str, prefix: str = "") -> str:
    """``--max-rank`` for ``max_rank`` (``--lora-max-rank`` with prefix ``lora``; a field that already starts with the
    prefix keeps one: ``lora_dropout`` is ``--lora-dropout``)."""
    stem = name if not prefix or name.startswith(prefix + "_") else f"{prefix}_{name}"
    return "--" + stem.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", None)) \
            and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _argparse_kind(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field type (values stay strings: the settings class converts them)."""
    annotation = _unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    choices = _choices(annotation)
    if choices is not None:
        return {"choices": choices}
    if origin in (tuple, list):
        inner = typing.get_args(annotation)[0]
        return {"nargs": "+", "metavar": getattr(inner, "__name__", "VALUE").upper()}
    return {"metavar": getattr(annotation, "__name__", "VALUE").upper()}


def _choices(annotation: Any) -> list[str] | None:
    """The values a ``Literal``, a ``str`` enum, or a union of them allows, as strings; None for any other type."""
    if typing.get_origin(annotation) is Literal:
        return [str(c) for c in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(m.value) for m in annotation]
    if typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", None)):
        parts = [_choices(a) for a in typing.get_args(annotation)]
        if all(p is not None for p in parts):
            return [c for p in parts for c in p]
    return None


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return str(value)


def help_text(field: Any) -> str:
    """A field's help on the command line: its docstring and its default."""
    return f"{' '.join((field.description or '').split())} (default: {_default_text(field.default)})".replace("%", "%%")


def add_settings_options(parser: argparse.ArgumentParser, group: SettingsGroup) -> None:
    """One option per field of ``group.cls``, in an argument group titled by the class's docstring."""
    title = (group.cls.__doc__ or group.cls.__name__).split("\n")[0].rstrip(".")
    options = parser.add_argument_group(title)
    for name in group.field_names():
        field = group.cls.model_fields[name]
        flags = [flag_for(name, group.prefix)] + (ALIASES.get(name, []) if not group.prefix else [])
        options.add_argument(*flags, dest=f"{group.param}.{name}", default=argparse.SUPPRESS, help=help_text(field),
                             **_argparse_kind(field.annotation))


def settings_from_args(args: argparse.Namespace, group: SettingsGroup) -> Settings:
    """The settings object of ``group`` from the parsed options (defaults for the ones not given).

    Raises:
        OptionError: one line naming each refused flag, its value and what is allowed.
    """
    given = {key.split(".", 1)[1]: value for key, value in vars(args).items() if key.startswith(group.param + ".")}
    try:
        return group.cls(**given)
    except ValidationError as exc:
        raise OptionError(describe_validation_error(exc, group, given)) from None


def describe_validation_error(exc: ValidationError, group: SettingsGroup, given: dict[str, Any]) -> str:
    """One line per pydantic error, in the command line's terms: ``--max-rank 2: must be at least ...``."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"] and error["loc"][0] in group.cls.model_fields:
            name = error["loc"][0]
            value = given.get(name, group.cls.model_fields[name].default)
            parts.append(f"{flag_for(name, group.prefix)} {_default_text(value)}: {message[0].lower()}{message[1:]}")
        else:  # a rule across fields: name them as flags (one pass, longest names first; quoted words are values)
            names = "|".join(sorted(group.cls.model_fields, key=len, reverse=True))
            parts.append(re.sub(rf"(?<![\w'])({names})(?![\w'])", lambda m: flag_for(m.group(1), group.prefix), message))
    return "; ".join(parts)
