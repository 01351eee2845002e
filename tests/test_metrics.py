"""PSNR, SSIM, NIQE and the metric registry, on images whose scores are known in closed form."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from diffsr.metrics import METRICS, MetricError, create_metric, luma_bt601, luma_yiq, niqe, parse_metric_names, psnr, ssim
from diffsr.metrics.niqe import matlab_imresize_half, pristine_model


def _texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour texture on 8-bit levels (like a decoded photo)."""
    rng = np.random.default_rng(seed)
    small = rng.random((height // 8 + 2, width // 8 + 2, 3))
    big = np.kron(small, np.ones((8, 8, 1)))[:height, :width]
    blurred = (big + np.roll(big, 3, 0) + np.roll(big, 3, 1) + np.roll(big, (5, 5), (0, 1))) / 4
    return (np.round(blurred * 255) / 255).astype(np.float32)


def _pink_noise(size: int, seed: int = 0) -> np.ndarray:
    """Grey 1/f noise on 8-bit levels: the power spectrum of natural photographs, which NIQE models."""
    rng = np.random.default_rng(seed)
    radius2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None] ** 2
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / np.sqrt(np.maximum(radius2, size**-2))
    image = np.real(np.fft.ifft2(spectrum))
    image = (image - image.min()) / (image.max() - image.min())
    return (np.round(np.repeat(image[:, :, None], 3, axis=2) * 255) / 255).astype(np.float32)


def test_bt601_luma_is_studio_range():
    pixels = np.array([[[0, 0, 0], [1, 1, 1], [1, 0, 0]]], dtype=np.float32)
    assert np.allclose(luma_bt601(pixels)[0], [16 / 255, 235 / 255, (65.481 + 16) / 255], atol=1e-6)
    assert np.allclose(luma_yiq(pixels)[0], [0.0, 1.0, 0.299], atol=1e-6)


def test_psnr_of_a_constant_offset():
    ref = np.full((16, 16, 3), 0.5, dtype=np.float32)
    pred = ref + np.float32(0.1)
    assert psnr(pred, ref) == pytest.approx(10 * math.log10(1 / (0.01 + 1e-8)), abs=1e-4)
    assert psnr(ref, ref) == pytest.approx(80.0)  # pyiqa's eps keeps identical images finite


def test_psnr_on_y_sees_only_luma():
    ref = np.full((8, 8, 3), 0.5, dtype=np.float32)
    pred = ref.copy()
    pred[..., 0] += 0.1  # red up: Y moves by 0.1 * 65.481 / 255
    expected_mse = (0.1 * 65.481 / 255) ** 2
    assert psnr(pred, ref, y_channel=True) == pytest.approx(10 * math.log10(1 / (expected_mse + 1e-8)), abs=1e-3)
    assert psnr(pred, ref, y_channel=False) == pytest.approx(10 * math.log10(1 / (0.01 / 3 + 1e-8)), abs=1e-3)


def test_crop_border_ignores_the_edges():
    ref = _texture(32, 32)
    pred = ref.copy()
    pred[:4] = 0
    assert psnr(pred, ref) < 30
    assert psnr(pred, ref, crop_border=4) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(pred, ref, crop_border=16)


def test_ssim_of_flat_images_has_a_closed_form():
    a, b = 100 / 255, 110 / 255
    x = np.full((32, 32, 1), a, dtype=np.float32)
    y = np.full((32, 32, 1), b, dtype=np.float32)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)  # variances and covariance are zero
    assert ssim(x, y) == pytest.approx(expected, abs=1e-6)  # the window is float32, as pyiqa stores it


def test_ssim_orders_degradations_and_is_one_for_identity():
    ref = _texture(64, 64)
    rng = np.random.default_rng(1)
    slight = np.clip(ref + rng.normal(0, 0.02, ref.shape), 0, 1).astype(np.float32)
    strong = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1).astype(np.float32)
    assert ssim(ref, ref, y_channel=True) == pytest.approx(1.0)
    assert 1.0 > ssim(slight, ref) > ssim(strong, ref) > 0.0


def test_grey_against_colour_is_compared_as_colour():
    grey = _texture(32, 32)[:, :, :1]
    rgb = np.repeat(grey, 3, axis=2)
    assert psnr(grey, rgb) == pytest.approx(80.0)
    assert ssim(grey, rgb, y_channel=True) == pytest.approx(1.0)


def test_size_mismatch_and_tiny_images_are_refused():
    with pytest.raises(ValueError, match="size mismatch: result 16x8, ground truth 16x16"):
        psnr(np.zeros((8, 16, 3)), np.zeros((16, 16, 3)))
    with pytest.raises(ValueError, match="SSIM needs at least 11x11"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="NIQE needs at least 96x96"):
        niqe(np.zeros((64, 200, 3)))


def test_pristine_parameters_ship_with_the_package():
    mean, cov = pristine_model()
    assert mean.shape == (36,) and cov.shape == (36, 36)
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)


def test_matlab_half_resize_keeps_constants_and_averages_ramps():
    constant = torch.full((1, 1, 20, 24), 0.3, dtype=torch.float64)
    assert torch.allclose(matlab_imresize_half(constant), torch.full((1, 1, 10, 12), 0.3, dtype=torch.float64), atol=1e-6)
    ramp = torch.arange(40, dtype=torch.float64).repeat(1, 1, 8, 1)  # columns 0..39
    half = matlab_imresize_half(ramp)[0, 0, 0]
    # away from the mirrored edges, output column i sits between input columns 2i and 2i+1
    assert torch.allclose(half[3:-3], torch.arange(3, 17, dtype=torch.float64) * 2 + 0.5, atol=1e-4)


def test_niqe_rises_with_noise_and_survives_flat_regions():
    clean = _pink_noise(192)
    noisy = np.clip(clean + np.random.default_rng(2).normal(0, 0.08, clean.shape), 0, 1).astype(np.float32)
    assert 3 < niqe(clean) < 10 < niqe(noisy)
    clipped = clean.copy()
    clipped[:, :96] = 1.0  # a saturated half: its blocks have no negative coefficients
    assert math.isfinite(niqe(clipped))
    assert niqe(clean) == niqe(clean.copy())


def test_metric_names_are_checked():
    assert parse_metric_names("PSNR, ssim,niqe,psnr", True) == ["psnr", "ssim", "niqe"]
    with pytest.raises(MetricError, match="unknown metric\\(s\\) psnrr; available: psnr"):
        parse_metric_names("psnrr", True)
    with pytest.raises(MetricError, match="psnr, lpips compare with the ground truth; pass --gt"):
        parse_metric_names("psnr,niqe,lpips", False)
    assert parse_metric_names("niqe,musiq", False) == ["niqe", "musiq"]
    assert {m for m, info in METRICS.items() if info.backend == "pyiqa"} == {"lpips", "dists", "musiq", "clipiqa", "maniqa", "fid"}


def test_pyiqa_metric_without_pyiqa_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa raises ImportError
    with pytest.raises(MetricError, match="pyiqa is not installed; pip install pyiqa .*Noncommercial"):
        create_metric("lpips")


def test_pyiqa_metric_without_weights_names_the_folder(monkeypatch):
    def create_metric_offline(name, device, as_loss):
        raise OSError("<urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric_offline))
    with pytest.raises(MetricError, match=r"musiq: pyiqa could not load its network \(OSError: .*unreachable.*nothing is downloaded here.*pyiqa"):
        create_metric("musiq")


def test_pyiqa_metric_receives_rgb_tensors(monkeypatch):
    seen = []

    def network(*tensors):
        seen.append([tuple(t.shape) for t in tensors])
        return torch.tensor([[0.25]])

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=lambda name, device, as_loss: network))
    lpips = create_metric("lpips", crop_border=2)
    grey = np.zeros((20, 24, 1), dtype=np.float32)
    assert lpips(grey, np.zeros((20, 24, 3), dtype=np.float32)) == 0.25
    assert seen == [[(1, 3, 16, 20), (1, 3, 16, 20)]]
