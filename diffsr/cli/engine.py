"""The scale-out flags that `upscale` and `degrade` share (not a subcommand)."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser, batch_flag: str, batch_help: str) -> None:
    """`batch_flag` names the Ray batch size: `--batch-size` where the command has no batch size of its own."""
    group = parser.add_argument_group("scale-out")
    group.add_argument("--engine", choices=("local", "ray"), default="local", help="run here, or on Ray Data (default: %(default)s)")
    group.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    group.add_argument("--workers", type=int, default=1, help="Ray actors, each with its own model (default: %(default)s)")
    group.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (default: %(default)s)")
    group.add_argument(batch_flag, dest="ray_batch_size", type=int, default=None, help=batch_help)
