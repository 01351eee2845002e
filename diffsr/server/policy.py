"""What a request may ask for: method options checked against the registry's schemas, and models by name.

No request can name a path on the server's disk. A free-text load option (a model or weights
file) accepts only its default, the built-in model names, or the file name of a model in the
folder the server was started with (`--model-dir`); the name is looked up in a listing of that
folder, never joined onto it. The device is the server's choice (`--device`), not the client's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsr.models.defaults import DEFAULT_MODELS
from diffsr.options import Option, OptionError
from diffsr.registry import DEFAULT_METHOD, METHOD_MODULES, Method, get_method
from diffsr.server.jobs import WRITABLE_FORMATS

MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
SERVER_CONTROLLED = frozenset({"device"})
"""Load options the server sets from its own flags; a request that sets them gets 422."""
MAX_TEXT = 4000
"""Longest text value (a prompt) accepted, in characters."""
OUTPUT_FORMATS = ("auto", *(f.lower() for f in WRITABLE_FORMATS))


class FieldError(ValueError):
    """A request field is unknown or out of range; `field` names it for the 422 answer."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class JobRequest:
    method: Method
    load_values: dict[str, Any]
    run_values: dict[str, Any]
    output_format: str
    shown_options: dict[str, Any]
    """The options as the request named them (model names, not the server's paths)."""


class ModelCatalogue:
    """The model files a request may pick by name: those in `model_dir` (listed afresh on each use)."""

    def __init__(self, model_dir: Path | None = None):
        self.model_dir = Path(model_dir).resolve() if model_dir else None

    def files(self) -> dict[str, Path]:
        if self.model_dir is None or not self.model_dir.is_dir():
            return {}
        return {
            entry.name: entry
            for entry in sorted(self.model_dir.iterdir())
            if entry.suffix.lower() in MODEL_SUFFIXES and entry.is_file()
        }

    def choices(self, option: Option) -> list[Any] | None:
        """The values a request may give a free-text load option, or None if it is not one."""
        if not _is_free_text_load(option):
            return None
        names: list[Any] = [option.default] if option.default is not None else []
        if option.default in DEFAULT_MODELS:
            names += [name for name in DEFAULT_MODELS if name != option.default]
        names += [name for name in self.files() if name not in names]
        if option.nullable and None not in names:
            names.append(None)
        return names

    def resolve(self, option: Option, value: Any) -> Any:
        """The value to load with: a built-in name as it is, a model-dir file name as its path."""
        if not _is_free_text_load(option) or value is None or value == option.default or value in DEFAULT_MODELS:
            return value
        return str(self.files()[value])


def method_schema(method: Method, catalogue: ModelCatalogue) -> dict[str, Any]:
    """A method's options as JSON Schema, as the server accepts them (each option with its stage)."""
    properties: dict[str, Any] = {}
    for option in method.options.options:
        if option.name in SERVER_CONTROLLED:
            continue
        schema = option.json_schema()
        schema["stage"] = option.stage
        choices = catalogue.choices(option)
        if choices is not None:
            schema["enum"] = choices
        properties[option.name] = schema
    return {
        "name": method.name,
        "summary": method.summary,
        "licence": method.licence,
        "default": method.name == DEFAULT_METHOD,
        "options": {"type": "object", "properties": properties, "additionalProperties": False},
        "weights": [
            {"option": w.option, "filename": w.filename, "source": w.source, "licence": w.licence} for w in method.weights
        ],
    }


def parse_options(text: str | None, catalogue: ModelCatalogue, device: str) -> JobRequest:
    """The `options` form field (JSON: `method`, `output_format` and the method's options), checked."""
    try:
        values = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise FieldError("options", f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(values, dict):
        raise FieldError("options", "must be a JSON object such as {\"method\": \"feedforward\"}")
    values = dict(values)
    name = values.pop("method", DEFAULT_METHOD)
    if name not in METHOD_MODULES:
        raise FieldError("method", f"unknown method {name!r}; available: {', '.join(METHOD_MODULES)}")
    output_format = values.pop("output_format", "auto")
    if not isinstance(output_format, str) or output_format.lower() not in OUTPUT_FORMATS:
        raise FieldError("output_format", f"{output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    method = get_method(name)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        option = method.options.by_name.get(key)
        if option is None:
            known = ", ".join(o.name for o in method.options.options if o.name not in SERVER_CONTROLLED)
            raise FieldError(key, f"unknown option of method {name}; known: {known}, output_format")
        if key in SERVER_CONTROLLED:
            raise FieldError(key, f"is set by the server (diffsr serve --{key}), not per request")
        checked[key] = _check(option, value, catalogue)
    try:
        merged = method.options.validate(checked)
    except OptionError as exc:  # defaults are valid, so this names a value already checked above
        raise FieldError("options", str(exc)) from None
    if "device" in method.options.by_name:
        merged["device"] = device
    load = {o.name: catalogue.resolve(o, merged[o.name]) for o in method.load_options().options}
    run = {o.name: merged[o.name] for o in method.run_options().options}
    fmt = output_format.upper()
    shown = {k: v for k, v in merged.items() if k not in SERVER_CONTROLLED}
    return JobRequest(method, load, run, fmt if fmt != "AUTO" else "auto", shown)


def _check(option: Option, value: Any, catalogue: ModelCatalogue) -> Any:
    """One value, with JSON's types taken at their word (no 2.7 for an integer, no true for a number)."""
    if isinstance(value, bool) and option.type is not bool:
        raise FieldError(option.name, f"expected {option.type.__name__}, got {json.dumps(value)}")
    if option.type is int and isinstance(value, float) and not value.is_integer():
        raise FieldError(option.name, f"expected an integer, got {value}")
    if isinstance(value, (list, dict)):
        raise FieldError(option.name, f"expected {option.type.__name__}, got a JSON {type(value).__name__}")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise FieldError(option.name, f"is {len(value)} characters long; the limit is {MAX_TEXT}")
    try:
        checked = option.validate(value)
    except OptionError as exc:
        raise FieldError(option.name, str(exc).split(": ", 1)[-1]) from None
    choices = catalogue.choices(option)
    if choices is not None and checked not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise FieldError(
            option.name,
            f"{checked!r} is not a model this server offers ({shown}); files are picked by name from the "
            "server's --model-dir, never by path",
        )
    return checked


def _is_free_text_load(option: Option) -> bool:
    return option.stage == "load" and option.type is str and option.choices is None and option.name not in SERVER_CONTROLLED
