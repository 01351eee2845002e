"""`diffsr train invsr CONFIG`: InvSR's noise-predictor training (configs/sd-turbo-sr-ldis.yaml, trainer.py).

SD-Turbo (UNet, VAE, text encoder) stays frozen; only the noise predictor f_w learns, through the frozen
UNet. Per sample (the official "start mode"):

    t ~ U{250, 200, 150, 100}, network timestep t - 1, sigma = sqrt((1 - abar) / abar)
    z_lq = 0.18215 * VAE.encode(bicubic x4 of LQ).sample;   z_gt = 0.18215 * VAE.encode(GT).sample
    z_t  = z_lq + sigma * (mu_w + exp(logvar_w / 2) * eps),   mu_w, logvar_w = f_w(LQ, t - 1)
    z0   = z_t - sigma * UNet(z_t / sqrt(sigma^2 + 1), t - 1, fixed prompt)
    loss = 1.0 * mean((z0 - z_gt)^2) + 2.0 * latentLPIPS(z0, z_gt) + 0.1 * (-mean D(clamp(z0, +-10), t - 1, prompt))

The GAN term starts after 10k iterations; the discriminator (a multi-output UNet on latents, conditioned on
t and the prompt) is trained every iteration with the hinge loss. AdamW lr 5e-5 (wd 0) with a 2k-iteration
linear warm-up, discriminator Adam lr 5e-5 wd 1e-3, EMA 0.999 (the EMA weights are the result), fp16,
batch 64 in the paper's runs (4 GPUs x 16). Data: HR folders cropped to 512, horizontal flips, the 'invsr'
degradation preset. The latent LPIPS uses the authors' `vgg16_sdturbo_lpips.pth` (HF OAOA/InvSR), since
its training code is not released; `lpips_weights: random` runs with random weights (smoke tests only).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.diffusion.latents import encode
from diffsr.diffusion.runtime import NoiseSource
from diffsr.models.invsr import NoisePredictor, NoisePredictorConfig, load_noise_predictor
from diffsr.pipelines.invsr import PROMPT
from diffsr.progress import OptionalCallback
from diffsr.train.loop import ConfigError, LoopSettings, Trainer

LPIPS_FILE = "vgg16_sdturbo_lpips.pth"
DISCRIMINATOR_FILE = "discriminator_sd_turbo_v5.pth"
WEIGHTS_SOURCE = "https://huggingface.co/OAOA/InvSR"
LATENT_BOUND = 10.0
"""trainer._Latent_bound: predicted latents are clamped to [-10, 10] before the discriminator."""

DISCRIMINATOR_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [128, 256, 512], "layers_per_block": [1, 2, 2],
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1024, "transformer_layers_per_block": 1, "attention_head_dim": [8, 16, 16],
    "use_linear_projection": False, "addition_embed_type": "text", "addition_time_embed_dim": 256,
    "resnet_time_scale_shift": "default", "projection_class_embeddings_input_dim": 2560,
    "addition_embed_type_num_heads": 64,
}
"""The `discriminator.params` of configs/sd-turbo-sr-ldis.yaml (keys with default values left out)."""


# --------------------------------------------------------------------------------------------- latent LPIPS


class _NetLin(nn.Module):
    """LPIPS's 1x1 linear head on a squared feature difference (dropout first, as `use_dropout=True`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Vgg16Latent(nn.Module):
    """VGG16 features on 4-channel latents with the max-pools before conv2_1, conv3_1 and conv4_1 removed.

    The layer indices are torchvision's vgg16().features indices, so the keys match the official
    latent_lpips checkpoint (`net.slice1.0.weight`, ..., `net.slice5.28.weight`)."""

    _SLICES = ((range(0, 4), ((4, 64), (64, 64))), (range(5, 9), ((64, 128), (128, 128))),
               (range(10, 16), ((128, 256), (256, 256), (256, 256))), (range(17, 23), ((256, 512), (512, 512), (512, 512))),
               (range(23, 30), ((512, 512), (512, 512), (512, 512))))

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        for number, (indices, convs) in enumerate(self._SLICES, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            pending = list(convs)
            for index in indices:
                if index == 23:
                    layers[str(index)] = nn.MaxPool2d(kernel_size=2, stride=2)
                elif not layers or isinstance(next(reversed(layers.values())), (nn.ReLU, nn.MaxPool2d)):
                    c_in, c_out = pending.pop(0)
                    layers[str(index)] = nn.Conv2d(in_channels if (number, index) == (1, 0) else c_in, c_out, 3, padding=1)
                else:
                    layers[str(index)] = nn.ReLU()
            setattr(self, f"slice{number}", nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            outs.append(x)
        return outs


class LatentLPIPS(nn.Module):
    """The official latent LPIPS (latent_lpips.lpips.LPIPS with latent=True, net vgg16, in_chans 4): no input
    scaling, unit-normalised features of 5 VGG stages, learned 1x1 weights on squared differences, spatial mean."""

    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        self.net = _Vgg16Latent(in_channels)
        self.lins = nn.ModuleList(_NetLin(c) for c in self.CHANNELS)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """N x 1 x 1 x 1 distances."""
        total = 0
        for lin, fa, fb in zip(self.lins, self.net(a), self.net(b)):
            fa = fa / (torch.sqrt(torch.sum(fa**2, dim=1, keepdim=True)) + 1e-10)
            fb = fb / (torch.sqrt(torch.sum(fb**2, dim=1, keepdim=True)) + 1e-10)
            total = total + lin((fa - fb) ** 2).mean([2, 3], keepdim=True)
        return total

    def load_official(self, path: str | Path) -> None:
        """Load vgg16_sdturbo_lpips.pth: `lin{k}.model.1.weight` -> lins.k, `net.*` as is (scaling buffers ignored)."""
        from diffsr.diffusion.loading import read_state_dict
        from diffsr.models.loading import WeightsError

        expected_text = f"expected {LPIPS_FILE} (from {WEIGHTS_SOURCE})"
        state = read_state_dict(path, expected_text)
        renamed = {}
        for key, value in state.items():
            if key.startswith("lin") and key[3:4].isdigit():
                renamed[f"lins.{key[3]}{key[4:]}"] = value
            elif key.startswith(("net.", "lins.")):
                renamed[key] = value
        own = self.state_dict()
        missing = sorted(set(own) - set(renamed))
        wrong = [k for k in own if k in renamed and renamed[k].shape != own[k].shape]
        if missing or wrong:
            raise WeightsError(f"{path}: not the latent LPIPS ({len(missing)} weights missing, e.g. {missing[:1]}; "
                               f"{len(wrong)} of other shape); {expected_text}")
        self.load_state_dict({k: renamed[k].float() for k in own}, strict=True)


# -------------------------------------------------------------------------------------------- discriminator


def build_discriminator(overrides: dict[str, Any] | None = None) -> nn.Module:
    """The official UNet2DConditionDiscriminator on stock diffusers blocks (same module names and keys)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import get_down_block

    class UNet2DConditionDiscriminator(UNet2DConditionModel):
        """A UNet on latents whose every down block also sees a (bicubically resized) feature map of the input,
        with a logit head after the mid block and after each up block; it has no conv_out."""

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
            if hasattr(self, "hidden_compress_layer"):
                encoder_hidden_states = self.hidden_compress_layer(encoder_hidden_states)
            emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), None)
            aug = self.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
            emb = emb + aug if aug is not None else emb
            inputs = sample
            sample = self.conv_in(sample)
            features = self.feature_in(inputs)
            residuals = (sample,)
            for block in self.down_blocks:
                extra = F.interpolate(features, size=sample.shape[-2:], mode="bicubic")
                hidden = torch.cat([sample, extra], dim=1)
                if getattr(block, "has_cross_attention", False):
                    sample, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
                else:
                    sample, res = block(hidden_states=hidden, temb=emb)
                residuals += res
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
            outs = [self.out_blocks[0](sample)]
            for index, block in enumerate(self.up_blocks):
                res = residuals[-len(block.resnets):]
                residuals = residuals[: -len(block.resnets)]
                size = residuals[-1].shape[2:] if index < len(self.up_blocks) - 1 and residuals else None
                if getattr(block, "has_cross_attention", False):
                    sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                                   encoder_hidden_states=encoder_hidden_states, upsample_size=size)
                else:
                    sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
                outs.append(self.out_blocks[index + 1](sample))
            return outs

    config = {**DISCRIMINATOR_CONFIG, **(overrides or {})}
    model = UNet2DConditionDiscriminator(**config)
    groups, eps = config["norm_num_groups"], config["norm_eps"]
    channels = list(config["block_out_channels"])
    count = len(channels)
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * count  # noqa: E731
    heads = as_list(config.get("num_attention_heads") or config["attention_head_dim"])  # diffusers' SD naming
    head_dims = as_list(config["attention_head_dim"])
    layers, cross = as_list(config["layers_per_block"]), as_list(config["cross_attention_dim"])
    transformer_layers = as_list(config.get("transformer_layers_per_block", 1))
    if isinstance(config["cross_attention_dim"], int) and config["cross_attention_dim"] > 1024:
        model.hidden_compress_layer = nn.Linear(config["cross_attention_dim"], 1024)  # official: contexts wider than 1024
    cross = [min(c, 1024) for c in cross]
    time_dim = channels[0] * 4
    out_channels = channels[0]
    for index, block_type in enumerate(config["down_block_types"]):
        in_channels, out_channels = out_channels + groups, channels[index]
        model.down_blocks[index] = get_down_block(
            block_type, num_layers=layers[index], transformer_layers_per_block=transformer_layers[index], in_channels=in_channels,
            out_channels=out_channels, temb_channels=time_dim, add_downsample=index < count - 1, resnet_eps=eps,
            resnet_act_fn=config["act_fn"], resnet_groups=groups, cross_attention_dim=cross[index], num_attention_heads=heads[index],
            downsample_padding=config["downsample_padding"], use_linear_projection=config["use_linear_projection"],
            only_cross_attention=False, resnet_time_scale_shift=config["resnet_time_scale_shift"],
            attention_head_dim=head_dims[index] if head_dims[index] is not None else out_channels, dropout=config["dropout"],
        )
    model.feature_in = nn.Conv2d(config["in_channels"], groups, kernel_size=3, padding=1)

    def head(width: int) -> nn.Sequential:
        norm = lambda: nn.GroupNorm(num_channels=width, num_groups=min(groups, width // 4), eps=eps)  # noqa: E731
        return nn.Sequential(norm(), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), norm(), nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1))

    model.out_blocks = nn.ModuleList([head(channels[-1])] + [head(c) for c in reversed(channels)])
    model.conv_norm_out = model.conv_act = model.conv_out = None
    return model


def hinge_d_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """trainer.hinge_d_loss: per sample, 0.5 * (relu(1 - real) + relu(1 + fake)) averaged, then over the heads."""
    total = 0
    for r, f in zip(real, fake):
        total = total + (0.5 * (F.relu(1.0 - r) + F.relu(1.0 + f))).mean(dim=list(range(1, r.ndim)))
    return total / len(real)


def generator_gan_loss(fake: list[torch.Tensor]) -> torch.Tensor:
    """trainer.get_loss_from_discrimnator: -mean(logits) per sample, averaged over the heads."""
    return sum(-f.mean(dim=list(range(1, f.ndim))) for f in fake) / len(fake)


# ------------------------------------------------------------------------------------------------- recipe


@dataclasses.dataclass
class Config:
    """Defaults: the official recipe (configs/sd-turbo-sr-ldis.yaml)."""

    data: list[str] = dataclasses.field(default_factory=list)
    """HR image folders (official: LSDIR train + the first 20k FFHQ images)."""
    base: str = "sd_turbo.safetensors"
    config_dir: str | None = None
    lpips_weights: str = LPIPS_FILE
    """the authors' latent LPIPS; 'random' = random weights (smoke tests only)."""
    init_weights: str | None = None
    """a noise predictor to start from (model.ckpt_path), e.g. noise_predictor_sd_turbo_v5.pth to fine-tune."""
    discriminator_weights: str | None = None
    """discriminator_sd_turbo_v5.pth to fine-tune with the released discriminator (zsyOAOA/InvSR#1)."""
    predictor: dict[str, Any] = dataclasses.field(default_factory=dict)
    """overrides of the noise predictor's constructor arguments (model.params)."""
    discriminator: dict[str, Any] = dataclasses.field(default_factory=dict)
    """overrides of the discriminator's constructor arguments (discriminator.params)."""
    degradation: str = "invsr"
    gt_size: int = 512
    scale: int = 4
    timesteps: list[int] = dataclasses.field(default_factory=lambda: [250, 200, 150, 100])
    loss_type: str = "L2"
    ldif: float = 1.0
    llpips: float = 2.0
    ldis: float = 0.1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 2000
    lr_dis: float = 5e-5
    weight_decay_dis: float = 1e-3
    dis_init_steps: int = 10000
    """the generator's GAN term starts after this many iterations."""
    dis_update_every: int = 1
    ema_rate: float = 0.999
    batch_size: int = 16
    """per process (official: 64 = 4 GPUs x 16)."""
    num_workers: int = 4
    gradient_checkpointing: bool = True
    max_steps: int = 100000
    save_every: int = 5000
    log_every: int = 200
    keep_checkpoints: int = 2
    mixed_precision: str = "fp16"
    gradient_accumulation_steps: int = 1
    seed: int = 123456
    cpu: bool = False


class _EMA(nn.Module):
    """EMA of the predictor with the official decay min(rate, (1 + it) / (10 + it)); checkpointed with the run."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.rate = rate

    @torch.no_grad()
    def update(self, source: nn.Module, iteration: int) -> None:
        decay = min(self.rate, (1 + iteration) / (10 + iteration))
        params = dict(source.named_parameters())
        for name, value in self.model.named_parameters():
            if params[name].requires_grad:
                value.sub_((1.0 - decay) * (value - params[name].detach().to(value.dtype)))


def _warmup(steps: int):
    """adjust_lr's schedule: the first iteration at the full rate (adjust_lr runs after it), then i / warmup up to 1."""
    return lambda index: 1.0 if index == 0 or steps <= 0 else min(1.0, index / steps)


def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True) -> Path:
    """Run the recipe; returns the EMA noise predictor as safetensors (+ its config JSON beside it)."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, worker_init
    from diffsr.diffusion.loading import load_base, read_state_dict

    if not config.data:
        raise ConfigError("setting data: give at least one folder of HR images")
    if config.loss_type not in ("L2", "L1"):
        raise ConfigError(f"setting loss_type: {config.loss_type!r} is not L2 or L1")
    if not config.timesteps or any(not 1 <= t <= 1000 for t in config.timesteps):
        raise ConfigError(f"setting timesteps: expected values in 1..1000, got {config.timesteps}")
    if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
        raise ConfigError("setting mixed_precision: fp16 (the official setting) needs a CUDA GPU; use bf16 or no on the CPU")
    output_dir = Path(output_dir)
    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    device = trainer.device
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

    base = load_base(config.base, "sd-turbo", dtype=frozen_dtype, device=device, config_dir=config.config_dir)
    unet, vae = base.unet, base.vae
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    with torch.no_grad():
        ids = base.tokenizers[0]([PROMPT], padding="max_length", max_length=base.tokenizers[0].model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        prompt_embeds = base.text_encoders[0](ids.to(device))[0]
    base.text_encoders.clear()
    alphas = base.scheduler.alphas_cumprod.to(torch.float32)
    sigma_table = ((1 - alphas) / alphas) ** 0.5

    predictor_config = NoisePredictorConfig.from_dict({**NoisePredictorConfig().to_dict(), **config.predictor})
    predictor = load_noise_predictor(config.init_weights, predictor_config) if config.init_weights else NoisePredictor(predictor_config)
    predictor.train().requires_grad_(True)
    ema = _EMA(predictor, config.ema_rate).to(device)
    lpips = LatentLPIPS(vae.config.latent_channels)
    if config.lpips_weights != "random":
        lpips.load_official(config.lpips_weights)
    lpips.to(device).eval().requires_grad_(False)
    use_gan = config.ldis > 0
    discriminator = build_discriminator(config.discriminator) if use_gan else None
    if discriminator is not None and config.discriminator_weights:
        state = read_state_dict(config.discriminator_weights, f"expected {DISCRIMINATOR_FILE} (from {WEIGHTS_SOURCE})")
        discriminator.load_state_dict(state, strict=True)

    optimizer = torch.optim.AdamW(predictor.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(config.warmup_steps))
    dataset = HRFolderDataset(config.data, crop_size=config.gt_size, scale=config.scale, degradation=config.degradation,
                              seed=config.seed, flip=True, rotate=False)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=len(dataset) >= config.batch_size,
                        num_workers=config.num_workers, collate_fn=collate_pairs, worker_init_fn=worker_init,
                        persistent_workers=config.num_workers > 0)
    if use_gan:
        optimizer_dis = torch.optim.Adam(discriminator.parameters(), lr=config.lr_dis, weight_decay=config.weight_decay_dis)
        predictor, discriminator, optimizer, optimizer_dis, schedule, loader = trainer.prepare(
            predictor, discriminator, optimizer, optimizer_dis, schedule, loader)
    else:
        predictor, optimizer, schedule, loader = trainer.prepare(predictor, optimizer, schedule, loader)
    trainer.register(ema)
    if resume:
        trainer.resume()
    steps = torch.tensor([t - 1 for t in config.timesteps], dtype=torch.long)

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        iteration = index + 1
        noise = NoiseSource(seed=config.seed * 1_000_003 + iteration * 7919 + trainer.accelerator.process_index)
        lq, gt = batch["lr"].to(device), batch["hr"].to(device)
        count = gt.shape[0]
        t = steps[torch.randint(len(steps), (count,), generator=noise.generator)].to(device)
        sigma = sigma_table.to(device)[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            z_gt = encode(vae, (gt * 2 - 1).to(frozen_dtype), noise).float()
            up = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic")
            z_lq = encode(vae, (up * 2 - 1).to(frozen_dtype), noise).float()
        context = prompt_embeds.expand(count, -1, -1)
        losses: dict[str, torch.Tensor] = {}
        with trainer.accumulate(predictor), trainer.accelerator.autocast():
            start = predictor(lq, t.float(), draw=lambda shape, dev, dt: noise.randn(shape, dev, dt, role="predictor_posterior"))
            z_t = z_lq + sigma * start.float()
            eps = unet((z_t / (sigma**2 + 1) ** 0.5).to(frozen_dtype), t, encoder_hidden_states=context, return_dict=False)[0]
            z0 = z_t - sigma * eps.float()
            distance = F.mse_loss(z0, z_gt, reduction="none") if config.loss_type == "L2" else F.l1_loss(z0, z_gt, reduction="none")
            per_sample = config.ldif * distance.mean(dim=[1, 2, 3])
            losses["ldif"] = per_sample.detach().mean()
            if config.llpips > 0:
                perceptual = lpips(z0, z_gt).view(-1) * config.llpips
                losses["llpips"] = perceptual.detach().mean()
                per_sample = per_sample + perceptual
            if use_gan and iteration > config.dis_init_steps:
                discriminator.requires_grad_(False)
                adversarial = generator_gan_loss(discriminator(z0.clamp(-LATENT_BOUND, LATENT_BOUND), t, context)) * config.ldis
                discriminator.requires_grad_(True)
                losses["ldis"] = adversarial.detach().mean()
                per_sample = per_sample + adversarial
            loss = per_sample.mean()
            trainer.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        losses["loss"] = loss.detach()
        if use_gan and (iteration < config.dis_init_steps or iteration % config.dis_update_every == 0):
            with trainer.accumulate(discriminator), trainer.accelerator.autocast():
                real = discriminator(z_gt, t, context)
                fake = discriminator(z0.detach().clamp(-LATENT_BOUND, LATENT_BOUND), t, context)
                d_loss = hinge_d_loss(real, fake).mean()
                trainer.backward(d_loss)
                optimizer_dis.step()
                optimizer_dis.zero_grad()
            losses["dis"] = d_loss.detach()
            losses["real"], losses["fake"] = real[-1].detach().mean(), fake[-1].detach().mean()
        ema.update(trainer.unwrap(predictor), iteration)
        return {k: float(v) for k, v in losses.items()}

    trainer.run(step, loader, on_progress)
    weights = output_dir / "noise_predictor_ema.safetensors"
    if trainer.accelerator.is_main_process:
        state = {k: v.detach().float().contiguous().cpu() for k, v in ema.model.state_dict().items()}
        save_file(state, str(weights), metadata={"diffsr_method": "invsr", "steps": str(trainer.step)})
        weights.with_suffix(".json").write_text(json.dumps(predictor_config.to_dict(), indent=1))
    trainer.accelerator.wait_for_everyone()
    return weights


__all__ = ["Config", "train", "LatentLPIPS", "build_discriminator", "hinge_d_loss", "generator_gan_loss"]
