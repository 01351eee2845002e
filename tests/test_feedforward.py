"""The feed-forward Upscaler: modes, alpha, bit depth, outscale, dtypes, tiling, input types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffsr import Upscaler
from diffsr.io.image import ImageData
from tiny_models import compact_state, gradient_image, rrdb_state, save_pth


@pytest.fixture(scope="module")
def tiny_rrdb(tmp_path_factory):
    path = save_pth(tmp_path_factory.mktemp("w") / "tiny_rrdb.pth", rrdb_state())
    return Upscaler.from_pretrained(path, device="cpu", dtype="fp32")


def _image(channels=3, alpha=False, depth=8):
    pixels = gradient_image(24, 20).astype(np.float32) / 255
    pixels = pixels[:, :, :1] if channels == 1 else pixels
    a = np.linspace(0, 1, 24 * 20, dtype=np.float32).reshape(24, 20) if alpha else None
    return ImageData(pixels=pixels, alpha=a, bit_depth=depth)


def test_rgb_is_upscaled_by_the_model_scale(tiny_rrdb):
    out = tiny_rrdb.upscale(_image())
    assert out.pixels.shape == (96, 80, 3) and out.pixels.dtype == np.float32
    assert 0 <= out.pixels.min() and out.pixels.max() <= 1


def test_grey_stays_grey_and_alpha_is_kept(tiny_rrdb):
    out = tiny_rrdb.upscale(_image(channels=1, alpha=True))
    assert out.pixels.shape == (96, 80, 1) and out.alpha.shape == (96, 80)
    bicubic = tiny_rrdb.upscale(_image(alpha=True), alpha_upsampler="bicubic")
    assert abs(float(bicubic.alpha.mean()) - 0.5) < 0.02  # a ramp stays a ramp


def test_any_outscale_is_resampled(tiny_rrdb):
    assert tiny_rrdb.upscale(_image(), outscale=2.5).pixels.shape == (60, 50, 3)
    assert tiny_rrdb.upscale(_image(), outscale=1).pixels.shape == (24, 20, 3)
    with pytest.raises(ValueError, match="outscale"):
        tiny_rrdb.upscale(_image(), outscale=-1)


def test_sixteen_bit_steps_below_one_eight_bit_level_reach_the_output(tmp_path):
    up = Upscaler.from_pretrained(save_pth(tmp_path / "c.pth", compact_state()), device="cpu", dtype="fp32")
    image = _image(depth=16)
    nudged = image.with_pixels(np.clip(image.pixels + 40 / 65535, 0, 1), None)
    a, b = up.upscale(image), up.upscale(nudged)
    assert a.bit_depth == 16
    assert np.abs(a.pixels - b.pixels).mean() > 5 / 65535


def test_tiled_call_matches_untiled_for_compact(tmp_path):
    path = save_pth(tmp_path / "c.pth", compact_state(), key="params")
    up = Upscaler.from_pretrained(path, device="cpu", dtype="fp32")
    image = ImageData(pixels=gradient_image(64, 72).astype(np.float32) / 255)
    whole = up.upscale(image, tile=1000)
    seen = []
    tiled = up.upscale(image, tile=32, on_progress=seen.append)
    assert seen[-1].stage == "tiles" and seen[-1].total > 1
    assert np.abs(np.rint(whole.pixels * 255) - np.rint(tiled.pixels * 255)).max() <= 1


def test_input_types_round_trip(tiny_rrdb):
    pil = Image.fromarray(gradient_image(24, 20))
    out = tiny_rrdb(pil)
    assert isinstance(out, Image.Image) and out.size == (80, 96) and out.mode == "RGB"
    array = tiny_rrdb(gradient_image(24, 20))
    assert array.dtype == np.uint8 and array.shape == (96, 80, 3)
    rgba = tiny_rrdb(np.dstack([gradient_image(24, 20), np.full((24, 20), 255, np.uint8)]))
    assert rgba.shape == (96, 80, 4)
    with pytest.raises(TypeError):
        tiny_rrdb(12)


def test_bf16_on_cpu_keeps_the_pixel_layer_in_fp32(tmp_path):
    up32 = Upscaler.from_pretrained(save_pth(tmp_path / "r.pth", rrdb_state()), device="cpu", dtype="fp32")
    up16 = Upscaler.from_pretrained(tmp_path / "r.pth", device="cpu", dtype="bf16")
    first = next(m for m in up16.descriptor.model.modules() if type(m).__name__ == "_Fp32Conv")
    assert first.conv.weight.dtype == torch.float32
    a, b = up32.upscale(_image()).pixels, up16.upscale(_image()).pixels
    assert np.abs(a - b).max() < 0.05


def test_settings_describe_the_run(tiny_rrdb):
    settings = tiny_rrdb.settings(outscale=2.0, tile=0)
    assert settings["model"] == "tiny_rrdb" and settings["outscale"] == 2.0 and settings["dtype"] == "float32"


def test_auto_tile_is_bounded_by_memory(tiny_rrdb, monkeypatch):
    import diffsr.pipelines.feedforward as ff

    monkeypatch.setattr(ff, "available_memory", lambda device: 64 * 2**20)
    tile = tiny_rrdb.choose_tile(4000, 4000)
    assert 32 <= tile < 200
    monkeypatch.setattr(ff, "available_memory", lambda device: 16 * 2**30)
    assert tiny_rrdb.choose_tile(50, 40) == 50  # small enough to run whole
