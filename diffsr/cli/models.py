"""`diffsr models`: the methods, the built-in models and whether their weights are installed."""

from __future__ import annotations

import argparse

from diffsr.diffusion.weights import METHOD_WEIGHTS, method_weight_files
from diffsr.models.defaults import DEFAULT_MODELS, DefaultModelError, ncnn_files
from diffsr.registry import list_methods


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser("models", help="list methods and built-in models, and what is installed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("methods:")
    for method in list_methods():
        print(f"  {method.name:<14} {method.summary}  [licence: {method.licence}]")
        for weight in method.weights:
            print(f"      needs --{weight.option.replace('_', '-')} {weight.filename}  (from {weight.source})")
    print("diffusion methods (ports in progress; the files each needs, which you download yourself):")
    for name in METHOD_WEIGHTS:
        print(f"  {name}")
        for weight in method_weight_files(name):
            print(f"      --{weight.option.replace('_', '-')} {weight.filename}  (from {weight.source}; {weight.licence})")
    print("built-in models (method feedforward, --model NAME):")
    for model in DEFAULT_MODELS.values():
        try:
            ncnn_files(model)
            state = "installed"
        except DefaultModelError as exc:
            state = f"missing: {exc}"
        print(f"  {model.name:<26} x{model.scale}  {state}  {model.description}  [licence: {model.licence}]")
    return 0
