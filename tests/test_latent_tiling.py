"""Latent tiling: the official grids and windows, bit-exact blending against SUPIR's fixture, batching."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import shared_path

from diffsr.latent_tiling import (
    SCHEMES,
    TileScheme,
    tile_grid,
    tile_starts,
    tile_window,
    tiled_map,
)


def test_official_grids():
    # OSEDiff fixture case b: T=16, O=4 on 32x32 and 32x33 latents.
    assert tile_starts(32, 16, 4, "stablesr") == [0, 12, 16]
    assert tile_starts(33, 16, 4, "stablesr") == [0, 12, 17]
    # StableSR tile script: 48-latent pixel patch, tile 32, overlap 16; and its 512 px image in 384 px patches.
    assert tile_starts(48, 32, 16, "stablesr") == [0, 16]
    assert tile_starts(512, 384, 128, "spliter") == [0, 128]
    # SUPIR fixture case c: 16x24 latent, tile 16, stride 12 -> columns 0 and 8 (the remainder rule).
    assert tile_starts(24, 16, 4, "supir") == [0, 8]
    assert tile_starts(16, 16, 4, "supir") == [0]
    # InvSR: 128 px LR, patches of 64 with stride 32 -> 3 per axis (the fixture's 9 patches).
    assert tile_starts(128, 64, 32, "spliter") == [0, 32, 64]
    # StableSR's 200-step example: 160-latent, tile 64, overlap 32 -> 4 tiles.
    assert tile_starts(160, 64, 32, "stablesr") == [0, 32, 64, 96]


def test_grid_order_and_osediff_rules():
    tiles = tile_grid(32, 33, 16, 4, SCHEMES["osediff"])
    assert len(tiles) == 9 and (tiles[1].y0, tiles[1].x0) == (12, 0)  # x offsets outer, y inner
    assert [(t.y0, t.x0) for t in tile_grid(16, 24, 16, 4, SCHEMES["supir"])] == [(0, 0), (0, 8)]
    assert tile_grid(32, 32, 96, 32, SCHEMES["osediff"]) == [tile_grid(32, 32, 96, 32, SCHEMES["osediff"])[0]]
    # OSEDiff: area above T^2 but a side below T -> square tiles of the short side; overlap >= tile would hang there.
    tiles = tile_grid(32, 300, 96, 32, SCHEMES["osediff"])
    assert all(t.y1 - t.y0 == 32 and t.x1 - t.x0 == 32 for t in tiles) and tiles[-1].x1 == 300
    # Latents smaller than the tile (official StableSR crashes, #131): the tile shrinks.
    assert tile_grid(20, 100, 64, 32, SCHEMES["stablesr"])[0].y1 == 20
    with pytest.raises(ValueError, match="unknown tile grid"):
        tile_starts(10, 4, 1, "hexagonal")


def test_windows():
    w = tile_window(64, 64, "gaussian")
    g = lambda u, m: math.exp(-((u - m) ** 2) / 64**2 / 0.02) / math.sqrt(2 * math.pi * 0.01)
    assert w.dtype == torch.float64
    assert w[10, 20].item() == pytest.approx(g(10, 32) * g(20, 31.5), rel=1e-12)  # y centre T/2, x centre (T-1)/2
    assert w[0, 0] / w[32, 31] < 1e-5
    k = tile_window(512, 512, "opencv")
    sigma = 0.3 * (511 / 2 - 1) + 0.8
    assert sigma == pytest.approx(77.15)
    ref = np.exp(-((np.arange(513) - 256.0) ** 2) / (2 * sigma**2))
    ref = (ref / ref.sum())[1:]
    assert np.allclose(k[100].numpy(), ref[100] * ref, rtol=1e-12)
    assert torch.equal(tile_window(3, 5, "flat"), torch.ones(3, 5, dtype=torch.float64))
    for size in (64, 256):  # InvSR: cv2.getGaussianKernel(k + 1, sigma, CV_64F)[1:] on each axis
        taps = cv2.getGaussianKernel(size + 1, 0.3 * ((size - 1) * 0.5 - 1) + 0.8, cv2.CV_64F)[1:, 0]
        assert np.allclose(tile_window(size, size, "opencv")[size // 3].numpy(), taps[size // 3] * taps, rtol=1e-12, atol=0)


def test_supir_fixture_blend_is_bit_exact():
    root = shared_path("fixtures", "supir")
    case = json.loads((root / "cases.json").read_text())["cases"]["c_tiled"]
    tile_out = torch.from_numpy(np.load(root / "expected" / "c_tiled" / "tile_x_out.npy"))
    final = np.load(root / "expected" / "c_tiled" / "final_latent.npy")
    calls = case["tile_calls_in_order"][-2:]  # the last step's two tiles
    outputs = iter(tile_out[-2:])
    latent = torch.zeros(1, 4, 16, 24)
    seen = []

    def step(x):
        seen.append(x.shape)
        return next(outputs)[None]

    blended = tiled_map(step, {"x": latent}, tile=16, overlap=4, scheme="supir")
    assert [c["tile_rows_cols"] for c in calls] == [[0, 16, 0, 16], [0, 16, 8, 24]]
    assert np.array_equal(blended.numpy(), final)


def test_identity_batching_scale_and_progress():
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 40, 56, generator=gen)
    noise = torch.randn(2, 4, 40, 56, generator=gen)
    events = []
    plain = tiled_map(lambda x, n: x + n, {"x": latent, "n": noise}, 16, 8, "stablesr", on_progress=events.append)
    assert torch.allclose(plain, latent + noise, atol=1e-5)
    assert events[-1].done == events[-1].total == len(tile_grid(40, 56, 16, 8, SCHEMES["stablesr"]))
    batched = tiled_map(lambda x, n: x + n, {"x": latent, "n": noise}, 16, 8, "stablesr", batch_size=5)
    assert torch.allclose(plain, batched, atol=1e-6)
    calls = []

    def upscale(x):
        calls.append(x.shape[0])
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")

    up = tiled_map(upscale, {"x": latent}, 16, 8, TileScheme("spliter", "opencv", "y-major"), batch_size=3, scale=4)
    assert up.shape == (2, 4, 160, 224) and max(calls) == 6  # 3 tiles x batch of 2 images
    assert torch.allclose(up, torch.nn.functional.interpolate(latent, scale_factor=4, mode="nearest"), atol=1e-5)


def test_tiles_are_independent_calls():
    """A position-dependent function shows the blend: each output pixel is a convex mix of its tiles' values."""
    latent = torch.zeros(1, 1, 20, 20)
    counter = iter(range(1000))
    out = tiled_map(lambda x: torch.full_like(x, float(next(counter))), {"x": latent}, 8, 4, "stablesr")
    assert out.min() >= 0 and out.max() <= len(tile_grid(20, 20, 8, 4, SCHEMES["stablesr"])) - 1 + 1e-4
    assert out[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-3) and out[0, 0, -1, -1] > 7.9


@pytest.mark.filterwarnings("ignore")
@torch.no_grad()
def test_osediff_fixture_tiled_noise_prediction():
    """OSEDiff case b: its LoRA'd tiny UNet on 16x16 tiles (overlap 4) reproduces the official stitched eps."""
    from diffsr.diffusion.loading import load_base

    root = shared_path("fixtures", "osediff")
    unet = load_base(root / "sd-tiny", "sd21-base", components=("unet",)).unet
    lora = torch.load(root / "osediff_tiny.pkl", weights_only=True)["state_dict_unet"]
    modules = dict(unet.named_modules())
    unet.conv_in.weight.copy_(lora["conv_in.base_layer.weight"])
    unet.conv_in.bias.copy_(lora["conv_in.base_layer.bias"])
    for key, down in lora.items():  # peft LoRA with alpha 8, rank 4: W + 2 B A
        if ".lora_A." in key:
            up = lora[key.replace(".lora_A.", ".lora_B.")].float()
            weight = modules[key.split(".lora_A.")[0]].weight
            weight += 2 * (torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down.float()) if down.ndim == 4 else up @ down.float())
    for stem in ("img1", "img2"):
        stored = root / "expected" / "b_latenttile" / "intermediates"
        embeds = torch.from_numpy(np.load(stored / f"{stem}.prompt_embeds.npy"))
        latent = torch.from_numpy(np.load(stored / f"{stem}.lq_latent.npy"))
        expected = np.load(stored / f"{stem}.model_pred.npy")

        def eps(x, embeds=embeds):
            return unet(x, torch.tensor([999]), encoder_hidden_states=embeds.expand(x.shape[0], -1, -1)).sample

        for batch in (1, 4):
            out = tiled_map(eps, {"x": latent}, 16, 4, "osediff", batch_size=batch).numpy()
            assert np.abs(out - expected).max() <= 1e-4, (stem, batch)
