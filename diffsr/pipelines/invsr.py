"""InvSR: arbitrary-steps super-resolution by diffusion inversion of SD-Turbo (Yue, Liao, Loy, CVPR 2025).

    diffsr upscale photo.png -o out --method invsr --weights noise_predictor_sd_turbo_v5.pth --base sd_turbo.safetensors --steps 1

SD-Turbo stays frozen. A small noise predictor looks at the LR image and predicts the noise that puts
the LR latent on SD-Turbo's trajectory at the start timestep t0; from there 1 to 5 deterministic
Euler steps of SD-Turbo run (the timestep tables of the official `inference_invsr.py`). Everything
follows the official `InvSamplerSR.sample_func` and its `StableDiffusionInvEnhancePipeline`, on stock
diffusers components, with the official code's patches done here instead:

- timesteps t are passed to the networks as t - 1, with sigma = sqrt((1 - abar[t-1]) / abar[t-1]) (float32)
  and a final sigma of 0 (their `retrieve_timesteps`);
- x0 = 0.18215 * VAE.encode(bicubic x4 of the LR, in [-1, 1]).sample + sigma0 * predictor sample;
- the LR is cut into 128 px patches (stride 64; `--chopping-size`) after InvSR's padding, every patch runs the
  whole pipeline and the x4 patches are blended with OpenCV Gaussian windows in float64
  (`diffsr.latent_tiling`, scheme "invsr");
- colour fix `wavelet` or `ycbcr` against the antialiased bicubic of the padded LR (the official quirk).

Every random draw goes through `diffsr.diffusion.runtime.NoiseSource` in the official order (predictor
sample, VAE posterior sample, one unused Euler draw per step, per pipeline call), so a parity test can
inject the official draws.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffsr import __version__
from diffsr.colorfix import color_fix as apply_color_fix
from diffsr.diffusion.latents import VAETiles, decode, encode
from diffsr.diffusion.runtime import RUNTIME_OPTIONS, NoiseSource, Runtime, vae_tiling_options
from diffsr.diffusion.weights import method_weight_files
from diffsr.io.image import ImageData
from diffsr.latent_tiling import tiled_map
from diffsr.models.invsr import NOISE_PREDICTOR_FILE, NoisePredictor, NoisePredictorConfig, infer_config, load_noise_predictor
from diffsr.options import Option, options
from diffsr.progress import OptionalCallback, report
from diffsr.registry import Method

PROMPT = ("Cinematic, high-contrast, photo-realistic, 8k, ultra HD, meticulous detailing, hyper sharpness, "
          "perfect without deformations")
"""The official positive prompt (sampler_invsr._positive); cfg_scale is 1, so there is no negative prompt."""

OFFICIAL_TIMESTEPS: dict[int, tuple[int, ...]] = {
    1: (200,), 2: (200, 100), 3: (200, 100, 50), 4: (200, 150, 100, 50), 5: (250, 200, 150, 100, 50),
}
"""inference_invsr.py's tables for --num_steps 1..5."""
TRAINED_STARTS = (250, 200, 150, 100)
"""Start timesteps the released predictor was trained for (author, zsyOAOA/InvSR#32)."""
SCALE = 4
LICENCE = ("InvSR: S-Lab License 1.0 per github.com/zsyOAOA/InvSR (non-commercial); "
           "SD-Turbo: Stability AI Community Licence")


def timestep_schedule(steps: int = 1, start: int | None = None, explicit: Sequence[int] | str | None = None) -> tuple[int, ...]:
    """The timesteps (1..1000, descending) for a run: an explicit list, else the official table, else
    linspace(start, 0, steps) as the official demos do beyond five steps (start 250 by default)."""
    if explicit not in (None, ""):
        values = [int(v) for v in explicit.replace(",", " ").split()] if isinstance(explicit, str) else [int(v) for v in explicit]
        if not values or any(v < 1 or v > 1000 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"--timesteps: expected distinct integers in 1..1000, got {explicit!r}")
        return tuple(sorted(values, reverse=True))
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if start is None and steps in OFFICIAL_TIMESTEPS:
        return OFFICIAL_TIMESTEPS[steps]
    start = 250 if start is None else start
    if not 1 <= start <= 1000 or steps > start:
        raise ValueError(f"--start-timestep {start} cannot give {steps} distinct steps; use 1..1000 and steps <= start")
    return tuple(int(v) for v in np.linspace(start, 0, steps, endpoint=False, dtype=np.int64))


def color_reference(padded: torch.Tensor, lr: torch.Tensor, size: Sequence[int], mode: str = "official") -> torch.Tensor:
    """The colour-fix reference: antialiased bicubic of the LR to the output size.

    "official" uses the LR *after* InvSR's padding squeezed to the cropped output size, as sample_func
    does (stretched and shifted whenever padding happened); "aligned" uses the unpadded LR."""
    if mode not in ("official", "aligned"):
        raise ValueError(f"--color-fix-reference: {mode!r} is not official or aligned")
    source = padded if mode == "official" else lr
    return F.interpolate(source.to(torch.float32).cpu(), size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


@dataclass
class _Models:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    predictor: NoisePredictor


class InvSRPipeline:
    """A loaded InvSR model: `upscale(ImageData)` for the CLI/API, `enhance(tensor)` for the float result."""

    def __init__(self, models: _Models, runtime: Runtime, names: dict[str, str] | None = None) -> None:
        self.m, self.runtime = models, runtime
        self.names = names or {}
        self.dtype = runtime.dtype
        self.vae_scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
        self.unet_scale = 2 ** (len(models.unet.config.block_out_channels) - 1)
        self.prompt_embeds = self._encode_prompt()
        config = models.scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"InvSR needs an epsilon-prediction base (SD-Turbo); this scheduler predicts {config['prediction_type']}")
        self.alphas_cumprod = models.scheduler.alphas_cumprod.to(torch.float32)
        self.final_sigma = 0.0 if config.get("final_sigmas_type", "zero") == "zero" else \
            float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)

    # ------------------------------------------------------------------------------- pieces

    @torch.no_grad()
    def _encode_prompt(self) -> torch.Tensor:
        tokenizer, encoder = self.m.tokenizer, self.m.text_encoder
        ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        with self.runtime.active(encoder):
            return encoder(ids.to(self.runtime.device))[0].to(self.dtype)

    def sigmas(self, timesteps: Sequence[int]) -> torch.Tensor:
        """sigma of each network timestep t - 1, then the final sigma (float32, the official table)."""
        index = torch.tensor([t - 1 for t in timesteps], dtype=torch.long)
        table = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        return torch.cat([table[index], torch.tensor([self.final_sigma], dtype=torch.float32)]).to(torch.float32)

    @torch.no_grad()
    def run_call(self, image: torch.Tensor, timesteps: Sequence[int], noise: NoiseSource, tiles: VAETiles | None = None,
                 on_progress: OptionalCallback = None) -> torch.Tensor:
        """One official pipeline call: a batch of LR patches in [0, 1] (B x 3 x h x w) -> x4 images in [0, 1]."""
        device, dtype = self.runtime.device, self.dtype
        batch, _, height, width = image.shape
        image = image.to(device, dtype)
        context = self.prompt_embeds.expand(batch, -1, -1)
        upsampled = F.interpolate(image, size=(height * SCALE, width * SCALE), mode="bicubic") * 2.0 - 1.0
        sigmas = self.sigmas(timesteps)
        steps = torch.tensor([float(t - 1) for t in timesteps], dtype=torch.float32)
        start = steps[:1].repeat(batch).to(device)
        predictor = self.m.predictor
        with self.runtime.active(predictor), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            start_noise = predictor(image, start, draw=lambda shape, dev, dt: noise.randn(shape, dev, dt, role="predictor_posterior"))
        with self.runtime.active(self.m.vae):
            latents = encode(self.m.vae, upsampled.to(dtype), noise, tiles, on_progress)
        latents = (latents + start_noise * sigmas[0].to(device, latents.dtype)).to(dtype)
        unet = self.m.unet
        with self.runtime.active(unet):
            for index, step in enumerate(steps):
                # EulerDiscreteScheduler.scale_model_input and step (gamma = 0), with its float32 sigma arithmetic
                sigma, sigma_next = sigmas[index].to(device), sigmas[index + 1].to(device)
                model_input = latents / ((sigma**2 + 1) ** 0.5).to(latents.dtype)
                eps = unet(model_input, step.to(device), encoder_hidden_states=context, return_dict=False)[0]
                noise.randn(eps.shape, device, eps.dtype, role="euler_step_unused")  # the official step draws it; s_churn = 0 never uses it
                sample = latents.to(torch.float32)
                denoised = sample - sigma * eps
                latents = (sample + (sample - denoised) / sigma * (sigma_next - sigma)).to(eps.dtype)
                report(on_progress, "steps", index + 1, len(steps))
        with self.runtime.active(self.m.vae):
            decoded = decode(self.m.vae, latents, tiles, on_progress)
        return (decoded / 2 + 0.5).clamp(0, 1)

    def mod_lr(self) -> int:
        """LR sizes are padded to a multiple of this before chopping: (vae_sf // 4) * unet_sf (16 for SD-Turbo)."""
        return self.vae_scale // SCALE * self.unet_scale

    @torch.no_grad()
    def enhance(self, lr: torch.Tensor, timesteps: Sequence[int], noise: NoiseSource, chopping_size: int = 128,
                chopping_bs: int = 8, color_fix: str = "none", tiles: VAETiles | None = None,
                on_progress: OptionalCallback = None, color_fix_reference: str = "official") -> torch.Tensor:
        """`InvSamplerSR.sample_func`: 1 x 3 x h x w in [0, 1] -> 1 x 3 x 4h x 4w in [0, 1] (float32, CPU)."""
        if chopping_size % 16 or chopping_size < 16:
            raise ValueError(f"--chopping-size must be a positive multiple of 16, got {chopping_size}")
        height, width = lr.shape[-2:]
        padded = lr.to(torch.float32)
        top = left = 0
        while min(padded.shape[-2:]) < chopping_size:
            h, w = padded.shape[-2:]
            up = max(min((chopping_size - h) // 2, h - 1), 0)
            down = max(min(chopping_size - h - up, h - 1), 0)
            lft = max(min((chopping_size - w) // 2, w - 1), 0)
            rgt = max(min(chopping_size - w - lft, w - 1), 0)
            if up + down + lft + rgt == 0:
                raise ValueError(f"image of {width}x{height} is too small for InvSR's reflect padding")
            padded = F.pad(padded, (lft, rgt, up, down), mode="reflect")
            top, left = top + up, left + lft
        if padded.shape[-2:] == (chopping_size, chopping_size):
            result = self.run_call(padded, timesteps, noise, tiles, on_progress).to(torch.float64)
        else:
            mod = self.mod_lr()
            h, w = padded.shape[-2:]
            pad_h, pad_w = math.ceil(h / mod) * mod - h, math.ceil(w / mod) * mod - w
            if pad_h or pad_w:
                padded = F.pad(padded, (0, pad_w, 0, pad_h), mode="reflect")
            result = tiled_map(lambda x: self.run_call(x, timesteps, noise, tiles).to(torch.float64), {"x": padded},
                               chopping_size, chopping_size - chopping_size // 2, "invsr", chopping_bs, SCALE, on_progress,
                               accumulate=torch.float64)
        result = result[:, :, SCALE * top: SCALE * (top + height), SCALE * left: SCALE * (left + width)].cpu()
        if color_fix != "none":
            reference = color_reference(padded, lr, result.shape[-2:], color_fix_reference)
            result = apply_color_fix(result, reference, color_fix)
        return result.clamp(0.0, 1.0).to(torch.float32)

    # ---------------------------------------------------------------------------------- API

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, steps: int = 1, start_timestep: int | None = None,
                timesteps: str | None = None, chopping_size: int = 128, chopping_bs: int = 8, color_fix: str = "none",
                color_fix_reference: str = "official", outscale: float | None = None, seed: int | None = None,
                **vae_tiling: Any) -> ImageData:
        """Upscale ImageData x4 (then resample to `outscale`); grey runs as RGB, alpha is upscaled bicubically.

        `vae_tiling` takes the shared `vae_tiling_options` values (vae_tiling, vae_encoder_tile, ...)."""
        schedule = timestep_schedule(steps, start_timestep, timesteps)
        pixels = image.pixels
        rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
        lr = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        unknown = sorted(k for k in vae_tiling if not k.startswith("vae_"))
        if unknown:
            raise TypeError(f"InvSRPipeline.upscale: unknown option(s) {', '.join(unknown)}")
        tiles = VAETiles.from_options({"vae_encoder_tile": 1024, "vae_decoder_tile": 128, **vae_tiling})
        out = self.enhance(lr, schedule, NoiseSource(seed=seed), chopping_size, chopping_bs, color_fix, tiles, on_progress,
                           color_fix_reference)
        result = out[0].numpy().transpose(1, 2, 0)
        if pixels.shape[2] == 1:
            result = result @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        from diffsr.resample import resize_array

        alpha = None
        if image.alpha is not None:
            alpha = resize_array(image.alpha[:, :, None], result.shape[:2], "bicubic")[:, :, 0]
        if outscale is not None and outscale != SCALE:
            target = (max(1, round(image.height * outscale)), max(1, round(image.width * outscale)))
            result = resize_array(np.ascontiguousarray(result), target, "lanczos")
            if alpha is not None:
                alpha = resize_array(alpha[:, :, None], target, "lanczos")[:, :, 0]
        result = np.clip(result, 0.0, 1.0).astype(np.float32)
        return image.with_pixels(np.ascontiguousarray(result), None if alpha is None else np.clip(alpha, 0.0, 1.0))

    def settings(self, **run_options: Any) -> dict[str, Any]:
        """What to record in an output's metadata (the schedule actually used included)."""
        schedule = timestep_schedule(run_options.get("steps", 1), run_options.get("start_timestep"), run_options.get("timesteps"))
        return {"diffsr": __version__, "method": "invsr", **self.names, "device": self.runtime.device.type,
                "dtype": str(self.dtype).replace("torch.", ""), "timesteps_used": list(schedule),
                **{k: v for k, v in run_options.items() if v is not None}}


def load_pipeline(weights: str = NOISE_PREDICTOR_FILE, base: str = "sd_turbo.safetensors", predictor_config: str | None = None,
                  config_dir: str | None = None, device: str = "auto", dtype: str = "auto", attention: str = "sdpa",
                  offload: bool = False, channels_last: bool = False, compile: bool = False) -> InvSRPipeline:
    """Load SD-Turbo (diffusers folder or single file) and the noise predictor (official .pth or converted safetensors)."""
    from diffsr.diffusion.loading import load_base

    runtime = Runtime.from_options({"device": device, "dtype": dtype, "attention": attention, "offload": offload,
                                    "channels_last": channels_last, "compile": compile})
    config = None
    if predictor_config:
        config = NoisePredictorConfig.from_dict(json.loads(Path(predictor_config).read_text()))
    predictor = load_noise_predictor(weights, config)
    parts = load_base(base, "sd-turbo", dtype=runtime.dtype, config_dir=config_dir)
    models = _Models(runtime.prepare(parts.unet, denoiser=True), runtime.prepare(parts.vae), parts.text_encoders[0].to(runtime.home, runtime.dtype),
                     parts.tokenizers[0], parts.scheduler, predictor)
    # the predictor keeps fp32 weights and runs under autocast in half precision, as the official code does
    predictor.to(runtime.home)
    return InvSRPipeline(models, runtime, {"weights": Path(weights).name, "base": Path(base).name})


def convert(path: Path) -> dict[str, torch.Tensor]:
    """The official noise_predictor_*.pth (read weights-only; `module.`/`_orig_mod.`/`state_dict` unwrapped), checked strictly."""
    model = load_noise_predictor(str(path))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


OPTIONS = options(
    Option("weights", str, NOISE_PREDICTOR_FILE, "InvSR noise predictor: the official .pth or its `diffsr convert` .safetensors", stage="load"),
    Option("base", str, "sd_turbo.safetensors", "SD-Turbo: a diffusers folder (stabilityai/sd-turbo) or the single file sd_turbo.safetensors",
           stage="load"),
    Option("predictor_config", str, None, "JSON of the predictor's constructor arguments (model_start.params) for predictors "
           "other than the released one; default: read from the weights' shapes", nullable=True, stage="load"),
    Option("config_dir", str, None, "a diffusers folder of SD-Turbo whose configs/tokenizer go with a single-file --base",
           nullable=True, stage="load"),
    *RUNTIME_OPTIONS.options,
    Option("steps", int, 1, "sampling steps; 1-5 use the official timestep tables (1: [200] ... 5: [250,200,150,100,50])",
           minimum=1, maximum=250, aliases=("-n", "--num_steps")),
    Option("start_timestep", int, None, "start timestep t0 (released predictor: 250, 200, 150 or 100); the steps are then "
           "linspace(t0, 0, steps) as the official demos", nullable=True, minimum=1, maximum=1000, aliases=("--started_step",)),
    Option("timesteps", str, None, "explicit timesteps, e.g. '200,100,50' (overrides --steps and --start-timestep)",
           nullable=True, aliases=("-t",)),
    Option("chopping_size", int, 128, "LR patch size; each patch runs the whole pipeline, blended with Gaussian weights "
           "(official: 128; 256 for 1k->4k inputs)", minimum=16, aliases=("--chopping_size",)),
    Option("chopping_bs", int, 8, "LR patches per pipeline call", minimum=1, aliases=("--chopping_bs",)),
    Option("color_fix", str, "none", "colour correction towards the LR: wavelet or ycbcr (official default: none)",
           choices=("none", "wavelet", "ycbcr"), aliases=("--color_fix",)),
    Option("color_fix_reference", str, "official", "colour-fix reference: official (the padded LR squeezed to the output, "
           "InvSR's quirk, shifted when the image was padded) or aligned (the LR itself)", choices=("official", "aligned")),
    *vae_tiling_options(encoder_tile=1024, decoder_tile=128).options,
    Option("outscale", float, None, "final scale; InvSR is x4 only, other scales resample its output with Lanczos",
           minimum=0.01, maximum=16.0, aliases=("-s",), nullable=True),
    licence=LICENCE,
)

METHOD = Method(
    name="invsr",
    summary="InvSR (CVPR 2025): SD-Turbo inversion with a noise predictor, 1-5 steps, x4",
    options=OPTIONS,
    load=load_pipeline,
    licence=LICENCE,
    weights=method_weight_files("invsr"),
    convert=convert,
)

__all__ = ["METHOD", "InvSRPipeline", "load_pipeline", "timestep_schedule", "OFFICIAL_TIMESTEPS", "PROMPT", "infer_config"]
