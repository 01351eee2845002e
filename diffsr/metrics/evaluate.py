"""Scoring folders of results: pairing by file stem, per-image values, means, and the report files.

`diffsr eval` and `diffsr bench` both end here. A pair that cannot be scored (no partner, sizes
that differ, an unreadable file) is reported by name and left out; the rest are still scored, and
the summary says over how many images each mean was taken.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from diffsr.io import READABLE_SUFFIXES, ImageData, ImageError, atomic_write_bytes, read_image
from diffsr.metrics.registry import METRICS, ImageMetric, MetricError, create_metric
from diffsr.progress import OptionalCallback, report


@dataclass(frozen=True)
class ImagePair:
    name: str
    """File name of the result, the `image` column of per_image.csv."""
    pred: Path
    gt: Path | None


@dataclass
class Evaluation:
    metrics: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    """image name -> metric -> value, in the order scored."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(image name, one-line reason)."""
    set_level: dict[str, float] = field(default_factory=dict)
    """Metrics over the whole folder (FID)."""

    def per_image_metrics(self) -> list[str]:
        return [m for m in self.metrics if METRICS[m].per_image]

    def values(self, metric: str) -> list[float]:
        """The finite per-image values of a metric (NIQE is NaN for an image without any texture)."""
        return [row[metric] for row in self.rows.values() if math.isfinite(row.get(metric, math.nan))]

    def means(self) -> dict[str, float]:
        out = {m: _mean(self.values(m)) for m in self.per_image_metrics()}
        out.update(self.set_level)
        return out


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES)


def pair_folders(pred_dir: Path, gt_dir: Path | None, suffix: str = "") -> tuple[list[ImagePair], list[tuple[str, str]]]:
    """Pairs results with ground truths of the same stem (after removing `_suffix` from results)."""
    problems: list[tuple[str, str]] = []
    preds = _by_stem(list_images(pred_dir), problems, strip=f"_{suffix}" if suffix else "")
    if not preds and not problems:
        problems.append((str(pred_dir), f"{pred_dir}: no images found; point --pred at a folder of results"))
    if gt_dir is None:
        return [ImagePair(p.name, p, None) for p in preds.values()], problems
    gts = _by_stem(list_images(gt_dir), problems, strip="")
    pairs = []
    for stem, pred in preds.items():
        if stem in gts:
            pairs.append(ImagePair(pred.name, pred, gts[stem]))
        else:
            hint = "; if results carry a suffix (diffsr upscale adds _out), pass --suffix" if "_" in stem and not suffix else ""
            problems.append((pred.name, f"{pred}: no ground truth named {stem}.* in {gt_dir}{hint}"))
    for stem, gt in gts.items():
        if stem not in preds:
            problems.append((gt.name, f"{gt}: ground truth has no result named {stem}{'_' + suffix if suffix else ''}.* in {pred_dir}"))
    return pairs, problems


def _by_stem(paths: Iterable[Path], problems: list[tuple[str, str]], strip: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in paths:
        stem = path.stem
        if strip:
            if not stem.endswith(strip):
                problems.append((path.name, f"{path}: name does not end in {strip}; check --suffix"))
                continue
            stem = stem[: -len(strip)]
        if stem in found:
            problems.append((path.name, f"{path}: same stem as {found[stem].name}; keep one of them"))
            continue
        found[stem] = path
    return found


class Scorer:
    """The chosen metrics, loaded once, scoring one image (and its ground truth) at a time."""

    def __init__(self, names: list[str], y_channel: bool = False, crop_border: int = 0, device: str = "cpu"):
        self.names = names
        self.functions: dict[str, ImageMetric] = {
            n: create_metric(n, y_channel, crop_border, device) for n in names if METRICS[n].per_image
        }

    def score(self, pred: np.ndarray, gt: np.ndarray | None) -> dict[str, float]:
        if gt is not None and pred.shape[:2] != gt.shape[:2]:
            raise ValueError(f"size mismatch: result {pred.shape[1]}x{pred.shape[0]}, ground truth {gt.shape[1]}x{gt.shape[0]}")
        return {n: fn(pred, gt if METRICS[n].full_reference else None) for n, fn in self.functions.items()}


def evaluate_pairs(
    pairs: list[ImagePair],
    scorer: Scorer,
    max_pixels: int | None = None,
    on_progress: OptionalCallback = None,
) -> Evaluation:
    result = Evaluation(metrics=list(scorer.names))
    for done, pair in enumerate(pairs):
        try:
            pred = read_image(pair.pred, max_pixels=max_pixels).pixels
            gt = read_image(pair.gt, max_pixels=max_pixels).pixels if pair.gt is not None else None
            result.rows[pair.name] = scorer.score(pred, gt)
        except ValueError as exc:  # ImageError is a ValueError too; both are one-line reasons
            reason = str(exc) if isinstance(exc, ImageError) else f"{pair.pred}: {exc}"
            result.failed.append((pair.name, reason))
        report(on_progress, "files", done + 1, len(pairs), pair.name)
    return result


def add_set_level_metrics(result: Evaluation, pred_dir: Path, gt_dir: Path | None, device: str = "cpu") -> None:
    for name in result.metrics:
        if not METRICS[name].per_image:
            if gt_dir is None:
                raise MetricError(f"{name} compares two folders; pass --gt")
            from diffsr.metrics.pyiqa_backend import fid_between_folders

            result.set_level[name] = fid_between_folders(pred_dir, gt_dir, device)


def quantise_like_file(image: ImageData) -> np.ndarray:
    """The pixels as they will be stored (8-bit levels for 8-bit images), so scores match the saved files."""
    levels = 255.0 if image.bit_depth == 8 else 65535.0
    return (np.round(image.pixels * levels) / levels).astype(np.float32)


# ------------------------------------------------------------------------------------ report files

def per_image_csv(result: Evaluation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = result.per_image_metrics()
    writer.writerow(["image", *columns])
    for name, row in result.rows.items():
        writer.writerow([name, *(_format(row.get(m, math.nan)) for m in columns)])
    return buffer.getvalue()


def summary_dict(result: Evaluation, settings: dict[str, Any]) -> dict[str, Any]:
    means = result.means()
    return {
        "metrics": {
            m: {
                "mean": _json_number(means.get(m, math.nan)),
                "images": len(result.values(m)) if METRICS[m].per_image else None,
                "direction": METRICS[m].direction,
            }
            for m in result.metrics
        },
        "images_scored": len(result.rows),
        "failed": [{"image": name, "reason": reason} for name, reason in result.failed],
        "settings": settings,
    }


def summary_markdown(result: Evaluation, settings: dict[str, Any]) -> str:
    means = result.means()
    lines = [
        "| metric | mean | direction | images |",
        "|---|---|---|---|",
        *(
            f"| {METRICS[m].title} | {_format(means.get(m, math.nan))} | {METRICS[m].direction} | "
            f"{len(result.values(m)) if METRICS[m].per_image else 'whole set'} |"
            for m in result.metrics
        ),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "command"),
    ]
    if "command" in settings:
        lines += ["", "```", settings["command"], "```"]
    if result.failed:
        lines += ["", f"Not scored ({len(result.failed)}):", *(f"- {reason}" for _, reason in result.failed)]
    return "\n".join(lines) + "\n"


def write_eval_report(result: Evaluation, out_dir: Path, settings: dict[str, Any]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "per_image.csv": per_image_csv(result),
        "summary.json": json.dumps(summary_dict(result, settings), indent=2) + "\n",
        "summary.md": summary_markdown(result, settings),
    }
    for name, text in files.items():
        atomic_write_bytes(out_dir / name, text.encode())
    return [out_dir / name for name in files]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _format(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.6f}"


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None
