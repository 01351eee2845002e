"""`diffsr train stablesr CONFIG`: StableSR's two training stages (configs/stableSRNew/*.yaml, autoencoder_kl_64x64x4_resi.yaml).

Stage "sft" (stage 1): SD 2.1 frozen; the time-aware encoder and the 22 SFT layers learn. Per batch, as
`LatentDiffusionSRTextWT.get_input` + `p_losses`: the GT (USM-sharpened for the 512 model) and its
'stablesr'-preset degradation, bicubic back to the GT size, both encoded (posterior sample x 0.18215);
t ~ U{0..999}; features = encoder(z_LR, t); loss = MSE(UNet(q_sample(z_GT, t), t, '' , features),
eps (512) or v (768v)), mean over C x H x W. AdamW (lr 5e-5, weight decay 0.01), no LR schedule.

Stage "cfw" (stage 2): everything frozen but the CFW fusion layers (and the discriminator). Data are
(LR, GT, latent) triples where the latent is the stage-1 model's sample for the LR: either an official
`generate_vqgan_data.py` folder (inputs/, gts/, latents/*.npy) or generated on the fly with
`generate_steps` DDPM steps of the stage-1 weights. rec = CFW-decode(latent, encoder features of
the LR, w = 1); loss = L1 + 1.0 LPIPS + d_weight * disc_factor * (-mean D(rec)), where d_weight
is 0.025 (the official adaptive weight fails on the frozen decoder and falls back to it) and
disc_factor 0 before step `disc_start` (501); the PatchGAN discriminator (3 layers, BatchNorm) learns
with the hinge loss; Adam(lr 5e-5, betas (0.5, 0.9)) for both.

Outputs (safetensors, official key names, loadable by `diffsr upscale --method stablesr`): stage 1
writes the encoder + SFT weights (the webui layout: give --base at inference); stage 2 the full CFW
autoencoder (`--cfw`). LPIPS needs local VGG weights (see diffsr.train.osediff), or a stand-in you name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffsr.models.stablesr import CFW, EncoderLayout, StableSRAdapter, unet_resnet_names
from diffsr.progress import OptionalCallback
from diffsr.train.loop import ConfigError, LoopSettings, Trainer

STAGES = ("sft", "cfw")


@dataclasses.dataclass
class Config:
    """Defaults: the official recipes (v2-finetune_text_T_512.yaml for "sft", autoencoder_kl_64x64x4_resi.yaml for "cfw")."""

    stage: str = "sft"
    data: list[str] = dataclasses.field(default_factory=list)
    """HR image folders (official: DIV8K, DF2K_OST and 10k FFHQ images)."""
    base: str = "stable-diffusion-2-1-base"
    """SD 2.1(-base) diffusers folder or single file (v2-1_512-ema-pruned)."""
    config_dir: str | None = None
    variant: str = "512"
    """512 (epsilon loss) or 768v (v-prediction loss)."""
    init_weights: str | None = None
    """sft: StableSR weights to continue from; cfw: a CFW checkpoint to continue from."""
    stage1_weights: str | None = None
    """cfw: the stage-1 StableSR weights that generate the latents (when `pairs` is not given)."""
    pairs: str | None = None
    """cfw: a generate_vqgan_data.py folder with inputs/, gts/ and latents/ (same stems)."""
    generate_steps: int = 200
    degradation: str = "stablesr"
    use_usm: bool | None = None
    """sharpen the GT (USM) before degrading it and use it as the target; None: as the variant's config
    (512: yes, 768v: no)."""
    gt_size: int = 512
    scale: int = 4
    encoder_channels: int = 256
    encoder_mult: tuple[int, ...] = (1, 1, 2, 2)
    encoder_res_blocks: int = 2
    encoder_attention: tuple[int, ...] = (4, 2, 1)
    encoder_out_channels: int = 256
    fuse_blocks: int = 2
    lr: float = 5e-5
    weight_decay: float = 1e-2
    disc_lr: float = 5e-5
    disc_start: int = 501
    disc_weight: float = 0.025
    perceptual_loss: str = "lpips"
    """cfw: "lpips" (official), or "none" (L1 and the adversarial term only) if you accept that stand-in."""
    lpips_weight: float = 1.0
    lpips_weights: str | None = None
    vgg_weights: str | None = None
    batch_size: int = 6
    num_workers: int = 4
    max_steps: int = 800_000
    save_every: int = 1500
    log_every: int = 10
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    """the official trains in fp32."""
    gradient_accumulation_steps: int = 4
    seed: int = 0
    cpu: bool = False


def _check(config: Config) -> None:
    if config.stage not in STAGES:
        raise ConfigError(f"setting stage: {config.stage!r} is not one of {', '.join(STAGES)}")
    if config.variant not in ("512", "768v"):
        raise ConfigError(f"setting variant: {config.variant!r} is not 512 or 768v")
    if config.stage == "sft" and not config.data:
        raise ConfigError("setting data: give at least one folder of HR images")
    if config.perceptual_loss not in ("lpips", "none"):
        raise ConfigError(f"setting perceptual_loss: {config.perceptual_loss!r} is not lpips or none")
    if config.stage == "cfw":
        if not config.pairs and not (config.data and config.stage1_weights):
            raise ConfigError("stage cfw needs `pairs` (a generate_vqgan_data.py folder) or `data` with `stage1_weights`")
        if config.perceptual_loss == "lpips" and not (config.vgg_weights or config.lpips_weights):
            raise ConfigError("LPIPS-VGG needs local VGG16 weights (vgg_weights, lpips_weights: see diffsr.train.osediff), "
                              "or set perceptual_loss to none if you accept that stand-in")


def zero_init(adapter: StableSRAdapter) -> StableSRAdapter:
    """The official initialisation: the encoder's residual-branch output convs and attention projections start at 0."""
    with torch.no_grad():
        for name, module in adapter.structcond.named_modules():
            if name.endswith("out_layers.3") or name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return adapter


def new_adapter(unet: nn.Module, config: Config) -> StableSRAdapter:
    layout = EncoderLayout.official(config.encoder_channels, tuple(config.encoder_mult), config.encoder_res_blocks,
                                    tuple(config.encoder_attention), config.encoder_out_channels)
    return zero_init(StableSRAdapter(layout, {n: r.conv2.out_channels for n, r in unet_resnet_names(unet).items()}))


class SFTModel(nn.Module):
    """The trainable stage-1 model: encoder + SFT layers; the frozen UNet is held outside the module tree."""

    def __init__(self, adapter: StableSRAdapter, unet: nn.Module):
        super().__init__()
        self.adapter = adapter
        self._unet = (unet,)  # not a submodule: it is frozen and must not enter optimizers or checkpoints

    def forward(self, noisy: torch.Tensor, lr_latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        unet = self._unet[0]
        features = self.adapter.structcond(lr_latent, t)
        with self.adapter.conditioned(features):
            return unet(noisy.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample.float()


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator of taming-transformers (3 layers, BatchNorm), as StableSR's CFW loss uses."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        sequence: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            previous, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            sequence += [nn.Conv2d(width * previous, width * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(width * mult),
                         nn.LeakyReLU(0.2, True)]
        sequence.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*sequence)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class CFWModel(nn.Module):
    """The trainable stage-2 model: CFW fusion layers on the frozen VAE (held outside the module tree)."""

    def __init__(self, cfw: CFW, vae: nn.Module):
        super().__init__()
        self.cfw = cfw
        self._vae = (vae,)

    def forward(self, lr: torch.Tensor, latent: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        vae = self._vae[0]
        with torch.no_grad(), self.cfw.capture(vae) as features:
            vae.encoder(lr.to(vae.dtype))
        z = vae.post_quant_conv(latent.to(vae.dtype) / vae.config.scaling_factor)
        with self.cfw.fused(vae, {k: v.detach() for k, v in features.items()}, w):
            return vae.decoder(z).float()


def _alphas_cumprod() -> torch.Tensor:
    from diffsr.pipelines.stablesr import _base_alphas_cumprod

    return torch.tensor(_base_alphas_cumprod(), dtype=torch.float32)  # LDM's float32 buffer


def _images(batch: dict[str, Any], device: torch.device, usm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(GT, LR bicubic-upsampled to the GT size), both in [-1, 1]."""
    from diffsr.degrade.kernels import usm_sharpen

    hr = batch["hr"].to(device)
    if usm:
        hr = usm_sharpen(hr).clamp(0, 1)
    lr = F.interpolate(batch["lr"].to(device), size=hr.shape[-2:], mode="bicubic").clamp(0, 1)
    return hr * 2 - 1, lr * 2 - 1


def _encode(vae: nn.Module, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(image.to(vae.dtype)))
        mean, logvar = moments.float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * vae.config.scaling_factor


def sft_loss(model: SFTModel, vae: nn.Module, context: torch.Tensor, gt: torch.Tensor, lr: torch.Tensor,
             generator: torch.Generator, v_prediction: bool = False) -> torch.Tensor:
    """Stage 1's loss on one batch (GT and upsampled LR in [-1, 1]); all random draws from `generator`."""
    acp = _alphas_cumprod().to(gt.device)
    z_gt, z_lr = _encode(vae, gt, generator), _encode(vae, lr, generator)
    t = torch.randint(0, acp.shape[0], (gt.shape[0],), generator=generator).to(gt.device)
    noise = torch.randn(z_gt.shape, generator=generator).to(gt.device)
    a = acp[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z_gt + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * z_gt if v_prediction else noise
    out = model(noisy, z_lr, t, context.expand(gt.shape[0], -1, -1))
    return F.mse_loss(out.float(), target)


def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True) -> Path:
    """Run the configured stage; returns the safetensors file the inference loader reads."""
    _check(config)
    return (_train_sft if config.stage == "sft" else _train_cfw)(config, Path(output_dir), on_progress, resume)


def _loader(config: Config, dataset: Any):
    from torch.utils.data import DataLoader

    from diffsr.data.folders import collate_pairs, worker_init

    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                      num_workers=config.num_workers, collate_fn=collate_pairs, worker_init_fn=worker_init,
                      persistent_workers=config.num_workers > 0)


def _base(config: Config, components: tuple[str, ...]):
    from diffsr.diffusion.loading import load_base
    from diffsr.pipelines.stablesr import VARIANTS

    kind = VARIANTS[config.variant][0]
    return load_base(config.base, kind, dtype=torch.float32, device="cpu", config_dir=config.config_dir, components=components)


def _train_sft(config: Config, output_dir: Path, on_progress: OptionalCallback, resume: bool) -> Path:
    from safetensors.torch import save_file

    from diffsr.data.folders import HRFolderDataset
    from diffsr.pipelines.stablesr import empty_prompt_context, read_stablesr_checkpoint

    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    device = trainer.device
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    base = _base(config, ("unet", "vae", "text_encoder", "tokenizer"))
    context = empty_prompt_context(base.text_encoders[0], base.tokenizers[0]).to(device)
    unet = base.unet.to(device, frozen).eval().requires_grad_(False)
    vae = base.vae.to(device).eval().requires_grad_(False)
    if config.init_weights:
        from diffsr.models.stablesr import split_state

        adapter = StableSRAdapter.from_state(split_state(read_stablesr_checkpoint(config.init_weights))[0])
    else:
        adapter = new_adapter(unet, config)
    adapter.attach(unet)
    model = SFTModel(adapter.train(), unet)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    dataset = HRFolderDataset(config.data, crop_size=config.gt_size, scale=config.scale, degradation=config.degradation,
                              seed=config.seed, flip=True, rotate=False)
    model, optimizer, loader = trainer.prepare(model, optimizer, _loader(config, dataset))
    if resume:
        trainer.resume()

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        rng = torch.Generator().manual_seed(config.seed * 1_000_003 + (index + 1) * 7919 + trainer.accelerator.process_index)
        gt, lr = _images(batch, device, config.variant == "512" if config.use_usm is None else config.use_usm)
        with trainer.accumulate(model):
            with trainer.accelerator.autocast():
                loss = sft_loss(model, vae, context, gt, lr, rng, config.variant == "768v")
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return {"loss": float(loss.detach())}

    trainer.run(step, loader, on_progress)
    final = output_dir / "stablesr_sft.safetensors"
    if trainer.accelerator.is_main_process:
        adapter_out = trainer.unwrap(model).adapter
        save_file({k: v.detach().float().contiguous().cpu() for k, v in adapter_out.official_state_dict().items()}, str(final),
                  metadata={"diffsr_method": "stablesr", "stage": "sft", "steps": str(trainer.step)})
    return final


class PairsFolder(torch.utils.data.Dataset):
    """generate_vqgan_data.py's output: inputs/<stem>.png (LR upsampled), gts/<stem>.png, latents/<stem>.npy."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        latents = sorted((self.root / "latents").glob("*.npy"))
        if not latents:
            raise ConfigError(f"setting pairs: {self.root}/latents holds no .npy latents")
        self.stems = [p.stem for p in latents]

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from diffsr.data.folders import load_rgb, to_tensor

        stem = self.stems[index]
        image = lambda folder: to_tensor(load_rgb(next((self.root / folder).glob(stem + ".*"))))  # noqa: E731
        array = np.load(self.root / "latents" / f"{stem}.npy")  # (1, 4, h, w) as the script saves it
        latent = torch.from_numpy(array).float().reshape(-1, *array.shape[-2:])
        return {"hr": image("gts"), "lr": image("inputs"), "latent": latent, "path": stem}


def _perceptual(config: Config) -> nn.Module | None:
    from diffsr.train.osediff import LPIPSVgg, _installed_lpips_heads

    if config.perceptual_loss == "none":
        return None
    lpips = LPIPSVgg()
    lpips.load_weights(config.lpips_weights or _installed_lpips_heads(), config.vgg_weights)
    return lpips.eval().requires_grad_(False)


def _train_cfw(config: Config, output_dir: Path, on_progress: OptionalCallback, resume: bool) -> Path:
    from safetensors.torch import save_file

    from diffsr.data.folders import HRFolderDataset
    from diffsr.diffusion.ldm_layout import vae_to_ldm
    from diffsr.pipelines.stablesr import NoiseSource, StableSRPipeline, build_models, read_stablesr_checkpoint

    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    device = trainer.device
    generator_pipeline = None
    if config.pairs:
        dataset: Any = PairsFolder(config.pairs)
        vae = _base(config, ("vae",)).vae
    else:
        from diffsr.diffusion.bases import BASES
        from diffsr.pipelines.stablesr import VARIANTS

        kind, prediction, size = VARIANTS[config.variant]
        models = build_models(read_stablesr_checkpoint(config.stage1_weights), BASES[kind], prediction, size,
                              base=config.base, names=(str(config.stage1_weights), "", str(config.base)))
        generator_pipeline = StableSRPipeline(models)
        vae = models.vae
        dataset = HRFolderDataset(config.data, crop_size=config.gt_size, scale=config.scale, degradation=config.degradation,
                                  seed=config.seed, flip=True, rotate=False)
    vae = vae.to(device).eval().requires_grad_(False)
    levels = len(vae.decoder.up_blocks)
    widths = {level: vae.encoder.down_blocks[level].resnets[-1].conv2.out_channels for level in range(1, levels - 1)}
    if config.init_weights:
        cfw = CFW.from_state(read_stablesr_checkpoint(config.init_weights))
    else:
        cfw = CFW(widths, config.fuse_blocks)
    cfw.check(vae)
    model = CFWModel(cfw.train(), vae)
    discriminator = NLayerDiscriminator()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.5, 0.9))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr, betas=(0.5, 0.9))
    perceptual = _perceptual(config)
    model, discriminator, optimizer, optimizer_d, loader = trainer.prepare(model, discriminator, optimizer, optimizer_d,
                                                                           _loader(config, dataset))
    if perceptual is not None:
        perceptual.to(device)
    if resume:
        trainer.resume()

    def latents_for(lr: torch.Tensor, index: int) -> torch.Tensor:
        """The stage-1 model's DDPM sample for each LR (generate_vqgan_data.py, from the noised LR)."""
        out = []
        for i in range(lr.shape[0]):
            noise = NoiseSource(seed=config.seed * 1_000_003 + index * 101 + i)
            out.append(generator_pipeline.sample_image(lr[i : i + 1], noise, True, config.generate_steps).latent)
        return torch.cat(out).to(device)

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        if "latent" in batch:
            gt, lr = batch["hr"].to(device) * 2 - 1, batch["lr"].to(device) * 2 - 1
            latent = batch["latent"].to(device)
        else:
            gt, lr = _images(batch, device, False)
            with torch.no_grad():
                latent = latents_for(lr, index)
        disc_factor = 1.0 if trainer.step >= config.disc_start else 0.0
        with trainer.accumulate(model, discriminator):
            with trainer.accelerator.autocast():
                rec = model(lr, latent, 1.0)
            rec_loss = (gt - rec).abs().mean()
            losses = {"l1": rec_loss.detach()}
            loss = rec_loss
            if perceptual is not None:
                p_loss = perceptual(rec, gt).mean() * config.lpips_weight
                loss = loss + p_loss
                losses["lpips"] = p_loss.detach()
            g_loss = -discriminator(rec).mean()
            loss = loss + config.disc_weight * disc_factor * g_loss
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            logits_real, logits_fake = discriminator(gt.detach()), discriminator(rec.detach())
            d_loss = disc_factor * 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
            trainer.backward(d_loss)
            optimizer_d.step()
            optimizer_d.zero_grad()
        losses.update(loss=loss.detach(), g=g_loss.detach(), d=d_loss.detach())
        return {k: float(v) for k, v in losses.items()}

    trainer.run(step, loader, on_progress)
    final = output_dir / "vqgan_cfw.safetensors"
    if trainer.accelerator.is_main_process:
        trained = trainer.unwrap(model).cfw
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in vae_to_ldm(vae.state_dict(), levels).items()}
        tensors.update({k: v.detach().float().contiguous().cpu() for k, v in trained.official_state_dict().items()})
        save_file(tensors, str(final), metadata={"diffsr_method": "stablesr", "stage": "cfw", "steps": str(trainer.step)})
    return final

