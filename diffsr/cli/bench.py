"""`diffsr bench --dataset DIR --method SPEC [--method SPEC ...] -o REPORT_DIR`: compare methods."""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from diffsr import __version__
from diffsr.bench import (
    BenchError,
    choose_crop_boxes,
    crop_of_input,
    infer_scale,
    method_values,
    open_dataset,
    parse_method_spec,
    run_method,
)
from diffsr.cli.eval import add_metric_arguments
from diffsr.cli.bars import ProgressBars
from diffsr.io import read_image
from diffsr.metrics.evaluate import Scorer
from diffsr.metrics.registry import METRICS, MetricError, default_metric_names, parse_metric_names
from diffsr.metrics.report import machine_description, write_bench_report


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run methods over a dataset and write a report with tables and plots",
        description=(
            "Run each --method over DIR/LR (scored against DIR/HR when present), record seconds per image and peak "
            "memory, and write a report folder. A method is NAME[:key=value,...]: bicubic, a registered method "
            "(e.g. feedforward:model=realesrgan-x4plus,tile=256) or a built-in model name."
        ),
    )
    parser.add_argument("--dataset", required=True, type=Path, help="folder with LR/ and HR/ (or only images)")
    parser.add_argument("--method", action="append", required=True, dest="methods", metavar="SPEC",
                        help="a method to run (repeat to compare several)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="report folder (default: bench-DATASET-TIME)")
    parser.add_argument("--scale", type=float, default=None,
                        help="scale for the bicubic baseline when there is no HR (default: HR/LR size ratio, else 4)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images (quick runs)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="untimed runs on the first image before timing, for steady-state figures (default: 1)")
    parser.add_argument("--crops", type=int, default=4, metavar="K", help="side-by-side crops of K images (default: 4)")
    parser.add_argument("--crop-size", type=int, default=128, help="crop side in output pixels (default: 128)")
    parser.add_argument("--save-outputs", action=argparse.BooleanOptionalAction, default=True,
                        help="keep every method's outputs under REPORT_DIR/outputs/METHOD (default: yes)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_metric_arguments(parser)
    parser.set_defaults(func=run, argv=list(argv))


def run(args: argparse.Namespace) -> int:
    try:
        specs = [parse_method_spec(text) for text in args.methods]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise BenchError("the same --method is given twice; give each once")
        for spec in specs:
            method_values(spec)
        dataset = open_dataset(args.dataset, args.limit)
        names = parse_metric_names(args.metrics or default_metric_names(dataset.has_ground_truth), dataset.has_ground_truth)
        set_level = [n for n in names if not METRICS[n].per_image]
        if set_level:
            raise MetricError(f"{', '.join(set_level)} compare folders; run diffsr eval on REPORT_DIR/outputs/METHOD instead")
        scorer = Scorer(names, args.y_channel, args.crop_border, args.device)
    except (BenchError, MetricError, ValueError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 2
    for _, reason in dataset.problems:
        print(f"diffsr: {reason}", file=sys.stderr)
    scale = args.scale or infer_scale(dataset)
    out_dir = args.output or Path(f"bench-{dataset.name}-{datetime.now():%Y%m%d-%H%M%S}")
    boxes = choose_crop_boxes(dataset, args.crops, args.crop_size, scale)

    runs = []
    for spec in specs:
        print(f"{spec.label}: {len(dataset.pairs)} images", file=sys.stderr)
        bars = ProgressBars(args.quiet)
        try:
            outputs = out_dir / "outputs" / spec.slug if args.save_outputs else None
            run_ = run_method(spec, dataset, scorer, scale, outputs, boxes, args.warmup, on_progress=bars)
        finally:
            bars.close()
        if run_.error:
            print(f"diffsr: could not run {spec.label}: {run_.error}", file=sys.stderr)
        for _, reason in run_.evaluation.failed:
            print(f"diffsr: {spec.label}: {reason}", file=sys.stderr)
        runs.append(run_)

    inputs, truths = {}, {}
    for pair in dataset.pairs:
        if pair.name in boxes:
            inputs[pair.name] = crop_of_input(read_image(pair.pred).pixels, boxes[pair.name], scale)
            if pair.gt is not None:
                top, left, size = boxes[pair.name]
                truths[pair.name] = read_image(pair.gt).pixels[top : top + size, left : left + size]
    settings = {
        "dataset": str(args.dataset), "images": len(dataset.pairs), "metrics": ",".join(names),
        "y_channel": args.y_channel, "crop_border": args.crop_border, "scale": scale,
        "diffsr": __version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(), "command": shlex.join(["diffsr", *args.argv]),
    }
    written = write_bench_report(out_dir, runs, names, settings, inputs, truths)
    for run_ in runs:
        if not run_.error:
            means = run_.evaluation.means()
            figures = "  ".join(f"{METRICS[m].title} {means[m]:.4f}" for m in names)
            print(f"{run_.spec.label}: {figures}  {run_.seconds_per_image:.3f} s/image")
    print(f"report: {written[0]}")
    failed = dataset.problems or any(r.error or r.evaluation.failed for r in runs)
    return 1 if failed else 0
