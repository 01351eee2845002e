"""`diffsr models`: the methods, the files each needs and whether they are installed, the built-in models."""

from __future__ import annotations

import argparse

from diffsr.diffusion.weights import METHOD_WEIGHTS
from diffsr.hub import weights_dir
from diffsr.models.defaults import DEFAULT_MODELS, DefaultModelError, ncnn_files
from diffsr.registry import METHOD_MODULES, WeightFile, list_methods


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser("models", help="list methods and built-in models, and what is installed")
    parser.set_defaults(func=run)


def _state(weight: WeightFile) -> str:
    stored = weights_dir() / weight.filename
    if stored.exists():
        return f"installed: {stored}"
    return f"not in {weights_dir()}: download it from {weight.source}, put it there or pass --{weight.option.replace('_', '-')} PATH"


def run(args: argparse.Namespace) -> int:
    print(f"methods (checkpoints you download yourself; diffsr finds them by name in {weights_dir()}):")
    for method in list_methods():
        print(f"  {method.name:<14} {method.summary}  [licence: {method.licence}]")
        for weight in method.weights:
            licence = f"; licence: {weight.licence}" if weight.licence else ""
            print(f"      --{weight.option.replace('_', '-')} {weight.filename}{licence}")
            print(f"          {_state(weight)}")
    planned = [name for name in METHOD_WEIGHTS if name not in METHOD_MODULES]
    if planned:
        print(f"not yet available in this version: {', '.join(planned)}")
    print("built-in models (method feedforward, --model NAME):")
    for model in DEFAULT_MODELS.values():
        try:
            ncnn_files(model)
            state = "installed"
        except DefaultModelError as exc:
            state = f"missing: {exc}"
        print(f"  {model.name:<26} x{model.scale}  {state}  {model.description}  [licence: {model.licence}]")
    return 0
