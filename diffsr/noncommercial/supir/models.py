"""SUPIR's networks on diffusers' SDXL modules: the GLVControl adaptor, ZeroSFT / ZeroCrossAttn, the denoise encoder.

NON-COMMERCIAL (SUPIR Software License Agreement, see diffsr.noncommercial). A re-implementation
from the published description and the official code's structure; no official code is copied.

How it maps onto diffusers (official sgm names -> here):

- `model.control_model` (GLVControl) is the encoder half of an SDXL UNet (time and text-time
  embeddings, 3 down blocks, mid block) plus `input_hint_block`, a 3x3 conv of the LQ latent added
  to the output of `conv_in`. It reads the *scaled noisy* latent and returns 10 feature maps: the 9
  entries of diffusers' `down_block_res_samples` and the mid-block output. Its keys convert with
  diffusers' own `convert_ldm_unet_checkpoint` (which tolerates the missing up blocks).
- `model.diffusion_model.project_modules` (12 connectors) keep their official names. In the SDXL
  decoder each skip concatenation `cat(h, skip)` becomes `ZeroSFT(control_j, skip, h)`, one ZeroSFT
  follows the mid block, and a ZeroCrossAttn runs before the upsamplers of up blocks 0 and 1.
- `first_stage_model.denoise_encoder` is a second SDXL VAE encoder (sharing `quant_conv`),
  converted with diffusers' `convert_ldm_vae_checkpoint`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONTROL_PREFIX = "model.control_model."
PROJECT_PREFIX = "model.diffusion_model.project_modules."
DENOISE_PREFIX = "first_stage_model.denoise_encoder."
SUPIR_PREFIXES = (CONTROL_PREFIX, PROJECT_PREFIX, DENOISE_PREFIX)
STRAY_KEYS = ("model.control_model.mask_LQ",)
"""A training leftover in the released files that no module reads (the official loader drops it silently)."""
CROSS_ATTN_AT = (6, 3)
"""Where the two ZeroCrossAttn are inserted into the connector list (in this order), as the official constructor does."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (sgm's `normalization`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ZeroSFT(nn.Module):
    """Spatial feature transform of the decoder's input by an adaptor feature map, blended by the control scale.

    forward(c, skip, h): skip' = skip + zero_conv(c); u = cat(h, skip') (or skip' alone after the mid
    block); out = GroupNorm(u) * (1 + zero_mul(a)) + zero_add(a) with a = SiLU(conv(c)); returns
    s * out + (1 - s) * cat(h, skip), so s = 0 is plain SDXL.
    """

    def __init__(self, label_nc: int, norm_nc: int, concat_channels: int = 0, nhidden: int = 128) -> None:
        super().__init__()
        self.param_free_norm = GroupNorm32(32, norm_nc + concat_channels)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.SiLU())
        self.zero_mul = nn.Conv2d(nhidden, norm_nc + concat_channels, 3, padding=1)
        self.zero_add = nn.Conv2d(nhidden, norm_nc + concat_channels, 3, padding=1)
        self.zero_conv = nn.Conv2d(label_nc, norm_nc, 1)
        self.pre_concat = concat_channels != 0

    def forward(self, c: torch.Tensor, skip: torch.Tensor, h: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
        concat = h is not None and self.pre_concat
        raw = torch.cat([h, skip], dim=1) if concat else skip
        shifted = skip + self.zero_conv(c)
        if concat:
            shifted = torch.cat([h, shifted], dim=1)
        actv = self.mlp_shared(c)
        out = self.param_free_norm(shifted) * (self.zero_mul(actv) + 1) + self.zero_add(actv)
        if h is not None and not self.pre_concat:
            out = torch.cat([h, out], dim=1)
        return out * control_scale + raw * (1 - control_scale)


class ZeroCrossAttn(nn.Module):
    """Cross-attention from the decoder state (queries) to an adaptor feature map (keys/values), added with the control scale."""

    def __init__(self, context_dim: int, query_dim: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim, cross_attention_dim=context_dim, heads=query_dim // 64, dim_head=64, bias=False, out_bias=True)
        self.norm1 = GroupNorm32(32, query_dim)
        self.norm2 = GroupNorm32(32, context_dim)

    def forward(self, c: torch.Tensor, x: torch.Tensor, control_scale: float = 1.0) -> torch.Tensor:
        b, ch, height, width = x.shape
        query = self.norm1(x).flatten(2).transpose(1, 2)
        context = self.norm2(c).flatten(2).transpose(1, 2)
        out = self.attn(query, encoder_hidden_states=context)
        return x + out.transpose(1, 2).reshape(b, ch, height, width) * control_scale


def connector_channels(widths: tuple[int, int, int]) -> list[tuple[str, int, int, int]]:
    """(kind, control channels, skip/query channels, concatenated channels) of the 12 connectors, in official order.

    The official lists are written for widths 320/640/1280; they are these formulas of the level widths.
    """
    w1, w2, w3 = widths
    cond = [w1] * 4 + [w2] * 3 + [w3] * 3
    concat = [w1] * 2 + [w2] * 3 + [w3] * 4 + [0]
    specs: list[tuple[str, int, int, int]] = [("sft", cond[i], cond[i], concat[i]) for i in range(len(cond))]
    for i in CROSS_ATTN_AT:
        specs.insert(i, ("attn", cond[i], concat[i], 0))
    return specs


def build_project_modules(widths: tuple[int, int, int], nhidden: int = 128) -> nn.ModuleList:
    """The 12 connectors (`model.diffusion_model.project_modules`) for an SDXL UNet of these level widths."""
    modules = []
    for kind, cond, channels, concat in connector_channels(widths):
        modules.append(ZeroSFT(cond, channels, concat, nhidden) if kind == "sft" else ZeroCrossAttn(cond, channels))
    return nn.ModuleList(modules)


class GLVControl(nn.Module):
    """The adaptor: an SDXL encoder copy that reads the noisy latent, with the LQ latent added after conv_in.

    Built on the meta device from an SDXL UNet config (a full UNet is never materialised); the
    weights come from `load_state_dict(..., assign=True)` (a checkpoint, or `from_unet` for training).
    """

    def __init__(self, unet_config: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet_config = dict(unet_config)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
            width = unet.config.block_out_channels[0]
            self.input_hint_block = nn.Conv2d(unet.config.in_channels, width, 3, padding=1)
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.add_embedding, self.down_blocks, self.mid_block = unet.add_embedding, unet.down_blocks, unet.mid_block
        self.checkpointing = False
        """Recompute each block in the backward pass (training memory); the denoiser applies it to the UNet part too."""

    @classmethod
    def from_unet(cls, unet: nn.Module, zero_hint: bool = True) -> GLVControl:
        """An adaptor initialised from an SDXL UNet's encoder half (how training starts), hint conv zeroed."""
        control = cls(dict(unet.config))
        source = unet.state_dict()
        state = {k: source[k].clone() for k in control.state_dict() if k in source}
        hint = control.input_hint_block
        state["input_hint_block.weight"] = torch.zeros(hint.weight.shape, dtype=unet.dtype)
        state["input_hint_block.bias"] = torch.zeros(hint.bias.shape, dtype=unet.dtype)
        if not zero_hint:
            nn.init.kaiming_uniform_(state["input_hint_block.weight"], a=5 ** 0.5)
        control.load_state_dict(state, strict=True, assign=True)
        return control

    def forward(self, hint: torch.Tensor, timesteps: torch.Tensor, xt: torch.Tensor, context: torch.Tensor,
                vector: torch.Tensor) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        hint, xt, context, vector = hint.to(dtype), xt.to(dtype), context.to(dtype), vector.to(dtype)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype)) + self.add_embedding(vector)
        h = self.conv_in(xt) + self.input_hint_block(hint)
        maps = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = _call(self.checkpointing, block, h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = _call(self.checkpointing, block, h, temb=emb)
            maps.extend(res)
        maps.append(_call(self.checkpointing, self.mid_block, h, emb, encoder_hidden_states=context))
        return maps


def _call(checkpointing: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args), recomputed in the backward pass instead of stored when training with gradient checkpointing."""
    if checkpointing and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def supir_unet(unet: nn.Module, project_modules: nn.ModuleList, sample: torch.Tensor, timesteps: torch.Tensor,
               context: torch.Tensor, vector: torch.Tensor, control: list[torch.Tensor], control_scale: float,
               checkpointing: bool = False) -> torch.Tensor:
    """The SDXL UNet (diffusers modules) with the connectors in place of the skip concatenations; returns eps."""
    dtype = unet.conv_in.weight.dtype
    sample, context, vector = sample.to(dtype), context.to(dtype), vector.to(dtype)
    with torch.no_grad():  # the frozen SDXL encoder needs no gradients, also when the connectors train (as official)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype)) + unet.add_embedding(vector)
        h = unet.conv_in(sample)
        skips = [h]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(h, temb=emb)
            skips.extend(res)
    h = _call(checkpointing, unet.mid_block, h, emb, encoder_hidden_states=context)
    adapter, index = len(project_modules) - 1, len(control) - 1
    h = _call(checkpointing, project_modules[adapter], control[index].to(dtype), h, None, control_scale)
    adapter, index = adapter - 1, index - 1
    for block in unet.up_blocks:
        attentions = getattr(block, "attentions", None)
        for r, resnet in enumerate(block.resnets):
            c = control[index].to(dtype)
            h = _call(checkpointing, project_modules[adapter], c, skips.pop(), h, control_scale)
            adapter -= 1
            h = _call(checkpointing, resnet, h, emb)
            if attentions is not None:
                h = _call(checkpointing, attentions[r], h, encoder_hidden_states=context, return_dict=False)[0]
            if r == len(block.resnets) - 1 and block.upsamplers is not None:
                h = _call(checkpointing, project_modules[adapter], c, h, control_scale)
                adapter -= 1
                for upsampler in block.upsamplers:
                    h = upsampler(h)
            index -= 1
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h


class SUPIRDenoiser(nn.Module):
    """eps(x_in, t | text, vector, LQ latent): GLVControl feeding the connectors of the frozen SDXL UNet."""

    def __init__(self, unet: nn.Module, control_model: GLVControl, project_modules: nn.ModuleList) -> None:
        super().__init__()
        self.unet, self.control_model, self.project_modules = unet, control_model, project_modules

    def forward(self, x_in: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, vector: torch.Tensor,
                control_latent: torch.Tensor, control_scale: float = 1.0) -> torch.Tensor:
        control = self.control_model(control_latent, timesteps, x_in, context, vector)
        return supir_unet(self.unet, self.project_modules, x_in, timesteps, context, vector, control, control_scale,
                          self.control_model.checkpointing).float()

    def set_attention(self, kind: str) -> None:
        """The attention kernel of every attention layer, connectors included: "sdpa" or "eager"."""
        from diffusers.models.attention_processor import (
            Attention,
            AttnProcessor,
            AttnProcessor2_0,
        )

        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


# ------------------------------------------------------------------------------------------ weights


def split_supir_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The official SUPIR state dict by part (prefixes removed); stray keys dropped, anything else unexpected listed."""
    parts: dict[str, dict[str, torch.Tensor]] = {"control": {}, "project": {}, "denoise": {}, "other": {}}
    for key, value in state.items():
        if key in STRAY_KEYS:
            continue
        for part, prefix in (("control", CONTROL_PREFIX), ("project", PROJECT_PREFIX), ("denoise", DENOISE_PREFIX)):
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
        else:
            parts["other"][key] = value
    return parts


def convert_control(control_state: dict[str, torch.Tensor], unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`model.control_model.*` (sgm names, prefix removed) -> GLVControl keys, with diffusers' own UNet converter."""
    from diffusers.loaders import single_file_utils as sfu

    hint = {k: v for k, v in control_state.items() if k.startswith("input_hint_block.")}
    body = {"model.diffusion_model." + k: v for k, v in control_state.items() if k not in hint}
    converted = sfu.convert_ldm_unet_checkpoint(body, unet_config)
    converted["input_hint_block.weight"] = hint.get("input_hint_block.0.weight")
    converted["input_hint_block.bias"] = hint.get("input_hint_block.0.bias")
    return {k: v for k, v in converted.items() if v is not None}


def convert_denoise_encoder(encoder_state: dict[str, torch.Tensor], vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`first_stage_model.denoise_encoder.*` (LDM VAE encoder names) -> diffusers `Encoder` keys."""
    from diffusers.loaders import single_file_utils as sfu

    fake = {"first_stage_model.encoder." + k: v for k, v in encoder_state.items()}
    converted = sfu.convert_ldm_vae_checkpoint(fake, vae_config)
    return {k[len("encoder."):]: v for k, v in converted.items() if k.startswith("encoder.")}


def denoise_encoder_like(vae: nn.Module) -> nn.Module:
    """A copy of the VAE's encoder architecture to receive the degradation-robust weights (assigned on load)."""
    return copy.deepcopy(vae.encoder)


def check_and_load(module: nn.Module, state: dict[str, torch.Tensor], what: str, dtype: torch.dtype) -> list[str]:
    """Load `state` strictly into `module` (meta or not); returns readable problems instead of raising."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{what}: {len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{what}: {len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{what}: {len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    if not problems:
        module.load_state_dict({k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in expected},
                               strict=True, assign=True)
    return problems


def official_state_dict(control: GLVControl, project_modules: nn.ModuleList, denoise_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The three parts in the official SUPIR checkpoint layout (what `diffsr train supir` writes and `load` reads)."""
    from diffsr.diffusion.ldm_layout import unet_to_ldm, vae_to_ldm

    body = {k: v for k, v in control.state_dict().items() if not k.startswith("input_hint_block.")}
    out = {CONTROL_PREFIX + k: v for k, v in unet_to_ldm(body, control.unet_config).items()}
    out[CONTROL_PREFIX + "input_hint_block.0.weight"] = control.input_hint_block.weight
    out[CONTROL_PREFIX + "input_hint_block.0.bias"] = control.input_hint_block.bias
    out.update({PROJECT_PREFIX + k: v for k, v in project_modules.state_dict().items()})
    levels = sum(1 for _ in denoise_encoder.down_blocks)
    encoder = vae_to_ldm({"encoder." + k: v for k, v in denoise_encoder.state_dict().items()}, levels)
    out.update({DENOISE_PREFIX + k[len("encoder."):]: v for k, v in encoder.items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def zero_init_connectors(project_modules: nn.ModuleList) -> None:
    """The official initialisation: ZeroSFT's zero_conv / zero_mul / zero_add start at zero (so SDXL is unchanged)."""
    for module in project_modules:
        if isinstance(module, ZeroSFT):
            for conv in (module.zero_conv, module.zero_mul, module.zero_add):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)


def connector_hidden(project_state: dict[str, torch.Tensor]) -> int:
    """ZeroSFT's hidden width (128 in SUPIR v0; the checkpoint says)."""
    weight = project_state.get("0.mlp_shared.0.weight")
    return int(weight.shape[0]) if weight is not None else 128
