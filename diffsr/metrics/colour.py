"""Luminance as the SR literature measures it, computed the way pyiqa computes it.

Papers report PSNR/SSIM "on Y": the Y of ITU-R BT.601 YCbCr in studio range (16..235 for 8-bit),
as MATLAB's rgb2ycbcr and BasicSR give it. pyiqa's NIQE (and its `psnry`) use the Y of YIQ instead,
which is full-range luma. Both are computed in float32, in the order pyiqa uses, so that values
that are later rounded to 8-bit levels round the same way.
"""

from __future__ import annotations

import numpy as np

_BT601_STUDIO = np.array([65.481, 128.553, 24.966], dtype=np.float32)
_YIQ_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_float32_rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB array, got shape {pixels.shape}")
    return pixels.astype(np.float32, copy=False)


def luma_bt601(pixels: np.ndarray) -> np.ndarray:
    """Y of BT.601 YCbCr (studio range), H x W float32 in [16/255, 235/255]."""
    rgb = _as_float32_rgb(pixels)
    return ((rgb @ _BT601_STUDIO + np.float32(16.0)) / np.float32(255.0)).astype(np.float32)


def luma_yiq(pixels: np.ndarray) -> np.ndarray:
    """Y of YIQ (full-range BT.601 luma), H x W float32 in [0, 1]."""
    return (_as_float32_rgb(pixels) @ _YIQ_LUMA).astype(np.float32)


def to_8bit_levels(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as float64 on the 0..255 scale, rounded to whole levels (as MATLAB's uint8 steps)."""
    return np.round(values.astype(np.float32) * np.float32(255.0)).astype(np.float64)
