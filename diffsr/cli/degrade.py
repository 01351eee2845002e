"""`diffsr degrade HR_DIR -o OUT --scale 4 --preset realesrgan --seed 0`: write a synthetic LR/HR pair set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffsr.batch import collect_inputs
from diffsr.io.storage import is_uri
from diffsr.cli.bars import ProgressBars
from diffsr.cli.engine import add_engine_arguments
from diffsr.data.pairs import CONFIG_NAME, RECORDS_NAME, make_pairs
from diffsr.degrade.config import PRESETS, get_config
from diffsr.degrade.pipeline import Degrader
from diffsr.io.image import DEFAULT_MAX_PIXELS
from diffsr.options import Option, OptionError, options
from diffsr.runtime import resolve_device

OPTIONS = options(
    Option("scale", int, 4, "LR is 1/scale of the HR", minimum=1, maximum=16, aliases=("-s",)),
    Option("preset", str, "realesrgan", f"degradation settings: {', '.join(PRESETS)}, or a .json config file"),
    Option("seed", int, 0, "run seed; each image's seed is derived from it and the image's relative path"),
    Option("crop", int, None, "centre-crop each HR to this many pixels square (default: whole image, trimmed to a multiple of --scale)",
           minimum=1, nullable=True),
    Option("shuffle_prob", float, None, "override the preset's probability of a random stage order", minimum=0.0, maximum=1.0,
           nullable=True),
    Option("device", str, "cpu", "cpu (reproducible on any machine), auto, cuda, cuda:N or mps; noise differs between devices"),
    Option("batch_size", int, 16, "images of the same size degraded together", minimum=1),
)


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "degrade",
        help="make synthetic LR/HR training or test pairs (Real-ESRGAN-style degradations, PromptSR prompts)",
        description="Degrade HR images into LR images with a seeded degradation model; write OUT/LR, OUT/HR and "
        f"OUT/{RECORDS_NAME} (each pair's prompt and drawn parameters).",
    )
    parser.add_argument("inputs", nargs="+", metavar="HR", help="HR image files, folders or glob patterns")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--recursive", action="store_true", help="include images in sub-folders of input folders")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every pair (default: resume, skipping pairs an earlier run finished)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse inputs larger than this many pixels; 0 = no limit (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    OPTIONS.add_arguments(parser)
    add_engine_arguments(parser, "--ray-batch-size", "images per Ray batch (default: --batch-size)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        values = OPTIONS.from_namespace(args)
        config = get_config(values["preset"])
        if values["shuffle_prob"] is not None:
            config = config.replace(shuffle_prob=values["shuffle_prob"])
        degrader = Degrader(config, values["scale"], device=resolve_device(values["device"]))
        if values["crop"] is not None and values["crop"] % values["scale"]:
            raise ValueError(f"--crop {values['crop']} is not a multiple of --scale {values['scale']}")
    except (OptionError, ValueError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    remote = [text for text in args.inputs if is_uri(text)] + [str(args.output)] * (":/" in str(args.output))
    if remote:
        print(f"diffsr: {remote[0]}: diffsr degrade reads and writes local folders only; "
              "copy the photos here (or mount the bucket) first", file=sys.stderr)
        return 2
    out: Path = args.output
    inside = out.resolve()
    items, problems = collect_inputs(args.inputs, recursive=args.recursive, exclude=lambda key: inside in Path(key).parents)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"diffsr: cannot create output folder {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    bar = ProgressBars(args.quiet)
    try:
        runner = None
        if args.engine == "ray":
            from diffsr.ray_engine import ray_pair_runner, require_ray

            try:
                require_ray()
            except ValueError as exc:
                print(f"diffsr: {exc}", file=sys.stderr)
                return 2
            runner = ray_pair_runner(out, degrader, values["seed"], values["crop"], args.ray_batch_size or values["batch_size"],
                                     args.max_pixels or None, args.address, args.workers, args.num_gpus_per_worker)
        summary = make_pairs(items, out, degrader, seed=values["seed"], crop=values["crop"], batch_size=values["batch_size"],
                             max_pixels=args.max_pixels or None, on_progress=bar, overwrite=args.overwrite, runner=runner)
    except OSError as exc:
        print(f"diffsr: cannot write to {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    failed = [reason for _, reason in problems] + summary.failed
    print(f"written {len(summary.written)} pairs to {out} (LR/, HR/, {RECORDS_NAME}, {CONFIG_NAME}), "
          f"skipped {len(summary.skipped)} finished before, failed {len(failed)}")
    for note in summary.notes:
        print(f"  note: {note}")
    for reason in failed:
        print(f"diffsr: {reason}", file=sys.stderr)
    return 0 if not failed else 1
