"""Batched JPEG compression in torch that follows libjpeg (Pillow's encoder and decoder) step by step.

Per sample: 8-bit RGB -> YCbCr (JFIF, rounded to 8 bits), 4:2:0 chroma by 2x2 averaging with
libjpeg's alternating rounding bias, 8x8 DCT, quantisation with the IJG tables scaled by the sample's
integer quality exactly as `jpeg_set_quality` does, dequantisation, inverse DCT, libjpeg's "fancy"
(triangle) chroma upsampling, and YCbCr -> RGB with libjpeg's rounding. The only differences from
Pillow are float instead of libjpeg's fixed-point DCT and edge padding of sizes that are not
multiples of 16; docs/degrade.md gives the measured gap. `differentiable=True` replaces every
rounding by a straight-through estimate so gradients pass (as BasicSR's DiffJPEG allows); the
forward result is the same.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

# ITU-T T.81 Annex K, tables K.1 and K.2 (the IJG defaults that Pillow/libjpeg scale by quality).
LUMA_QUANT = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
CHROMA_QUANT = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip


def quality_tables(qualities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Luma and chroma tables (N x 64) for integer qualities, as libjpeg's jpeg_set_quality(q, baseline)."""
    q = qualities.to(torch.float64).clamp(1, 100).round()
    scale = torch.where(q < 50, torch.floor(5000.0 / q), 200.0 - 2.0 * q)
    tables = []
    for base in (LUMA_QUANT, CHROMA_QUANT):
        base_t = torch.tensor(base, dtype=torch.float64, device=q.device)
        tables.append(torch.floor((base_t[None] * scale[:, None] + 50.0) / 100.0).clamp(1, 255))
    return tables[0], tables[1]


@lru_cache(maxsize=8)
def _dct_matrix(device: str, dtype: torch.dtype) -> torch.Tensor:
    """64 x 64 orthonormal 2-D DCT-II acting on row-major 8x8 blocks (JPEG's FDCT, without scaling)."""
    d = torch.zeros(8, 8, dtype=torch.float64)
    for u in range(8):
        c = math.sqrt(1 / 8) if u == 0 else math.sqrt(2 / 8)
        for x in range(8):
            d[u, x] = c * math.cos((2 * x + 1) * u * math.pi / 16)
    return torch.kron(d, d).to(device=device, dtype=dtype)


def _round(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    rounded = torch.floor(x + 0.5)
    return x + (rounded - x).detach() if differentiable else rounded


def _round_half_away(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    rounded = torch.sign(x) * torch.floor(x.abs() + 0.5)
    return x + (rounded - x).detach() if differentiable else rounded


def _code_plane(plane: torch.Tensor, table: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Level-shift, DCT, quantise, dequantise, IDCT and un-shift an N x H x W plane (H, W multiples of 8)."""
    n, h, w = plane.shape
    kron = _dct_matrix(str(plane.device), plane.dtype)
    blocks = (plane - 128.0).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(n, h // 8, w // 8, 64)
    table = table.to(plane.dtype).view(n, 1, 1, 64)
    coefficients = _round_half_away((blocks @ kron.T) / table, differentiable) * table
    pixels = coefficients @ kron
    pixels = pixels.reshape(n, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, h, w)
    return torch.clamp(_round(pixels, differentiable) + 128.0, 0, 255)


def _downsample(chroma: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """libjpeg's h2v2_downsample: (sum of 2x2 + bias) >> 2 with bias 1, 2, 1, 2, ... across columns."""
    n, h, w = chroma.shape
    total = chroma.reshape(n, h // 2, 2, w // 2, 2).sum(dim=(2, 4))
    bias = torch.tensor([1.0, 2.0], device=chroma.device, dtype=chroma.dtype).repeat(w // 4 + 1)[: w // 2]
    exact = torch.floor((total + bias) / 4.0)
    return total / 4.0 + (exact - total / 4.0).detach() if differentiable else exact


def _upsample(chroma: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """libjpeg's h2v2_fancy_upsample: triangle weights 3/4, 1/4 in both directions, its rounding bias."""
    n, h, w = chroma.shape
    padded = F.pad(chroma[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, :]
    above, below = padded[:, :-2, :], padded[:, 2:, :]
    columns = torch.stack([3 * centre + above, 3 * centre + below], dim=2).reshape(n, 2 * h, w + 2)
    middle = columns[:, :, 1:-1]
    left, right = columns[:, :, :-2], columns[:, :, 2:]
    even = 3 * middle + left + 8
    odd = 3 * middle + right + 7
    out = torch.stack([even, odd], dim=3).reshape(n, 2 * h, 2 * w) / 16.0
    return out + (torch.floor(out) - out).detach() if differentiable else torch.floor(out)


def jpeg_compress(images: torch.Tensor, qualities: torch.Tensor | list[int], differentiable: bool = False) -> torch.Tensor:
    """JPEG-compress and decode an N x 3 x H x W batch in [0, 1] with one integer quality per sample."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"jpeg_compress expects an N x 3 x H x W batch, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    qualities = torch.as_tensor(qualities, device=images.device)
    luma_table, chroma_table = quality_tables(qualities.reshape(n))
    x = _round(torch.clamp(images, 0, 1) * 255.0, differentiable)
    pad_h, pad_w = (-h) % 16, (-w) % 16
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = _round(0.29900 * r + 0.58700 * g + 0.11400 * b, differentiable)
    cb = _round(-0.16874 * r - 0.33126 * g + 0.50000 * b + 128.0 - 1.0 / 65536, differentiable)
    cr = _round(0.50000 * r - 0.41869 * g - 0.08131 * b + 128.0 - 1.0 / 65536, differentiable)

    y = _code_plane(y, luma_table, differentiable)
    chroma = torch.cat([_downsample(cb, differentiable), _downsample(cr, differentiable)])
    chroma = _code_plane(chroma, torch.cat([chroma_table, chroma_table]), differentiable)
    chroma = _upsample(chroma, differentiable) - 128.0
    cb, cr = chroma[:n], chroma[n:]

    red = y + _round(1.40200 * cr, differentiable)
    green = y + _round(-0.34414 * cb - 0.71414 * cr, differentiable)
    blue = y + _round(1.77200 * cb, differentiable)
    out = torch.clamp(torch.stack([red, green, blue], dim=1), 0, 255) / 255.0
    return out[:, :, :h, :w]
