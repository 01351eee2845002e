"""`diffsr train osediff CONFIG`: OSEDiff's recipe (train_osediff.py, osediff.py::OSEDiff_gen / OSEDiff_reg).

Generator: SD 2.1-base with LoRA (rank 4, alpha 8) on the VAE encoder + quant_conv and on the UNet
(three adapters: down blocks + conv_in, up blocks + conv_out, mid block), the UNet's conv_in fully
trainable, the decoder frozen (gradients flow through it). Per batch, exactly the inference path
(posterior sample, t = 999, x0 from the DDPM step, decode, clamp), then

    L_gen = 1 * MSE(x_hat, x) + 2 * LPIPS_vgg(x_hat, x) + 1 * VSD(z_hat)

VSD works on the latent z_hat: t ~ U{20..979}, z_t = add_noise(z_hat, eps, t); the frozen SD UNet (fp16 under
mixed precision) gives x0_fix with CFG 7.5 against the negative prompt, the LoRA "update" UNet gives x0_upd
without CFG; grad = (x0_upd - x0_fix) / mean|z_hat - x0_fix| (per sample) and L = MSE(z_hat, sg(z_hat - grad)).
The update UNet then takes its own step on the plain epsilon-MSE at t ~ U{0..999} on sg(z_hat). Both use
AdamW (lr 5e-5, wd 1e-2), constant schedule, gradient clipping 1.0.

Data: HR folders, 512 crops, the 'osediff' degradation preset (Real-ESRGAN's, sharpening off), the LR resized
back to 512 with a random area/bilinear/bicubic mode. The official prompts are RAM tags of the HR image; RAM
is not part of diffsr, so prompts come from `captions` (file name -> tags) or the fixed `prompt`.

LPIPS needs VGG16 weights that diffsr cannot download: give `vgg_weights` (torchvision's
vgg16-397923af.pth) and `lpips_weights` (the lpips package's weights/v0.1/vgg.pth; found in an installed
`lpips` package when not given), or one file holding both (an `lpips.LPIPS(net="vgg").state_dict()`).
Without them the run stops with that message, unless `perceptual_loss` names a stand-in ("l1" or "none").

Output: `osediff.pkl` in the official layout (what the official test script and `diffsr upscale --method
osediff` load) and the same tensors as `osediff.safetensors`; every `save_every` steps also
`checkpoints/model_N.pkl`, beside the accelerate state the run resumes from. Differences from the official script, on
purpose: it stops at `max_steps` (the official loop never stops; ~14k iterations per the maintainer), and
the conv_in LoRA tensors are in the optimizer once (the official list holds them twice).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.models.loading import WeightsError
from diffsr.pipelines.osediff import (
    BASE_KIND,
    TIMESTEP,
    UNET_ADAPTERS,
    VAE_ADAPTER,
    add_lora,
    load_lora_state,
    official_checkpoint,
    predict_x0,
    read_weights,
    unet_lora_targets,
    vae_lora_targets,
)
from diffsr.progress import OptionalCallback
from diffsr.train.loop import ConfigError, LoopSettings, Trainer

NEGATIVE_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
                   "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
                   "lowres, over-smooth")
"""--neg_prompt of the official train_osediff.sh."""
VGG_FILE = "vgg16-397923af.pth"
VGG_SOURCE = "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision's ImageNet VGG16)"
LPIPS_FILE = "vgg.pth"
LPIPS_SOURCE = "the lpips package (pip install lpips: lpips/weights/v0.1/vgg.pth)"
PERCEPTUAL = ("lpips", "l1", "none")
RESIZE_MODES = ("area", "bilinear", "bicubic")


# ------------------------------------------------------------------------------------------------- LPIPS

class LPIPSVgg(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018), laid out like `lpips.LPIPS(net="vgg")` so its
    state dict loads as is: inputs in [-1, 1], scaling layer, 5 unit-normalised relu features, 1x1 linear
    heads on squared differences, spatial mean, summed. Output N x 1 x 1 x 1."""

    CHANNELS = (64, 128, 256, 512, 512)
    SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])  # vgg16().features, without building its 100M-parameter classifier
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.net = nn.Module()
        for index, (start, stop) in enumerate(self.SLICES):
            block = nn.Sequential()
            for layer in range(start, stop):
                block.add_module(str(layer), features[layer])
            setattr(self.net, f"slice{index + 1}", block)
        for index, channels in enumerate(self.CHANNELS):
            head = nn.Module()
            head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
            setattr(self, f"lin{index}", head)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale
        x, y = (a - shift) / scale, (b - shift) / scale
        total = 0
        for index in range(len(self.CHANNELS)):
            block = getattr(self.net, f"slice{index + 1}")
            x, y = block(x), block(y)
            fx = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + 1e-10)
            fy = y / (torch.sqrt(torch.sum(y**2, dim=1, keepdim=True)) + 1e-10)
            total = total + getattr(self, f"lin{index}").model((fx - fy) ** 2).mean(dim=(2, 3), keepdim=True)
        return total

    def load_weights(self, lpips_weights: str | Path | None, vgg_weights: str | Path | None) -> None:
        """Trunk from torchvision's vgg16 file (features.N.*) or a full LPIPS dict (net.sliceK.N.*); heads from lin*."""
        from diffsr.diffusion.loading import read_state_dict

        found: dict[str, torch.Tensor] = {}
        for path, what in ((vgg_weights, f"expected {VGG_FILE} from {VGG_SOURCE}"), (lpips_weights, f"expected {LPIPS_FILE} from {LPIPS_SOURCE}")):
            if path:
                found.update(read_state_dict(path, what))
        slice_of = {layer: index + 1 for index, (start, stop) in enumerate(self.SLICES) for layer in range(start, stop)}
        state: dict[str, torch.Tensor] = {}
        for key, value in found.items():
            if key.startswith("features."):
                layer, rest = key[len("features."):].split(".", 1)
                if int(layer) in slice_of:
                    state[f"net.slice{slice_of[int(layer)]}.{layer}.{rest}"] = value
            elif key.startswith(("net.slice", "lin")):
                state[key] = value
        own = {k for k in self.state_dict() if not k.startswith("scaling_layer.")}
        missing = sorted(own - set(state))
        if missing:
            trunk = any(k.startswith("net.") for k in missing)
            raise WeightsError(f"LPIPS-VGG weights incomplete ({len(missing)} tensors missing, e.g. {missing[0]}): "
                               + (f"vgg_weights: {VGG_FILE} from {VGG_SOURCE}" if trunk else f"lpips_weights: {LPIPS_FILE} from {LPIPS_SOURCE}"))
        self.load_state_dict({k: state[k] for k in own}, strict=False)


def _installed_lpips_heads() -> str | None:
    """The lpips package's own vgg.pth (its linear heads), when the package is installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / LPIPS_FILE
    return str(path) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ config

@dataclasses.dataclass
class Config:
    """Defaults: the official recipe (train_osediff.py with the README's train_osediff.sh)."""

    data: list[str] = dataclasses.field(default_factory=list)
    """HR image folders (official: LSDIR + the first 10k FFHQ images)."""
    base: str = "v2-1_512-ema-pruned.safetensors"
    config_dir: str | None = None
    init_weights: str | None = None
    """an osediff.pkl / .safetensors to continue from (e.g. the released weights)."""
    prompt: str = ""
    """the prompt of every sample without a caption (official: RAM tags of the HR image)."""
    captions: str | None = None
    """JSON file {image file name: tags}, e.g. RAM tags computed beforehand."""
    neg_prompt: str = NEGATIVE_PROMPT
    perceptual_loss: str = "lpips"
    """"lpips" (official: LPIPS-VGG), or a stand-in you name: "l1" or "none"."""
    lpips_weights: str | None = None
    vgg_weights: str | None = None
    degradation: str = "osediff"
    gt_size: int = 512
    scale: int = 4
    lora_rank: int = 4
    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0
    lambda_vsd: float = 1.0
    lambda_vsd_lora: float = 1.0
    cfg_vsd: float = 7.5
    vsd_timesteps: tuple[int, int] = (20, 980)
    """torch.randint(20, 980): t in 20..979."""
    reg_active_adapters: list[str] = dataclasses.field(default_factory=lambda: ["default_others"])
    """adapters active in the regulariser UNet: the official code leaves only the last one added active
    (diffusers 0.25's add_adapter activates each new adapter alone), so only its mid-block LoRA learns."""
    lr: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 4
    """per process (official: 4 per GPU x 4 GPUs)."""
    num_workers: int = 4
    gradient_checkpointing: bool = False
    max_steps: int = 14000
    save_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    mixed_precision: str = "fp16"
    gradient_accumulation_steps: int = 1
    seed: int = 123
    cpu: bool = False


# ------------------------------------------------------------------------------------------------ models

class Generator(nn.Module):
    """OSEDiff_gen: the LoRA'd VAE and UNet; `forward` is the one-step inference path, with gradients."""

    def __init__(self, unet: nn.Module, vae: nn.Module, abar: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        self.register_buffer("abar", abar.reshape(()).float(), persistent=False)

    def forward(self, lq: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(lq).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        z = (posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor
        timestep = torch.full((lq.shape[0],), TIMESTEP, device=lq.device, dtype=torch.long)
        eps = self.unet(z, timestep, encoder_hidden_states=prompt_embeds).sample
        x0 = predict_x0(z, eps, self.abar)
        image = self.vae.decode(x0.to(z.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)
        return image, x0


def _eps_to_x0(alphas: torch.Tensor, eps: torch.Tensor, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """OSEDiff_reg.eps_to_mu: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), per sample."""
    abar = alphas.to(sample)[t].view(-1, 1, 1, 1)
    return (sample - (1 - abar) ** 0.5 * eps) / abar**0.5


def _add_noise(alphas: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DDPMScheduler.add_noise."""
    abar = alphas.to(x0)[t].view(-1, 1, 1, 1)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def _captions(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"setting captions: cannot read {path} as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"setting captions: {path} must map image file names to tag strings")
    return {str(k): str(v) for k, v in data.items()}


def _check(config: Config) -> None:
    if not config.data:
        raise ConfigError("setting data: give at least one folder of HR images")
    if config.perceptual_loss not in PERCEPTUAL:
        raise ConfigError(f"setting perceptual_loss: {config.perceptual_loss!r} is not one of {', '.join(PERCEPTUAL)}")
    unknown = sorted(set(config.reg_active_adapters) - set(UNET_ADAPTERS))
    if unknown or not config.reg_active_adapters:
        raise ConfigError(f"setting reg_active_adapters: use some of {', '.join(UNET_ADAPTERS)}")
    if config.perceptual_loss == "lpips" and not config.vgg_weights and not config.lpips_weights:
        raise ConfigError(
            f"LPIPS-VGG needs VGG16 weights, which diffsr does not download: set vgg_weights to {VGG_FILE} ({VGG_SOURCE}) and "
            f"lpips_weights to {LPIPS_FILE} ({LPIPS_SOURCE}; found automatically when lpips is installed), or set "
            "perceptual_loss to a stand-in you accept (l1 or none)")


def build_perceptual(config: Config) -> nn.Module | None:
    """The data loss's perceptual term: LPIPS-VGG (frozen, eval) or the named stand-in."""
    if config.perceptual_loss == "none":
        return None
    if config.perceptual_loss == "l1":
        return _L1()
    lpips = LPIPSVgg()
    lpips.load_weights(config.lpips_weights or _installed_lpips_heads(), config.vgg_weights)
    return lpips.eval().requires_grad_(False)


class _L1(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


# -------------------------------------------------------------------------------------------------- train

def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True) -> Path:
    """Run the recipe; returns `osediff.pkl` (official layout; `osediff.safetensors` is written beside it)."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, worker_init
    from diffsr.diffusion.loading import load_base
    from diffsr.pipelines.osediff import alpha_bar

    _check(config)
    captions = _captions(config.captions)
    perceptual = build_perceptual(config)
    output_dir = Path(output_dir)
    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    device = trainer.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

    base = load_base(config.base, BASE_KIND, dtype=torch.float32, device="cpu", config_dir=config.config_dir)
    tokenizer, text_encoder = base.tokenizers[0], base.text_encoders[0].to(device)
    scheduler = DDPMScheduler.from_config({k: v for k, v in base.scheduler.config.items() if not k.startswith("_")})
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    abar = alpha_bar(base.scheduler.config)
    unet, vae = base.unet, base.vae
    unet_fix = _copy_unet(unet).to(device, frozen_dtype).eval().requires_grad_(False)
    unet_update = _copy_unet(unet)
    unet_targets, vae_targets = unet_lora_targets(unet), vae_lora_targets(vae)
    add_lora(unet, unet_targets, config.lora_rank, "UNet")
    add_lora(vae, {VAE_ADAPTER: vae_targets}, config.lora_rank, "VAE")
    add_lora(unet_update, unet_lora_targets(unet_update), config.lora_rank, "UNet")
    _activate(unet_update, config.reg_active_adapters)
    if config.init_weights:
        weights = read_weights(config.init_weights)
        load_lora_state(unet, weights.unet, ("lora", "conv_in"), weights.source, "UNet")
        load_lora_state(vae, weights.vae, ("lora",), weights.source, "VAE")
    for model, adapters in ((unet, UNET_ADAPTERS), (vae, (VAE_ADAPTER,)), (unet_update, tuple(config.reg_active_adapters))):
        model.requires_grad_(False)
        for name, param in model.named_parameters():  # LoRA of inactive adapters would get no gradient: left frozen
            if "lora_" in name and any(f".{a}." in name for a in adapters):
                param.requires_grad_(True)
    unet.conv_in.requires_grad_(True)  # the official trains conv_in fully (base weight, bias and its LoRA)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet_update.enable_gradient_checkpointing()
    generator_model = Generator(unet, vae, abar).train()
    unet_update.train()
    gen_params = [p for p in generator_model.parameters() if p.requires_grad]
    reg_params = [p for p in unet_update.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(gen_params, lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay,
                                  eps=config.adam_eps)
    optimizer_reg = torch.optim.AdamW(reg_params, lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay,
                                      eps=config.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # "constant"
    schedule_reg = torch.optim.lr_scheduler.LambdaLR(optimizer_reg, lambda _: 1.0)
    dataset = HRFolderDataset(config.data, crop_size=config.gt_size, scale=config.scale, degradation=config.degradation,
                              seed=config.seed, flip=True, rotate=False)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                        num_workers=config.num_workers, collate_fn=collate_pairs, worker_init_fn=worker_init,
                        persistent_workers=config.num_workers > 0)
    generator_model, unet_update, optimizer, optimizer_reg, schedule, schedule_reg, loader = trainer.prepare(
        generator_model, unet_update, optimizer, optimizer_reg, schedule, schedule_reg, loader)
    if perceptual is not None:
        perceptual.to(device)
    if resume:
        trainer.resume()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(device))[0]

    neg_embeds = embed([config.neg_prompt])

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        rng = torch.Generator().manual_seed(config.seed * 1_000_003 + (index + 1) * 7919 + trainer.accelerator.process_index)
        hr = batch["hr"].to(device)
        mode = RESIZE_MODES[int(torch.randint(len(RESIZE_MODES), (1,), generator=rng))]
        lr = F.interpolate(batch["lr"].to(device), size=hr.shape[-2:], mode=mode)
        lr = (lr.clamp(0, 1) * 255).round() / 255  # the official rounds the degraded LR to 8 bits
        x_src, x_tgt = lr * 2 - 1, hr * 2 - 1
        prompts = [captions.get(Path(p).name, config.prompt) for p in batch["path"]]
        embeds = embed(prompts)
        count = hr.shape[0]
        with trainer.accumulate(generator_model, unet_update):
            with trainer.accelerator.autocast():
                output, latent = generator_model(x_src, embeds, rng)
            loss_l2 = F.mse_loss(output.float(), x_tgt.float()) * config.lambda_l2
            loss = loss_l2
            losses = {"l2": loss_l2.detach()}
            if perceptual is not None:
                loss_p = perceptual(output.float(), x_tgt.float()).mean() * config.lambda_lpips
                loss = loss + loss_p
                losses[config.perceptual_loss] = loss_p.detach()
            loss_vsd = _vsd_loss(latent.float(), embeds, neg_embeds.expand(count, -1, -1), rng) * config.lambda_vsd
            loss = loss + loss_vsd
            losses["vsd"] = loss_vsd.detach()
            trainer.backward(loss)
            if trainer.accelerator.sync_gradients:
                trainer.accelerator.clip_grad_norm_(gen_params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            # the regulariser learns the generator's latent distribution (plain epsilon loss)
            t = torch.randint(0, alphas.shape[0], (count,), generator=rng).to(device)
            noise = torch.randn(latent.shape, generator=rng).to(device)
            target = latent.detach().float()
            eps = unet_update(_add_noise(alphas, target, noise, t), t, encoder_hidden_states=embeds.detach()).sample
            loss_d = F.mse_loss(eps.float(), noise) * config.lambda_vsd_lora
            trainer.backward(loss_d)
            if trainer.accelerator.sync_gradients:
                trainer.accelerator.clip_grad_norm_(reg_params, config.max_grad_norm)
            optimizer_reg.step()
            schedule_reg.step()
            optimizer_reg.zero_grad()
        losses["diffusion"] = loss_d.detach()
        losses["loss"] = loss.detach()
        if (index + 1) % config.save_every == 0 and trainer.accelerator.is_main_process:  # as the official model_{step}.pkl
            write_weights(trainer.unwrap(generator_model), output_dir / "checkpoints" / f"model_{index + 1}.pkl", safetensors=False)
        return {k: float(v) for k, v in losses.items()}

    def write_weights(gen: Generator, path: Path, safetensors: bool = True) -> None:
        """The generator's trained tensors in the official pkl layout (written atomically), optionally also as safetensors."""
        checkpoint = official_checkpoint(gen.unet, gen.vae, unet_targets, vae_targets, config.lora_rank, config.lora_rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        torch.save(checkpoint, tmp)
        tmp.replace(path)
        if safetensors:
            from diffsr.pipelines.osediff import OSEDiffWeights

            flat = OSEDiffWeights(checkpoint["state_dict_unet"], checkpoint["state_dict_vae"]).to_state_dict()
            save_file({k: v.contiguous() for k, v in flat.items()}, str(path.with_suffix(".safetensors")),
                      metadata={"diffsr_method": "osediff", "steps": str(trainer.step)})

    def _vsd_loss(latent: torch.Tensor, embeds: torch.Tensor, neg_embeds: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        count = latent.shape[0]
        low, high = config.vsd_timesteps
        t = torch.randint(low, high, (count,), generator=rng).to(device)
        noise = torch.randn(latent.shape, generator=rng).to(device)
        noisy = _add_noise(alphas, latent, noise, t)
        with torch.no_grad():
            eps_update = unet_update(noisy, t, encoder_hidden_states=embeds.float()).sample
            x0_update = _eps_to_x0(alphas, eps_update.float(), noisy, t)
            eps_fix = unet_fix(torch.cat([noisy] * 2).to(frozen_dtype), torch.cat([t] * 2),
                               encoder_hidden_states=torch.cat([neg_embeds, embeds]).to(frozen_dtype)).sample.float()
            uncond, cond = eps_fix.chunk(2)
            x0_fix = _eps_to_x0(alphas, uncond + config.cfg_vsd * (cond - uncond), noisy, t)
        weighting = (latent - x0_fix).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = (x0_update - x0_fix) / weighting
        return F.mse_loss(latent, (latent - grad).detach())

    trainer.run(step, loader, on_progress)
    weights = output_dir / "osediff.pkl"
    if trainer.accelerator.is_main_process:
        write_weights(trainer.unwrap(generator_model), weights)
    trainer.accelerator.wait_for_everyone()
    return weights


def _copy_unet(unet: nn.Module) -> nn.Module:
    """An independent copy of the base UNet (the frozen 'fix' and the LoRA 'update' regularisers start from SD)."""
    import copy

    return copy.deepcopy(unet)


def _activate(model: nn.Module, adapters: list[str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([a for a in adapters if a in module.lora_A])


__all__ = ["Config", "train", "LPIPSVgg", "Generator", "NEGATIVE_PROMPT"]
