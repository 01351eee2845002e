"""OSEDiff (Wu et al., "One-Step Effective Diffusion Network for Real-World Image Super-Resolution", NeurIPS 2024).

One UNet step restores the image. Read top to bottom, the pipeline is the paper's:

1. **Pre-upscale** (Pillow, 8-bit as the official script): an LR whose short side is below
   process_size / upscale is first bicubic-enlarged to that, then bicubic x `upscale`, then
   LANCZOS-rescaled to a multiple of 8.
2. **Prompt**: DAPE tags (here: tags the user gives) as ``"{tags}, {prompt},"``, or a plain prompt.
3. **Encode** with the SD 2.1-base VAE encoder carrying OSEDiff's LoRA (and LoRA on quant_conv):
   z = posterior sample x 0.18215.
4. **One step**: eps = UNet-with-LoRA(z, t=999, text); x0 = (z - sqrt(1 - abar_999) eps) / sqrt(abar_999),
   which is exactly what DDPMScheduler.step returns after set_timesteps(1) (the previous timestep is -1).
5. **Decode** x0 with the frozen decoder, clamp to [-1, 1].
6. **Colour fix** (AdaIN by default, or wavelet) against the pre-upscaled input, in 8-bit as the official.

Large images: the UNet runs on Gaussian-blended latent tiles (official 96/32 latent pixels) and the VAE
in tiles with shared GroupNorm statistics (`diffsr.vae_tiling`). The weights are the official
`osediff.pkl` as published (read with ``torch.load(weights_only=True, map_location="cpu")``) or its
`diffsr convert` safetensors, applied with peft exactly as the official `load_ckpt` does (rank 4,
peft's default lora_alpha 8, so the scale is 2).

Fixed here, unlike the official script (docs/osediff.md): the output is resized back to upscale x the
input size (issue #52; `resize_back`), latent tiles on long thin images no longer loop forever (the
overlap is halved when it reaches the tile), and the decoder's default tile is small enough that the
VAE attention does not need ~25 GB (#69).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsr import __version__
from diffsr.colorfix import color_fix
from diffsr.diffusion.latents import VAETiles, decode, encode
from diffsr.diffusion.runtime import RUNTIME_OPTIONS, NoiseSource, Runtime, latent_tiling_options, vae_tiling_options
from diffsr.diffusion.weights import METHOD_WEIGHTS, base_weight_files, describe_files
from diffsr.io.image import ImageData
from diffsr.latent_tiling import tiled_map
from diffsr.models.loading import WeightsError, load_checkpoint
from diffsr.options import Option, options
from diffsr.progress import OptionalCallback, report
from diffsr.registry import Method
from diffsr.resample import resize_array

BASE_KIND = "sd21-base"
TIMESTEP = 999
LORA_ALPHA = 8
"""peft's default lora_alpha, which the official `LoraConfig(r=rank, ...)` leaves in place: scale = 8 / rank (2 at rank 4)."""
UNET_ADAPTERS = ("default_encoder", "default_decoder", "default_others")
VAE_ADAPTER = "default_encoder"
ENCODER_PAD, DECODER_PAD = 32, 11
"""The official tiled-VAE hook's paddings (image pixels for the encoder, latent pixels for the decoder)."""
EXACT_ENCODER_HALO = 64
"""Halo of the exact tiled encoder (its receptive field is wider than the hook's 32 px; docs/diffusion.md)."""
PKL_LIST_KEYS = ("vae_lora_encoder_modules", "unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
PREFIXES = {"unet": "unet.", "vae": "vae."}
"""Key prefixes of the converted safetensors file."""
COLOR_FIX_NAMES = {"adain": "adain", "wavelet": "wavelet", "nofix": "none", "none": "none"}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:A|B)\.(?P<adapter>[^.]+)\.weight$")


# ------------------------------------------------------------------------------------------------ weights

@dataclass(frozen=True)
class OSEDiffWeights:
    """OSEDiff's trained tensors, keyed by the peft-wrapped module names the official code uses.

    `unet` holds the LoRA A/B of the three UNet adapters plus the fully trained
    `conv_in.base_layer.{weight,bias}`; `vae` the LoRA A/B of the encoder adapter. The adapter of each
    module is part of its key (``...to_q.lora_A.default_encoder.weight``), so the target modules of each
    adapter follow from the keys: that is all the official module lists say, without their duplicates.
    """

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    source: str = ""

    def adapters(self, part: str) -> dict[str, list[str]]:
        """adapter name -> target module names, for "unet" or "vae"."""
        found: dict[str, list[str]] = {}
        for key in getattr(self, part):
            match = _LORA_KEY.match(key)
            if match and match["module"] not in found.setdefault(match["adapter"], []):
                found[match["adapter"]].append(match["module"])
        return found

    def rank(self, part: str) -> int:
        ranks = {t.shape[0] for k, t in getattr(self, part).items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise WeightsError(f"{self.source}: the {part} LoRA has mixed ranks {sorted(ranks)}; {describe_files('osediff')}")
        return ranks.pop()

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        """The flat form `diffsr convert` stores: unet.* and vae.* keys."""
        return {**{PREFIXES["unet"] + k: v for k, v in self.unet.items()}, **{PREFIXES["vae"] + k: v for k, v in self.vae.items()}}


def read_weights(path: str | Path) -> OSEDiffWeights:
    """The official `osediff.pkl` (a dict of module lists, ranks and two state dicts) or its converted safetensors."""
    path = Path(path)
    content = load_checkpoint(path)  # safetensors, or torch.load(weights_only=True, map_location="cpu")
    if "state_dict_unet" in content or "state_dict_vae" in content:
        unet, vae = content.get("state_dict_unet"), content.get("state_dict_vae")
        if not isinstance(unet, Mapping) or not isinstance(vae, Mapping):
            raise WeightsError(f"{path}: an OSEDiff checkpoint needs both state_dict_unet and state_dict_vae; {describe_files('osediff')}")
        weights = OSEDiffWeights({k: v.float() for k, v in unet.items()}, {k: v.float() for k, v in vae.items()}, str(path))
        _check_module_lists(content, weights, path)
    elif content and all(isinstance(v, torch.Tensor) for v in content.values()) and any(k.startswith(PREFIXES["unet"]) for k in content):
        parts = {name: {k[len(p):]: v.float() for k, v in content.items() if k.startswith(p)} for name, p in PREFIXES.items()}
        weights = OSEDiffWeights(parts["unet"], parts["vae"], str(path))
    else:
        sample = ", ".join(sorted(map(str, content))[:3])
        raise WeightsError(f"{path}: not an OSEDiff checkpoint (no state_dict_unet / unet.* keys; it has {sample}, ...); "
                           f"{describe_files('osediff')}")
    missing = [k for k in ("conv_in.base_layer.weight", "conv_in.base_layer.bias") if k not in weights.unet]
    if missing or not weights.adapters("unet") or not weights.adapters("vae"):
        raise WeightsError(f"{path}: incomplete OSEDiff checkpoint (UNet LoRA, VAE LoRA and conv_in are all needed"
                           f"{'; missing ' + ', '.join(missing) if missing else ''}); {describe_files('osediff')}")
    return weights


def _check_module_lists(content: dict, weights: OSEDiffWeights, path: Path) -> None:
    """The official lists name the same modules the keys hold (the VAE list repeats names: peft made a set of it)."""
    expected = {"unet_lora_encoder_modules": ("unet", "default_encoder"), "unet_lora_decoder_modules": ("unet", "default_decoder"),
                "unet_lora_others_modules": ("unet", "default_others"), "vae_lora_encoder_modules": ("vae", "default_encoder")}
    for key, (part, adapter) in expected.items():
        listed = content.get(key)
        if listed is None:
            continue
        held = set(weights.adapters(part).get(adapter, []))
        if set(listed) != held:
            raise WeightsError(f"{path}: {key} lists {len(set(listed))} modules but the checkpoint holds LoRA for {len(held)}; "
                               f"the file is damaged; {describe_files('osediff')}")
    for key in ("rank_unet", "rank_vae"):
        if key in content and int(content[key]) != weights.rank(key[5:]):
            raise WeightsError(f"{path}: {key} = {content[key]} but its LoRA matrices have rank {weights.rank(key[5:])}")


def convert(path: Path) -> dict[str, torch.Tensor]:
    """`diffsr convert --method osediff osediff.pkl`: the tensors as unet.* / vae.* safetensors keys."""
    return read_weights(path).to_state_dict()


UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out", "proj_out",
                 "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def unet_lora_targets(unet: torch.nn.Module) -> dict[str, list[str]]:
    """The official `initialize_unet` module lists: every weight (not bias/norm) matching a pattern, grouped by
    place (down_blocks/conv_in -> encoder, up_blocks/conv_out -> decoder, the rest: mid block -> others)."""
    groups: dict[str, list[str]] = {name: [] for name in UNET_ADAPTERS}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or not any(p in name for p in UNET_PATTERNS):
            continue
        module = name.replace(".weight", "")
        place = "default_encoder" if "down_blocks" in name or "conv_in" in name else \
            "default_decoder" if "up_blocks" in name or "conv_out" in name else "default_others"
        groups[place].append(module)
    return groups


def vae_lora_targets(vae: torch.nn.Module) -> list[str]:
    """The official `initialize_vae` list: encoder convs and attention projections plus quant_conv, with the
    official's repeats (a name is added once per pattern it contains; peft makes a set of it)."""
    found: list[str] = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                found.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                found.append(name.replace(".weight", ""))
    return found


def official_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, unet_targets: Mapping[str, list[str]], vae_targets: list[str],
                        rank_unet: int, rank_vae: int) -> dict[str, Any]:
    """The dict the official `OSEDiff_gen.save_model` writes (module lists as `*_lora_targets` gave them, ranks,
    LoRA and conv_in tensors), for torch.save; `read_weights` and the official `load_ckpt` both read it."""
    return {
        "vae_lora_encoder_modules": list(vae_targets),
        "unet_lora_encoder_modules": list(unet_targets["default_encoder"]),
        "unet_lora_decoder_modules": list(unet_targets["default_decoder"]),
        "unet_lora_others_modules": list(unet_targets["default_others"]),
        "rank_unet": rank_unet,
        "rank_vae": rank_vae,
        "state_dict_unet": {k: v.detach().float().cpu().clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v.detach().float().cpu().clone() for k, v in vae.state_dict().items() if "lora" in k},
    }


def _regex(modules: list[str]) -> str:
    """A target_modules pattern peft matches in full: exactly these module names, nothing that merely ends in them."""
    return "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"


def add_lora(model: torch.nn.Module, adapters: Mapping[str, list[str]], rank: int, part: str = "model") -> None:
    """Wrap the named modules with peft LoRA layers (alpha 8, dropout 0), all adapters active, as `load_ckpt` does."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {name for name, _ in model.named_modules()}
    for adapter, listed in adapters.items():
        modules = list(dict.fromkeys(listed))  # the official VAE list repeats names
        absent = [m for m in modules if m not in names]
        if absent:
            raise WeightsError(f"OSEDiff LoRA targets {part} module {absent[0]} (and {len(absent) - 1} more) that the base lacks; "
                               f"the base must be SD 2.1-base ({describe_files('osediff')})")
        if not modules:
            continue
        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=_regex(modules))
        with warnings.catch_warnings():  # "multiple adapters": three disjoint ones are what the official code builds
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(config, model, adapter_name=adapter)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(list(module.lora_A.keys()))


def load_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], keep: tuple[str, ...], source: str, part: str) -> None:
    """Copy every parameter whose name contains one of `keep` ("lora", "conv_in") from `state`, strictly."""
    params = {n: p for n, p in model.named_parameters() if any(k in n for k in keep)}
    missing = sorted(set(params) - set(state))
    unused = sorted(set(state) - set(params))
    if missing or unused:
        detail = f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(unused)} unused (e.g. {unused[0]})"
        raise WeightsError(f"{source}: its {part} tensors do not fit the LoRA layers built from it ({detail}); {describe_files('osediff')}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise WeightsError(f"{source}: {part} tensor {name} has shape {tuple(state[name].shape)}, the base needs "
                                   f"{tuple(param.shape)}: the base must be SD 2.1-base ({describe_files('osediff')})")
            param.copy_(state[name])


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every LoRA into its base layer (W + scale * B A) and drop the wrappers: one matmul per layer at run time.

    The official --merge_and_unload_lora does the same; it moves fp32 outputs by <= 8e-5 (fixture README)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def alpha_bar(scheduler_config: Mapping[str, Any], timestep: int = TIMESTEP) -> torch.Tensor:
    """abar_t of the base's schedule, from DDPMScheduler as the official code builds it (float32 cumprod)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config).alphas_cumprod[timestep]


def predict_x0(latent: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """DDPMScheduler.step from t=999 to t=-1 after set_timesteps(1): the x0 prediction, in float32 as the official.

    (The step also adds sqrt(1e-20) * noise, which is below float32 resolution; it is left out.)"""
    beta = 1 - abar
    return (latent.float() - beta**0.5 * eps.float()) / abar**0.5


# --------------------------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class Preprocessed:
    """The model input the official script builds from an LR image, and how it got there."""

    pixels: np.ndarray
    """H x W x 3 float32 in [0, 1] (an 8-bit image / 255 for 8-bit inputs)."""
    eight_bit: bool
    pre_resized: bool
    """The short side was below process_size / upscale and was enlarged first."""


def preprocess(pixels: np.ndarray, upscale: int = 4, process_size: int = 512, eight_bit: bool = True) -> Preprocessed:
    """The official resizes: optional bicubic pre-enlargement, bicubic x upscale, LANCZOS to a multiple of 8.

    8-bit inputs go through Pillow's 8-bit RGB path exactly as the script (Image.resize's default filter is
    bicubic); deeper inputs through the same filters in float, so their extra bits survive."""
    height, width = pixels.shape[:2]
    minimum = process_size // upscale
    if eight_bit:
        image = Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8), "RGB")
        resize = lambda img, size, f: img.resize(size, f)  # noqa: E731
    else:
        image = pixels.astype(np.float32)
        resize = lambda img, size, f: resize_array(img, (size[1], size[0]), f)  # noqa: E731
    size = (width, height)
    pre_resized = width < minimum or height < minimum
    bicubic = Image.Resampling.BICUBIC if eight_bit else "bicubic"
    if pre_resized:
        scale = minimum / min(width, height)
        size = (int(scale * width), int(scale * height))
        image = resize(image, size, bicubic)
    size = (size[0] * upscale, size[1] * upscale)
    image = resize(image, size, bicubic)
    final = (size[0] - size[0] % 8, size[1] - size[1] % 8)
    if final != size:
        image = resize(image, final, Image.Resampling.LANCZOS if eight_bit else "lanczos")
    array = np.asarray(image, dtype=np.float32) / 255.0 if eight_bit else np.clip(image, 0.0, 1.0)
    return Preprocessed(np.ascontiguousarray(array), eight_bit, pre_resized)


def build_prompt(tags: str = "", prompt: str = "") -> str:
    """The official prompt ``"{tags}, {prompt},"`` when there are tags (DAPE's, or given); else the user prompt as is."""
    return f"{tags}, {prompt}," if tags else prompt


def truncate_8bit(x: torch.Tensor) -> torch.Tensor:
    """torchvision ToPILImage on a [0, 1] float: floor(255 x), which the official script saves and colour-fixes."""
    return torch.floor(x.clamp(0, 1) * 255) / 255


def fix_colours(target: torch.Tensor, source: Preprocessed, align_method: str) -> torch.Tensor:
    """The official colour fix of a [0, 1] output towards the preprocessed input, clamped to [0, 1]."""
    reference = torch.from_numpy(source.pixels).permute(2, 0, 1)[None]
    return color_fix(target, reference, COLOR_FIX_NAMES[align_method]).clamp(0, 1)


class OSEDiffPipeline:
    """SD 2.1-base with OSEDiff's LoRA on the VAE encoder and the UNet; see the module docstring for the steps."""

    def __init__(self, components: Any, weights: OSEDiffWeights, runtime: Runtime, merge: bool = False):
        self.runtime = runtime
        self.weights_source = weights.source
        self.base_source = str(components.source)
        self.tokenizer = components.tokenizers[0]
        self.text_encoder = components.text_encoders[0]
        self.unet, self.vae = components.unet, components.vae
        self.abar = alpha_bar(components.scheduler.config)
        add_lora(self.unet, weights.adapters("unet"), weights.rank("unet"), "UNet")
        load_lora_state(self.unet, weights.unet, ("lora", "conv_in"), weights.source, "UNet")
        add_lora(self.vae, weights.adapters("vae"), weights.rank("vae"), "VAE")
        load_lora_state(self.vae, weights.vae, ("lora",), weights.source, "VAE")
        self.merged = merge
        if merge:
            merge_lora(self.unet)
            merge_lora(self.vae)
        for module, denoiser in ((self.text_encoder, False), (self.vae, False), (self.unet, True)):
            runtime.prepare(module, denoiser=denoiser)

    # the model ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Last hidden state of the text encoder; padded to 77 with the tokenizer's pad ("!" for SD 2), truncated."""
        ids = self.tokenizer(prompt, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
        with self.runtime.active(self.text_encoder):
            return self.text_encoder(ids.to(self.runtime.device))[0]

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, prompt_embeds: torch.Tensor, noise: NoiseSource, latent_tile: int = 96,
                latent_overlap: int = 32, tile_batch: int = 1, vae_tiling: bool = True, vae_encoder_tile: int = 1024,
                vae_decoder_tile: int = 128, vae_statistics: str = "exact", on_progress: OptionalCallback = None,
                record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """lq: 1 x 3 x H x W in [-1, 1] (H, W multiples of 8) -> the restored image in [-1, 1], float32 on the CPU.

        `record`, when given, receives the intermediates the fixture stores (lq_latent, model_pred, x_denoised)."""
        rt = self.runtime
        dtype = rt.module_dtype(self.vae)
        halos = (ENCODER_PAD, DECODER_PAD) if vae_statistics == "vaehook" else (EXACT_ENCODER_HALO, DECODER_PAD)
        tiles = VAETiles(vae_encoder_tile, vae_decoder_tile, *halos, statistics=vae_statistics) if vae_tiling else None
        with rt.active(self.vae):
            latent = encode(self.vae, lq.to(rt.device, dtype), noise, tiles, on_progress)
        report(on_progress, "vae_encode", 1, 1)
        embeds = prompt_embeds.to(rt.device, rt.module_dtype(self.unet))
        timestep = torch.tensor([TIMESTEP], device=rt.device, dtype=torch.long)

        def unet(x: torch.Tensor) -> torch.Tensor:
            return self.unet(x, timestep, encoder_hidden_states=embeds.expand(x.shape[0], -1, -1)).sample

        with rt.active(self.unet):
            eps = tiled_map(unet, {"x": latent}, latent_tile, latent_overlap, "osediff", tile_batch, on_progress=on_progress)
        report(on_progress, "steps", 1, 1)
        x0 = predict_x0(latent, eps, self.abar.to(rt.device))
        if record is not None:
            record.update(lq_latent=latent.float().cpu(), model_pred=eps.float().cpu(), x_denoised=x0.cpu())
        with rt.active(self.vae):
            image = decode(self.vae, x0.to(dtype), tiles, on_progress)
        report(on_progress, "vae_decode", 1, 1)
        return image.float().clamp(-1, 1).cpu()

    # pixels in, pixels out ---------------------------------------------------------------------------

    def finish(self, restored: torch.Tensor, source: Preprocessed, align_method: str) -> torch.Tensor:
        """[-1, 1] model output -> colour-fixed image in [0, 1] (1 x 3 x H x W), before the final 8-bit quantisation.

        The official script colour-fixes the *saved* 8-bit output (ToPILImage truncates: floor(255 x)); for
        8-bit inputs the target is truncated the same way, so results match it. Deeper inputs keep their bits."""
        x = (restored * 0.5 + 0.5).clamp(0, 1)
        if COLOR_FIX_NAMES[align_method] == "none":
            return x
        return fix_colours(truncate_8bit(x) if source.eight_bit else x, source, align_method)

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, prompt: str = "", tags: str = "",
                upscale: int = 4, process_size: int = 512, align_method: str = "adain", resize_back: bool = True,
                latent_tile: int = 96, latent_overlap: int = 32, tile_batch: int = 1, vae_tiling: bool = True,
                vae_encoder_tile: int = 1024, vae_decoder_tile: int = 128, vae_statistics: str = "exact",
                seed: int | None = None, record: dict[str, Any] | None = None) -> ImageData:
        """Restore one image at `upscale` x its size (grey stays grey; alpha is resized bicubic, as the model has none).

        `record` (for parity checks) receives the prompt, its embeddings, the preprocessed input, the
        intermediates of `restore`, the model output and the colour-fixed float image."""
        grey = image.pixels.shape[2] == 1
        rgb = np.repeat(image.pixels, 3, axis=2) if grey else image.pixels
        pre = preprocess(rgb, upscale, process_size, eight_bit=image.bit_depth <= 8)
        lq = torch.from_numpy(pre.pixels).permute(2, 0, 1)[None] * 2 - 1
        text = build_prompt(tags, prompt)
        embeds = self.encode_prompt(text)
        restored = self.restore(lq, embeds, NoiseSource(seed=seed), latent_tile, latent_overlap, tile_batch, vae_tiling,
                                vae_encoder_tile, vae_decoder_tile, vae_statistics, on_progress, record)
        fixed = self.finish(restored, pre, align_method)
        if record is not None:
            record.update(prompt=text, prompt_embeds=embeds.float().cpu(), preprocessed=pre, restored=restored, fixed=fixed)
        if pre.eight_bit:  # the official saves with ToPILImage: truncation, not rounding; the same PNG results
            fixed = truncate_8bit(fixed)
        pixels = fixed[0].permute(1, 2, 0).numpy()
        target = (image.height * upscale, image.width * upscale)
        if resize_back and pixels.shape[:2] != target:  # issue #52: the official discards this resize
            pixels = np.clip(resize_array(pixels, target, "bicubic"), 0.0, 1.0)
        if grey:
            pixels = pixels @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        alpha = None
        if image.alpha is not None:
            alpha = np.clip(resize_array(image.alpha[:, :, None], pixels.shape[:2], "bicubic")[:, :, 0], 0.0, 1.0)
        return image.with_pixels(np.ascontiguousarray(pixels, dtype=np.float32), alpha)

    def settings(self, **run_options: Any) -> dict[str, Any]:
        """What to record in an output's metadata."""
        return {"diffsr": __version__, "method": "osediff", "weights": Path(self.weights_source).name,
                "base": Path(self.base_source).name, "merged_lora": self.merged, "device": self.runtime.device.type,
                "dtype": str(self.runtime.dtype).replace("torch.", ""), **{k: v for k, v in run_options.items() if v is not None}}


# ------------------------------------------------------------------------------------------------ method

OPTIONS = options(
    Option("weights", str, "osediff.pkl", "the official osediff.pkl (or its `diffsr convert` .safetensors)", stage="load"),
    Option("base", str, "v2-1_512-ema-pruned.safetensors", "SD 2.1-base: v2-1_512-ema-pruned.safetensors/.ckpt or a diffusers folder",
           stage="load"),
    Option("config_dir", str, None, "for a single-file --base: a diffusers folder of the same model to take configs and "
           "tokenizer from (default: SD 2.1-base's built-in configs)", nullable=True, stage="load"),
    Option("merge_lora", bool, False, "fold the LoRA into the base weights (faster; moves outputs by <= 1e-4, as the official merge)",
           stage="load"),
    Option("prompt", str, "", "user prompt; with --tags the official prompt '{tags}, {prompt},' is built"),
    Option("tags", str, "", "comma-separated tags standing in for the DAPE tagger's (e.g. 'building, sky, tree')"),
    Option("upscale", int, 4, "scale factor (the official model is x4; use 1 with osediff_face.pkl)", minimum=1, maximum=8),
    Option("process_size", int, 512, "inputs whose short side is below process_size / upscale are enlarged to it first",
           minimum=8),
    Option("align_method", str, "adain", "colour fix against the upscaled input (official names; 'none' = 'nofix')",
           choices=("adain", "wavelet", "nofix", "none")),
    Option("resize_back", bool, True, "resize the output to upscale x the input size (the official script forgets to, #52)"),
) + latent_tiling_options(96, 32) + vae_tiling_options(1024, 128, statistics="exact") + RUNTIME_OPTIONS
OPTIONS = type(OPTIONS)(OPTIONS.options, "Apache-2.0 (OSEDiff code and weights); SD 2.1-base: CreativeML Open RAIL++-M")


def load(weights: str = "osediff.pkl", base: str = "v2-1_512-ema-pruned.safetensors", config_dir: str | None = None,
         merge_lora: bool = False, device: str = "auto", dtype: str = "auto", attention: str = "sdpa", offload: bool = False,
         channels_last: bool = False, compile: bool = False) -> OSEDiffPipeline:
    """Read the weights (checked before the base is loaded, so a wrong file fails fast), the base, then apply the LoRA."""
    from diffsr.diffusion.loading import load_base

    runtime = Runtime.from_options({"device": device, "dtype": dtype, "attention": attention, "offload": offload,
                                    "channels_last": channels_last, "compile": compile})
    osediff = read_weights(weights)
    components = load_base(base, BASE_KIND, dtype=torch.float32, config_dir=config_dir)
    return OSEDiffPipeline(components, osediff, runtime, merge=merge_lora)


METHOD = Method(
    name="osediff",
    summary="OSEDiff (NeurIPS 2024): one-step diffusion SR, LoRA on SD 2.1-base",
    options=OPTIONS,
    load=load,
    licence=OPTIONS.licence,
    weights=tuple(w for w in METHOD_WEIGHTS["osediff"] if w.option == "weights") + base_weight_files("osediff"),
    convert=convert,
)
