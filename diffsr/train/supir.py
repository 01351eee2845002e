"""`diffsr train supir CONFIG`: SUPIR's training recipe, RECONSTRUCTED (no training code, data or config was released).

NON-COMMERCIAL: this trains the SUPIR architecture, which the SUPIR licence covers (diffsr.noncommercial);
set `accept_licence: true` in the config (or DIFFSR_NONCOMMERCIAL=1).

What is known (paper, released weights and the vestiges in the released code): SDXL stays frozen;
the adaptor (GLVControl, initialised as a copy of the SDXL encoder half, its hint conv zeroed) and the
12 connectors (ZeroSFT's zero_conv / zero_mul / zero_add zeroed) learn with SDXL's eps loss; the
frozen SDXL encoder runs without gradients while gradients pass through the frozen decoder; the
degradation-robust encoder is a fine-tuned copy of the SDXL VAE encoder trained so that the frozen
decoder reconstructs the HQ image from the LQ input. What is reconstructed here (choices of this
port, not official): the two stages as separate runs (`stage: encoder`, then `stage: adaptor`), the
encoder loss (L1 in pixels + `latent_weight` x MSE to the SDXL encoder's latent of the HQ image),
uniform timesteps 0..999, text dropout 5%, the caption as the positive text, the inference-time size
vector (1024, 1024, 0, 0, 1024, 1024), AdamW with lr 1e-5, and the optional negative-quality
samples (images of `negative_data` trained with the negative-quality prompt as their caption, as the
paper describes). The paper's progressive connector schedule is not used (the released code
disables it).

The result is one safetensors file in the official checkpoint layout (model.control_model.*,
model.diffusion_model.project_modules.*, first_stage_model.denoise_encoder.*), which
`diffsr upscale --method supir --weights` reads like SUPIR-v0Q.ckpt.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.progress import OptionalCallback
from diffsr.train.loop import ConfigError, LoopSettings, Trainer

STAGES = ("adaptor", "encoder")


@dataclasses.dataclass
class Config:
    base: str
    """SDXL base (single file or diffusers folder), frozen."""
    data: list[str] = dataclasses.field(default_factory=list)
    """Folders of HQ images."""
    stage: str = "adaptor"
    """adaptor: GLVControl + connectors with the eps loss; encoder: the degradation-robust encoder."""
    weights: str | None = None
    """A SUPIR checkpoint to start from (e.g. an encoder-stage result, or SUPIR-v0Q.ckpt to fine-tune); none: from SDXL."""
    config_dir: str | None = None
    accept_licence: bool = False
    captions: str | None = None
    """JSON file {image file name: caption}; images without one get an empty caption."""
    negative_data: list[str] = dataclasses.field(default_factory=list)
    """Folders of negative-quality images (trained with the negative-quality prompt as caption)."""
    crop_size: int = 1024
    scale: int = 4
    """Degradation scale: the LQ is made at crop/scale and resized back to the crop (SUPIR restores at full size)."""
    degradation: str = "realesrgan"
    batch_size: int = 1
    num_workers: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.0
    text_dropout: float = 0.05
    latent_weight: float = 1.0
    gradient_checkpointing: bool = True
    max_steps: int = 100000
    save_every: int = 1000
    log_every: int = 10
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    seed: int = 0
    cpu: bool = False


class _Flagged(torch.utils.data.Dataset):
    """Positive and negative-quality images in one dataset (one loader keeps resume exact), each item flagged."""

    def __init__(self, positive: Any, negative: Any | None) -> None:
        self.parts = [(positive, False)] + ([(negative, True)] if negative is not None else [])

    def set_epoch(self, epoch: int) -> None:
        for dataset, _ in self.parts:
            dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(d) for d, _ in self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for dataset, negative in self.parts:
            if index < len(dataset):
                return {**dataset[index], "negative": negative}
            index -= len(dataset)
        raise IndexError(index)


class _Trainable(nn.Module):
    """What the optimiser sees: the adaptor and connectors, or the denoise encoder."""

    def __init__(self, **parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)


def _captions(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"setting captions: {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"setting captions: {path} must map image file names to captions")
    return {str(k): str(v) for k, v in data.items()}


def _check(config: Config) -> None:
    if config.stage not in STAGES:
        raise ConfigError(f"setting stage: {config.stage!r} is not one of {', '.join(STAGES)}")
    if not config.data:
        raise ConfigError("setting data: give at least one folder of HQ images")
    if config.crop_size % 64:
        raise ConfigError(f"setting crop_size: {config.crop_size} is not a multiple of 64 (SUPIR works on multiples of 64)")
    if not 0.0 <= config.text_dropout <= 1.0:
        raise ConfigError(f"setting text_dropout: {config.text_dropout} is outside [0, 1]")


def _initial_parts(config: Config, unet: nn.Module, vae: nn.Module):
    from diffsr.noncommercial.supir.models import (
        GLVControl,
        build_project_modules,
        check_and_load,
        connector_hidden,
        convert_control,
        convert_denoise_encoder,
        denoise_encoder_like,
        split_supir_state,
        zero_init_connectors,
    )
    from diffsr.noncommercial.supir.pipeline import read_supir_checkpoint

    widths = tuple(unet.config.block_out_channels)
    if config.weights is None:
        control = GLVControl.from_unet(unet)
        project = build_project_modules(widths)
        zero_init_connectors(project)
        return control, project, denoise_encoder_like(vae)
    parts = split_supir_state(read_supir_checkpoint(config.weights))
    control = GLVControl(dict(unet.config))
    with torch.device("meta"):
        project = build_project_modules(widths, connector_hidden(parts["project"]))
    encoder = denoise_encoder_like(vae)
    problems = check_and_load(control, convert_control(parts["control"], dict(unet.config)), "adaptor", torch.float32)
    problems += check_and_load(project, parts["project"], "connectors", torch.float32)
    problems += check_and_load(encoder, convert_denoise_encoder(parts["denoise"], dict(vae.config)), "denoise encoder", torch.float32)
    if problems:
        raise ConfigError(f"setting weights: {config.weights} does not fit the base ({'; '.join(problems)})")
    return control, project, encoder


def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True) -> Path:
    """Run one stage; returns the SUPIR checkpoint (official layout, safetensors) with all three parts."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, worker_init
    from diffsr.diffusion.loading import load_base
    from diffsr.noncommercial import require_acceptance
    from diffsr.noncommercial.supir.models import SUPIRDenoiser, official_state_dict
    from diffsr.noncommercial.supir.pipeline import LICENCE, N_PROMPT, SCALE_FACTOR, encode_prompts
    from diffsr.noncommercial.supir.sampling import training_sigmas

    _check(config)
    require_acceptance("supir", LICENCE, config.accept_licence)
    captions = _captions(config.captions)
    output_dir = Path(output_dir)
    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    device = trainer.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    base = load_base(config.base, "sdxl-base", dtype=torch.float32, device="cpu", config_dir=config.config_dir)
    unet, vae = base.unet, base.vae
    control, project, encoder = _initial_parts(config, unet, vae)
    unet.to(device, frozen_dtype).requires_grad_(False)
    vae.to(device, torch.float32 if vae.config.force_upcast and frozen_dtype == torch.float16 else frozen_dtype).requires_grad_(False)
    for text_encoder in base.text_encoders:
        text_encoder.to(device, frozen_dtype).requires_grad_(False)
    if config.stage == "adaptor":
        trainable = _Trainable(control=control, project=project)
        encoder.to(device, vae.dtype).eval().requires_grad_(False)
        control.checkpointing = config.gradient_checkpointing
    else:
        trainable = _Trainable(encoder=encoder)
    trainable.to(device).train().requires_grad_(True)

    positive = HRFolderDataset(config.data, crop_size=config.crop_size, scale=config.scale, degradation=config.degradation,
                               seed=config.seed, flip=True, rotate=False)
    negative = (HRFolderDataset(config.negative_data, crop_size=config.crop_size, scale=config.scale, degradation=config.degradation,
                                seed=config.seed + 1, flip=True, rotate=False) if config.negative_data else None)
    dataset = _Flagged(positive, negative)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                        num_workers=config.num_workers, collate_fn=collate_pairs, worker_init_fn=worker_init,
                        persistent_workers=config.num_workers > 0)
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    trainable, optimizer, loader = trainer.prepare(trainable, optimizer, loader)
    if resume:
        trainer.resume()
    sigmas = training_sigmas().to(device)

    def images(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        hq = batch["hr"].to(device) * 2 - 1
        lq = F.interpolate(batch["lr"].to(device), size=hq.shape[-2:], mode="bicubic").clamp(0, 1) * 2 - 1
        return hq, lq

    def moments(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return vae.quant_conv(module(x.to(vae.dtype))).chunk(2, dim=1)[0]

    def encoder_step(batch: dict[str, Any], index: int) -> dict[str, float]:
        hq, lq = images(batch)
        with trainer.accumulate(trainable):
            model = trainer.unwrap(trainable).parts["encoder"]
            mean = moments(model, lq)
            with torch.no_grad():
                target = moments(vae.encoder, hq)
            recon = vae.decoder(vae.post_quant_conv(mean))
            pixel = F.l1_loss(recon.float(), hq.float())
            latent = F.mse_loss(mean.float(), target.float())
            loss = pixel + config.latent_weight * latent
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "pixel_l1": pixel.item(), "latent_mse": latent.item()}

    rng = random.Random(config.seed)

    def adaptor_step(batch: dict[str, Any], index: int) -> dict[str, float]:
        hq, lq = images(batch)
        with torch.no_grad():
            z = moments(vae.encoder, hq) * SCALE_FACTOR  # posterior mean: the clean target latent
            control_latent = moments(encoder, lq) * SCALE_FACTOR
            texts = [N_PROMPT if neg else captions.get(Path(path).name, "") for path, neg in zip(batch["path"], batch["negative"])]
            texts = ["" if rng.random() < config.text_dropout else t for t in texts]
            context, vector = encode_prompts(base.tokenizers, base.text_encoders, unet, texts, device)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        t = torch.randint(0, len(sigmas), (z.shape[0],), generator=generator).to(device)
        eps = torch.randn(z.shape, generator=generator).to(device)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        x_in = (z.float() + sigma * eps) / (sigma**2 + 1) ** 0.5
        with trainer.accumulate(trainable):
            parts = trainer.unwrap(trainable).parts
            denoiser = SUPIRDenoiser(unet, parts["control"], parts["project"])
            pred = denoiser(x_in, t, context, vector, control_latent)
            loss = F.mse_loss(pred.float(), eps)
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    trainer.run(adaptor_step if config.stage == "adaptor" else encoder_step, loader, on_progress)
    parts = trainer.unwrap(trainable).parts
    final_control = parts["control"] if "control" in parts else control
    final_project = parts["project"] if "project" in parts else project
    final_encoder = parts["encoder"] if "encoder" in parts else encoder
    out = output_dir / f"supir_{config.stage}.safetensors"
    if trainer.accelerator.is_main_process:
        state = {k: v.float().cpu() for k, v in official_state_dict(final_control, final_project, final_encoder).items()}
        save_file(state, str(out), metadata={"diffsr_method": "supir", "stage": config.stage, "steps": str(trainer.step)})
    trainer.accelerator.wait_for_everyone()
    return out
