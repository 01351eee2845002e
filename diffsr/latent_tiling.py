"""Tiled latent denoising with Gaussian-weighted aggregation, with each official code's grid and window.

Large latents are cut into overlapping tiles, a function (a UNet call, a whole sampler step, a whole
pipeline) runs on batches of tiles, and the tile outputs are blended with a window that is large in
the tile centre and tiny at its edges, so tiles fade into each other. The methods differ in details
that change outputs, so each is selectable by name (`SCHEMES`) and the parts can be combined:

- grid "stablesr" (StableSR's canvas, also OSEDiff): the fewest tiles n with (n-1)(T-O)+T >= L,
  starts k(T-O), the last one flush with the border; x offsets in the outer loop.
- grid "supir": starts range(0, L-T+1, T-O), plus L-T when the stride does not reach it; row-major.
- grid "spliter" (ImageSpliterTh, StableSR's and InvSR's pixel patches): starts range(0, L, T-O),
  each clamped to L-T, duplicates dropped.
- window "gaussian": exp(-(u-m)^2 / (2*0.01*T^2)) / sqrt(2*pi*0.01) per axis in float64, with the
  official half-pixel asymmetry m_x = (T-1)/2, m_y = T/2; window "opencv": InvSR's
  cv2.getGaussianKernel(T+1, 0.3((T-1)/2-1)+0.8)[1:] per axis; window "flat": plain average.
- OSEDiff tiles only when h*w > T^2 and uses square tiles of min(T, h, w).

Products with the float64 window are added into float32 accumulators, as the official codes do, so
a port fed the same tile outputs reproduces the official blend bit for bit (tests/test_latent_tiling.py
checks this against SUPIR's fixture). Unlike the official codes, latents smaller than a tile are
handled (the tile shrinks to the latent) and OSEDiff's overlap >= tile hang becomes overlap = tile // 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from diffsr.progress import OptionalCallback, report

GRIDS = ("stablesr", "supir", "spliter")
WINDOWS = ("gaussian", "opencv", "flat")
ORDERS = ("x-major", "y-major")


@dataclass(frozen=True)
class LatentTile:
    """Rows [y0, y1) and columns [x0, x1) of one tile, in input (latent) coordinates."""

    y0: int
    y1: int
    x0: int
    x1: int


@dataclass(frozen=True)
class TileScheme:
    grid: str
    window: str
    order: str
    square: bool = False
    """OSEDiff: square tiles of min(T, h, w), and no tiling at all while h*w <= T^2."""


SCHEMES: dict[str, TileScheme] = {
    "stablesr": TileScheme("stablesr", "gaussian", "x-major"),
    "osediff": TileScheme("stablesr", "gaussian", "x-major", square=True),
    "supir": TileScheme("supir", "gaussian", "y-major"),
    "invsr": TileScheme("spliter", "opencv", "y-major"),
    "stablesr-pixel": TileScheme("spliter", "gaussian", "x-major"),
}


def tile_starts(length: int, tile: int, overlap: int, grid: str) -> list[int]:
    """Start offsets along one axis; `tile` must already be <= `length`."""
    stride = tile - overlap
    if tile > length or stride <= 0:
        raise ValueError(f"tile {tile} with overlap {overlap} does not fit a length of {length}")
    if grid == "stablesr":
        count = 1 if length <= tile else 1 + math.ceil((length - tile) / stride)
        return [min(k * stride, length - tile) for k in range(count)]
    if grid == "supir":
        starts = list(range(0, length - tile + 1, stride))
        if (length - tile) % stride:
            starts.append(length - tile)
        return starts
    if grid == "spliter":
        starts: list[int] = []
        for start in range(0, length, stride):
            start = min(start, length - tile)
            if start not in starts:
                starts.append(start)
        return starts
    raise ValueError(f"unknown tile grid '{grid}'; use one of {', '.join(GRIDS)}")


def tile_grid(height: int, width: int, tile: int, overlap: int, scheme: TileScheme) -> list[LatentTile]:
    """The tiles covering a height x width latent, in the scheme's visiting order."""
    if scheme.square:
        if height * width <= tile * tile:
            return [LatentTile(0, height, 0, width)]
        tile = min(tile, height, width)
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows = tile_starts(height, tile_h, overlap if overlap < tile_h else tile_h // 2, scheme.grid)
    cols = tile_starts(width, tile_w, overlap if overlap < tile_w else tile_w // 2, scheme.grid)
    if scheme.order == "x-major":
        return [LatentTile(y, y + tile_h, x, x + tile_w) for x in cols for y in rows]
    if scheme.order == "y-major":
        return [LatentTile(y, y + tile_h, x, x + tile_w) for y in rows for x in cols]
    raise ValueError(f"unknown tile order '{scheme.order}'; use one of {', '.join(ORDERS)}")


def _gaussian_1d(size: int, centre: float) -> torch.Tensor:
    var = 0.01
    u = torch.arange(size, dtype=torch.float64)
    return torch.exp(-((u - centre) ** 2) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)


def _opencv_1d(size: int) -> torch.Tensor:
    """cv2.getGaussianKernel(size + 1, sigma)[1:] for even sizes (InvSR); getGaussianKernel(size, sigma) for odd."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    taps = size + 1 if size % 2 == 0 else size
    u = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    kernel = torch.exp(-(u**2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    return kernel[1:] if size % 2 == 0 else kernel


def tile_window(height: int, width: int, window: str) -> torch.Tensor:
    """The float64 blending weight of one tile (height x width, output resolution)."""
    if window == "gaussian":
        return torch.outer(_gaussian_1d(height, height / 2), _gaussian_1d(width, (width - 1) / 2))
    if window == "opencv":
        return torch.outer(_opencv_1d(height), _opencv_1d(width))
    if window == "flat":
        return torch.ones(height, width, dtype=torch.float64)
    raise ValueError(f"unknown tile window '{window}'; use one of {', '.join(WINDOWS)}")


TileFunction = Callable[..., torch.Tensor]


def tiled_map(fn: TileFunction, inputs: Mapping[str, torch.Tensor], tile: int, overlap: int, scheme: str | TileScheme = "stablesr",
              batch_size: int = 1, scale: int = 1, on_progress: OptionalCallback = None,
              accumulate: torch.dtype = torch.float32) -> torch.Tensor:
    """Run `fn(**crops)` on tiles of every tensor in `inputs` (N x C x H x W, same H x W) and blend the results.

    `accumulate` is the dtype of the weighted sums: float32 as most official codes; InvSR's
    ImageSpliterTh sums in float64 (pass torch.float64 to reproduce it).

    `fn` gets the crops of a batch of tiles concatenated along dim 0 and returns one output per crop,
    of size (h*scale, w*scale); inputs that must be shared by all tiles (prompt embeddings, the
    timestep) belong in a closure, not in `inputs`. A full-size noise tensor in `inputs` is cropped
    per tile, as SUPIR does with its churn noise.
    """
    scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    if not inputs:
        raise ValueError("tiled_map needs at least one input tensor")
    first = next(iter(inputs.values()))
    n, height, width = first.shape[0], first.shape[-2], first.shape[-1]
    for name, tensor in inputs.items():
        if tensor.shape[0] != n or tensor.shape[-2:] != first.shape[-2:]:
            raise ValueError(f"tiled_map: input '{name}' has shape {tuple(tensor.shape)}, others {tuple(first.shape)}")
    tiles = tile_grid(height, width, tile, overlap, scheme)
    if len(tiles) == 1 and (tiles[0].y1 - tiles[0].y0, tiles[0].x1 - tiles[0].x0) == (height, width):
        report(on_progress, "tiles", 1, 1)
        return fn(**inputs)  # one tile covering everything: no window, exactly the untiled result
    batch_size = max(1, batch_size)
    accumulator = count = None
    window_cache: dict[tuple[int, int], torch.Tensor] = {}
    out_dtype = None
    for done in range(0, len(tiles), batch_size):
        group = tiles[done : done + batch_size]
        crops = {name: torch.cat([t[..., g.y0 : g.y1, g.x0 : g.x1] for g in group]) for name, t in inputs.items()}
        outputs = fn(**crops)
        if accumulator is None:
            out_dtype = outputs.dtype
            accumulator = torch.zeros(n, outputs.shape[1], height * scale, width * scale, dtype=accumulate, device=outputs.device)
            count = torch.zeros(1, 1, height * scale, width * scale, dtype=accumulate, device=outputs.device)
        for index, g in enumerate(group):
            size = ((g.y1 - g.y0) * scale, (g.x1 - g.x0) * scale)
            if size not in window_cache:
                window_cache[size] = tile_window(*size, scheme.window).to(outputs.device)
            weight = window_cache[size]
            region = (..., slice(g.y0 * scale, g.y1 * scale), slice(g.x0 * scale, g.x1 * scale))
            accumulator[region] += outputs[index * n : (index + 1) * n] * weight
            count[region] += weight
        report(on_progress, "tiles", min(done + batch_size, len(tiles)), len(tiles))
    return (accumulator / count).to(out_dtype)
