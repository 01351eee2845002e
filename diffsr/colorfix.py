"""Colour correction of a diffusion output towards a reference image: AdaIN, wavelet and InvSR's YCbCr.

Diffusion priors shift colours; StableSR, OSEDiff, SUPIR and InvSR all correct the output against a
reference (the upsampled LR, or SUPIR's stage-1 image) with the same two functions, which came from
sd-webui-stablesr. The formulas here are those ones, term for term, so ports reproduce the official
outputs bit for bit (checked against the official fixtures in tests/test_colorfix.py):

- AdaIN: per image and channel, ``(t - mean_t) / std_t * std_s + mean_s`` with
  ``std = sqrt(unbiased variance + 1e-5)`` over all pixels.
- wavelet: a 5-level a-trous decomposition with the 3x3 kernel [[1,2,1],[2,4,2],[1,2,1]]/16 at
  dilation 1, 2, 4, 8, 16 and replicate padding of the same radius; the result is the target's
  accumulated high frequencies plus the reference's final low band.

The tensors are used in whatever range the caller's method uses ([-1, 1] for StableSR and SUPIR,
[0, 1] for OSEDiff and InvSR): the wavelet fix is linear, but AdaIN's 1e-5 is not scale-free, so pass
the range the official code uses. Inputs are N x C x H x W; half-precision inputs are computed in
float32 and returned in their own dtype. No clamping is done here (the methods clamp differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("none", "adain", "wavelet", "ycbcr")
WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5


def _check_pair(target: torch.Tensor, source: torch.Tensor) -> None:
    if target.ndim != 4 or source.ndim != 4:
        raise ValueError(f"colour fix expects N x C x H x W tensors, got {tuple(target.shape)} and {tuple(source.shape)}")
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(f"colour fix: target {tuple(target.shape)} and reference {tuple(source.shape)} differ in batch or channels")


def _mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    std = (flat.var(dim=2) + eps).sqrt().reshape(n, c, 1, 1)
    mean = flat.mean(dim=2).reshape(n, c, 1, 1)
    return mean, std


def adain_color_fix(target: torch.Tensor, source: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Give `target` the per-channel mean and standard deviation of `source` (sizes may differ)."""
    _check_pair(target, source)
    dtype = target.dtype
    t = target.float()
    s = source.float()
    t_mean, t_std = _mean_std(t, eps)
    s_mean, s_std = _mean_std(s, eps)
    normalized = (t - t_mean.expand(t.shape)) / t_std.expand(t.shape)
    return (normalized * s_std.expand(t.shape) + s_mean.expand(t.shape)).to(dtype)


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """One a-trous level: the binomial 3x3 kernel at dilation `radius`, replicate-padded by `radius`."""
    kernel = torch.tensor(
        [[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=image.dtype, device=image.device
    )
    channels = image.shape[1]
    kernel = kernel[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the sum of the band-pass levels and the final low band; high + low == image."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The target's detail (high bands) on the reference's colours (low band); same size required."""
    _check_pair(target, source)
    if target.shape != source.shape:
        raise ValueError(f"wavelet colour fix needs the reference at the output size: {tuple(source.shape)} vs {tuple(target.shape)}")
    high, _ = wavelet_decomposition(target.float(), levels)
    _, low = wavelet_decomposition(source.float(), levels)
    return (high + low).to(target.dtype)


_RGB_TO_YCBCR = ((65.481, -37.797, 112.0), (128.553, -74.203, -93.786), (24.966, 112.0, -18.214))
_YCBCR_TO_RGB = ((0.00456621, 0.00456621, 0.00456621), (0.0, -0.00153632, 0.00791071), (0.00625893, -0.00318811, 0.0))
_YCBCR_TO_RGB_BIAS = (-222.921, 135.576, -276.836)


def _to_ycbcr(image: torch.Tensor, only_y: bool) -> torch.Tensor:
    """MATLAB rgb2ycbcr of [0, 1] RGB, returned /255 and clamped to [0, 1] (InvSR's rgb2ycbcrTorch)."""
    pixels = image.permute(0, 2, 3, 1) * 255.0
    scale = torch.tensor(_RGB_TO_YCBCR, dtype=image.dtype, device=image.device) / 255.0
    if only_y:
        out = torch.matmul(pixels, scale[:, :1]) + 16.0
    else:
        out = torch.matmul(pixels, scale) + torch.tensor([16.0, 128.0, 128.0], dtype=image.dtype, device=image.device).view(1, 1, 1, 3)
    return (out / 255.0).clamp(0.0, 1.0).permute(0, 3, 1, 2)


def _from_ycbcr(image: torch.Tensor) -> torch.Tensor:
    """MATLAB ycbcr2rgb of [0, 1] YCbCr, clamped to [0, 1] (InvSR's ycbcr2rgbTorch)."""
    pixels = image.permute(0, 2, 3, 1) * 255.0
    scale = torch.tensor(_YCBCR_TO_RGB, dtype=image.dtype, device=image.device) * 255.0
    bias = torch.tensor(_YCBCR_TO_RGB_BIAS, dtype=image.dtype, device=image.device).view(1, 1, 1, 3)
    return ((torch.matmul(pixels, scale) + bias) / 255.0).clamp(0.0, 1.0).permute(0, 3, 1, 2)


def ycbcr_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """InvSR's `ycbcr` fix: the target's luma (Y) with the reference's chroma (Cb, Cr); [0, 1] RGB, same size.

    Both conversions are MATLAB's BT.601 studio-swing formulas computed at the 0..255 scale and
    clamped to [0, 1] after each one, as the official code does (so the output is clamped too).
    """
    _check_pair(target, source)
    if target.shape != source.shape:
        raise ValueError(f"ycbcr colour fix needs the reference at the output size: {tuple(source.shape)} vs {tuple(target.shape)}")
    dtype = target.dtype
    compute = torch.promote_types(torch.promote_types(dtype, source.dtype), torch.float32)
    luma = _to_ycbcr(target.to(compute), only_y=True)
    chroma = _to_ycbcr(source.to(compute), only_y=False)[:, 1:]
    return _from_ycbcr(torch.cat([luma, chroma], dim=1)).to(dtype)


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str) -> torch.Tensor:
    """Dispatch on a method name from COLOR_FIXES ("none" returns `target` unchanged)."""
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "ycbcr":
        return ycbcr_color_fix(target, source)
    if method == "none":
        return target
    raise ValueError(f"unknown colour fix '{method}'; use one of {', '.join(COLOR_FIXES)}")
