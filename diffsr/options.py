"""Typed option schemas: each method declares its options once; interfaces are generated from them.

An `Option` knows its type, default, range or choices and help text. `add_arguments` turns a list
of options into argparse flags; `json_schema` gives the same list to the HTTP API and web form;
`validate` checks values coming from any interface with one set of messages.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


class OptionError(ValueError):
    """A value is outside an option's type, range or choices."""


@dataclass(frozen=True)
class Option:
    name: str
    """Python keyword name (snake_case); the CLI flag is --name-with-dashes."""
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    """Extra CLI flags, e.g. Real-ESRGAN's spellings ("-s", "--tile_pad")."""
    nullable: bool = False
    stage: str = "run"
    """"load" options select and build the model (kept loaded across images); "run" options apply per image."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        if value is None:
            if self.nullable:
                return None
            raise OptionError(f"{self.flag}: a value is required")
        try:
            if self.type is bool and isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = lowered in ("1", "true", "yes", "on")
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise OptionError(f"{self.flag}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{self.flag}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{self.flag}: {value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"{self.flag}: {value} is above the maximum {self.maximum}")
        return value

    def json_schema(self) -> dict[str, Any]:
        kind = {int: "integer", float: "number", bool: "boolean", str: "string"}[self.type]
        schema: dict[str, Any] = {"type": [kind, "null"] if self.nullable else kind, "default": self.default, "description": self.help}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices is not None:
            schema["enum"] = list(self.choices)
        return schema


@dataclass(frozen=True)
class OptionSet:
    """The options of one method (or of a shared stage such as tiling), with the method's licence."""

    options: tuple[Option, ...]
    licence: str = ""
    by_name: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {o.name: o for o in self.options})

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def validate(self, values: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(self.by_name))
        if unknown:
            raise OptionError(f"unknown option(s): {', '.join(unknown)}")
        merged = self.defaults()
        merged.update({k: self.by_name[k].validate(v) for k, v in values.items()})
        return merged

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        for option in self.options:
            flags = [option.flag, *option.aliases]
            text = option.help + _range_text(option)
            if option.type is bool:
                parser.add_argument(*flags, dest=option.name, action=argparse.BooleanOptionalAction, default=option.default, help=text)
            else:
                parser.add_argument(
                    *flags,
                    dest=option.name,
                    type=_argparse_type(option),
                    default=option.default,
                    choices=option.choices,
                    help=text if option.default is None else text + " (default: %(default)s)",
                )

    def from_namespace(self, namespace: argparse.Namespace) -> dict[str, Any]:
        return self.validate({o.name: getattr(namespace, o.name) for o in self.options})

    def json_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {o.name: o.json_schema() for o in self.options},
            "additionalProperties": False,
        }

    def __add__(self, other: OptionSet) -> OptionSet:
        return OptionSet(self.options + other.options, self.licence or other.licence)


def _range_text(option: Option) -> str:
    if option.minimum is not None and option.maximum is not None:
        return f" [{option.minimum}..{option.maximum}]"
    if option.minimum is not None:
        return f" [>= {option.minimum}]"
    return ""


def _argparse_type(option: Option):
    def convert(text: str) -> Any:
        if option.nullable and text.lower() in ("none", "auto", ""):
            return None
        try:
            return option.validate(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    convert.__name__ = option.type.__name__
    return convert


def options(*items: Option, licence: str = "") -> OptionSet:
    return OptionSet(tuple(items), licence)


