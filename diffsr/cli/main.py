"""Entry point of the `diffsr` console script."""

from __future__ import annotations

import argparse
import importlib
import sys

from diffsr import __version__

COMMANDS = ("upscale", "models", "convert", "train", "degrade", "eval", "bench", "serve", "describe")
"""Subcommand modules under diffsr.cli; each defines register(subparsers) and sets func(args) -> int."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsr", description="Real-world image super-resolution.")
    parser.add_argument("--version", action="version", version=f"diffsr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"diffsr.cli.{name}").register(subparsers, argv or [])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("diffsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
