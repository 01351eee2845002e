"""SUPIR's restoration-guided EDM sampler (RestoreEDMSampler / TiledRestoreEDMSampler), as a plain loop.

NON-COMMERCIAL (see diffsr.noncommercial). Why a custom loop: diffusers' Euler scheduler with churn
evaluates the model on the un-churned sample at the nominal timestep; SUPIR churns first, then
evaluates at sigma_hat *quantised to the nearest of the 1000 training sigmas* (c_in, c_out and the
integer timestep come from that), steps Euler with the unquantised sigma_hat, scales CFG linearly
in sigma_hat, and pulls x0 toward the stage-1 latent with weight (sigma / 14.6146)^tau (sigma
before churn). The constants are the official ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from diffsr.diffusion.runtime import NoiseSource
from diffsr.latent_tiling import tiled_map
from diffsr.progress import OptionalCallback, report

SIGMA_MAX = 14.6146
"""The rounded sigma_max the official sampler and guider divide by (the table's largest sigma is 14.614641)."""
RESTORE_SIGMA_MIN = 0.05
"""Restoration guidance is applied only while the next sigma exceeds this (`restore_cfg_s_tmin`)."""
NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod() -> np.ndarray:
    """SDXL's scaled-linear schedule in float64 (sgm LegacyDDPMDiscretization)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


def _sigmas_of(acp: np.ndarray) -> torch.Tensor:
    # the ratio is made float32 first, then square-rooted in float32, as the official code does
    return torch.tensor((1 - acp) / acp, dtype=torch.float32) ** 0.5


def training_sigmas() -> torch.Tensor:
    """The 1000 sigmas the network was trained on, ascending (index = the UNet's timestep)."""
    return _sigmas_of(alphas_cumprod())


def sampling_sigmas(steps: int) -> torch.Tensor:
    """Descending sigmas for `steps` steps plus a final 0: timesteps linspace(999, 0, n, endpoint=False) ("trailing")."""
    acp = alphas_cumprod()
    if steps < NUM_TRAIN_TIMESTEPS:
        timesteps = np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps, endpoint=False).astype(int)[::-1]
        acp = acp[timesteps]
    elif steps > NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"at most {NUM_TRAIN_TIMESTEPS} steps, got {steps}")
    sigmas = torch.flip(_sigmas_of(acp), (0,))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler arguments of `batchify_sample` (names of test.py in the comments)."""

    steps: int = 50                  # --edm_steps
    s_churn: float = 5.0             # --s_churn
    s_noise: float = 1.01            # --s_noise
    cfg_scale: float = 4.0           # --s_cfg: CFG at sigma -> 0 (LinearCFG scale_min)
    cfg_scale_start: float = 1.0     # --spt_linear_CFG: CFG at sigma_max (LinearCFG scale)
    linear_cfg: bool = True          # --linear_CFG (always on in test.py)
    control_scale: float = 1.0       # --s_stage2
    linear_control_scale: bool = False  # --linear_s_stage2
    control_scale_start: float = 0.0    # --spt_linear_s_stage2
    restoration_scale: float = -1.0  # --s_stage1 (tau_r); <= 0: no pull toward the stage-1 latent
    s_tmin: float = 0.0
    s_tmax: float = float("inf")

    def gamma(self, sigma: float) -> float:
        num_sigmas = self.steps + 1
        return min(self.s_churn / (num_sigmas - 1), 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0

    def cfg_at(self, sigma_hat: torch.Tensor) -> torch.Tensor:
        if not self.linear_cfg:
            return torch.full_like(sigma_hat, self.cfg_scale)
        return (self.cfg_scale_start - self.cfg_scale) * sigma_hat / SIGMA_MAX + self.cfg_scale

    def control_at(self, sigma: float) -> float:
        if not self.linear_control_scale:
            return self.control_scale
        return (sigma / SIGMA_MAX) * (self.control_scale_start - self.control_scale) + self.control_scale


EpsFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""eps(x_in [2N], timesteps [2N], control latent [2N], control_scale) on the doubled [uc; c] batch."""


class RestoreEDM:
    """The sampler: `sample(eps_fn, x_T_unscaled, control, x_center, noise)`; `step` is one official sampler_step."""

    def __init__(self, settings: SamplerSettings) -> None:
        self.settings = settings
        self.sigmas = sampling_sigmas(settings.steps)
        self.table = training_sigmas()

    def quantize(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest training sigma and its index (the network's timestep)."""
        table = self.table.to(sigma.device)
        index = (sigma[None, :] - table[:, None]).abs().argmin(dim=0)
        return table[index], index

    def denoise(self, eps_fn: EpsFunction, x: torch.Tensor, sigma_hat: torch.Tensor, control: torch.Tensor,
                control_scale: float) -> torch.Tensor:
        """D(x; sigma_hat) with linear CFG: the network on [uc; c] at the quantised sigma."""
        n = x.shape[0]
        doubled = torch.cat([x, x])
        sigma_q, index = self.quantize(torch.cat([sigma_hat, sigma_hat]))
        c_in = (1 / (sigma_q**2 + 1.0) ** 0.5).view(-1, 1, 1, 1)
        eps = eps_fn(doubled * c_in, index, torch.cat([control, control]), control_scale)
        out = eps.float() * (-sigma_q).view(-1, 1, 1, 1) + doubled
        d_uc, d_c = out[:n], out[n:]
        scale = self.settings.cfg_at(sigma_hat).view(-1, 1, 1, 1)
        return d_uc + scale * (d_c - d_uc)

    def step(self, eps_fn: EpsFunction, x: torch.Tensor, i: int, control: torch.Tensor, x_center: torch.Tensor,
             churn_noise: torch.Tensor | None) -> torch.Tensor:
        settings = self.settings
        n = x.shape[0]
        s_in = x.new_ones([n])
        sigma, next_sigma = s_in * self.sigmas[i], s_in * self.sigmas[i + 1]
        gamma = settings.gamma(float(self.sigmas[i]))
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = churn_noise * settings.s_noise
            x = x + eps * ((sigma_hat**2 - sigma**2) ** 0.5).view(-1, 1, 1, 1)
        control_scale = settings.control_at(float(sigma[0]))
        denoised = self.denoise(eps_fn, x, sigma_hat, control, control_scale)
        if next_sigma[0] > RESTORE_SIGMA_MIN and settings.restoration_scale > 0:
            denoised = denoised - (denoised - x_center) * ((sigma.view(-1, 1, 1, 1) / SIGMA_MAX) ** settings.restoration_scale)
        d = (x - denoised) / sigma_hat.view(-1, 1, 1, 1)
        return x + d * (next_sigma - sigma_hat).view(-1, 1, 1, 1)

    def sample(self, eps_fn: EpsFunction, noise_z: torch.Tensor, control: torch.Tensor, x_center: torch.Tensor,
               noise: NoiseSource, tile: int | None = None, overlap: int = 64, tile_batch: int = 1,
               on_progress: OptionalCallback = None, on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run all steps from the unscaled initial noise. `tile`: the tiled sampler (one full-size noise draw per step)."""
        x = noise_z.float() * torch.sqrt(1.0 + self.sigmas[0] ** 2.0)
        control, x_center = control.float(), x_center.float()
        steps = len(self.sigmas) - 1
        for i in range(steps):
            if tile is None:
                churn = noise.randn_like(x, role="churn_eps") if self.settings.gamma(float(self.sigmas[i])) > 0 else None
                x = self.step(eps_fn, x, i, control, x_center, churn)
            else:
                field = noise.randn_like(x, role="tile_eps_noise")

                def tile_step(x: torch.Tensor, eps: torch.Tensor, control: torch.Tensor, center: torch.Tensor, i: int = i) -> torch.Tensor:
                    return self.step(eps_fn, x, i, control, center, eps)

                x = tiled_map(tile_step, {"x": x, "eps": field, "control": control, "center": x_center},
                              tile, overlap, "supir", batch_size=tile_batch, on_progress=on_progress)
            if on_step is not None:
                on_step(i, x)
            report(on_progress, "steps", i + 1, steps)
        return x
