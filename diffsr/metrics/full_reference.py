"""PSNR and SSIM between a result and its ground truth, with pyiqa's conventions.

Conventions (those of pyiqa's `psnr` and `ssim`, which diffusion-SR papers report):
- inputs are H x W x C float arrays in [0, 1] (C = 1 or 3); `y_channel` measures the BT.601 Y only;
- `crop_border` drops that many pixels on every side first (the scale factor, in BasicSR's tests);
- PSNR is computed on the [0, 1] values without rounding, with mse + 1e-8, so identical images
  give 80 dB instead of infinity (averages stay finite);
- SSIM rounds to 8-bit levels first, uses an 11 x 11 Gaussian window (sigma 1.5) over the valid
  area only, clamps the contrast-structure term at zero and averages over channels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from diffsr.metrics.colour import luma_bt601, to_8bit_levels

PSNR_EPS = 1e-8
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def prepare_pair(pred: np.ndarray, ref: np.ndarray, y_channel: bool, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    """Check sizes, match grey to RGB, crop the border and (optionally) take Y: H x W x C float32."""
    pred, ref = _as_hwc(pred, "result"), _as_hwc(ref, "ground truth")
    if pred.shape[:2] != ref.shape[:2]:
        raise ValueError(
            f"size mismatch: result {pred.shape[1]}x{pred.shape[0]}, ground truth {ref.shape[1]}x{ref.shape[0]}"
        )
    if pred.shape[2] != ref.shape[2]:  # a grey image against a colour one: compare as colour
        pred, ref = _as_rgb(pred), _as_rgb(ref)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(pred.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {pred.shape[1]}x{pred.shape[0]} image")
        pred = pred[crop_border:-crop_border, crop_border:-crop_border]
        ref = ref[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and pred.shape[2] == 3:
        pred, ref = luma_bt601(pred)[:, :, None], luma_bt601(ref)[:, :, None]
    return pred, ref


def psnr(pred: np.ndarray, ref: np.ndarray, y_channel: bool = False, crop_border: int = 0) -> float:
    """Peak signal-to-noise ratio in dB, peak 1.0."""
    a, b = prepare_pair(pred, ref, y_channel, crop_border)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / (mse + PSNR_EPS))


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma), normalised, then stored in float32 as pyiqa does.

    The float32 rounding leaves the sum a hair off 1, which decides the sign of NIQE's
    coefficients in flat (e.g. clipped) areas; keeping it reproduces pyiqa's figures there.
    """
    half = (size - 1) / 2.0
    axis = np.arange(size, dtype=np.float64) - half
    window = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2.0 * sigma * sigma))
    window[window < np.finfo(np.float64).eps * window.max()] = 0.0
    return (window / window.sum()).astype(np.float32).astype(np.float64)


def ssim(pred: np.ndarray, ref: np.ndarray, y_channel: bool = False, crop_border: int = 0) -> float:
    """Structural similarity (Wang et al. 2004) on 8-bit levels, mean over channels."""
    a, b = prepare_pair(pred, ref, y_channel, crop_border)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[1]}x{a.shape[0]}")
    x, y = to_8bit_levels(a), to_8bit_levels(b)
    # The Gaussian is separable: two 1-D passes give the 2-D window's result (to float rounding).
    column = gaussian_window(SSIM_WINDOW, SSIM_SIGMA).sum(axis=1)
    valid = SSIM_WINDOW // 2

    def blur(t: np.ndarray) -> np.ndarray:  # the 'valid' part of the filtered image, all channels
        out = cv2.sepFilter2D(np.ascontiguousarray(t), cv2.CV_64F, column, column, borderType=cv2.BORDER_REFLECT)
        return out.reshape(t.shape)[valid:-valid, valid:-valid]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    contrast_structure = np.maximum((2 * cov_xy + c2) / (var_x + var_y + c2), 0.0)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return float((luminance * contrast_structure).mean())


def _as_hwc(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"{what}: expected an H x W, H x W x 1 or H x W x 3 array, got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def _as_rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
