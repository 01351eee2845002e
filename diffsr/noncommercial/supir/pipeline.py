"""SUPIR (Yu et al., CVPR 2024): photo restoration with SDXL as the prior, ported onto diffusers modules.

NON-COMMERCIAL: SUPIR's code, weights and (as its licence claims) architecture are under the SUPIR
Software License Agreement (SupPixel); see diffsr.noncommercial. diffsr never ships or downloads
SUPIR weights: users get SUPIR-v0Q.ckpt / SUPIR-v0F.ckpt from the official links.

    diffsr upscale photo.png -o out --method supir --weights SUPIR-v0Q.ckpt --base sd_xl_base_1.0_0.9vae.safetensors --accept-licence

Per image, as the official test.py: resize (x scale, short side >= min_size, sides rounded to
multiples of 64, one Pillow bicubic), stage 1 (degradation-robust encoder -> posterior mean ->
SDXL decoder), the stage-1 latent re-encoded with the SDXL encoder (a posterior sample: the target
of restoration guidance), SDXL text conditioning of caption + quality prompt against the
negative-quality prompt with the fixed 1024/0/1024 size vector, restoration-guided EDM sampling
(diffsr.noncommercial.supir.sampling), decoding, colour fix toward the stage-1 image, and the
bicubic resize back to input size x scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsr import __version__
from diffsr.colorfix import color_fix
from diffsr.diffusion.bases import BaseSpec, get_base
from diffsr.diffusion.latents import VAETiles, decode, encode
from diffsr.diffusion.runtime import (
    RUNTIME_OPTIONS,
    NoiseSource,
    Runtime,
    latent_tiling_options,
    vae_tiling_options,
)
from diffsr.diffusion.weights import METHOD_WEIGHTS, base_weight_files
from diffsr.io.image import ImageData
from diffsr.models.loading import WeightsError
from diffsr.noncommercial import require_acceptance
from diffsr.noncommercial.supir.models import (
    SUPIR_PREFIXES,
    GLVControl,
    SUPIRDenoiser,
    build_project_modules,
    check_and_load,
    connector_hidden,
    convert_control,
    convert_denoise_encoder,
    denoise_encoder_like,
    split_supir_state,
)
from diffsr.noncommercial.supir.sampling import RestoreEDM, SamplerSettings
from diffsr.options import Option, OptionSet, options
from diffsr.progress import OptionalCallback
from diffsr.resample import resize_array
from diffsr.vae_tiling import tiled_encoder

LICENCE = "SUPIR Software License Agreement (SupPixel Pty Ltd): non-commercial use only, code, weights and architecture"
SCALE_FACTOR = 0.13025

A_PROMPT = ("Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - realistic maximum "
            "detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, hyper sharpness, perfect "
            "without deformations.")
"""test.py's --a_prompt (appended to the caption with no separator)."""
N_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, unreal engine, "
            "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, "
            "over-smooth")
"""test.py's --n_prompt (the CFG negative branch)."""
SIZE_CONDITIONING = (1024, 1024, 0, 0, 1024, 1024)
"""original size, crop top-left, target size: constants in the official code, whatever the image size."""

PRESETS: dict[str, dict[str, Any]] = {
    # test.py at HEAD (bda91af, defaults changed on 2025-05-12)
    "default": dict(steps=50, s_churn=5.0, s_noise=1.01, s_cfg=4.0, spt_linear_cfg=1.0, s_stage2=1.0, linear_s_stage2=False,
                    spt_linear_s_stage2=0.0, s_stage1=-1.0, color_fix="wavelet"),
    # gradio_demo.py "Quality" preset (also test.py's defaults before 2025-05-12); the demo pairs it with v0Q
    "quality": dict(steps=50, s_churn=5.0, s_noise=1.003, s_cfg=7.5, spt_linear_cfg=4.0, s_stage2=1.0, linear_s_stage2=False,
                    spt_linear_s_stage2=0.0, s_stage1=-1.0, color_fix="wavelet"),
    # gradio_demo.py "Fidelity" preset; the demo pairs it with v0F
    "fidelity": dict(steps=50, s_churn=5.0, s_noise=1.003, s_cfg=4.0, spt_linear_cfg=1.0, s_stage2=1.0, linear_s_stage2=False,
                     spt_linear_s_stage2=0.0, s_stage1=-1.0, color_fix="wavelet"),
}
PRESET_NOTE = "none: from --preset"

OPTIONS: OptionSet = options(
    Option("weights", str, "SUPIR-v0Q.ckpt", "SUPIR checkpoint: SUPIR-v0Q.ckpt or SUPIR-v0F.ckpt (official), or its `diffsr convert` "
           "safetensors", stage="load"),
    Option("base", str, "sd_xl_base_1.0_0.9vae.safetensors", "SDXL base: a single file (SDXL base 1.0, Juggernaut-XL, ...) or a diffusers "
           "folder; UNet, VAE and both text encoders are taken from it", stage="load"),
    Option("config_dir", str, None, "diffusers folder whose component configs describe a single-file --base (default: SDXL base 1.0's)",
           nullable=True, stage="load"),
    Option("vae_fp32", bool, False, "keep the VAE and the stage-1 encoder in fp32 under --dtype bf16 (the official --ae_dtype fp32; "
           "fp16 always keeps them in fp32)", stage="load"),
    Option("accept_licence", bool, False, "confirm that your use is non-commercial (SUPIR's licence); or set DIFFSR_NONCOMMERCIAL=1",
           stage="load"),
    Option("preset", str, "default", "sampler settings: default (test.py), quality or fidelity (the gradio demo's presets); "
           "the options below override single values", choices=tuple(PRESETS)),
    Option("scale", int, 1, "upscale factor before restoration (test.py --upscale)", minimum=1, maximum=16, aliases=("--upscale",)),
    Option("min_size", int, 1024, "the shorter side is enlarged to at least this many pixels (test.py --min_size)", minimum=64),
    Option("caption", str, "", "image description put before the quality prompt (LLaVA's in the official code; any captioner's, "
           "or your own words)"),
    Option("a_prompt", str, A_PROMPT, "positive quality prompt appended to the caption"),
    Option("n_prompt", str, N_PROMPT, "negative-quality prompt (CFG's negative branch)"),
    Option("steps", int, None, f"sampling steps ({PRESET_NOTE}: 50)", minimum=1, maximum=1000, nullable=True),
    Option("s_cfg", float, None, f"text CFG scale reached at low noise ({PRESET_NOTE})", nullable=True),
    Option("spt_linear_cfg", float, None, f"text CFG scale at the highest noise; linear in sigma in between ({PRESET_NOTE})", nullable=True),
    Option("s_churn", float, None, f"EDM churn ({PRESET_NOTE}: 5)", minimum=0.0, nullable=True),
    Option("s_noise", float, None, f"EDM churn noise scale ({PRESET_NOTE})", minimum=0.0, nullable=True),
    Option("s_stage2", float, None, f"control scale of the adaptor, 0 = plain SDXL ({PRESET_NOTE}: 1.0)", nullable=True),
    Option("linear_s_stage2", bool, None, f"control scale linear in sigma, from --spt-linear-s-stage2 to --s-stage2 ({PRESET_NOTE})",
           nullable=True),
    Option("spt_linear_s_stage2", float, None, f"control scale at the highest noise with --linear-s-stage2 ({PRESET_NOTE}: 0)", nullable=True),
    Option("s_stage1", float, None, f"restoration guidance tau_r toward the stage-1 latent; -1 = off ({PRESET_NOTE}: -1)", nullable=True),
    Option("color_fix", str, None, f"colour correction toward the stage-1 image ({PRESET_NOTE}: wavelet)",
           choices=("wavelet", "adain", "none"), nullable=True),
    Option("stage1_only", bool, False, "output the stage-1 image (degradation-robust encoder + SDXL decoder) and stop"),
    Option("tiled_sampling", bool, True, "sample in latent tiles (the official TiledRestoreEDMSampler: memory flat in image size); "
           "off: the untiled sampler of test.py"),
) + latent_tiling_options(128, 64) + vae_tiling_options(512, 64, enabled=True) + RUNTIME_OPTIONS
OPTIONS = OptionSet(OPTIONS.options, LICENCE)
RUN_OPTIONS = OptionSet(tuple(o for o in OPTIONS.options if o.stage == "run"), LICENCE)


# ------------------------------------------------------------------------------------ preprocessing


def working_size(width: int, height: int, scale: int, min_size: int, fix_resize: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w, h) processed, (w0, h0) output) as test.py's PIL2Tensor: x scale, min side, multiples of 64 (half to even).

    `fix_resize` (test.py's captioning pass: 512) then rescales the short side to that size, output included.
    """
    w, h = float(width * scale), float(height * scale)
    w0, h0 = round(w), round(h)
    if min(w, h) < min_size:
        up = min_size / min(w, h)
        w, h = w * up, h * up
    if fix_resize is not None:
        up = fix_resize / min(w, h)
        w, h = w * up, h * up
        w0, h0 = round(w), round(h)
    return (int(np.round(w / 64.0)) * 64, int(np.round(h / 64.0)) * 64), (w0, h0)


def preprocess(pixels: np.ndarray, bit_depth: int, scale: int, min_size: int, fix_resize: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """H x W x 3 float [0, 1] -> 1 x 3 x H' x W' in [-1, 1] at the working size, and the output (h0, w0).

    8-bit images take the official path exactly (uint8 RGB, one Pillow BICUBIC resize, /255*2-1);
    deeper images are resized per channel in float so their extra precision is kept.
    """
    height, width = pixels.shape[:2]
    (w, h), (w0, h0) = working_size(width, height, scale, min_size, fix_resize)
    if bit_depth <= 8:
        image = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")
        array = np.asarray(image.resize((w, h), Image.BICUBIC)).astype(np.float64) / 255 * 2 - 1
    else:
        array = np.clip(resize_array(pixels.astype(np.float32), (h, w), "bicubic"), 0, 1).astype(np.float64) * 2 - 1
    return torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)[None], (h0, w0)


def postprocess(x: torch.Tensor, size: tuple[int, int], bit_depth: int) -> np.ndarray:
    """1 x 3 x H x W in [-1, 1] -> H0 x W0 x 3 in [0, 1]: torch bicubic resize, then test.py's truncation to 8 bits."""
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x.float(), size=size, mode="bicubic")
    values = (x[0].permute(1, 2, 0).float().cpu().numpy() * 127.5 + 127.5).clip(0, 255)
    if bit_depth <= 8:
        values = values.astype(np.uint8).astype(np.float32)  # truncation, as the official PNG writer
    return (values / 255.0).astype(np.float32)


# ----------------------------------------------------------------------------------------- models


@dataclass
class SUPIRModels:
    """Everything a SUPIR run needs, loaded."""

    denoiser: SUPIRDenoiser
    vae: torch.nn.Module
    denoise_encoder: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    base_source: Path
    weights_source: Path


BASE_FILES = tuple(replace(f, filename="sd_xl_base_1.0_0.9vae.safetensors") for f in base_weight_files("supir"))
"""The SDXL file the official code names (SDXL_CKPT); any SDXL single file or diffusers folder works."""


def _weights_text() -> str:
    files = METHOD_WEIGHTS["supir"] + BASE_FILES
    return "expected " + "; ".join(f"--{f.option} {f.filename} (from {f.source})" for f in files)


def read_supir_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The SUPIR tensors of an official .ckpt (weights-only unpickling) or its safetensors conversion, checked by part."""
    from diffsr.diffusion.loading import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: SUPIR checkpoint not found; {_weights_text()}")
    state = read_state_dict(path, _weights_text())
    parts = split_supir_state(state)
    absent = [prefix for prefix, part in zip(SUPIR_PREFIXES, ("control", "project", "denoise")) if not parts[part]]
    if absent:
        raise WeightsError(f"{path}: not a SUPIR checkpoint (no {', '.join(p + '*' for p in absent)} keys); {_weights_text()}")
    return state


def load_models(weights: str | Path, base: str | Path, runtime: Runtime, base_spec: BaseSpec | None = None,
                config_dir: str | Path | None = None, vae_fp32: bool = False) -> SUPIRModels:
    """SDXL (UNet, VAE, both text encoders) from `base`, SUPIR's adaptor, connectors and denoise encoder from `weights`."""
    from diffsr.diffusion.loading import load_base

    spec = base_spec or get_base("sdxl-base")
    parts = split_supir_state(read_supir_checkpoint(weights))
    # the SDXL files are fp16 already: loading in the run's dtype halves host memory; the VAE is re-cast by prepare()
    loaded = load_base(base, spec, dtype=runtime.dtype, config_dir=config_dir)
    unet, vae = loaded.unet, loaded.vae
    control = GLVControl(dict(unet.config))
    widths = tuple(unet.config.block_out_channels)
    if len(widths) != 3:
        raise WeightsError(f"{base}: its UNet has {len(widths)} levels; SUPIR needs an SDXL UNet (3 levels)")
    with torch.device("meta"):
        project = build_project_modules(widths, connector_hidden(parts["project"]))
    denoise_encoder = denoise_encoder_like(vae)
    vae_dtype = torch.float32 if vae_fp32 else runtime.module_dtype(vae)
    problems = check_and_load(control, convert_control(parts["control"], dict(unet.config)), "adaptor (model.control_model.*)", runtime.dtype)
    problems += check_and_load(project, parts["project"], "connectors (model.diffusion_model.project_modules.*)", runtime.dtype)
    problems += check_and_load(denoise_encoder, convert_denoise_encoder(parts["denoise"], dict(vae.config)),
                               "denoise encoder (first_stage_model.denoise_encoder.*)", vae_dtype)
    if problems:
        raise WeightsError(f"{weights}: does not fit the SDXL base {base} ({'; '.join(problems)}); {_weights_text()}")
    denoiser = SUPIRDenoiser(unet, control, project)
    runtime.prepare(denoiser, denoiser=True)
    denoiser.set_attention(runtime.attention)
    runtime.prepare(vae)
    vae.to(dtype=vae_dtype)
    denoise_encoder.to(device=runtime.home, dtype=vae_dtype).eval().requires_grad_(False)
    for encoder in loaded.text_encoders:
        runtime.prepare(encoder)
    return SUPIRModels(denoiser, vae, denoise_encoder, loaded.text_encoders, loaded.tokenizers, Path(base), Path(weights))


@torch.no_grad()
def encode_prompts(tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], unet: torch.nn.Module, prompts: Sequence[str],
                   device: torch.device | str = "cpu", active: Callable[[torch.nn.Module], Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning as the official GeneralConditioner: crossattn = CLIP-L hidden_states[11] ++ bigG penultimate
    (no final norm); vector = bigG pooled ++ the sinusoidal embedding of the constant sizes 1024/0/1024."""
    from contextlib import nullcontext

    active = active or (lambda module: nullcontext(module))
    (tok_l, tok_g), (enc_l, enc_g) = tokenizers, text_encoders
    kwargs = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids_l, ids_g = tok_l(list(prompts), **kwargs).input_ids, tok_g(list(prompts), **kwargs).input_ids
    with active(enc_l):
        hidden_l = enc_l(ids_l.to(device), output_hidden_states=True).hidden_states[11]
    with active(enc_g):
        out_g = enc_g(ids_g.to(device), output_hidden_states=True)
    crossattn = torch.cat([hidden_l.float(), out_g.hidden_states[-2].float()], dim=-1)
    sizes = torch.tensor([SIZE_CONDITIONING] * len(prompts), dtype=torch.float32).flatten()
    size_emb = unet.add_time_proj(sizes).reshape(len(prompts), -1).float()
    vector = torch.cat([out_g.text_embeds.float(), size_emb.to(crossattn.device)], dim=-1)
    return crossattn, vector


# --------------------------------------------------------------------------------------- pipeline


@dataclass
class RestoreResult:
    """The official intermediates of one run (all float32, [-1, 1] images at the working size)."""

    control_latent: torch.Tensor
    """Stage-1 latent: 0.13025 x posterior mean of the denoise encoder (the adaptor's input)."""
    stage1: torch.Tensor
    """Stage-1 image: SDXL decoder of control_latent, unclamped (the colour-fix reference)."""
    center_latent: torch.Tensor | None = None
    """SDXL-encoder posterior sample of stage1 (restoration guidance's target)."""
    final_latent: torch.Tensor | None = None
    decoded: torch.Tensor | None = None
    output: torch.Tensor | None = None
    """decoded after the colour fix (what batchify_sample returns)."""
    steps: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class RunSettings:
    """Resolved per-image settings (preset + overrides)."""

    sampler: SamplerSettings
    color_fix: str
    caption: str
    a_prompt: str
    n_prompt: str
    tiled_sampling: bool
    latent_tile: int
    latent_overlap: int
    tile_batch: int
    vae_tiles: VAETiles | None


def resolve_settings(values: dict[str, Any]) -> RunSettings:
    """Run-option values (validated or partial) -> settings: unset sampler options come from the preset."""
    merged = {**RUN_OPTIONS.defaults(), **values}
    preset = PRESETS[merged.get("preset") or "default"]
    pick = {k: (merged.get(k) if merged.get(k) is not None else preset[k]) for k in preset}
    sampler = SamplerSettings(
        steps=int(pick["steps"]), s_churn=float(pick["s_churn"]), s_noise=float(pick["s_noise"]), cfg_scale=float(pick["s_cfg"]),
        cfg_scale_start=float(pick["spt_linear_cfg"]), linear_cfg=True, control_scale=float(pick["s_stage2"]),
        linear_control_scale=bool(pick["linear_s_stage2"]), control_scale_start=float(pick["spt_linear_s_stage2"]),
        restoration_scale=float(pick["s_stage1"]))
    statistics = str(merged.get("vae_statistics", "exact"))
    tiles = VAETiles.from_options(merged, encoder_halo=32 if statistics == "vaehook" else 64, decoder_halo=11)
    return RunSettings(sampler, str(pick["color_fix"]), str(merged.get("caption", "")), str(merged.get("a_prompt", A_PROMPT)),
                       str(merged.get("n_prompt", N_PROMPT)), bool(merged.get("tiled_sampling", True)),
                       int(merged.get("latent_tile", 128)), int(merged.get("latent_overlap", 64)), int(merged.get("tile_batch", 1)), tiles)


class SUPIRPipeline:
    """A loaded SUPIR: `upscale(ImageData, **run_options)` for the CLI/API, `restore(tensor, ...)` for the tensor path."""

    def __init__(self, models: SUPIRModels, runtime: Runtime, captioner: Callable[[Image.Image], str] | None = None) -> None:
        self.models, self.runtime, self.captioner = models, runtime, captioner

    @classmethod
    def from_files(cls, weights: str | Path, base: str | Path, device: str = "auto", dtype: str = "auto",
                   base_spec: BaseSpec | None = None, config_dir: str | Path | None = None, accept_licence: bool = False,
                   captioner: Callable[[Image.Image], str] | None = None, vae_fp32: bool = False,
                   **runtime_values: Any) -> SUPIRPipeline:
        require_acceptance("supir", LICENCE, accept_licence)
        runtime = Runtime.from_options({"device": device, "dtype": dtype, **runtime_values})
        return cls(load_models(weights, base, runtime, base_spec, config_dir, vae_fp32), runtime, captioner)

    # ------------------------------------------------------------------ conditioning

    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(crossattn N x 77 x 2048, vector N x 2816) of `prompts`, see `encode_prompts`."""
        return encode_prompts(self.models.tokenizers, self.models.text_encoders, self.models.denoiser.unet, prompts,
                              self.runtime.device, self.runtime.active)

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def stage1(self, lq: torch.Tensor, tiles: VAETiles | None = None, on_progress: OptionalCallback = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(control latent, stage-1 image): the degradation-robust encoder's posterior mean, decoded by SDXL's decoder."""
        vae, encoder = self.models.vae, self.models.denoise_encoder
        dtype = next(vae.parameters()).dtype
        with self.runtime.active(encoder), self.runtime.active(vae):
            x = lq.to(self.runtime.device, dtype)
            if tiles is None:
                hidden = encoder(x)
            else:
                hidden = tiled_encoder(encoder, x, tiles.encoder_tile, tiles.encoder_halo, on_progress=on_progress, statistics=tiles.statistics)
            mean = vae.quant_conv(hidden).chunk(2, dim=1)[0]
            latent = (mean * SCALE_FACTOR).float()
            stage1 = decode(vae, latent.to(dtype), tiles, on_progress).float()
        return latent, stage1

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, settings: RunSettings, noise: NoiseSource, on_progress: OptionalCallback = None,
                keep_steps: bool = False) -> RestoreResult:
        """The official batchify_sample for one image (1 x 3 x H x W in [-1, 1], sides multiples of 64)."""
        if lq.shape[0] != 1:
            raise ValueError("restore takes one image at a time")
        if lq.shape[-1] % 64 or lq.shape[-2] % 64:
            raise ValueError(f"SUPIR works on sides that are multiples of 64, got {tuple(lq.shape[-2:])}")
        device = self.runtime.device
        control, stage1 = self.stage1(lq, settings.vae_tiles, on_progress)
        result = RestoreResult(control, stage1)
        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        with self.runtime.active(vae):
            result.center_latent = encode(vae, stage1.to(dtype), noise, settings.vae_tiles, on_progress).float()
        context, vector = self.encode_text([settings.caption + settings.a_prompt, settings.n_prompt])
        c_ctx, uc_ctx = context[:1], context[1:]
        c_vec, uc_vec = vector[:1], vector[1:]
        noise_z = noise.randn_like(control, role="initial_noise")
        sampler = RestoreEDM(settings.sampler)
        denoiser = self.models.denoiser

        def eps_fn(x_in: torch.Tensor, timesteps: torch.Tensor, control_latent: torch.Tensor, control_scale: float) -> torch.Tensor:
            half = x_in.shape[0] // 2
            ctx = torch.cat([uc_ctx.expand(half, -1, -1), c_ctx.expand(half, -1, -1)])
            vec = torch.cat([uc_vec.expand(half, -1), c_vec.expand(half, -1)])
            return denoiser(x_in, timesteps.to(device), ctx, vec, control_latent, control_scale)

        tile = settings.latent_tile if settings.tiled_sampling else None
        on_step = (lambda i, x: result.steps.append(x.clone())) if keep_steps else None
        with self.runtime.active(denoiser):
            final = sampler.sample(eps_fn, noise_z.to(device), control.to(device), result.center_latent.to(device), noise,
                                   tile, settings.latent_overlap, settings.tile_batch, on_progress, on_step)
        result.final_latent = final
        with self.runtime.active(vae):
            result.decoded = decode(vae, final.to(dtype), settings.vae_tiles, on_progress).float()
        result.output = color_fix(result.decoded, stage1, settings.color_fix)
        return result

    # ------------------------------------------------------------------ images

    def caption_image(self, pixels: np.ndarray, bit_depth: int, scale: int, min_size: int, tiles: VAETiles | None = None) -> Image.Image:
        """What test.py shows LLaVA: the stage-1 image of the input resized to short side 512 (multiples of 64), resized to
        short side exactly 512 and truncated to 8 bits."""
        lq, size = preprocess(pixels, bit_depth, scale, min_size, fix_resize=512)
        _, stage1 = self.stage1(lq, tiles)
        return Image.fromarray(np.rint(postprocess(stage1, size, 8) * 255).astype(np.uint8))

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, noise: NoiseSource | None = None,
                **run_options: Any) -> ImageData:
        """Restore one image; options as `OPTIONS` (run stage). `noise` injects the random draws (tests)."""
        values = RUN_OPTIONS.validate(run_options)
        settings = resolve_settings(values)
        pixels = image.pixels if image.pixels.shape[2] == 3 else np.repeat(image.pixels, 3, axis=2)
        lq, size = preprocess(pixels, image.bit_depth, int(values["scale"]), int(values["min_size"]))
        if values.get("stage1_only"):
            _, stage1 = self.stage1(lq, settings.vae_tiles, on_progress)
            out = stage1
        else:
            if self.captioner is not None and not settings.caption:
                shown = self.caption_image(pixels, image.bit_depth, int(values["scale"]), int(values["min_size"]), settings.vae_tiles)
                settings = replace(settings, caption=str(self.captioner(shown)))
            noise = noise or NoiseSource(values.get("seed"))
            out = self.restore(lq, settings, noise, on_progress).output
        result = postprocess(out, size, image.bit_depth)
        if image.pixels.shape[2] == 1:
            result = result @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        alpha = None
        if image.alpha is not None:
            alpha = np.clip(resize_array(image.alpha[:, :, None], size, "bicubic")[:, :, 0], 0, 1)
        return image.with_pixels(np.ascontiguousarray(result), alpha)

    def settings(self, **run_options: Any) -> dict[str, Any]:
        """What to record in an output's metadata: the resolved sampler settings and the files used."""
        values = RUN_OPTIONS.validate(run_options)
        resolved = resolve_settings(values)
        return {"diffsr": __version__, "method": "supir", "licence": LICENCE, "weights": self.models.weights_source.name,
                "base": self.models.base_source.name, "device": self.runtime.device.type,
                "dtype": str(self.runtime.dtype).replace("torch.", ""),
                **{k: v for k, v in resolved.sampler.__dict__.items() if k not in ("s_tmin", "s_tmax")},
                "color_fix": resolved.color_fix, **{k: v for k, v in values.items() if v is not None}}


def _load(weights: str = "SUPIR-v0Q.ckpt", base: str = "sd_xl_base_1.0_0.9vae.safetensors", config_dir: str | None = None,
          vae_fp32: bool = False, accept_licence: bool = False, device: str = "auto", dtype: str = "auto", attention: str = "sdpa",
          offload: bool = False, channels_last: bool = False, compile: bool = False) -> SUPIRPipeline:
    return SUPIRPipeline.from_files(weights, base, device=device, dtype=dtype, config_dir=config_dir, accept_licence=accept_licence,
                                    vae_fp32=vae_fp32, attention=attention, offload=offload, channels_last=channels_last, compile=compile)


def convert(path: Path) -> dict[str, torch.Tensor]:
    """`diffsr convert --method supir`: the official checkpoint's tensors (official key layout, stray mask_LQ dropped)."""
    state = read_supir_checkpoint(path)
    parts = split_supir_state(state)
    if parts["other"]:
        raise WeightsError(f"{path}: holds keys outside SUPIR's parts (e.g. {next(iter(parts['other']))}); {_weights_text()}")
    return {k: v for k, v in state.items() if k.startswith(SUPIR_PREFIXES)}


def _method():
    from diffsr.registry import Method

    return Method(
        name="supir",
        summary="SUPIR (SDXL prior, GLVControl adaptor, restoration-guided EDM sampling) [NON-COMMERCIAL]",
        options=OPTIONS,
        load=_load,
        licence=LICENCE,
        weights=METHOD_WEIGHTS["supir"] + BASE_FILES,
        convert=convert,
    )


METHOD = _method()
