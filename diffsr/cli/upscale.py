"""`diffsr upscale INPUT... -o OUTDIR`: upscale files, folders and globs with any registered method."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffsr import __version__
from diffsr.batch import BatchConfig, Summary, collect_inputs, own_outputs, run_batch
from diffsr.cli.bars import ProgressBars
from diffsr.cli.engine import add_engine_arguments
from diffsr.io.image import DEFAULT_MAX_PIXELS
from diffsr.io.storage import LocalOutput, StorageError, is_uri, open_output
from diffsr.models.defaults import DefaultModelError
from diffsr.models.loading import WeightsError
from diffsr.options import OptionError
from diffsr.registry import DEFAULT_METHOD, METHOD_MODULES, get_method


def _method_in(argv: list[str]) -> str:
    """The --method named on the command line, needed before the method's own flags can be added."""
    for index, word in enumerate(argv):
        if word == "--method" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--method="):
            return word.split("=", 1)[1]
    return DEFAULT_METHOD


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="upscale images (default: Real-ESRGAN x4plus, no download needed)",
        description="Upscale image files, folders or glob patterns. Method options follow --method.",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("-i", "--input", action="append", default=[], dest="extra_inputs", help="an input (repeatable), as Real-ESRGAN spells it")
    parser.add_argument("-o", "--output", required=True, type=_folder,
                        help="output folder: a path, or a URI pyarrow understands (s3://bucket/prefix, gs://, hdfs://)")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHOD_MODULES), help="method (default: %(default)s)")
    parser.add_argument("--recursive", action="store_true", help="include images in sub-folders of input folders")
    parser.add_argument("--ext", default="auto", help="output format: auto (as the input), png, jpg, webp, tif, bmp")
    parser.add_argument("--suffix", default="out", help="outputs are named {name}_{suffix}.{ext}; '' for {name}.{ext}")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse inputs larger than this many pixels, a decompression-bomb guard; 0 = no limit (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_engine_arguments(parser, "--batch-size", "images per Ray batch (default: 1)")
    name = _method_in(argv)
    method = get_method(name if name in METHOD_MODULES else DEFAULT_METHOD)  # argparse reports a bad name
    group = parser.add_argument_group(f"options of --method {method.name}")
    method.options.add_arguments(group)
    parser.set_defaults(func=run, method_spec=method)


def run(args: argparse.Namespace) -> int:
    method = args.method_spec
    try:
        values = method.options.from_namespace(args)
    except OptionError as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    try:
        output = open_output(args.output)
        items, problems = collect_inputs(args.inputs + args.extra_inputs, recursive=args.recursive, exclude=own_outputs(output))
    except StorageError as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 1
    if not items and not problems:
        print("diffsr: no inputs given; pass image files, folders or globs", file=sys.stderr)
        return 2
    if isinstance(output, LocalOutput):
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"diffsr: cannot create output folder {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not _writable(args.output):
            print(f"diffsr: output folder {args.output} is not writable; choose another -o", file=sys.stderr)
            return 1

    load_values = {o.name: values[o.name] for o in method.load_options().options}
    run_values = {o.name: values[o.name] for o in method.run_options().options}
    summary = Summary(failed=list(problems))
    requested = {"diffsr": __version__, "method": method.name, **load_values, **run_values}
    config = BatchConfig(args.output, requested, args.ext, args.suffix, args.overwrite, args.max_pixels or None, args.quality)
    if items:
        bars = ProgressBars(args.quiet)
        try:
            batch = _run_engine(args, method, items, load_values, run_values, config, bars)
        except (WeightsError, DefaultModelError, ValueError, OSError) as exc:
            print(f"diffsr: {exc}", file=sys.stderr)
            return 1
        finally:
            bars.close()
        batch.failed[:0] = summary.failed
        summary = batch
    for line in summary.lines():
        print(line, file=sys.stderr if "failed:" in line else sys.stdout)
    return 0 if summary.ok else 1


def _run_engine(args, method, items, load_values, run_values, config: BatchConfig, bars: ProgressBars) -> Summary:
    if args.engine == "ray":
        from diffsr.ray_engine import run_batch_ray

        return run_batch_ray(items, method.name, load_values, run_values, config, args.address, args.workers,
                             args.num_gpus_per_worker, args.ray_batch_size or 1, bars)
    pipeline = method.open(**load_values)
    process = lambda image: pipeline.upscale(image, on_progress=bars, **run_values)  # noqa: E731
    return run_batch(items, process, config, bars, details=pipeline.settings(**run_values))


def _folder(text: str) -> Path | str:
    """-o: a remote URI stays a string (Path would fold its '//')."""
    return text if is_uri(text) else Path(text)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)
