"""`diffsr train METHOD CONFIG -o OUTDIR`: run a method's training recipe (resumes by default)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from diffsr.models.loading import WeightsError
from diffsr.train import TRAINERS
from diffsr.train.loop import ConfigError, config_from_dict, load_config_file, parse_overrides


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "train", help="train a method (the official recipe; accelerate for multi-GPU)",
        description="Train a method from a YAML/JSON config whose keys are the recipe's settings "
                    "(defaults: the official recipe). Run under `accelerate launch -m diffsr.cli.main train ...` "
                    "for several GPUs. A rerun with the same -o resumes from the newest checkpoint.")
    parser.add_argument("method", choices=sorted(TRAINERS) or None, help="the method to train")
    parser.add_argument("config", type=Path, help="YAML or JSON file of settings")
    parser.add_argument("-o", "--output", type=Path, required=True, help="run folder: checkpoints, log, final weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--restart", action="store_true", help="ignore checkpoints in the run folder and start from step 0")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffsr.cli.bars import ProgressBars

    recipe = importlib.import_module(TRAINERS[args.method])
    try:
        data = load_config_file(args.config)
        data.update(parse_overrides(args.set))
        config = config_from_dict(recipe.Config, data)
    except (ConfigError, ValueError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    bars = ProgressBars(args.quiet)
    try:
        weights = recipe.train(config, args.output, on_progress=bars, resume=not args.restart)
    except (WeightsError, ConfigError, ValueError, OSError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    print(f"trained weights: {weights}")
    return 0
