"""InvSR's noise predictor f_w, built from stock diffusers blocks with the official state-dict keys.

InvSR (Yue et al., CVPR 2025) ships the predictor as `NoisePredictor` in a vendored copy of
diffusers; upstream diffusers has no such class. Its content is a VAE-encoder-like network whose
ResNet blocks are conditioned on the diffusion timestep (`TimeAwareEncoder`), so here it is put
together from upstream's `Timesteps`, `TimestepEmbedding`, `AttnDownBlock2D` (via `get_down_block`)
and `UNetMidBlock2D` with the official constructor arguments. The module tree, and so every key of
`noise_predictor_sd_turbo_v5.pth` (all under ``encoder.``), is the official one; loading is strict.

The predictor sees the LR image itself (no upsampling, [0, 1] mapped to [-1, 1] inside) and the start
timestep, and returns a posterior sample of the noise that puts the LR latent on SD-Turbo's
trajectory: mean + exp(logvar / 2) * eps with logvar clamped to [-30, 20], at 1/2 of the LR size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

NOISE_PREDICTOR_FILE = "noise_predictor_sd_turbo_v5.pth"
NOISE_PREDICTOR_SOURCE = "https://huggingface.co/OAOA/InvSR"
KEY_PREFIX = "encoder."


@dataclass(frozen=True)
class NoisePredictorConfig:
    """`model_start.params` of the official configs (configs/sample-sd-turbo.yaml); defaults = the released v5 model."""

    in_channels: int = 3
    down_block_types: tuple[str, ...] = ("AttnDownBlock2D", "AttnDownBlock2D")
    block_out_channels: tuple[int, ...] = (256, 512)
    layers_per_block: tuple[int, ...] | int = (3, 3)
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    attention_head_dim: int = 64
    mid_block_add_attention: bool = True
    resnet_time_scale_shift: str = "default"
    temb_channels: int = 512
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    double_z: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Official keys with no effect on the network (up_block_types, sample_size), kept for round trips."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoisePredictorConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k != "extra"}, **self.extra}


class TimeAwareEncoder(nn.Module):
    """The official TimeAwareEncoder: a VAE encoder whose ResNets take a timestep embedding."""

    def __init__(self, config: NoisePredictorConfig) -> None:
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block

        super().__init__()
        channels = tuple(config.block_out_channels)
        layers = config.layers_per_block
        layers = (layers,) * len(config.down_block_types) if isinstance(layers, int) else tuple(layers)
        if len(layers) != len(config.down_block_types) or len(channels) != len(config.down_block_types):
            raise ValueError("noise predictor config: down_block_types, block_out_channels and layers_per_block differ in length")
        projection = max(128, channels[0])  # official: the sinusoidal embedding is never narrower than 128
        self.time_proj = Timesteps(projection, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(projection, config.temb_channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        out_channels = channels[0]
        for index, block_type in enumerate(config.down_block_types):
            in_channels, out_channels = out_channels, channels[index]
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers[index], in_channels=in_channels, out_channels=out_channels,
                temb_channels=config.temb_channels, add_downsample=index < len(channels) - 1, resnet_eps=1e-6,
                resnet_act_fn=config.act_fn, resnet_groups=config.norm_num_groups, downsample_padding=0,
                attention_head_dim=config.attention_head_dim, resnet_time_scale_shift=config.resnet_time_scale_shift,
            ))
        self.mid_block = UNetMidBlock2D(
            in_channels=channels[-1], temb_channels=config.temb_channels, resnet_eps=1e-6, resnet_act_fn=config.act_fn,
            output_scale_factor=1, attention_head_dim=config.attention_head_dim, resnet_groups=config.norm_num_groups,
            add_attention=config.mid_block_add_attention, resnet_time_scale_shift=config.resnet_time_scale_shift,
        )
        self.conv_norm_out = nn.GroupNorm(num_channels=channels[-1], num_groups=config.norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels if config.double_z else config.latent_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor | float) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float32, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = self.time_proj(timesteps).to(self.time_embedding.linear_1.weight.dtype)
        emb = self.time_embedding(emb)
        sample = self.conv_in(sample)
        checkpoint = self.training and self.gradient_checkpointing
        for block in self.down_blocks:
            if checkpoint:
                sample, _ = torch.utils.checkpoint.checkpoint(block, sample, emb, use_reentrant=False)
            else:
                sample, _ = block(sample, emb)
        if checkpoint:
            sample = torch.utils.checkpoint.checkpoint(self.mid_block, sample, emb, use_reentrant=False)
        else:
            sample = self.mid_block(sample, emb)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


NoiseDraw = Callable[[Sequence[int], torch.device, torch.dtype], torch.Tensor]


class NoisePredictor(nn.Module):
    """f_w: the LR image ([0, 1]) and a timestep -> (mean, logvar) of the start noise, or a sample of it."""

    def __init__(self, config: NoisePredictorConfig | None = None) -> None:
        super().__init__()
        self.config = config or NoisePredictorConfig()
        self.encoder = TimeAwareEncoder(self.config)

    def moments(self, image: torch.Tensor, timesteps: torch.Tensor | float, center_input_sample: bool = True) -> torch.Tensor:
        """The raw 2*latent_channels output (mean, then unclamped logvar)."""
        if center_input_sample:
            image = image * 2 - 1.0
        return self.encoder(image, timesteps)

    def forward(self, image: torch.Tensor, timesteps: torch.Tensor | float, draw: NoiseDraw | None = None,
                center_input_sample: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """With `draw` (shape, device, dtype -> standard normal), the posterior sample; else (mean, logvar)."""
        moments = self.moments(image, timesteps, center_input_sample)
        if not self.config.double_z:
            return moments
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        if draw is None:
            return mean, logvar
        return mean + torch.exp(0.5 * logvar) * draw(mean.shape, mean.device, mean.dtype)


def load_noise_predictor(path: str, config: NoisePredictorConfig | None = None) -> NoisePredictor:
    """The official checkpoint (or its `diffsr convert` safetensors), loaded strictly onto our module."""
    from diffsr.diffusion.loading import load_method_checkpoint
    from diffsr.models.loading import WeightsError

    state = load_method_checkpoint(path, "invsr", (KEY_PREFIX,))
    config = config or infer_config(state)
    model = NoisePredictor(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of other shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})" if wrong else "",
        ) if part)
        raise WeightsError(f"{path}: does not fit InvSR's noise predictor ({detail}); expected --weights {NOISE_PREDICTOR_FILE} "
                           f"(from {NOISE_PREDICTOR_SOURCE})")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


def infer_config(state: dict[str, torch.Tensor]) -> NoisePredictorConfig:
    """Widths and depths read from the tensors, so the released model and smaller trained ones load without a config file.

    What cannot be read from shapes (the GroupNorm group count, the attention head width) takes the
    official values, scaled down only where they would not divide the channels (tiny test models).
    """
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    if not blocks:
        return NoisePredictorConfig()
    channels = tuple(int(state[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"].shape[0]) for b in blocks)
    layers = tuple(len({int(k.split(".")[4]) for k in state if k.startswith(f"encoder.down_blocks.{b}.resnets.")}) for b in blocks)
    types = tuple("AttnDownBlock2D" if any(k.startswith(f"encoder.down_blocks.{b}.attentions.") for k in state) else "DownBlock2D" for b in blocks)
    temb = int(state["encoder.time_embedding.linear_2.weight"].shape[0])
    latent = int(state["encoder.conv_out.weight"].shape[0]) // 2
    groups = NoisePredictorConfig.norm_num_groups
    while min(channels) % groups:
        groups //= 2
    head = NoisePredictorConfig.attention_head_dim
    while min(channels) % head or min(channels) // head < 1:
        head //= 2
    return NoisePredictorConfig(down_block_types=types, block_out_channels=channels, layers_per_block=layers, latent_channels=latent,
                                norm_num_groups=groups, attention_head_dim=head, temb_channels=temb,
                                mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in state))
