"""The folder `diffsr bench` writes: a markdown report, JSON, per-image CSVs and plots.

    report.md              the table, the settings, the exact command, the plots and crops inline
    results.json           everything, per method and per image (seconds included)
    per_image/METHOD.csv   image, one column per metric, seconds
    metrics.png            one bar chart per metric
    quality_vs_speed.png   each metric against seconds per image
    crops/IMAGE.png        the same detailed window of the input, every method and the ground truth
    command.txt            the command line that produced the folder
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from diffsr.io import atomic_write_bytes
from diffsr.metrics.evaluate import per_image_csv
from diffsr.metrics.registry import METRICS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _save_figure(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _megabytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MB"


def method_table(runs: list, metrics: list[str]) -> str:
    arrows = {m: "↓" if METRICS[m].lower_better else "↑" for m in metrics}
    head = ["method", *(f"{METRICS[m].title} {arrows[m]}" for m in metrics), "s / image", "median s", "load s", "warm-up s", "peak memory", "images", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        if run.error:
            lines.append(f"| {run.spec.label} | " + " | ".join(["–"] * (len(head) - 2)) + f" | could not run: {run.error} |")
            continue
        means = run.evaluation.means()
        memory = _megabytes(run.peak_rss_bytes) + " RSS"
        if run.peak_cuda_bytes is not None:
            memory += f", {_megabytes(run.peak_cuda_bytes)} CUDA"
        cells = [run.spec.label, *(_fmt(means.get(m)) for m in metrics), f"{run.seconds_per_image:.3f}",
                 f"{run.median_seconds:.3f}", f"{run.load_seconds:.1f}", f"{run.warmup_seconds:.1f}", memory, str(len(run.evaluation.rows)), str(len(run.evaluation.failed))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_bench_report(out_dir: Path, runs: list, metrics: list[str], settings: dict[str, Any],
                       inputs: dict[str, np.ndarray], ground_truths: dict[str, np.ndarray]) -> list[Path]:
    """Write every file of the report; `inputs`/`ground_truths` hold the crops' LR and HR regions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "per_image").mkdir(exist_ok=True)
    per_image_metrics = [m for m in metrics if METRICS[m].per_image]
    written = []
    for run in runs:
        if run.error:
            continue
        csv_text = per_image_csv(run.evaluation).splitlines()
        rows = [csv_text[0] + ",seconds"] + [
            line + f",{run.seconds.get(name, math.nan):.4f}" for line, name in zip(csv_text[1:], run.evaluation.rows)
        ]
        path = out_dir / "per_image" / f"{run.spec.slug}.csv"
        _write_text(path, "\n".join(rows) + "\n")
        written.append(path)

    usable = [r for r in runs if not r.error and r.evaluation.rows]
    plots = []
    if usable and per_image_metrics:
        plots.append(_bar_charts(out_dir / "metrics.png", usable, per_image_metrics))
        plots.append(_quality_vs_speed(out_dir / "quality_vs_speed.png", usable, per_image_metrics))
    crops = _crop_figures(out_dir / "crops", usable, inputs, ground_truths) if usable else []
    written += plots + crops

    _write_text(out_dir / "results.json", json.dumps(_results(runs, metrics, settings), indent=2) + "\n")
    _write_text(out_dir / "command.txt", settings["command"] + "\n")
    _write_text(out_dir / "report.md", _markdown(runs, metrics, settings, plots, crops, out_dir))
    return [out_dir / "report.md", out_dir / "results.json", out_dir / "command.txt", *written]


def _markdown(runs, metrics, settings, plots, crops, out_dir: Path) -> str:
    lines = [
        f"# diffsr bench: {settings['dataset']}",
        "",
        method_table(runs, metrics),
        "",
        "s / image: the method's own time per image (no reading, writing or scoring), mean and median over the images; "
        "load s: building the model; warm-up s: untimed first runs on the first image (--warmup). Peak memory: the process's peak resident memory while the method ran"
        + (" (CUDA: torch's peak allocated)" if any(r.peak_cuda_bytes is not None for r in runs) else "") + ".",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("command", "machine")),
        "",
        f"Machine: {settings['machine']}",
        "",
        "Command:",
        "",
        "```",
        settings["command"],
        "```",
        "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    if crops:
        lines += ["", "## Crops", "", "Left to right: the input (pixels enlarged), each method, the ground truth.", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in crops]
    failures = [(r.spec.label, reason) for r in runs for _, reason in r.evaluation.failed]
    if failures:
        lines += ["", "## Not scored", "", *(f"- {label}: {reason}" for label, reason in failures)]
    return "\n".join(lines) + "\n"


def _results(runs, metrics, settings) -> dict[str, Any]:
    out = {"settings": settings, "metrics": {m: METRICS[m].direction for m in metrics}, "methods": []}
    for run in runs:
        means = run.evaluation.means()
        out["methods"].append({
            "label": run.spec.label,
            "method": run.spec.method,
            "options": run.spec.options,
            "error": run.error,
            "device": run.device,
            "settings": run.settings,
            "means": {m: (v if v is not None and math.isfinite(v) else None) for m, v in means.items()},
            "seconds_per_image": None if not run.seconds else run.seconds_per_image,
            "median_seconds_per_image": None if not run.seconds else run.median_seconds,
            "load_seconds": run.load_seconds,
            "warmup_seconds": run.warmup_seconds,
            "peak_rss_bytes": run.peak_rss_bytes,
            "peak_rss_scope": run.peak_rss_scope,
            "peak_cuda_bytes": run.peak_cuda_bytes,
            "per_image": {name: {**row, "seconds": run.seconds.get(name)} for name, row in run.evaluation.rows.items()},
            "failed": [{"image": name, "reason": reason} for name, reason in run.evaluation.failed],
        })
    return out


def _bar_charts(path: Path, runs, metrics) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 0.8, 3.4), squeeze=False)
    labels = [r.spec.label for r in runs]
    colours = [plt.cm.tab10(i % 10) for i in range(len(runs))]
    for ax, metric in zip(axes[0], metrics):
        values = [r.evaluation.means().get(metric, math.nan) for r in runs]
        bars = ax.bar(range(len(runs)), values, color=colours)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_title(f"{METRICS[metric].title} ({METRICS[metric].direction})", fontsize=10)
        ax.set_xticks(range(len(runs)), labels, rotation=20, ha="right", fontsize=8)
        finite = [v for v in values if math.isfinite(v)]
        if finite:  # zoom in: the differences, not the distance from zero, are what matter
            low, high = min(finite), max(finite)
            pad = (high - low) * 0.25 or abs(high) * 0.05 or 1.0
            ax.set_ylim(max(0.0, low - pad * 2) if low >= 0 else low - pad * 2, high + pad)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _quality_vs_speed(path: Path, runs, metrics) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 0.8, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, run in enumerate(runs):
            x, y = run.seconds_per_image, run.evaluation.means().get(metric, math.nan)
            ax.scatter([x], [y], color=plt.cm.tab10(i % 10), s=40)
            ax.annotate(run.spec.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.35, y=0.15)  # room for the labels
        ax.set_xlabel("seconds per image (log)")
        ax.set_title(f"{METRICS[metric].title} ({METRICS[metric].direction})", fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _crop_figures(folder: Path, runs, inputs: dict[str, np.ndarray], ground_truths: dict[str, np.ndarray]) -> list[Path]:
    plt = _pyplot()
    folder.mkdir(exist_ok=True)
    written = []
    for name in sorted(set().union(*(r.crops for r in runs))):
        panels = [("input", inputs.get(name))]
        for run in runs:
            value = run.evaluation.rows.get(name, {})
            caption = run.spec.label
            if "psnr" in value:
                caption += f"\nimage PSNR {value['psnr']:.2f}"
            panels.append((caption, run.crops.get(name)))
        if name in ground_truths:
            panels.append(("ground truth", ground_truths[name]))
        panels = [(t, p) for t, p in panels if p is not None]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
        for ax, (title, pixels) in zip(axes[0], panels):
            shown = np.clip(pixels, 0, 1)
            ax.imshow(shown[:, :, 0] if shown.shape[2] == 1 else shown, cmap="gray" if shown.shape[2] == 1 else None,
                      interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.suptitle(name, fontsize=9)
        fig.tight_layout()
        path = folder / f"{Path(name).stem}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
