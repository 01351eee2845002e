"""Resampling of float images with Pillow's filters (antialiased when shrinking, exact in float32)."""

from __future__ import annotations

import numpy as np
from PIL import Image

FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def resize_array(array: np.ndarray, size: tuple[int, int], method: str = "lanczos") -> np.ndarray:
    """Resize an H x W x C float32 array to `size` = (height, width), one channel at a time."""
    height, width = size
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, c], dtype=np.float32), mode="F").resize((width, height), FILTERS[method]))
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)
