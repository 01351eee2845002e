"""`diffsr eval --pred DIR [--gt DIR] -o REPORT_DIR`: score a folder of results against ground truth."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from diffsr.cli.bars import ProgressBars
from diffsr.io import DEFAULT_MAX_PIXELS
from diffsr.metrics.evaluate import Scorer, add_set_level_metrics, evaluate_pairs, pair_folders, write_eval_report
from diffsr.metrics.registry import METRICS, MetricError, default_metric_names, parse_metric_names


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `eval` and `bench` share."""
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {', '.join(METRICS)} (default: psnr,ssim,niqe with ground truth, niqe without)")
    parser.add_argument("--y-channel", action=argparse.BooleanOptionalAction, default=False,
                        help="PSNR/SSIM on the Y of BT.601 YCbCr, as SR papers report them (default: on RGB)")
    parser.add_argument("--crop-border", type=_non_negative, default=0, metavar="N",
                        help="ignore N pixels on every side, e.g. the scale factor as in BasicSR (default: 0)")
    parser.add_argument("--device", default="cpu", help="device for learned (pyiqa) metrics: cpu, cuda, auto (default: cpu)")


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score results against ground truth (PSNR, SSIM, NIQE; pyiqa metrics if installed)",
        description="Pair results with ground truths by file stem and write per_image.csv, summary.md and summary.json.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of results")
    parser.add_argument("--gt", type=Path, default=None, help="folder of ground truths (not needed for NIQE, MUSIQ, ...)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="report folder")
    parser.add_argument("--suffix", default="", help="results are named NAME_SUFFIX.* (diffsr upscale's default is 'out')")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images; 0 = no limit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_metric_arguments(parser)
    parser.set_defaults(func=run, argv=list(argv))


def run(args: argparse.Namespace) -> int:
    for folder, flag in ((args.pred, "--pred"), (args.gt, "--gt")):
        if folder is not None and not folder.is_dir():
            print(f"diffsr: {flag} {folder} is not a folder; pass a folder of images", file=sys.stderr)
            return 2
    try:
        names = parse_metric_names(args.metrics or default_metric_names(args.gt is not None), args.gt is not None)
        scorer = Scorer(names, args.y_channel, args.crop_border, args.device)
        if any(not METRICS[n].per_image for n in names):  # FID runs last: find a missing pyiqa now
            from diffsr.metrics.pyiqa_backend import import_pyiqa

            import_pyiqa()
    except (MetricError, ValueError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    pairs, problems = pair_folders(args.pred, args.gt, args.suffix)
    bars = ProgressBars(args.quiet)
    try:
        result = evaluate_pairs(pairs, scorer, args.max_pixels or None, on_progress=bars)
    finally:
        bars.close()
    result.failed[:0] = problems
    try:
        add_set_level_metrics(result, args.pred, args.gt, args.device)
    except MetricError as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    settings = {
        "pred": str(args.pred), "gt": str(args.gt) if args.gt else None, "metrics": ",".join(names),
        "y_channel": args.y_channel, "crop_border": args.crop_border,
        "command": shlex.join(["diffsr", *args.argv]),
    }
    written = write_eval_report(result, args.output, settings)
    means = result.means()
    print("  ".join(f"{METRICS[m].title} {means[m]:.4f}" for m in names) + f"  ({len(result.rows)} images)")
    for _, reason in result.failed:
        print(f"diffsr: {reason}", file=sys.stderr)
    print(f"report: {', '.join(str(p) for p in written)}")
    return 1 if result.failed else 0


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value
