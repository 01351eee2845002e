"""The methods diffsr can run: name -> the module that declares it (imported only when used).

Each method module defines `METHOD`, a `Method`: its option schema (load-time and per-image
options), licence, the weight files it needs, and a `load(**load_options)` that returns a
pipeline with `upscale(image: ImageData, on_progress=None, **run_options) -> ImageData` and
`settings(**run_options) -> dict`. The CLI, the Python API and the server read this registry.
A method whose official checkpoints are pickles also gives `convert(path) -> {name: tensor}`, the
state dict `diffsr convert` writes as safetensors (which its `load` then accepts in place of the
original); one with a training recipe names its module in `TRAINERS` (diffsr.train).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffsr.options import OptionSet


@dataclass(frozen=True)
class WeightFile:
    """A file the user must provide, named as its publisher names it."""

    option: str
    """The load option that takes its path (e.g. "weights", "base")."""
    filename: str
    source: str
    """Where users get it (URL or model page)."""
    licence: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: OptionSet
    load: Callable[..., Any]
    licence: str
    weights: tuple[WeightFile, ...] = field(default=())
    convert: Callable[[Path], dict[str, Any]] | None = None
    """Reads an official checkpoint safely and returns the tensors to store as safetensors."""

    def open(self, **load_values: Any) -> Any:
        """`load` with each weights option (a path, or a file name in diffsr's weights folder) resolved."""
        from diffsr.hub import find_weights

        for option in {weight.option for weight in self.weights}:
            if load_values.get(option) not in (None, ""):
                load_values[option] = str(find_weights(load_values[option]))
        return self.load(**load_values)

    def load_options(self) -> OptionSet:
        return OptionSet(tuple(o for o in self.options.options if o.stage == "load"), self.options.licence)

    def run_options(self) -> OptionSet:
        return OptionSet(tuple(o for o in self.options.options if o.stage == "run"), self.options.licence)


METHOD_MODULES = {
    "feedforward": "diffsr.pipelines.feedforward",
    "invsr": "diffsr.pipelines.invsr",
    "osediff": "diffsr.pipelines.osediff",
    "promptsr": "diffsr.pipelines.promptsr",
    "stablesr": "diffsr.pipelines.stablesr",
    "supir": "diffsr.noncommercial.supir.pipeline",  # non-commercial licence (diffsr.noncommercial)
}
DEFAULT_METHOD = "feedforward"


def get_method(name: str) -> Method:
    try:
        module = METHOD_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(METHOD_MODULES)}") from None
    return importlib.import_module(module).METHOD


def list_methods() -> list[Method]:
    return [get_method(name) for name in METHOD_MODULES]
