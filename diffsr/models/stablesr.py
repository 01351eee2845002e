"""StableSR's networks on top of a diffusers SD 2.x UNet and VAE: time-aware encoder, SFT layers, CFW.

StableSR keeps Stable Diffusion frozen and adds three things (Wang et al., IJCV 2024):

- a time-aware encoder (the official `EncoderUNetModelWT`, a half UNet) that turns the LR latent
  and the timestep into feature maps at every UNet resolution, keyed by their width;
- one SFT layer (the official `SPADE`) per UNet ResBlock, applied to the residual branch (after the
  second convolution, before the skip add): ``GN(h) * (1 + gamma(s)) + beta(s)``;
- CFW, two fusion blocks in the VAE decoder that add ``w * Fuse(encoder features, decoder features)``
  before the upsamplers of decoder levels 2 and 1.

The modules here use the official parameter names (so `structcond_stage_model.*`,
`model.diffusion_model.*.spade.*` and `decoder.fusion_layer_*` keys load as they are) and are
attached to the stock diffusers modules with hooks, so the SD weights stay the publishers' own:
an SFT hook on every `ResnetBlock2D.conv2`, feature-capture hooks on the VAE encoder, and fusion
pre-hooks on the decoder's upsamplers. Architectures are read from the checkpoint's shapes, so the
official release and the tiny parity-fixture models load through the same code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.models.loading import WeightsError

ENCODER_PREFIX = "structcond_stage_model."
UNET_PREFIX = "model.diffusion_model."
SPADE_MARK = ".spade."
CFW_PREFIX = "decoder.fusion_layer_"
SFT_HIDDEN = 128
"""Hidden width of every SFT layer's shared convolution (hard-coded in the official SPADE)."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activations' dtype (as the official GroupNorm32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-5)


# ------------------------------------------------------------------------------------------------
# time-aware encoder


def timestep_features(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding (cos first, max period 1e4) the encoder and the SD UNet share."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class EncoderResBlock(nn.Module):
    """The time-conditioned residual block of the official openaimodel (its key names)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class EncoderAttention(nn.Module):
    """Legacy openaimodel self-attention: GroupNorm, 1x1 Conv1d qkv split heads-first, zero-init projection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible by {heads} heads")
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        length = qkv.shape[-1]
        ch = c // self.heads
        # heads first, then q/k/v within each head (QKVAttentionLegacy)
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, length).split(ch, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).reshape(b, c, length)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class EncoderDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


@dataclass(frozen=True)
class EncoderLayout:
    """The time-aware encoder's shape, as read from a checkpoint (or the official config)."""

    in_channels: int
    model_channels: int
    out_channels: int
    blocks: tuple[tuple[str, int, int, bool], ...]
    """Input blocks after conv_in: ("res", in, out, has_attention) or ("down", ch, ch, False)."""
    heads: int = 4

    @property
    def middle_channels(self) -> int:
        return self.blocks[-1][2]

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Inputs of the fea_tran blocks: the width before every downsample, then the middle block's."""
        return tuple(ch for kind, ch, _, _ in self.blocks if kind == "down") + (self.middle_channels,)

    @classmethod
    def official(cls, model_channels: int = 256, channel_mult: tuple[int, ...] = (1, 1, 2, 2), res_blocks: int = 2,
                 attention: tuple[int, ...] = (4, 2, 1), out_channels: int = 256, heads: int = 4) -> EncoderLayout:
        """The layout of the official configs (v2-finetune_text_T_512 / 768v)."""
        blocks: list[tuple[str, int, int, bool]] = []
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks):
                blocks.append(("res", ch, mult * model_channels, ds in attention))
                ch = mult * model_channels
            if level != len(channel_mult) - 1:
                blocks.append(("down", ch, ch, False))
                ds *= 2
        return cls(4, model_channels, out_channels, tuple(blocks), heads)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], heads: int = 4) -> EncoderLayout:
        """Read from `structcond_stage_model.*` weights (prefix removed)."""
        conv_in = state["input_blocks.0.0.weight"]
        blocks = []
        index = 1
        while True:
            prefix = f"input_blocks.{index}."
            if prefix + "0.op.weight" in state:
                ch = state[prefix + "0.op.weight"].shape[0]
                blocks.append(("down", ch, ch, False))
            elif prefix + "0.in_layers.2.weight" in state:
                weight = state[prefix + "0.in_layers.2.weight"]
                blocks.append(("res", weight.shape[1], weight.shape[0], prefix + "1.qkv.weight" in state))
            else:
                break
            index += 1
        out_channels = state["fea_tran.0.out_layers.3.weight"].shape[0]
        return cls(conv_in.shape[1], conv_in.shape[0], out_channels, tuple(blocks), heads)


class TimeAwareEncoder(nn.Module):
    """The official `EncoderUNetModelWT`: LR latent + timestep -> {str(width): features} for the SFT layers."""

    def __init__(self, layout: EncoderLayout):
        super().__init__()
        self.layout = layout
        mc = layout.model_channels
        emb = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        blocks: list[nn.Module] = [nn.ModuleList([nn.Conv2d(layout.in_channels, mc, 3, padding=1)])]
        for kind, cin, cout, attention in layout.blocks:
            if kind == "down":
                blocks.append(nn.ModuleList([EncoderDownsample(cin)]))
            else:
                layers: list[nn.Module] = [EncoderResBlock(cin, emb, cout)]
                if attention:
                    layers.append(EncoderAttention(cout, layout.heads))
                blocks.append(nn.ModuleList(layers))
        self.input_blocks = nn.ModuleList(blocks)
        mid = layout.middle_channels
        self.middle_block = nn.ModuleList([EncoderResBlock(mid, emb, mid), EncoderAttention(mid, layout.heads), EncoderResBlock(mid, emb, mid)])
        self.fea_tran = nn.ModuleList([EncoderResBlock(ch, emb, layout.out_channels) for ch in layout.feature_channels])

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_features(timesteps, self.layout.model_channels).to(dtype))
        kept: list[torch.Tensor] = []
        h = latent.to(dtype)
        for i, block in enumerate(self.input_blocks):
            before = h
            for layer in block:
                h = layer(h) if i == 0 else layer(h, emb)
            if h.shape[-1] != before.shape[-1]:
                kept.append(before)  # the activation before every downsample
        for layer in self.middle_block:
            h = layer(h, emb)
        kept.append(h)
        return {str(f.shape[-1]): tran(f, emb) for f, tran in zip(kept, self.fea_tran)}


# ------------------------------------------------------------------------------------------------
# SFT layers on the diffusers UNet


class SFTLayer(nn.Module):
    """The official SPADE: affine GroupNorm of the residual branch, scaled and shifted by convs of the features."""

    def __init__(self, channels: int, feature_channels: int):
        super().__init__()
        self.param_free_norm = _norm(channels)  # "param free" in name only: it is affine and trained
        self.mlp_shared = nn.Sequential(nn.Conv2d(feature_channels, SFT_HIDDEN, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(SFT_HIDDEN, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(SFT_HIDDEN, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        key = str(h.shape[-1])
        if key not in features:
            raise ValueError(f"SFT: no encoder features of width {key} (have {', '.join(features)}); the LR latent and the "
                             "noisy latent must have the same size")
        actv = self.mlp_shared(features[key].to(h.dtype))
        return self.param_free_norm(h) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def unet_resnet_names(unet: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers ResnetBlock2D of an SD UNet under its official name (input_blocks.N.0, ...)."""
    per_level = unet.config.layers_per_block
    names: dict[str, nn.Module] = {}
    for i, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            names[f"input_blocks.{1 + i * (per_level + 1) + j}.0"] = resnet
    for j, resnet in enumerate(unet.mid_block.resnets):
        names[f"middle_block.{2 * j}"] = resnet
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            names[f"output_blocks.{i * (per_level + 1) + j}.0"] = resnet
    return names


def _module_key(name: str) -> str:
    return name.replace(".", "-")


class StableSRAdapter(nn.Module):
    """The trained part of StableSR stage 1: the time-aware encoder and the SFT layers, keyed by official names."""

    def __init__(self, layout: EncoderLayout, sft_channels: dict[str, int]):
        super().__init__()
        self.structcond = TimeAwareEncoder(layout)
        self.sft = nn.ModuleDict({_module_key(name): SFTLayer(c, layout.out_channels) for name, c in sft_channels.items()})
        self._features: dict[str, torch.Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], heads: int = 4) -> StableSRAdapter:
        """Build and load from official-layout keys (`structcond_stage_model.*`, `model.diffusion_model.*.spade.*`)."""
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        if not encoder:
            raise WeightsError(f"no time-aware encoder weights ({ENCODER_PREFIX}* keys)")
        channels = {}
        for key, value in state.items():
            match = re.fullmatch(re.escape(UNET_PREFIX) + r"(.+)\.spade\.mlp_gamma\.weight", key)
            if match:
                channels[match.group(1)] = value.shape[0]
        if not channels:
            raise WeightsError(f"no SFT layer weights ({UNET_PREFIX}*{SPADE_MARK}* keys)")
        adapter = cls(EncoderLayout.from_state(encoder, heads), dict(sorted(channels.items())))
        adapter.load_official(state)
        return adapter

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official names (what the webui files and our safetensors hold)."""
        out = {ENCODER_PREFIX + k: v for k, v in self.structcond.state_dict().items()}
        for key, layer in self.sft.items():
            name = key.replace("-", ".")
            out.update({f"{UNET_PREFIX}{name}.spade.{k}": v for k, v in layer.state_dict().items()})
        return out

    def load_official(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.official_state_dict()
        missing = sorted(set(expected) - set(state))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or wrong:
            detail = f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(wrong)} of another shape (e.g. {wrong[0]})"
            raise WeightsError(f"StableSR encoder/SFT weights: {detail}")
        encoder = {k[len(ENCODER_PREFIX):]: state[k].float() for k in expected if k.startswith(ENCODER_PREFIX)}
        self.structcond.load_state_dict(encoder, strict=True)
        for key, layer in self.sft.items():
            prefix = f"{UNET_PREFIX}{key.replace('-', '.')}.spade."
            layer.load_state_dict({k[len(prefix):]: state[k].float() for k in expected if k.startswith(prefix)}, strict=True)

    def attach(self, unet: nn.Module) -> None:
        """Hook every SFT layer onto the output of its UNet ResBlock's second convolution."""
        self.detach()
        resnets = unet_resnet_names(unet)
        names = {key.replace("-", ".") for key in self.sft}
        if names != set(resnets):
            extra, absent = sorted(names - set(resnets)), sorted(set(resnets) - names)
            raise WeightsError(f"the SFT layers do not fit this UNet (no ResBlock for {extra[:2]}, no SFT layer for {absent[:2]}); "
                               "the StableSR weights and the base model must be of the same SD 2.x architecture")
        for name, resnet in resnets.items():
            layer = self.sft[_module_key(name)]
            if layer.mlp_gamma.out_channels != resnet.conv2.out_channels:
                raise WeightsError(f"SFT layer {name} has {layer.mlp_gamma.out_channels} channels, the UNet's ResBlock "
                                   f"{resnet.conv2.out_channels}: the weights belong to another base model")
            self._handles.append(resnet.conv2.register_forward_hook(self._hook(layer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, layer: SFTLayer):
        def apply(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._features is None:
                raise RuntimeError("StableSR UNet called outside StableSRAdapter.conditioned(...)")
            return layer(output, self._features)

        return apply

    @contextmanager
    def conditioned(self, features: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, UNet calls are modulated by these encoder features."""
        self._features = features
        try:
            yield
        finally:
            self._features = None


# ------------------------------------------------------------------------------------------------
# CFW: controllable feature wrapping in the VAE decoder


def _cfw_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class CFWResBlock(nn.Module):
    """GroupNorm-swish-conv twice, with a 1x1 skip when the width changes (official model.ResBlock)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _cfw_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _cfw_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_out is None else self.conv_out(x))


class DenseBlock(nn.Module):
    """ESRGAN's residual dense block (5 convs, growth 32, LeakyReLU 0.2, residual scale 0.2)."""

    def __init__(self, channels: int, grow: int = 32):
        super().__init__()
        for i in range(1, 6):
            setattr(self, f"conv{i}", nn.Conv2d(channels + (i - 1) * grow, channels if i == 5 else grow, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, channels: int, grow: int = 32):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = DenseBlock(channels, grow), DenseBlock(channels, grow), DenseBlock(channels, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class CFWFusion(nn.Module):
    """The official `Fuse_sft_block_RRDB`: dec + w * ResBlock(RRDBs(ResBlock(cat[enc, dec])))."""

    def __init__(self, channels: int, blocks: int = 2):
        super().__init__()
        self.encode_enc_1 = CFWResBlock(2 * channels, channels)
        self.encode_enc_2 = nn.Sequential(*[RRDB(channels) for _ in range(blocks)])
        self.encode_enc_3 = CFWResBlock(channels, channels)

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        fused = self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], 1))))
        return dec + w * fused


class CFW(nn.Module):
    """The fusion layers of the CFW decoder, keyed by the official decoder level (1 = H/2, 2 = H/4, ...)."""

    def __init__(self, channels: dict[int, int], blocks: int = 2):
        super().__init__()
        self.levels = tuple(sorted(channels))
        for level in self.levels:
            setattr(self, f"fusion_layer_{level}", CFWFusion(channels[level], blocks))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> CFW:
        """From `decoder.fusion_layer_*` keys (the rest of the CFW autoencoder is the SD VAE)."""
        channels: dict[int, int] = {}
        blocks: dict[int, int] = {}
        for key, value in state.items():
            match = re.fullmatch(re.escape(CFW_PREFIX) + r"(\d+)\.encode_enc_3\.conv2\.weight", key)
            if match:
                channels[int(match.group(1))] = value.shape[0]
            match = re.fullmatch(re.escape(CFW_PREFIX) + r"(\d+)\.encode_enc_2\.(\d+)\.rdb1\.conv1\.weight", key)
            if match:
                level = int(match.group(1))
                blocks[level] = max(blocks.get(level, 0), int(match.group(2)) + 1)
        if not channels:
            raise WeightsError(f"no CFW fusion layers ({CFW_PREFIX}* keys)")
        counts = set(blocks.values())
        if len(counts) != 1:
            raise WeightsError(f"CFW fusion layers with unequal RRDB counts {blocks}")
        cfw = cls(channels, counts.pop())
        own = cfw.state_dict()
        missing = sorted(k for k in own if "decoder." + k not in state)
        if missing:
            raise WeightsError(f"CFW weights incomplete: {len(missing)} missing (e.g. decoder.{missing[0]})")
        cfw.load_state_dict({k: state["decoder." + k].float() for k in own}, strict=True)
        return cfw

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        return {"decoder." + k: v for k, v in self.state_dict().items()}

    def check(self, vae: nn.Module) -> None:
        """The fusion layers must sit at existing decoder levels of the VAE, with its widths."""
        levels = len(vae.decoder.up_blocks)
        for level in self.levels:
            if not 0 < level < levels - 1:
                raise WeightsError(f"CFW fusion layer {level} has no place in a {levels}-level VAE decoder")
            width = vae.encoder.down_blocks[level].resnets[-1].conv2.out_channels
            own = getattr(self, f"fusion_layer_{level}").encode_enc_3.conv2.out_channels
            if own != width:
                raise WeightsError(f"CFW fusion layer {level} has {own} channels, the VAE level {width}: another VAE")

    @contextmanager
    def capture(self, vae: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, VAE encoder runs record the features CFW needs (per level, before downsampling)."""
        features: dict[int, torch.Tensor] = {}
        handles = []
        for level in self.levels:
            def keep(module: nn.Module, args: tuple, output: torch.Tensor, level: int = level) -> None:
                features[level] = output
            handles.append(vae.encoder.down_blocks[level].resnets[-1].register_forward_hook(keep))
        try:
            yield features
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def fused(self, vae: nn.Module, features: dict[int, torch.Tensor], w: float) -> Iterator[None]:
        """Within the block, VAE decoder runs add `w` times the fusion of these encoder features."""
        if w == 0:  # dec + 0 * fuse == dec: the plain SD decoder
            yield
            return
        levels = len(vae.decoder.up_blocks)
        handles = []
        for level in self.levels:
            layer = getattr(self, f"fusion_layer_{level}")
            upsampler = vae.decoder.up_blocks[levels - 1 - level].upsamplers[0]

            def fuse(module: nn.Module, args: tuple, layer: CFWFusion = layer, level: int = level) -> tuple:
                enc = features[level]
                if enc.shape[-2:] != args[0].shape[-2:]:
                    raise ValueError(f"CFW level {level}: encoder features {tuple(enc.shape)} do not match the decoder's "
                                     f"{tuple(args[0].shape)}; encode the same image that is decoded")
                return (layer(enc.to(args[0].dtype), args[0], w),) + tuple(args[1:])

            handles.append(upsampler.register_forward_pre_hook(fuse))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(StableSR's own keys: encoder + SFT, everything else: the SD base's) of an official checkpoint."""
    own = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX) or (k.startswith(UNET_PREFIX) and SPADE_MARK in k)}
    return own, {k: v for k, v in state.items() if k not in own}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
