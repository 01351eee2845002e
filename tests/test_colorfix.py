"""Colour fixes: hand-computed values, invariants, and the official fixtures' stored outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from diffsr.colorfix import (
    adain_color_fix,
    color_fix,
    wavelet_blur,
    wavelet_color_fix,
    wavelet_decomposition,
)


def _png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def test_adain_known_values():
    target = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2)
    source = torch.tensor([10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 2, 2)
    t_std = (5 / 3 + 1e-5) ** 0.5  # unbiased variance of 0..3 is 5/3
    s_std = (500 / 3 + 1e-5) ** 0.5
    expected = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / t_std * s_std + 25
    assert torch.allclose(adain_color_fix(target, source).flatten(), expected, atol=1e-5)


def test_adain_per_channel_and_dtype():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 9, generator=gen)
    source = torch.rand(2, 3, 5, 4, generator=gen) * 0.5 + 0.2
    out = adain_color_fix(target, source)
    assert torch.allclose(out.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.flatten(2).std(dim=2), source.flatten(2).std(dim=2), atol=1e-3)
    half = adain_color_fix(target.half(), source.half())
    assert half.dtype == torch.float16
    assert (half.float() - out).abs().max() < 5e-3


def test_wavelet_blur_impulse_at_dilation():
    image = torch.zeros(1, 3, 9, 9)
    image[:, :, 4, 4] = 1.0
    blurred = wavelet_blur(image, 2)
    assert blurred[0, 0, 4, 4] == pytest.approx(0.25)
    assert blurred[0, 0, 2, 4] == pytest.approx(0.125)
    assert blurred[0, 0, 6, 6] == pytest.approx(0.0625)
    assert blurred[0, 0, 3, 4] == 0.0  # only the dilated taps are non-zero
    assert blurred.sum() == pytest.approx(3.0)


def test_wavelet_invariants():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 20, 24, generator=gen)
    high, low = wavelet_decomposition(image)
    assert torch.allclose(high + low, image, atol=1e-6)
    flat = torch.full_like(image, 0.3)
    assert torch.allclose(wavelet_color_fix(image, flat), high + 0.3, atol=1e-6)
    assert torch.allclose(wavelet_color_fix(flat, image), low, atol=1e-6)  # a flat target has no detail
    with pytest.raises(ValueError, match="reference at the output size"):
        wavelet_color_fix(image, image[:, :, :10])
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(image, image, "histogram")
    assert color_fix(image, flat, "none") is image


@pytest.mark.parametrize("method", ["adain", "wavelet"])
@pytest.mark.parametrize("stem", ["img1", "img2"])
def test_osediff_fixture(method, stem):
    """OSEDiff fixes 8-bit images in [0, 1]: target = case-a PNG, source = the preprocessed input."""
    root = shared_path("fixtures", "osediff", "expected")
    target = _png(root / "a_notile" / f"{stem}.png")
    source = _png(root / "preprocessed" / f"{stem}.png")
    expected = np.load(root / f"c_{method}" / f"{stem}.npy")
    out = color_fix(target, source, method).clamp(0, 1)[0].numpy()
    assert np.abs(out - expected).max() <= 1e-5


def test_supir_fixture_wavelet():
    """SUPIR fixes in [-1, 1] towards its stage-1 image, without clamping."""
    root = shared_path("fixtures", "supir", "expected")
    decoded = torch.from_numpy(np.load(root / "a_default" / "decoded_before_colorfix.npy"))
    stage1 = torch.from_numpy(np.load(root / "common" / "A_Canon_10_x1_crop" / "x_stage1.npy"))
    expected = np.load(root / "a_default" / "output.npy")
    assert np.abs(wavelet_color_fix(decoded, stage1).numpy() - expected).max() <= 1e-6
