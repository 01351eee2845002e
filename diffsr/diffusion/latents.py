"""Image <-> latent through a diffusers AutoencoderKL, with the methods' shared conventions.

All four SD-based methods encode with a posterior *sample* (mean + std * randn, log-variance clamped
to [-30, 20]) times the VAE's scaling factor, and decode latents / scaling factor. Drawing that
randn through `NoiseSource` lets parity tests inject the official draw; `tiles` switches the
encoder/decoder to `diffsr.vae_tiling` for large images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffsr.diffusion.runtime import NoiseSource
from diffsr.progress import OptionalCallback
from diffsr.vae_tiling import tiled_decoder, tiled_encoder


@dataclass(frozen=True)
class VAETiles:
    """Tile sizes for `encode`/`decode`: image pixels for the encoder, latent pixels for the decoder."""

    encoder_tile: int = 512
    decoder_tile: int = 64
    encoder_halo: int = 64
    decoder_halo: int = 11
    statistics: str = "exact"
    """GroupNorm statistics across tiles (diffsr.vae_tiling.STATISTICS): exact, sampled or vaehook."""

    @classmethod
    def from_options(cls, values: dict, **official: int) -> VAETiles | None:
        """The tiles the `vae_tiling_options` values ask for (None when tiling is off); `official` sets halos."""
        if not values.get("vae_tiling", True):
            return None
        return cls(int(values.get("vae_encoder_tile", cls.encoder_tile)), int(values.get("vae_decoder_tile", cls.decoder_tile)),
                   statistics=str(values.get("vae_statistics", "exact")), **official)


def _moments(vae: torch.nn.Module, image: torch.Tensor, tiles: VAETiles | None, on_progress: OptionalCallback) -> torch.Tensor:
    if tiles is None:
        hidden = vae.encoder(image)
    else:
        hidden = tiled_encoder(vae.encoder, image, tiles.encoder_tile, tiles.encoder_halo, on_progress=on_progress,
                               statistics=tiles.statistics)
    return vae.quant_conv(hidden.to(vae.quant_conv.weight.dtype)) if vae.quant_conv is not None else hidden


@torch.no_grad()
def encode(vae: torch.nn.Module, image: torch.Tensor, noise: NoiseSource | None = None, tiles: VAETiles | None = None,
           on_progress: OptionalCallback = None) -> torch.Tensor:
    """Scaled latents of `image` (N x 3 x H x W in [-1, 1]); a posterior sample when `noise` is given, else the mean."""
    mean, logvar = _moments(vae, image, tiles, on_progress).chunk(2, dim=1)
    if noise is not None:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        mean = mean + std * noise.randn_like(mean, role="vae_posterior")
    return mean * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, tiles: VAETiles | None = None, on_progress: OptionalCallback = None) -> torch.Tensor:
    """Image in [-1, 1] (not clamped) from scaled latents."""
    z = latents / vae.config.scaling_factor
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z.to(vae.post_quant_conv.weight.dtype))
    if tiles is None:
        return vae.decoder(z)
    return tiled_decoder(vae.decoder, z, tiles.decoder_tile, tiles.decoder_halo, on_progress=on_progress,
                         statistics=tiles.statistics)
