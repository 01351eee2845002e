"""Blur kernels (Gaussian family, plateau, sinc) and batched filtering with one kernel per sample.

Kernel formulas follow BasicSR's `degradations.py`: a bivariate Gaussian with covariance
R diag(sx^2, sy^2) R^T, its generalized form exp(-0.5 q^beta), the plateau form 1 / (1 + q^beta), and
the circular low-pass kernel w J1(w r) / (2 pi r). Kernels are built in float64 on the CPU (they are
tiny) and normalised to sum 1.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from diffsr.degrade.config import KernelSettings


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return xx, yy


def gaussian_family_kernel(kind: str, size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float = 1.0) -> torch.Tensor:
    """A size x size kernel of `kind` ("iso", "aniso", "generalized_*", "plateau_*"), summing to 1."""
    xx, yy = _grid(size)
    cos, sin = math.cos(rotation), math.sin(rotation)
    rot = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    inv = torch.linalg.inv(cov)
    xy = torch.stack([xx, yy], dim=-1)
    quad = ((xy @ inv) * xy).sum(-1)
    if kind.startswith("generalized"):
        kernel = torch.exp(-0.5 * quad.pow(beta))
    elif kind.startswith("plateau"):
        kernel = 1.0 / (quad.pow(beta) + 1.0)
    else:
        kernel = torch.exp(-0.5 * quad)
    return kernel / kernel.sum()


def sinc_kernel(omega_c: float, size: int) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cut-off `omega_c` (radians per pixel), summing to 1."""
    xx, yy = _grid(size)
    radius = torch.sqrt(xx**2 + yy**2)
    safe = torch.where(radius == 0, torch.ones_like(radius), radius)
    kernel = omega_c * torch.special.bessel_j1(omega_c * safe) / (2 * math.pi * safe)
    kernel[size // 2, size // 2] = omega_c**2 / (4 * math.pi)
    return kernel / kernel.sum()


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad)) if pad > 0 else kernel


def pulse_kernel(size: int) -> torch.Tensor:
    kernel = torch.zeros(size, size, dtype=torch.float64)
    kernel[size // 2, size // 2] = 1.0
    return kernel


def _beta(rng: random.Random, low: float, high: float) -> float:
    """BasicSR's draw: half the time below 1, half the time above (shape < 1 and > 1 equally likely)."""
    if rng.random() < 0.5:
        return rng.uniform(low, 1.0) if low < 1.0 else low
    return rng.uniform(1.0, high) if high > 1.0 else high


def draw_kernel(settings: KernelSettings, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw one blur kernel (padded to settings.pad_to) and the parameters that made it."""
    size = rng.choice(settings.sizes)
    if rng.random() < settings.sinc_prob:
        omega_c = rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)
        return pad_kernel(sinc_kernel(omega_c, size), settings.pad_to), {"kernel": "sinc", "size": size, "omega_c": omega_c}
    kind = rng.choices(settings.kinds, weights=settings.probs)[0]
    sigma_x = rng.uniform(*settings.sigma)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y, rotation = rng.uniform(*settings.sigma), rng.uniform(-math.pi, math.pi)
    params: dict[str, Any] = {"kernel": kind, "size": size, "sigma_x": sigma_x, "sigma_y": sigma_y, "rotation": rotation}
    beta = 1.0
    if kind.startswith("generalized"):
        beta = params["beta"] = _beta(rng, *settings.beta_gaussian)
    elif kind.startswith("plateau"):
        beta = params["beta"] = _beta(rng, *settings.beta_plateau)
    kernel = gaussian_family_kernel(kind, size, sigma_x, sigma_y, rotation, beta)
    return pad_kernel(kernel, settings.pad_to), params


def draw_final_sinc(sizes: tuple[int, ...], prob: float, pad_to: int, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Real-ESRGAN's final sinc filter (cut-off in [pi/3, pi]) or, otherwise, a pulse (no filtering)."""
    if rng.random() < prob:
        size = rng.choice(sizes)
        omega_c = rng.uniform(math.pi / 3, math.pi)
        return pad_kernel(sinc_kernel(omega_c, size), pad_to), {"kernel": "sinc", "size": size, "omega_c": omega_c}
    return pulse_kernel(pad_to), None


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate each image of an N x C x H x W batch with its own K x K kernel (N x K x K).

    Reflect padding keeps the size, as BasicSR's filter2D; images smaller than the kernel fall back
    to edge replication, which reflect padding cannot do. Small batches (after a per-sample resize,
    one image at a time) go through the FFT: PyTorch's CPU depthwise convolution is about 7x slower
    there, since it vectorises across channels; both agree to about 1e-6.
    """
    n, c, h, w = images.shape
    size = kernels.shape[-1]
    pad = size // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    kernels = kernels.to(device=images.device, dtype=images.dtype)
    # Far tails of narrow Gaussians become float32 denormals, which made the convolution 3x slower
    # on x86; weights below 1e-38 change no output.
    kernels = torch.where(kernels.abs() < torch.finfo(kernels.dtype).tiny, torch.zeros_like(kernels), kernels)
    if n * c < 16:
        shape = padded.shape[-2:]
        spectrum = torch.fft.rfft2(padded) * torch.fft.rfft2(kernels.flip(-1, -2), s=shape)[:, None]
        return torch.fft.irfft2(spectrum, s=shape)[..., size - 1 :, size - 1 :].contiguous()
    weight = kernels.reshape(n, 1, 1, size, size).expand(n, c, 1, size, size).reshape(n * c, 1, size, size)
    out = F.conv2d(padded.reshape(1, n * c, h + 2 * pad, w + 2 * pad), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def _blur_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """The length x length matrix of a 1-D correlation with `taps`, reflect padding folded in.

    Two matrix products run a wide separable blur several times faster on the CPU than 1-D convolutions.
    """
    pad = taps.numel() // 2
    mode = "reflect" if pad < length else "replicate"
    eye = torch.eye(length, dtype=taps.dtype, device=taps.device)[:, None, :]
    columns = F.conv1d(F.pad(eye, (pad, pad), mode=mode), taps.view(1, 1, -1))[:, 0, :]
    return columns.T  # row i: the weights of output pixel i over the input pixels


def _separable_blur(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    rows = _blur_matrix(h, taps).to(images.dtype)
    cols = _blur_matrix(w, taps).to(images.dtype)
    return rows @ images @ cols.T


def usm_sharpen(images: torch.Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Unsharp masking as BasicSR's USMSharp (Real-ESRGAN sharpens the GT with it before degrading).

    The 2-D Gaussian is separable, so it runs as two 1-D passes: the same result at a fraction of the cost.
    """
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's getGaussianKernel(size, 0)
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(axis**2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(images.device)
    residual = images - _separable_blur(images, taps)
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft_mask = _separable_blur(mask, taps)
    sharp = torch.clamp(images + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images
