"""diffusers -> original (LDM / sgm / OpenCLIP) key layout, so tiny models can be written as single files.

Loading goes the other way through diffusers' own converters (see `loading.py`); writing tiny
single files with an independent mapping, and reading them back through diffusers, checks both
directions (tests/test_diffusion_loading.py), and the official fixtures' files check the reading
direction on their own.
"""

from __future__ import annotations

from typing import Any

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))


class _Renamer:
    """Renames groups of keys and remembers which source keys it used, so none is silently left out."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.used: set[str] = set()

    def __call__(self, src: str, dst: str, inner: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
        out = _rename_under(self.state, src, dst, inner)
        self.used.update(k for k in self.state if k.startswith(src))
        return out

    def check(self, what: str) -> None:
        missing = sorted(set(self.state) - self.used)
        if missing:
            raise ValueError(f"{what}: {len(missing)} weights have no original-layout name, e.g. {missing[:3]}")


def _rename_under(state: dict[str, torch.Tensor], src: str, dst: str, inner: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(src):
            rest = key[len(src):]
            for old, new in inner:
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[dst + rest] = value
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> `input_blocks` / `middle_block` / `output_blocks` names (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    rename = _Renamer(state)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for src, dst in fixed.items():
        out.update(rename(src + ".", dst + "."))
    per_level = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(per_level):
            block = 1 + i * (per_level + 1) + j
            out.update(rename(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _RESNET))
            if kind.startswith("CrossAttn"):
                out.update(rename(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1."))
        if i < levels - 1:
            out.update(rename(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_level + 1)}.0.op."))
    for i, kind in enumerate(config["up_block_types"]):
        has_attention = kind.startswith("CrossAttn")
        for j in range(per_level + 1):
            block = i * (per_level + 1) + j
            out.update(rename(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", _RESNET))
            if has_attention:
                out.update(rename(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1."))
        if i < levels - 1:
            last = i * (per_level + 1) + per_level
            out.update(rename(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}."))
    out.update(rename("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        out.update(rename(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _RESNET))
    rename.check("unet_to_ldm")
    return out


_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> `encoder.down.N.block.M` / `decoder.up.N` names; attention as 1x1 convs."""
    out: dict[str, torch.Tensor] = {}
    rename = _Renamer(state)
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            out.update(rename(f"{side}.{name}.", f"{side}.{name}."))
        out.update(rename(f"{side}.conv_norm_out.", f"{side}.norm_out."))
        for j in range(2):
            out.update(rename(f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}.", _VAE_RESNET))
        attention = rename(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION)
        out.update({k: v[:, :, None, None] if v.ndim == 2 else v for k, v in attention.items()})
    for i in range(levels):
        out.update(rename(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", ()))
        out.update(rename(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        out.update(rename(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        out.update(rename(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - i}.upsample.conv."))
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}
    for name in ("quant_conv", "post_quant_conv"):
        out.update(rename(f"{name}.", f"{name}."))
    rename.check("vae_to_ldm")
    return out


def openclip_text_to_ldm(state: dict[str, torch.Tensor], layers: int, hidden: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) weights -> OpenCLIP text-tower names (`transformer.resblocks.N`, fused qkv)."""
    state = with_text_model_prefix(state)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    else:  # SD 2.x files carry the (unused) projection too
        out["text_projection"] = torch.eye(hidden)
    for i in range(layers):
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def with_text_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names as in saved CLIP files (`text_model.*`); transformers >= 5.6 drops that level in CLIPTextModel."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}
