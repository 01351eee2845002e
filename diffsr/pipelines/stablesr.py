"""StableSR (Wang et al., IJCV 2024): SD 2.1 steered by a time-aware LR encoder and SFT layers, with CFW.

A port of the official inference scripts (IceClear/StableSR @ 398ee93) onto diffusers:

- mode "tile" is `sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`, the one the README recommends for
  any size: bicubic to `max(input_size / short side, upscale)`, reflect-pad to a multiple of 32, cut
  images larger than `pixel_tile` into Gaussian-blended pixel patches (re-seeded per patch, as the
  script does), and sample every patch on overlapping latent tiles whose noise predictions are
  blended with the official (asymmetric) Gaussian window at every step;
- mode "center-crop" is `sr_val_ddpm_text_T_vqganfin_old.py` (the paper's 128 -> 512 benchmark):
  shorter side resized to `input_size`, centre crop, one latent, pure-noise start.

Sampling is the official respaced DDPM (guided-diffusion `space_timesteps`, ancestral, fixed-small
variance, no x0 clipping, coefficients computed in float32 as LDM's `register_schedule` does); the UNet
and the encoder see the original timesteps. `sampler="ddim"` is the later DDIM scripts' sampler,
including their timestep/alpha mismatch. Colour fix, CFW weight, tile sizes and the start point are
options. Every random draw goes through `NoiseSource` in the official order, so parity tests inject
the official noise (tests/test_stablesr_parity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffsr import __version__
from diffsr.colorfix import color_fix as color_fix_image
from diffsr.diffusion.bases import BASES, LDM_UNET_PREFIX, LDM_VAE_PREFIX, BaseSpec
from diffsr.diffusion.latents import VAETiles
from diffsr.diffusion.latents import decode as vae_decode
from diffsr.diffusion.latents import encode as vae_encode
from diffsr.diffusion.runtime import RUNTIME_OPTIONS, NoiseSource, Runtime, latent_tiling_options, vae_tiling_options
from diffsr.diffusion.weights import describe_files, method_weight_files
from diffsr.io.image import ImageData
from diffsr.latent_tiling import tiled_map
from diffsr.models.loading import WeightsError, load_checkpoint, load_lightning_checkpoint, tensors_only
from diffsr.models.stablesr import CFW_PREFIX, ENCODER_PREFIX, SPADE_MARK, UNET_PREFIX, CFW, StableSRAdapter, split_state
from diffsr.options import Option, options
from diffsr.progress import OptionalCallback, report
from diffsr.registry import Method
from diffsr.resample import resize_array

LICENCE = "S-Lab License 1.0 (non-commercial); SFT (SPADE) code CC BY-NC-SA 4.0; SD 2.1: CreativeML Open RAIL++-M"
TRAIN_STEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.0120
SCALE_FACTOR = 0.18215
VARIANTS = {
    # variant: (base kind, prediction, native input size)
    "512": ("sd21-base", "epsilon", 512),
    "768v": ("sd21-v", "v_prediction", 768),
    "turbo": ("sd-turbo", "epsilon", 512),
}
NEGATIVE_PROMPT = "3d, cartoon, anime, sketches, (worst quality:2), (low quality:2)"


# ------------------------------------------------------------------------------------------------
# schedule


def space_timesteps(num_timesteps: int, section_counts: list[int] | str) -> set[int]:
    """guided-diffusion's respacing (as StableSR's scripts use it): `section_counts[i]` steps, evenly
    rounded, from the i-th equal part of the original process; "ddimN" uses an integer stride."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    per_section, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    steps: list[int] = []
    for index, count in enumerate(section_counts):
        size = per_section + (1 if index < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


def _base_alphas_cumprod() -> np.ndarray:
    """LDM's "linear" schedule (diffusers' scaled_linear) in float64, as `make_beta_schedule` builds it."""
    betas = (torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2).numpy()
    return np.cumprod(1.0 - betas, axis=0)


@dataclass(frozen=True)
class RespacedSchedule:
    """The official respaced DDPM: coefficient arrays indexed by the respaced step, in float32.

    Built as the scripts do: the 1000-step cumulative alphas stored as float32, new betas
    1 - acp[t_k] / acp[t_{k-1}] in float32, then LDM's `register_schedule` formulas in numpy (the
    posterior terms mix float64 and float32 exactly as there)."""

    timesteps: tuple[int, ...]
    """Original timesteps, ascending; respaced step i runs the models at timesteps[i]."""
    arrays: dict[str, np.ndarray] = field(repr=False)
    sqrt_alphas_cumprod_1000: np.ndarray = field(repr=False)
    sqrt_one_minus_alphas_cumprod_1000: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, steps: int) -> RespacedSchedule:
        acp64 = _base_alphas_cumprod()
        acp32 = torch.tensor(acp64, dtype=torch.float32)
        kept = sorted(space_timesteps(TRAIN_STEPS, [steps]))
        last: torch.Tensor | float = 1.0
        betas_list = []
        for t in kept:
            betas_list.append((1 - acp32[t] / last).numpy())
            last = acp32[t]
        betas = np.array(betas_list)
        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        acp_prev = np.append(1.0, acp[:-1])
        posterior_variance = 1 * betas * (1.0 - acp_prev) / (1.0 - acp) + 0 * betas
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731 - LDM's to_torch(float32)
        arrays = {
            "betas": f32(betas),
            "alphas_cumprod": f32(acp),
            "alphas_cumprod_prev": f32(acp_prev),
            "sqrt_alphas_cumprod": f32(np.sqrt(acp)),
            "sqrt_one_minus_alphas_cumprod": f32(np.sqrt(1.0 - acp)),
            "sqrt_recip_alphas_cumprod": f32(np.sqrt(1.0 / acp)),
            "sqrt_recipm1_alphas_cumprod": f32(np.sqrt(1.0 / acp - 1)),
            "posterior_variance": f32(posterior_variance),
            "posterior_log_variance_clipped": f32(np.log(np.maximum(posterior_variance, 1e-20))),
            "posterior_mean_coef1": f32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
            "posterior_mean_coef2": f32((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
        }
        return cls(tuple(kept), arrays, f32(np.sqrt(acp64)), f32(np.sqrt(1.0 - acp64)))

    def _c(self, name: str, index: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.arrays[name][index], dtype=torch.float32, device=device)

    def noised(self, latent: torch.Tensor, noise: torch.Tensor, t: int = TRAIN_STEPS - 1) -> torch.Tensor:
        """q_sample with the 1000-step tables (the scripts' `q_sample_respace`): the noised-LR start."""
        a = torch.tensor(self.sqrt_alphas_cumprod_1000[t], device=latent.device)
        b = torch.tensor(self.sqrt_one_minus_alphas_cumprod_1000[t], device=latent.device)
        return a * latent + b * noise

    def predict_x0(self, x: torch.Tensor, out: torch.Tensor, index: int, prediction: str) -> torch.Tensor:
        if prediction == "v_prediction":
            return self._c("sqrt_alphas_cumprod", index, x.device) * x - self._c("sqrt_one_minus_alphas_cumprod", index, x.device) * out
        return self._c("sqrt_recip_alphas_cumprod", index, x.device) * x - self._c("sqrt_recipm1_alphas_cumprod", index, x.device) * out

    def step(self, x: torch.Tensor, out: torch.Tensor, index: int, noise: torch.Tensor, prediction: str) -> torch.Tensor:
        """x_{index-1} from x_index and the model output: posterior mean plus fixed-small noise (none at index 0)."""
        x0 = self.predict_x0(x, out, index, prediction)
        mean = self._c("posterior_mean_coef1", index, x.device) * x0 + self._c("posterior_mean_coef2", index, x.device) * x
        mask = torch.tensor(0.0 if index == 0 else 1.0, device=x.device)
        return mean + mask * (0.5 * self._c("posterior_log_variance_clipped", index, x.device)).exp() * noise


@lru_cache(maxsize=8)
def respaced_schedule(steps: int) -> RespacedSchedule:
    return RespacedSchedule.build(steps)


@dataclass(frozen=True)
class DDIMSchedule:
    """The DDIM scripts' sampler (sr_val_ddim_text_T_negativeprompt*.py), quirk included: the models are told
    t = space_timesteps(S)[k] while the update uses the alphas of range(0, 1000, 1000 // S)[k] (no +1
    offset), and the last step's alpha_prev is acp[0], not 1."""

    timesteps: tuple[int, ...]
    alphas: np.ndarray
    alphas_prev: np.ndarray

    @classmethod
    def build(cls, steps: int) -> DDIMSchedule:
        acp = torch.tensor(_base_alphas_cumprod(), dtype=torch.float32).numpy()
        uniform = np.arange(0, TRAIN_STEPS, TRAIN_STEPS // steps)
        prev = np.concatenate([acp[:1], acp[uniform[:-1]]])
        return cls(tuple(sorted(space_timesteps(TRAIN_STEPS, [steps]))), acp[uniform], prev)

    def step(self, x: torch.Tensor, out: torch.Tensor, index: int, noise: torch.Tensor, prediction: str, eta: float) -> torch.Tensor:
        a_t, a_prev = float(self.alphas[index]), float(self.alphas_prev[index])
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        a_t, a_prev, sigma = (torch.tensor(v, dtype=torch.float32, device=x.device) for v in (a_t, a_prev, sigma))
        sqrt_one_minus = torch.sqrt(1.0 - a_t)
        eps = a_t.sqrt() * out + sqrt_one_minus * x if prediction == "v_prediction" else out
        x0 = (x - sqrt_one_minus * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * eps + sigma * noise


# ------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class Sampled:
    """One sampled image or pixel patch, before decoding: what CFW weight and colour fix are applied to."""

    reference: torch.Tensor
    """The (upsampled) LR input in [-1, 1]: the colour-fix reference."""
    latent: torch.Tensor
    features: dict[int, torch.Tensor]
    """The VAE encoder features CFW fuses into the decoder."""


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """[-1, 1] N x 3 x H x W (first image) -> H x W x 3 in [0, 1], clamped as the scripts do."""
    return torch.clamp((image + 1.0) / 2.0, 0.0, 1.0)[0].permute(1, 2, 0).cpu().numpy()


@dataclass
class StableSRModels:
    """Loaded components. `context` is the empty-prompt embedding (StableSR always conditions on '')."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    adapter: StableSRAdapter
    context: torch.Tensor
    prediction: str = "epsilon"
    input_size: int = 512
    cfw: CFW | None = None
    negative_context: torch.Tensor | None = None
    variant: str = "512"
    sources: dict[str, str] = field(default_factory=dict)


class StableSRPipeline:
    """StableSR inference; `upscale(ImageData, **run options)` as the registry expects."""

    def __init__(self, models: StableSRModels, runtime: Runtime | None = None):
        self.models = models
        self.runtime = runtime or Runtime(torch.device("cpu"), torch.float32)
        rt = self.runtime
        rt.prepare(models.unet, denoiser=True)
        rt.prepare(models.vae)
        for module in (models.adapter, models.cfw):
            if module is not None:
                module.to(device=rt.home, dtype=rt.dtype).eval().requires_grad_(False)
        models.adapter.attach(models.unet)
        if models.cfw is not None:
            models.cfw.check(models.vae)

    # ---------------------------------------------------------------- model calls

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def model_output(self, x: torch.Tensor, lr: torch.Tensor, t: int, guidance: float = 1.0) -> torch.Tensor:
        """UNet noise (or v) prediction for latent tiles `x`, conditioned on the LR-latent tiles `lr` at timestep t."""
        m, rt = self.models, self.runtime
        n = x.shape[0]
        context = m.context.to(rt.device, rt.dtype).expand(n, -1, -1)
        x_in, lr_in = x.to(rt.device, rt.dtype), lr.to(rt.device, rt.dtype)
        if guidance != 1.0:
            if m.negative_context is None:
                raise ValueError("guidance needs the negative prompt's embedding (a text encoder was not loaded)")
            context = torch.cat([m.negative_context.to(rt.device, rt.dtype).expand(n, -1, -1), context])
            x_in, lr_in = torch.cat([x_in, x_in]), torch.cat([lr_in, lr_in])
        steps = torch.full((x_in.shape[0],), t, dtype=torch.long, device=rt.device)
        with rt.active(m.adapter), rt.active(m.unet):  # the SFT layers (in the adapter) run inside the UNet
            features = m.adapter.structcond(lr_in, steps)
            with m.adapter.conditioned(features):
                out = m.unet(x_in, steps, encoder_hidden_states=context).sample.float()
        if guidance != 1.0:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        return out

    def encode(self, image: torch.Tensor, noise: NoiseSource, tiles: VAETiles | None = None,
               features: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Scaled posterior sample of `image` and the encoder features CFW fuses into the decoder.

        Without CFW (no CFW file, or `features` False because dec_w is 0) the shared tiled VAE may run
        (`tiles`); CFW needs the whole encoder pass of the image it decodes."""
        m, rt = self.models, self.runtime
        with rt.active(m.vae):
            if m.cfw is None or not features:
                return vae_encode(m.vae, image.to(rt.device, rt.dtype), noise, tiles).float(), {}
            with m.cfw.capture(m.vae) as captured:
                latent = vae_encode(m.vae, image.to(rt.device, rt.dtype), noise).float()
            return latent, dict(captured)

    def decode(self, latent: torch.Tensor, features: dict[int, torch.Tensor], dec_w: float, tiles: VAETiles | None = None) -> torch.Tensor:
        m, rt = self.models, self.runtime
        with rt.active(m.vae):
            if m.cfw is None or dec_w == 0:
                return vae_decode(m.vae, latent.to(rt.device, rt.dtype), tiles).float()
            with rt.active(m.cfw), m.cfw.fused(m.vae, features, dec_w):
                return vae_decode(m.vae, latent.to(rt.device, rt.dtype)).float()

    def denoise(self, x: torch.Tensor, lr: torch.Tensor, noise: NoiseSource, steps: int, sampler: str = "ddpm",
                tile: int | None = None, overlap: int = 32, tile_batch: int = 1, eta: float = 0.0, guidance: float = 1.0,
                on_progress: OptionalCallback = None) -> torch.Tensor:
        """The sampling loop from x_T; `tile` None runs the whole latent at once (the center-crop script)."""
        prediction = self.models.prediction
        schedule: RespacedSchedule | DDIMSchedule = respaced_schedule(steps) if sampler == "ddpm" else DDIMSchedule.build(steps)
        count = len(schedule.timesteps)
        x = x.float()
        for done, index in enumerate(reversed(range(count))):
            t = schedule.timesteps[index]
            if tile is None:
                out = self.model_output(x, lr, t, guidance)
            else:
                out = tiled_map(lambda x, lr: self.model_output(x, lr, t, guidance), {"x": x, "lr": lr}, tile, overlap,
                                "stablesr", tile_batch)
            z = noise.randn_like(x, role=f"step_i{index}_noise")  # drawn at every step, as both samplers do
            x = schedule.step(x, out, index, z, prediction) if sampler == "ddpm" else schedule.step(x, out, index, z, prediction, eta)
            report(on_progress, "steps", done + 1, count)
        return x

    # ---------------------------------------------------------------- images

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, *, mode: str = "tile", steps: int = 200,
                sampler: str = "ddpm", ddim_eta: float = 0.0, guidance: float = 1.0, dec_w: float = 0.5,
                color_fix: str = "adain", upscale: float = 4.0, input_size: int = 0, start: str = "auto",
                latent_tile: int = 64, latent_overlap: int = 32, tile_batch: int = 1, pixel_tile: int = 1280,
                pixel_stride: int = 1000, vae_tiling: bool = True, vae_encoder_tile: int = 512, vae_decoder_tile: int = 64,
                vae_statistics: str = "exact", seed: int | None = None, noise: NoiseSource | None = None) -> ImageData:
        """Super-resolve one image (pixels in [0, 1]); `noise` (tests) replaces the seeded draws."""
        size = input_size or self.models.input_size
        if size % 32:
            raise ValueError(f"--input-size must be a multiple of 32 (the scripts pad to 32), got {size}")
        tiles = VAETiles.from_options({"vae_tiling": vae_tiling, "vae_encoder_tile": vae_encoder_tile,
                                       "vae_decoder_tile": vae_decoder_tile, "vae_statistics": vae_statistics})
        if start not in ("auto", "lr", "noise"):
            raise ValueError(f"--start: {start!r} is not one of auto, lr, noise")
        rgb = image.pixels if image.pixels.shape[2] == 3 else np.repeat(image.pixels, 3, axis=2)
        run = dict(steps=steps, sampler=sampler, eta=ddim_eta, guidance=guidance, dec_w=dec_w, color_fix=color_fix, tiles=tiles)
        fresh = (lambda: noise) if noise is not None else (lambda: NoiseSource(seed=seed))
        if start == "auto":  # what each official script does: DDPM tile and DDIM crop start from the LR, the others from noise
            start = "lr" if (mode == "tile") == (sampler == "ddpm") else "noise"
        if mode == "center-crop":
            out = self.center_crop_sr(rgb, size, fresh(), start == "noise", on_progress=on_progress, **run)
            alpha = None
        elif mode == "tile":
            if seed is None and noise is None:  # one seed for all pixel patches, as the script re-seeds with --seed
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
                fresh = lambda: NoiseSource(seed=seed)  # noqa: E731
            out = self.tile_sr(rgb, size, upscale, fresh, start == "lr", latent_tile, latent_overlap, tile_batch,
                               pixel_tile, pixel_stride, on_progress=on_progress, **run)
            alpha = None if image.alpha is None else np.clip(resize_array(image.alpha[:, :, None], out.shape[:2], "bicubic")[:, :, 0], 0, 1)
        else:
            raise ValueError(f"--mode: {mode!r} is not one of tile, center-crop")
        if image.pixels.shape[2] == 1:
            out = out @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        return image.with_pixels(np.ascontiguousarray(out, dtype=np.float32), alpha)

    def sample_image(self, image: torch.Tensor, noise: NoiseSource, from_lr: bool, steps: int, sampler: str = "ddpm",
                     eta: float = 0.0, guidance: float = 1.0, tile: int | None = None, overlap: int = 32, tile_batch: int = 1,
                     x_t_shape: tuple[int, ...] | None = None, draw_unused: bool = False,
                     on_progress: OptionalCallback = None, tiles: VAETiles | None = None, features: bool = True) -> Sampled:
        """Encode one image in [-1, 1] and sample its latent (the scripts' per-image/patch body up to decoding).

        `draw_unused`: the center-crop script draws a q_sample noise before starting from pure noise
        and discards it; drawing it keeps the random stream (and injected noise) in the official order."""
        lr_latent, cfw_features = self.encode(image, noise, tiles, features)
        if from_lr:
            x_t = respaced_schedule(steps).noised(lr_latent, noise.randn_like(lr_latent, role="x_T_noise"))
        else:
            if draw_unused:
                noise.randn_like(lr_latent, role="unused_randn_like")
            x_t = noise.randn(x_t_shape or lr_latent.shape, lr_latent.device, torch.float32, role="x_T")
        latent = self.denoise(x_t, lr_latent, noise, steps, sampler, tile, overlap, tile_batch, eta, guidance, on_progress)
        return Sampled(image, latent, cfw_features)

    def finish(self, sampled: Sampled, dec_w: float, color_fix: str, tiles: VAETiles | None = None) -> torch.Tensor:
        """Decode with CFW weight `dec_w` and colour-fix against the input (in [-1, 1], not clamped)."""
        decoded = self.decode(sampled.latent, sampled.features, dec_w, tiles)
        return color_fix_image(decoded, sampled.reference.to(decoded.device, decoded.dtype), color_fix)

    @staticmethod
    def center_crop_input(rgb: np.ndarray, size: int) -> torch.Tensor:
        """The center-crop script's input: multiple of 32 (Lanczos), shorter side to `size` (antialiased bilinear),
        centre crop, in [-1, 1]."""
        h, w = rgb.shape[:2]
        h32, w32 = h - h % 32, w - w % 32
        if min(h32, w32) == 0:
            raise ValueError(f"center-crop mode needs an image of at least 32 x 32 pixels, got {w} x {h}")
        if (h32, w32) != (h, w):
            rgb = np.clip(resize_array(rgb, (h32, w32), "lanczos"), 0, 1)
        x = 2.0 * torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] - 1.0
        short, long = (h32, w32) if h32 <= w32 else (w32, h32)
        new_long = int(size * long / short)
        target = (size, new_long) if h32 <= w32 else (new_long, size)
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((target[0] - size) / 2.0)), int(round((target[1] - size) / 2.0))
        return x[:, :, top : top + size, left : left + size].clamp(-1, 1)

    def center_crop_sample(self, rgb: np.ndarray, size: int, noise: NoiseSource, pure_noise: bool = True, steps: int = 200,
                           sampler: str = "ddpm", eta: float = 0.0, guidance: float = 1.0,
                           on_progress: OptionalCallback = None, tiles: VAETiles | None = None, features: bool = True) -> Sampled:
        """`sr_val_ddpm_text_T_vqganfin_old.py` up to decoding: centre-cropped input, one untiled latent."""
        x = self.center_crop_input(rgb, size)
        # from the LR, the draw the script discards becomes x_T's noise
        return self.sample_image(x, noise, not pure_noise, steps, sampler, eta, guidance, None, 0, 1,
                                 (1, 4, size // 8, size // 8), draw_unused=pure_noise, on_progress=on_progress, tiles=tiles,
                                 features=features)

    def center_crop_sr(self, rgb: np.ndarray, size: int, noise: NoiseSource, pure_noise: bool, *, steps: int, sampler: str,
                       eta: float, guidance: float, dec_w: float, color_fix: str, tiles: VAETiles | None = None,
                       on_progress: OptionalCallback = None) -> np.ndarray:
        """`sr_val_ddpm_text_T_vqganfin_old.py`: shorter side to `size`, centre crop, one latent."""
        sampled = self.center_crop_sample(rgb, size, noise, pure_noise, steps, sampler, eta, guidance, on_progress, tiles, dec_w > 0)
        return to_pixels(self.finish(sampled, dec_w, color_fix, tiles))

    def tile_sr(self, rgb: np.ndarray, size: int, upscale: float, fresh_noise, from_lr: bool, latent_tile: int, latent_overlap: int,
                tile_batch: int, pixel_tile: int, pixel_stride: int, *, steps: int, sampler: str, eta: float, guidance: float,
                dec_w: float, color_fix: str, tiles: VAETiles | None = None, on_progress: OptionalCallback = None) -> np.ndarray:
        """`sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`: latent tiles inside Gaussian-blended pixel patches.

        Memory: each pixel patch is encoded, sampled (on latent tiles) and decoded alone, so the peak is
        that of one patch whatever the image size; pixel_tile 0 samples the whole image as one canvas
        (the oldcanvas script) and, with CFW off, bounds the VAE with the shared tiled VAE instead."""
        if pixel_tile and (pixel_stride > pixel_tile or pixel_stride < 1):
            raise ValueError(f"--pixel-stride must be between 1 and --pixel-tile ({pixel_tile}), got {pixel_stride}")
        if pixel_tile % 8:
            raise ValueError(f"--pixel-tile must be a multiple of 8 (the VAE's factor), got {pixel_tile}")
        h, w = rgb.shape[:2]
        x = (torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] - 0.5) / 0.5
        scale = max(size / min(h, w), upscale)
        x = F.interpolate(x, size=(int(h * scale), int(w * scale)), mode="bicubic").clamp(-1, 1)
        ori_h, ori_w = x.shape[-2:]
        pad_h, pad_w = (-ori_h) % 32, (-ori_w) % 32
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        patches = 0

        def patch(image: torch.Tensor) -> torch.Tensor:
            nonlocal patches
            patches += 1
            sampled = self.sample_image(image, fresh_noise(), from_lr, steps, sampler, eta, guidance, latent_tile,
                                        latent_overlap, tile_batch, on_progress=on_progress, tiles=tiles, features=dec_w > 0)
            return self.finish(sampled, dec_w, color_fix, tiles).cpu()

        if pixel_tile and max(x.shape[-2:]) > pixel_tile:
            out = tiled_map(patch, {"image": x}, pixel_tile, pixel_tile - pixel_stride, "stablesr-pixel", 1,
                            on_progress=on_progress)
        else:
            out = patch(x)
        out = torch.clamp((out + 1.0) / 2.0, 0.0, 1.0)[:, :, :ori_h, :ori_w]
        if scale > upscale:  # the LR was enlarged to reach input_size: back to the asked factor
            target = (int(ori_h * upscale / scale), int(ori_w * upscale / scale))
            out = torch.clamp(F.interpolate(out, size=target, mode="bicubic"), 0.0, 1.0)
        return out[0].permute(1, 2, 0).numpy()

    def settings(self, **run_options: Any) -> dict[str, Any]:
        rt = self.runtime
        return {"diffsr": __version__, "method": "stablesr", "variant": self.models.variant, "device": rt.device.type,
                "dtype": str(rt.dtype).replace("torch.", ""), **self.models.sources,
                **{k: v for k, v in run_options.items() if v is not None and k != "noise"}}


# ------------------------------------------------------------------------------------------------
# loading


def read_stablesr_checkpoint(path: str | Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of an official StableSR / CFW checkpoint (Lightning .ckpt read without running code) or our safetensors."""
    path = Path(path)
    try:
        content = load_checkpoint(path) if path.suffix.lower() == ".safetensors" else load_lightning_checkpoint(path)
    except WeightsError as exc:
        raise WeightsError(f"{exc}; {describe_files('stablesr')}") from None
    state = content.get("state_dict", content) if isinstance(content.get("state_dict"), dict) else content
    state = tensors_only(state)
    if not state:
        raise WeightsError(f"{path}: holds no tensors; {describe_files('stablesr')}")
    return state


def empty_prompt_context(text_encoder: torch.nn.Module, tokenizer: Any, prompt: str = "") -> torch.Tensor:
    """OpenCLIP penultimate-layer embedding of a prompt (1 x 77 x width), as FrozenOpenCLIPEmbedder gives it."""
    ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(next(text_encoder.parameters()).device))[0].float().cpu()


def _variant_of(path: Path, variant: str) -> str:
    if variant != "auto":
        return variant
    name = path.name.lower()
    return "768v" if "768" in name else "turbo" if "turbo" in name else "512"


def build_models(weights: dict[str, torch.Tensor], spec: BaseSpec, prediction: str, input_size: int,
                 cfw_state: dict[str, torch.Tensor] | None = None, base: str | Path | None = None,
                 names: tuple[str, str, str] = ("weights", "cfw", "base"), variant: str = "512",
                 negative_prompt: bool = False) -> StableSRModels:
    """Components from official-layout state dicts; the SD parts come from `weights` when it embeds them, else `base`.

    The VAE is the CFW checkpoint's trunk when one is given (the official scripts decode with it; it is
    the SD VAE, identical to the one inside the StableSR checkpoint), else the embedded or base VAE.
    """
    from diffsr.diffusion.loading import load_base

    # a diffusers folder as --base also supplies the component configs of single-file weights (e.g. tiny test models)
    config_dir = Path(base) if base not in (None, "") and Path(base).is_dir() else None
    own, rest = split_state(weights)
    adapter = StableSRAdapter.from_state(own)
    has = lambda prefix: any(k.startswith(prefix) for k in rest)  # noqa: E731
    wanted = ["unet", "vae", "text_encoder", "tokenizer"]
    trunk = {LDM_VAE_PREFIX + k: v for k, v in (cfw_state or {}).items()
             if k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv") and not k.startswith(CFW_PREFIX)}
    from_weights = [c for c in wanted if has({"unet": LDM_UNET_PREFIX, "vae": LDM_VAE_PREFIX}.get(c, spec.text_encoders[0].ldm_prefix))
                    and not (c == "vae" and trunk)]
    loaded: dict[str, Any] = {}
    if from_weights:
        part = load_base(names[0], spec, components=tuple(from_weights), state=rest, config_dir=config_dir)
        loaded.update(unet=part.unet, vae=part.vae, text=part.text_encoders[:1], tokenizer=part.tokenizers[:1])
    missing = [c for c in wanted if c not in from_weights and not (c == "vae" and trunk)]
    if missing:
        if base in (None, ""):
            raise WeightsError(f"{names[0]}: holds only StableSR's own weights (no {', '.join(missing)}); also give --base, "
                               f"the SD model it was trained on ({', '.join(spec.filenames)} or a diffusers folder, from {spec.source})")
        part = load_base(base, spec, components=tuple(missing))
        for c in missing:
            if c == "unet":
                loaded["unet"] = part.unet
            elif c == "vae":
                loaded["vae"] = part.vae
            elif c == "text_encoder":
                loaded["text"] = part.text_encoders
            else:
                loaded["tokenizer"] = part.tokenizers
    cfw = None
    if cfw_state is not None:
        cfw = CFW.from_state(cfw_state)
        if trunk:  # the full CFW autoencoder (not the webui's fusion-only extract): decode with its own trunk
            loaded["vae"] = load_base(names[1], spec, components=("vae",), state=trunk, config_dir=config_dir).vae
    text, tokenizer = loaded["text"][0], loaded["tokenizer"][0]
    context = empty_prompt_context(text, tokenizer)
    negative = empty_prompt_context(text, tokenizer, NEGATIVE_PROMPT) if negative_prompt else None
    sources = {"weights": Path(str(names[0])).name}
    if cfw_state is not None:
        sources["cfw_weights"] = Path(str(names[1])).name
    if base not in (None, ""):
        sources["base"] = Path(str(base)).name
    return StableSRModels(loaded["unet"], loaded["vae"], adapter, context, prediction, input_size, cfw, negative, variant, sources)


def load(weights: str = "", cfw_weights: str = "", base: str = "", variant: str = "auto", device: str = "auto",
         dtype: str = "auto", attention: str = "sdpa", offload: bool = False, channels_last: bool = False,
         compile: bool = False) -> StableSRPipeline:
    """The registry's loader: official or converted checkpoints, an SD 2.x base when the weights lack one."""
    if not weights:
        raise WeightsError(f"StableSR needs --weights; {describe_files('stablesr')}")
    path = Path(weights)
    chosen = _variant_of(path, variant)
    kind, prediction, size = VARIANTS[chosen]
    state = read_stablesr_checkpoint(path)
    cfw_state = read_stablesr_checkpoint(cfw_weights, "cfw") if cfw_weights else None
    models = build_models(state, BASES[kind], prediction, size, cfw_state, base or None, (str(path), str(cfw_weights), str(base)),
                          chosen, negative_prompt=True)
    del state, cfw_state
    runtime = Runtime.from_options({"device": device, "dtype": dtype, "attention": attention, "offload": offload,
                                    "channels_last": channels_last, "compile": compile})
    return StableSRPipeline(models, runtime)


def convert(path: Path) -> dict[str, torch.Tensor]:
    """An official checkpoint's model weights (no optimizer states, callbacks or schedule buffers) for safetensors.

    A StableSR checkpoint keeps its UNet, VAE, OpenCLIP text tower, encoder and SFT layers; a CFW
    checkpoint keeps its autoencoder with the fusion layers (its loss network is training-only)."""
    state = read_stablesr_checkpoint(path)
    keep = (UNET_PREFIX, LDM_VAE_PREFIX, "cond_stage_model.", ENCODER_PREFIX, "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    out = {k: v.contiguous() for k, v in state.items() if k.startswith(keep) and k != "cond_stage_model.model.logit_scale"}
    if not any(k.startswith(ENCODER_PREFIX) or SPADE_MARK in k or k.startswith(CFW_PREFIX) for k in out):
        raise WeightsError(f"{path}: neither a StableSR nor a CFW checkpoint (no {ENCODER_PREFIX}*, *{SPADE_MARK}* or "
                           f"{CFW_PREFIX}* keys); {describe_files('stablesr')}")
    return out


OPTIONS = options(
    Option("weights", str, "", "StableSR checkpoint: stablesr_000117.ckpt (512), stablesr_768v_000139.ckpt, stablesr_turbo.ckpt, "
           "a webui file with only the SFT/encoder weights (then --base is needed), or its diffsr convert output", stage="load"),
    Option("cfw_weights", str, "", "CFW autoencoder checkpoint (vqgan_cfw_00011.ckpt); without it the plain SD VAE decodes (dec_w 0)",
           aliases=("--cfw", "--vqgan-ckpt"), stage="load"),
    Option("base", str, "", "SD 2.x base (v2-1_512-ema-pruned.safetensors, v2-1_768-ema-pruned.safetensors, sd_turbo.safetensors or "
           "a diffusers folder); only needed when --weights lacks the SD weights", stage="load"),
    Option("variant", str, "auto", "which StableSR model: 512 (eps, SD 2.1-base), 768v (v-prediction, SD 2.1), turbo (SD-Turbo); "
           "auto: from the weights' file name", choices=("auto", "512", "768v", "turbo"), stage="load"),
    Option("mode", str, "tile", "tile: the official canvas+tile script (any size); center-crop: the 'old' script (shorter side to "
           "--input-size, centre crop, as in the paper's 128->512 benchmark)", choices=("tile", "center-crop")),
    Option("steps", int, 200, "sampling steps: respaced DDPM (README: 200 for the 512 model, 4 for turbo)", minimum=1, maximum=1000,
           aliases=("--ddpm-steps",)),
    Option("sampler", str, "ddpm", "ddpm (the DDPM scripts) or ddim (the later DDIM scripts, with their timestep/alpha quirk)",
           choices=("ddpm", "ddim")),
    Option("ddim_eta", float, 0.0, "DDIM eta (0 deterministic; the README's 768 example uses 1.0)", minimum=0.0, maximum=1.0),
    Option("guidance", float, 1.0, "classifier-free guidance scale against the DDIM scripts' negative prompt (1 = off; their "
           "--scale is 7)", minimum=1.0, maximum=30.0),
    Option("dec_w", float, 0.5, "CFW weight w: 0 = realism (plain SD decoder), 1 = fidelity; 0 is recommended for 768v",
           minimum=0.0, maximum=1.0),
    Option("color_fix", str, "adain", "colour correction against the upsampled LR: adain (the paper's), wavelet, none (the "
           "scripts' nofix)", choices=("adain", "wavelet", "none")),
    Option("upscale", float, 4.0, "upscale factor (tile mode)", minimum=1.0, maximum=16.0),
    Option("input_size", int, 0, "the model's working size (0: 512, or 768 for 768v); small images are enlarged to it",
           minimum=0, maximum=2048),
    Option("start", str, "auto", "x_T: lr = the LR latent noised to t=999 (DDPM tile script), noise = pure noise (center-crop "
           "and DDIM scripts); auto = the mode's script", choices=("auto", "lr", "noise")),
    Option("pixel_tile", int, 1280, "pixel patch size for large images (the script's --vqgantile_size; 0: no pixel patches, "
           "the whole image is one latent canvas)", minimum=0, aliases=("--vqgantile-size",)),
    Option("pixel_stride", int, 1000, "pixel patch stride (--vqgantile_stride)", minimum=64, aliases=("--vqgantile-stride",)),
    licence=LICENCE,
) + latent_tiling_options(64, 32, 1) + vae_tiling_options(512, 64) + RUNTIME_OPTIONS

METHOD = Method(
    name="stablesr",
    summary="StableSR: SD 2.1 with a time-aware encoder, SFT layers and CFW (official checkpoints, non-commercial)",
    options=OPTIONS,
    load=load,
    licence=LICENCE,
    weights=method_weight_files("stablesr"),
    convert=convert,
)
