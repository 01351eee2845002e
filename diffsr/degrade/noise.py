"""Gaussian and Poisson noise, colour or grey, one draw per sample (BasicSR's `*_noise_pt` semantics)."""

from __future__ import annotations

import torch

_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def gaussian_noise(image: torch.Tensor, sigma: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Noise for one C x H x W image in [0, 1]; `sigma` is on the 0-255 scale; grey = same on all channels."""
    c, h, w = image.shape
    shape = (1, h, w) if grey else (c, h, w)
    noise = torch.randn(shape, generator=generator, device=image.device, dtype=image.dtype) * (sigma / 255.0)
    return noise.expand(c, h, w)


def _poisson(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise whose level count is the image's number of distinct 8-bit values, rounded up to 2^k."""
    codes = torch.clamp((image * 255.0).round(), 0, 255)
    quantised = codes / 255.0
    distinct = torch.bincount(codes.to(torch.int64).flatten(), minlength=256).count_nonzero().item()
    levels = float(2 ** max(0, (distinct - 1).bit_length()))  # distinct values rounded up to a power of two
    return torch.poisson(quantised * levels, generator=generator) / levels - quantised


def poisson_noise(image: torch.Tensor, scale: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    c, h, w = image.shape
    if grey:
        weights = torch.tensor(_GREY_WEIGHTS, device=image.device, dtype=image.dtype).view(3, 1, 1)
        luma = (image * weights).sum(0, keepdim=True) if c == 3 else image[:1]
        noise = _poisson(luma, generator).expand(c, h, w)
    else:
        noise = _poisson(image, generator)
    return noise * scale


def add_noise(images: torch.Tensor, params: list[dict], generators: list[torch.Generator]) -> torch.Tensor:
    """Add each sample's noise (params: {"type": "gaussian"|"poisson", "sigma"|"scale", "grey"}) and clip to [0, 1]."""
    out = []
    for image, p, generator in zip(images, params, generators):
        if p["type"] == "gaussian":
            noise = gaussian_noise(image, p["sigma"], p["grey"], generator)
        else:
            noise = poisson_noise(image, p["scale"], p["grey"], generator)
        out.append(torch.clamp(image + noise, 0, 1))
    return torch.stack(out)
