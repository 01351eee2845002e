"""The Stable Diffusion bases the methods build on, with the diffusers configs of their components.

The configs are here so that a single original-layout file (``v2-1_512-ema-pruned.safetensors``,
``sd_xl_base_1.0.safetensors``, ...) loads without fetching anything: diffusers' own single-file path
downloads the matching configs from the Hugging Face hub, which an offline machine cannot reach. The
values are those of the publishers' diffusers folders (stabilityai/stable-diffusion-2-1-base,
stable-diffusion-2-1, sd-turbo, stable-diffusion-xl-base-1.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_SD2_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

_SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "force_upcast": False,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_OPENCLIP_H_TEXT: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a base: its transformers class and config, its tokenizer, its layout in a single file."""

    model_class: str
    """"CLIPTextModel" or "CLIPTextModelWithProjection"."""
    config: dict[str, Any]
    pad_token: str
    """"!" for OpenCLIP-trained encoders (SD 2.x, SDXL's second), "<|endoftext|>" for OpenAI CLIP."""
    ldm_prefix: str
    ldm_layout: str
    """"openclip" (resblocks with fused in_proj) or "hf" (transformers names under the prefix)."""


@dataclass(frozen=True)
class BaseSpec:
    name: str
    summary: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: dict[str, Any]
    filenames: tuple[str, ...]
    """What the publisher calls the single-file checkpoint(s)."""
    source: str
    licence: str
    pipeline_class: str = "StableDiffusionPipeline"
    extra: dict[str, Any] = field(default_factory=dict)


_SD2_TEXT = TextEncoderSpec("CLIPTextModel", _OPENCLIP_H_TEXT, "!", "cond_stage_model.model.", "openclip")

BASES: dict[str, BaseSpec] = {
    "sd21-base": BaseSpec(
        "sd21-base", "Stable Diffusion 2.1-base, 512 px, epsilon prediction (StableSR, OSEDiff)",
        _SD2_UNET, _SD_VAE, (_SD2_TEXT,),
        {"_class_name": "PNDMScheduler", "prediction_type": "epsilon", **_SCALED_LINEAR},
        ("v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.ckpt"),
        "https://huggingface.co/stabilityai/stable-diffusion-2-1-base", "CreativeML Open RAIL++-M",
    ),
    "sd21-v": BaseSpec(
        "sd21-v", "Stable Diffusion 2.1, 768 px, v-prediction (StableSR 768v)",
        {**_SD2_UNET, "sample_size": 96, "upcast_attention": True}, {**_SD_VAE, "sample_size": 768}, (_SD2_TEXT,),
        {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction", "clip_sample": False, **_SCALED_LINEAR},
        ("v2-1_768-ema-pruned.safetensors", "v2-1_768-ema-pruned.ckpt"),
        "https://huggingface.co/stabilityai/stable-diffusion-2-1", "CreativeML Open RAIL++-M",
    ),
    "sd-turbo": BaseSpec(
        "sd-turbo", "SD-Turbo (distilled SD 2.1, 512 px, 1-4 steps; InvSR, StableSR turbo)",
        _SD2_UNET, {**_SD_VAE, "sample_size": 768}, (_SD2_TEXT,),
        {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "interpolation_type": "linear",
         "timestep_spacing": "trailing", "use_karras_sigmas": False, "sample_max_value": 1.0, **_SCALED_LINEAR},
        ("sd_turbo.safetensors",),
        "https://huggingface.co/stabilityai/sd-turbo", "Stability AI Community Licence (non-commercial above revenue limits)",
    ),
    "sdxl-base": BaseSpec(
        "sdxl-base", "Stable Diffusion XL base 1.0, 1024 px (SUPIR)",
        {
            **_SD2_UNET,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        },
        {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        (
            TextEncoderSpec(
                "CLIPTextModel",
                {**_OPENCLIP_H_TEXT, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                 "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
                "<|endoftext|>", "conditioner.embedders.0.transformer.", "hf",
            ),
            TextEncoderSpec(
                "CLIPTextModelWithProjection",
                {**_OPENCLIP_H_TEXT, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                 "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280},
                "!", "conditioner.embedders.1.model.", "openclip",
            ),
        ),
        {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "interpolation_type": "linear",
         "timestep_spacing": "leading", "use_karras_sigmas": False, "sample_max_value": 1.0, **_SCALED_LINEAR},
        ("sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors"),
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0", "CreativeML Open RAIL++-M",
        pipeline_class="StableDiffusionXLPipeline",
    ),
}

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."


def get_base(name: str) -> BaseSpec:
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"unknown base model '{name}'; use one of {', '.join(BASES)}") from None
