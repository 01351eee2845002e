"""NIQE (Mittal et al., 2012), reproducing pyiqa's `niqe` and through it the MATLAB release.

The steps that decide the figures: luma is YIQ Y rounded to 8-bit levels; the image is cut to whole
96 x 96 blocks; each of two scales (the second made with MATLAB's antialiased bicubic imresize by
1/2) is normalised by a 7 x 7 Gaussian (sigma 7/6, replicated edges); each block gives 18
asymmetric-generalised-Gaussian features (shape found on a 0.001 grid from 0.2 to 10); the
quality is the Mahalanobis-like distance between the blocks' Gaussian and the pristine model's
(`niqe_pristine.npz`, the published MATLAB parameters shipped with diffsr). Lower is better.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from importlib import resources

import cv2
import numpy as np
import torch

from diffsr.metrics.colour import luma_yiq, to_8bit_levels
from diffsr.metrics.full_reference import gaussian_window

BLOCK = 96
_GAMMA_GRID = 0.2 + 0.001 * np.arange(9801)
_NEIGHBOUR_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, two diagonals


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """Mean (36,) and covariance (36, 36) of the features of pristine natural images."""
    with resources.files("diffsr.metrics").joinpath("niqe_pristine.npz").open("rb") as handle:
        params = np.load(handle)
        mean, cov = params["mu_pris_param"].reshape(-1), params["cov_pris_param"]
    return mean.astype(np.float64), cov.astype(np.float64)


@lru_cache(maxsize=1)
def _gamma_ratio_table() -> np.ndarray:
    """r(gamma) = Gamma(2/g)^2 / (Gamma(1/g) Gamma(3/g)) on the search grid."""
    g = _GAMMA_GRID
    return np.exp(2 * _lgamma(2 / g) - _lgamma(1 / g) - _lgamma(3 / g))


def niqe(pixels: np.ndarray, crop_border: int = 0) -> float:
    """NIQE of an H x W x C image in [0, 1] (C = 1 or 3); needs at least 96 x 96 pixels."""
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = array[:, :, None]
    if crop_border:
        array = array[crop_border:-crop_border, crop_border:-crop_border]
    if min(array.shape[:2]) < BLOCK:
        raise ValueError(f"NIQE needs at least {BLOCK}x{BLOCK} pixels, got {array.shape[1]}x{array.shape[0]}")
    luma = luma_yiq(array) if array.shape[2] == 3 else array[:, :, 0]
    image = to_8bit_levels(luma)  # H x W float64 on the 0..255 scale
    image = image[: (image.shape[0] // BLOCK) * BLOCK, : (image.shape[1] // BLOCK) * BLOCK]

    features = []
    for scale in (1, 2):
        block = BLOCK // scale
        normalised = _normalise_contrast(image)
        grid = normalised.reshape(normalised.shape[0] // block, block, normalised.shape[1] // block, block)
        features.append(_block_features(grid.transpose(0, 2, 1, 3).reshape(-1, block, block)))
        if scale == 1:
            image = matlab_imresize_half(torch.from_numpy(image / 255.0)[None, None])[0, 0].numpy() * 255.0
    feats = np.concatenate(features, axis=1)  # blocks x 36

    # As MATLAB's nanmean and nancov: the mean skips NaN entries feature by feature, the covariance
    # skips whole blocks with any NaN (flat blocks, e.g. clipped highlights, have no positive side).
    complete = feats[~np.isnan(feats).any(axis=1)]
    with warnings.catch_warnings():  # a feature NaN in every block stays NaN: the image has no texture at all
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(feats, axis=0)
    cov = np.cov(complete, rowvar=False) if len(complete) > 1 else np.zeros((feats.shape[1], feats.shape[1]))
    pristine_mean, pristine_cov = pristine_model()
    diff = pristine_mean - mean
    pooled = (pristine_cov + cov) / 2
    inverse = np.linalg.pinv(pooled, rcond=max(pooled.shape) * np.finfo(np.float64).eps)  # torch.linalg.pinv's cut-off
    return float(np.sqrt(diff @ inverse @ diff))


def _normalise_contrast(image: np.ndarray) -> np.ndarray:
    """Mean-subtracted, contrast-normalised coefficients (MSCN) of an H x W float64 image."""
    window = gaussian_window(7, 7.0 / 6.0)
    mu = cv2.filter2D(image, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE)
    second = cv2.filter2D(image * image, cv2.CV_64F, window, borderType=cv2.BORDER_REPLICATE)
    sigma = np.sqrt(np.abs(second - mu * mu) + np.finfo(np.float64).eps)
    return (image - mu) / (sigma + 1.0)


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each of B blocks (B x h x w): B x 18."""
    alpha, left, right = _fit_aggd(blocks)
    features = [alpha, (left + right) / 2]
    for shift in _NEIGHBOUR_SHIFTS:
        products = blocks * np.roll(blocks, shift, axis=(1, 2))  # wraps around inside each block
        alpha, left, right = _fit_aggd(products)
        mean = (right - left) * np.exp(_lgamma(2 / alpha) - _lgamma(1 / alpha))
        features += [alpha, mean, left, right]
    return np.stack(features, axis=1)


def _fit_aggd(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching fit of an asymmetric generalised Gaussian per block: shape, left and right scale.

    A block with no negative or no positive values gives NaN scales (and the smallest shape), which
    the caller leaves out as MATLAB's nanmean/nancov do.
    """
    flat = values.reshape(values.shape[0], -1)
    squares = flat * flat
    with np.errstate(invalid="ignore", divide="ignore"):
        left_std = np.sqrt(np.where(flat < 0, squares, 0).sum(1) / (flat < 0).sum(1))
        right_std = np.sqrt(np.where(flat > 0, squares, 0).sum(1) / (flat > 0).sum(1))
        gamma_hat = left_std / right_std
        r_hat = np.abs(flat).mean(1) ** 2 / squares.mean(1)
        r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    mismatch = np.abs(_gamma_ratio_table()[None] - r_norm[:, None])
    shape = _GAMMA_GRID[np.where(np.isnan(r_norm), 0, np.argmin(mismatch, axis=1))]
    spread = np.sqrt(np.exp(_lgamma(1 / shape) - _lgamma(3 / shape)))
    return shape, left_std * spread, right_std * spread


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[np.float64])(x)


def matlab_imresize_half(image: torch.Tensor) -> torch.Tensor:
    """MATLAB imresize(image, 0.5) with its default antialiased bicubic kernel, N x 1 x H x W.

    Computed in float32, one axis at a time (rows, then columns), as pyiqa does: in flat areas the
    float32 rounding noise is what NIQE's features describe, so its precision changes the score.
    """
    out = image.to(torch.float32)
    for dim in (2, 3):
        out = _resize_axis(out, dim, math.ceil(out.shape[dim] / 2), 0.5)
    return out.to(image.dtype)


def _resize_axis(image: torch.Tensor, dim: int, size_out: int, scale: float) -> torch.Tensor:
    """Resample one axis: each output is a weighted sum of `taps` inputs around its centre, edges mirrored."""
    width = 4.0 / scale  # the cubic kernel widened for antialiasing when shrinking
    taps = math.ceil(width) + 2
    centres = (torch.arange(size_out, dtype=torch.float32) + 0.5) / scale - 0.5
    first = centres.floor() - taps // 2 + 1
    offsets = (centres - first)[None] - torch.arange(taps, dtype=torch.float32)[:, None]  # taps x size_out
    weights = _cubic(offsets * scale)
    weights = weights / weights.sum(dim=0, keepdim=True)
    size_in = image.shape[dim]
    mirrored = torch.cat([torch.arange(size_in), torch.arange(size_in - 1, -1, -1)])
    index = mirrored[(first.long()[None] + torch.arange(taps)[:, None]) % (2 * size_in)]  # taps x size_out
    moved = image.movedim(dim, -1)  # ... x size_in
    gathered = moved[..., index]  # ... x taps x size_out
    return (gathered * weights).sum(dim=-2).movedim(-1, dim)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = x.abs()
    near = (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
    far = (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far
