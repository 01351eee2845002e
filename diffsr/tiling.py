"""Tiled inference with overlap and feathered blending, and automatic retry in smaller tiles.

A model runs on overlapping windows of the input; each window's output is weighted by a window
that is 1 over the tile's own core and ramps towards 0 across the overlap, so neighbouring tiles
fade into each other instead of meeting at a seam. Peak model memory depends on the tile size,
not on the image size. A tile that runs out of memory is split into four and retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffsr.progress import OptionalCallback, report
from diffsr.runtime import is_out_of_memory, release_cached_memory

MIN_TILE = 32


@dataclass(frozen=True)
class Span:
    """A tile's core [start, stop) and the window [lo, hi) that the model sees, along one axis."""

    start: int
    stop: int
    lo: int
    hi: int


def split_axis(length: int, tile: int, overlap: int) -> list[Span]:
    """Cut [0, length) into near-equal cores of at most `tile`, each widened by `overlap` on both sides."""
    count = max(1, -(-length // max(tile, 1)))
    bounds = [round(i * length / count) for i in range(count + 1)]
    return [
        Span(start, stop, max(0, start - overlap), min(length, stop + overlap))
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]


def feather(span: Span, scale: int, device: torch.device | None = None) -> torch.Tensor:
    """1-D blending weights over the window of `span` at output resolution.

    Where a neighbour exists, the weight ramps linearly from 1 to 0 across a band of a quarter of
    the overlap centred on the core's edge; the neighbour's ramp mirrors it, so the weights sum to
    one. Pixels near a window's edge, which the cut has changed, never get any weight: a tile only
    contributes where it is at least 7/8 of the overlap away from its own border.
    """
    positions = torch.arange(span.lo * scale, span.hi * scale, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones_like(positions)
    left, right = span.start - span.lo, span.hi - span.stop
    for margin, distance in ((left, positions - span.start * scale), (right, span.stop * scale - positions)):
        if margin:
            band = max(margin / 4, 0.5) * scale
            weight *= (distance / band + 0.5).clamp(0, 1)
    return weight


TileFunction = Callable[[torch.Tensor], torch.Tensor]


class TiledRunner:
    """Runs `fn` (N x C x h x w -> N x C' x h*scale x w*scale) over tiles of a large input."""

    def __init__(
        self,
        fn: TileFunction,
        scale: int,
        tile: int,
        overlap: int,
        device: torch.device,
        on_progress: OptionalCallback = None,
        min_tile: int = MIN_TILE,
    ):
        self.fn, self.scale, self.tile, self.overlap = fn, scale, tile, overlap
        self.device, self.on_progress, self.min_tile = device, on_progress, min_tile
        self.smallest_tile_used = tile

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """`image` is N x C x H x W on the CPU; the result is float32 on the CPU."""
        _, _, height, width = image.shape
        self._image = image
        self._out: torch.Tensor | None = None
        self._weight = torch.zeros(1, 1, height * self.scale, width * self.scale)
        tiles = [(ys, xs) for ys in split_axis(height, self.tile, self.overlap) for xs in split_axis(width, self.tile, self.overlap)]
        self._done, self._total = 0, len(tiles)
        report(self.on_progress, "tiles", 0, self._total)
        for ys, xs in tiles:
            self._run_tile(ys, xs, min(self.tile, max(ys.stop - ys.start, xs.stop - xs.start)))
        assert self._out is not None
        out = self._out
        out /= self._weight
        self._image = self._out = None
        return out

    def _run_tile(self, ys: Span, xs: Span, size: int) -> None:
        window = self._image[:, :, ys.lo : ys.hi, xs.lo : xs.hi]
        try:
            result = self.fn(window)
        except Exception as exc:  # out-of-memory comes as several exception types
            if not is_out_of_memory(exc):
                raise
            release_cached_memory(self.device)
            half = size // 2
            if half < self.min_tile:
                raise MemoryError(
                    f"out of memory even for {size}px tiles; free memory, use a smaller model or --device cpu"
                ) from exc
            self.smallest_tile_used = min(self.smallest_tile_used, half)
            sub_y = _subspans(ys, half, self.overlap, self._image.shape[2])
            sub_x = _subspans(xs, half, self.overlap, self._image.shape[3])
            self._total += len(sub_y) * len(sub_x) - 1
            for sy in sub_y:
                for sx in sub_x:
                    self._run_tile(sy, sx, half)
            return
        self._accumulate(result.float().cpu(), ys, xs)
        self._done += 1
        report(self.on_progress, "tiles", self._done, self._total)

    def _accumulate(self, result: torch.Tensor, ys: Span, xs: Span) -> None:
        s = self.scale
        expected = ((ys.hi - ys.lo) * s, (xs.hi - xs.lo) * s)
        if tuple(result.shape[-2:]) != expected:
            raise RuntimeError(f"model returned {tuple(result.shape[-2:])} for a tile, expected {expected}")
        if self._out is None:
            n, c = result.shape[:2]
            self._out = torch.zeros(n, c, self._weight.shape[2], self._weight.shape[3])
        weight = feather(ys, s)[:, None] * feather(xs, s)[None, :]
        region = (slice(None), slice(None), slice(ys.lo * s, ys.hi * s), slice(xs.lo * s, xs.hi * s))
        self._out[region] += result * weight
        self._weight[region] += weight


def _subspans(span: Span, tile: int, overlap: int, length: int) -> list[Span]:
    """Split a core into smaller cores, each widened by the overlap within the whole image."""
    parts = split_axis(span.stop - span.start, tile, 0)
    return [
        Span(span.start + p.start, span.start + p.stop, max(0, span.start + p.start - overlap), min(length, span.start + p.stop + overlap))
        for p in parts
    ]
