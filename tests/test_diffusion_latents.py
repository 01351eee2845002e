"""encode/decode: the same numbers as diffusers' own path, injected posterior noise, tiling switch."""

from __future__ import annotations

import pytest
import torch

from diffsr.diffusion.latents import VAETiles, decode, encode
from diffsr.diffusion.runtime import NoiseSource
from diffsr.diffusion.tiny import tiny_vae

pytestmark = pytest.mark.filterwarnings("ignore")


@torch.no_grad()
def test_matches_diffusers_and_injection():
    vae = tiny_vae(seed=1)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 48, generator=gen) * 2 - 1
    dist = vae.encode(image).latent_dist
    assert torch.allclose(encode(vae, image), dist.mean * 0.18215, atol=1e-6)
    eps = torch.randn(dist.mean.shape, generator=gen)
    sampled = encode(vae, image, NoiseSource(injected=[eps]))
    assert torch.allclose(sampled, (dist.mean + dist.std * eps) * 0.18215, atol=1e-6)
    latents = torch.randn(1, 4, 8, 6, generator=gen)
    assert torch.allclose(decode(vae, latents), vae.decode(latents / 0.18215).sample, atol=1e-6)
    tiles = VAETiles(encoder_tile=32, decoder_tile=4, encoder_halo=1000, decoder_halo=1000)
    assert torch.allclose(encode(vae, image, tiles=tiles), encode(vae, image), atol=1e-5)
    assert torch.allclose(decode(vae, latents, tiles=tiles), decode(vae, latents), atol=1e-5)


def test_tiles_from_options_reach_the_tiled_vae():
    from diffsr.diffusion.runtime import vae_tiling_options

    values = vae_tiling_options(encoder_tile=128, decoder_tile=16, statistics="sampled").defaults()
    tiles = VAETiles.from_options(values, decoder_halo=3)
    assert tiles == VAETiles(128, 16, decoder_halo=3, statistics="sampled")
    assert VAETiles.from_options({**values, "vae_tiling": False}) is None
    with pytest.raises(ValueError, match="vae-statistics"):
        vae_tiling_options().validate({"vae_statistics": "guess"})
    vae = tiny_vae(seed=1)
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    small = VAETiles(decoder_tile=4, decoder_halo=1)
    exact = decode(vae, latents, tiles=small)
    assert not torch.allclose(decode(vae, latents, tiles=VAETiles(decoder_tile=4, decoder_halo=1, statistics="vaehook")), exact, atol=1e-4)
