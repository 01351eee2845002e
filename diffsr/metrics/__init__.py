"""Image-quality metrics that reproduce the figures SR papers report (pyiqa's conventions).

    from diffsr.metrics import psnr, ssim, niqe
    psnr(result, ground_truth, y_channel=True, crop_border=4)   # H x W x C float arrays in [0, 1]

`diffsr.metrics.evaluate` scores folders (used by `diffsr eval`); `diffsr.bench` runs methods and
writes reports. Learned metrics (LPIPS, DISTS, MUSIQ, CLIPIQA, MANIQA, FID) go through pyiqa when it
and its weights are installed.
"""

from diffsr.metrics.colour import luma_bt601, luma_yiq
from diffsr.metrics.full_reference import psnr, ssim
from diffsr.metrics.niqe import niqe
from diffsr.metrics.registry import METRICS, MetricError, MetricInfo, create_metric, parse_metric_names

__all__ = [
    "METRICS",
    "MetricError",
    "MetricInfo",
    "create_metric",
    "luma_bt601",
    "luma_yiq",
    "niqe",
    "parse_metric_names",
    "psnr",
    "ssim",
]
