"""Tiled VAE: exact with a full halo, far closer to untiled than independent tiles, hook and dtypes."""

from __future__ import annotations

import pytest
import torch

from diffsr.diffusion.tiny import tiny_vae
from diffsr.vae_tiling import (
    _spans,
    decoder_ops,
    tiled_decoder,
    tiled_encoder,
    tiled_vae,
)

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(seed=3)


def _independent_tiles(module, x, tile, halo, align, scale):
    """Each tile decoded on its own (per-tile GroupNorm), cores pasted: the seam-prone baseline."""
    out = None
    for y0, y1, ylo, yhi in _spans(x.shape[-2], tile, halo, align):
        for x0, x1, xlo, xhi in _spans(x.shape[-1], tile, halo, align):
            o = module(x[..., ylo:yhi, xlo:xhi])
            if out is None:
                out = torch.zeros(*o.shape[:2], int(x.shape[-2] * scale), int(x.shape[-1] * scale))
            s = lambda v, o=0: int((v - o) * scale)
            out[..., s(y0):s(y1), s(x0):s(x1)] = o[..., s(y0, ylo):s(y1, ylo), s(x0, xlo):s(x1, xlo)]
    return out


@torch.no_grad()
def test_full_halo_is_exact(vae):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 72, generator=gen) * 2 - 1
    assert torch.allclose(tiled_encoder(vae.encoder, image, tile=32, halo=1000), vae.encoder(image), atol=1e-5)
    latent = torch.randn(1, 4, 12, 20, generator=gen)
    events = []
    out = tiled_decoder(vae.decoder, latent, tile=8, halo=1000, on_progress=events.append)
    assert torch.allclose(out, vae.decoder(latent), atol=1e-5)
    assert events[-1].stage == "vae_decode" and events[-1].done == events[-1].total
    assert events[-1].total % 6 == 0  # 2 x 3 tiles per segment


@torch.no_grad()
def test_shared_statistics_beat_independent_tiles(vae):
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 32, 32, generator=gen)
    reference = vae.decoder(latent)
    shared = (tiled_decoder(vae.decoder, latent, tile=16) - reference).abs()
    alone = (_independent_tiles(vae.decoder, latent, 16, 11, 1, 8) - reference).abs()
    assert shared.max() < 2e-3 and shared.mean() < 1e-5
    assert alone.mean() > 100 * shared.mean()
    image = torch.rand(1, 3, 64, 128, generator=gen) * 2 - 1
    reference = vae.encoder(image)
    shared = (tiled_encoder(vae.encoder, image, tile=64, halo=32) - reference).abs()
    alone = (_independent_tiles(vae.encoder, image, 64, 32, 8, 1 / 8) - reference).abs()
    assert alone.mean() > 1.5 * shared.mean()


@torch.no_grad()
def test_hook_and_small_inputs(vae):
    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 24, 16, generator=gen)
    plain = vae.decode(latent).sample
    with tiled_vae(vae, decoder_tile=8, decoder_halo=1000):
        hooked = vae.decode(latent).sample
        small = vae.decode(latent[..., :8, :8]).sample  # fits one tile: the module's own path
    assert torch.allclose(hooked, plain, atol=1e-5)
    assert torch.equal(small, vae.decode(latent[..., :8, :8]).sample)
    assert "tiled_vae" not in repr(vae.decoder.forward)  # restored


@torch.no_grad()
def test_half_precision_statistics(vae):
    """bf16 tiles normalise with float32/float64 statistics: tiling adds no error beyond bf16's own."""
    gen = torch.Generator().manual_seed(4)
    latent = torch.randn(1, 4, 24, 24, generator=gen)
    reference = vae.decoder(latent)
    low = tiny_vae(seed=3).to(torch.bfloat16)
    untiled = (low.decoder(latent.bfloat16()).float() - reference).abs().mean()
    tiled = (tiled_decoder(low.decoder, latent.bfloat16(), tile=8, halo=1000).float() - reference).abs().mean()
    assert tiled < 1.5 * untiled


def test_unsupported_decoder_is_refused(vae):
    from diffusers.models.attention_processor import SpatialNorm

    decoder = tiny_vae(seed=0).decoder
    decoder.conv_norm_out = SpatialNorm(32, 4)
    with pytest.raises(NotImplementedError, match="spatial"):
        decoder_ops(decoder)


def _osediff_vae(root):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(root / "sd-tiny", subfolder="vae", torch_dtype=torch.float32).eval()


@torch.no_grad()
@pytest.mark.parametrize("stem", ["img1", "img2"])
def test_vaehook_mode_reproduces_osediff_tiled_decoder(stem):
    """OSEDiff case d (decoder tile 8, pad 11): the official hook's output, from its own denoised latent."""
    import numpy as np
    from conftest import shared_path

    root = shared_path("fixtures", "osediff")
    vae = _osediff_vae(root)
    denoised = torch.from_numpy(np.load(root / "expected" / "d_vaetile" / "intermediates" / f"{stem}.x_denoised.npy"))
    expected = np.load(root / "expected" / "d_vaetile" / f"{stem}.npy")
    z = vae.post_quant_conv(denoised / 0.18215)
    out = tiled_decoder(vae.decoder, z, tile=8, halo=11, statistics="vaehook").clamp(-1, 1)[0].numpy()
    assert np.abs(out - expected).max() <= 2e-4 and np.abs(out - expected).mean() <= 1e-5
    exact = tiled_decoder(vae.decoder, z, tile=8, halo=11).clamp(-1, 1)
    assert (exact - vae.decoder(z).clamp(-1, 1)).abs().max() < 1e-5  # the exact mode is the untiled result here
    assert np.abs(exact[0].numpy() - expected).max() > 0.1  # which the official hook is not


@torch.no_grad()
@pytest.mark.parametrize("stem", ["img1", "img2"])
def test_vaehook_mode_reproduces_osediff_tiled_encoder(stem):
    """OSEDiff case d (encoder tile 96, pad 32) on the LoRA'd encoder, merged as W + 2 B A."""
    import numpy as np
    from conftest import shared_path
    from PIL import Image

    root = shared_path("fixtures", "osediff")
    vae = _osediff_vae(root)
    lora = torch.load(root / "osediff_tiny.pkl", weights_only=True)["state_dict_vae"]
    modules = dict(vae.named_modules())
    for key, down in lora.items():
        if ".lora_A." in key:
            up = lora[key.replace(".lora_A.", ".lora_B.")].float()
            weight = modules[key.split(".lora_A.")[0]].weight
            weight += 2 * (torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down.float()) if down.ndim == 4 else up @ down.float())
    pixels = np.asarray(Image.open(root / "expected" / "preprocessed" / f"{stem}.png").convert("RGB"), dtype=np.float32) / 255
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2 - 1
    latent = vae.quant_conv(tiled_encoder(vae.encoder, image, tile=96, halo=32, statistics="vaehook")).chunk(2, 1)[0] * 0.18215
    expected = np.load(root / "expected" / "d_vaetile" / "intermediates" / f"{stem}.lq_latent.npy")
    assert np.abs(latent.numpy() - expected).max() <= 1e-5


def _decode(vae, latent, tile):
    return tiled_decoder(vae.decoder, vae.post_quant_conv(latent), tile=tile, halo=11)


def _seam_ratio(out, reference, tile, scale=8):
    """Error of horizontal differences at tile borders over the error elsewhere: ~1 means no seams."""
    error = ((out[..., 1:] - out[..., :-1]) - (reference[..., 1:] - reference[..., :-1])).abs()
    borders = [c * scale - 1 for c in range(tile, out.shape[-1] // scale, tile)]
    return float(error[..., borders].mean() / error.mean())


@torch.no_grad()
def test_sampled_statistics(vae):
    """Sequential tiles with statistics recorded on a sample of them: the exact mode when every tile is
    sampled; otherwise an estimate, off from untiled everywhere alike (no seams), unlike independent tiles."""
    gen = torch.Generator().manual_seed(1)
    latent = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16, generator=gen), size=(24, 64), mode="bicubic")
    untiled = vae.decoder(latent)
    exact = tiled_decoder(vae.decoder, latent, tile=8, halo=11)
    events = []
    everything = tiled_decoder(vae.decoder, latent, tile=8, halo=11, statistics="sampled", sample=64, on_progress=events.append)
    assert torch.allclose(everything, exact, atol=1e-5)
    assert [e.done for e in events] == list(range(1, events[-1].total + 1))
    with tiled_vae(vae, decoder_tile=8, statistics="sampled", sample=64):
        assert torch.allclose(vae.decode(latent).sample, _decode(vae, latent, 8), atol=1e-5)
    estimated = tiled_decoder(vae.decoder, latent, tile=8, halo=11, statistics="sampled", sample=4)
    assert not torch.allclose(estimated, exact, atol=1e-3)  # really estimated from part of the image
    independent = _independent_tiles(vae.decoder, latent, 8, 11, 1, 8)
    assert _seam_ratio(estimated, untiled, 8) < 1.2 < 1.5 < _seam_ratio(independent, untiled, 8)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    assert torch.allclose(tiled_encoder(vae.encoder, image, tile=32, halo=1000, statistics="sampled", sample=4),
                          vae.encoder(image), atol=1e-5)
