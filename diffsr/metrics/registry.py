"""Which metrics exist, what they need, and how to build one: diffsr's own or pyiqa's.

PSNR, SSIM and NIQE are implemented in diffsr (they reproduce pyiqa's figures, see the modules).
LPIPS, DISTS, MUSIQ, CLIP-IQA, MANIQA and FID are learned metrics whose weights only pyiqa knows
how to load; they work when pyiqa is installed and its weight files are already on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np

from diffsr.metrics.full_reference import psnr, ssim
from diffsr.metrics.niqe import niqe

ImageMetric = Callable[[np.ndarray, Optional[np.ndarray]], float]
"""Scores one result (H x W x C float in [0, 1]) against its ground truth, or None for no-reference metrics."""


class MetricError(RuntimeError):
    """A metric cannot be used here; the message names the metric and the fix."""


@dataclass(frozen=True)
class MetricInfo:
    name: str
    title: str
    """Column heading in reports."""
    full_reference: bool
    """Needs the ground truth."""
    lower_better: bool
    backend: str
    """"diffsr" or "pyiqa"."""
    per_image: bool = True
    """False for set-level metrics (FID compares two folders as distributions)."""
    uses_colour_options: bool = False
    """Whether --y-channel changes it (--crop-border applies to every diffsr metric)."""

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("psnr", "PSNR", True, False, "diffsr", uses_colour_options=True),
        MetricInfo("ssim", "SSIM", True, False, "diffsr", uses_colour_options=True),
        MetricInfo("niqe", "NIQE", False, True, "diffsr"),
        MetricInfo("lpips", "LPIPS", True, True, "pyiqa"),
        MetricInfo("dists", "DISTS", True, True, "pyiqa"),
        MetricInfo("musiq", "MUSIQ", False, False, "pyiqa"),
        MetricInfo("clipiqa", "CLIPIQA", False, False, "pyiqa"),
        MetricInfo("maniqa", "MANIQA", False, False, "pyiqa"),
        MetricInfo("fid", "FID", True, True, "pyiqa", per_image=False),
    )
}


def parse_metric_names(text: str, have_ground_truth: bool) -> list[str]:
    """'psnr,ssim,niqe' -> names, checked; full-reference metrics are refused without ground truth."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise MetricError("no metrics named; pass e.g. --metrics psnr,ssim,niqe")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    if not have_ground_truth:
        needing = [n for n in names if METRICS[n].full_reference]
        if needing:
            raise MetricError(f"{', '.join(needing)} compare with the ground truth; pass --gt (or drop them from --metrics)")
    return list(dict.fromkeys(names))


def default_metric_names(have_ground_truth: bool) -> str:
    return "psnr,ssim,niqe" if have_ground_truth else "niqe"


def create_metric(name: str, y_channel: bool = False, crop_border: int = 0, device: str = "cpu") -> ImageMetric:
    """A per-image metric; pyiqa metrics load their network once here (MetricError if they cannot)."""
    info = METRICS[name]
    if not info.per_image:
        raise MetricError(f"{name} is computed over a whole folder, not per image")
    if name == "psnr":
        return lambda pred, ref: psnr(pred, ref, y_channel, crop_border)
    if name == "ssim":
        return lambda pred, ref: ssim(pred, ref, y_channel, crop_border)
    if name == "niqe":
        return lambda pred, ref=None: niqe(pred, crop_border)
    from diffsr.metrics.pyiqa_backend import load_pyiqa_metric

    return partial(load_pyiqa_metric(name, device), crop_border=crop_border)
