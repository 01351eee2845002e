"""`diffsr train promptsr CONFIG -o DIR`: PromptSR's diffusion training (research note promptsr.md, 3.5).

Why these defaults: BI-DiffSR, the same authors' public code on the same BasicSR + SR3 base, trains
its x4 SR3 U-Net with epsilon prediction, an L1 noise loss, 2000 linear betas (1e-6 -> 1e-2) and
Adam 1e-4 (0.9, 0.99); we keep that, with an independent timestep per sample and an EMA copy (the
checkpoint holds the EMA weights). Each sample's prompt comes from its own drawn degradation
(`diffsr.degrade`, preset "promptsr_shuffle": random stage order half the time) through the note's
phrase dropout (20 % of prompts lose each non-final phrase with p 0.5) and 10 % empty prompts, so a
missing phrase means "not stated" and the empty prompt is the guidance branch. Frozen encoders'
embeddings are cached by string. The output is a checkpoint folder DIR/final that
`diffsr upscale --method promptsr --weights DIR/final` loads.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffsr.degrade.prompts import PromptBins, PromptPolicy
from diffsr.models.promptsr import (
    TRAIN_TIMESTEPS,
    EmbeddingCache,
    HFTextEncoder,
    PhraseTableEncoder,
    PromptSRConfig,
    TextEncoder,
    build_unet,
    minilm_encoder,
    predict_noise,
    save_checkpoint,
    train_scheduler,
    upsample_lr,
)
from diffsr.progress import OptionalCallback


@dataclasses.dataclass
class Config:
    data: tuple[str, ...] = ("../shared/data/train/bsds500", "../shared/data/train/imagenet_half")
    """HR image folders (the paper trains on LSDIR)."""
    hr_crop: int = 256
    batch_size: int = 4
    size: str = "default"
    """U-Net size: default (103 M), mid, small, cpu-tiny, tiny (see diffsr.models.promptsr.unet_config)."""
    text_encoder: str = "minilm"
    """minilm (bundled), phrase_table (learned, no pre-training), or clip:PATH / t5:PATH / bert:PATH (local folders)."""
    phrase_table_dim: int = 64
    degradation: str = "promptsr_shuffle"
    partial_prob: float = 0.2
    drop_prob: float = 0.5
    empty_prob: float = 0.1
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    dropout: float = 0.0
    ema_decay: float = 0.9999
    """EMA decay, warmed up as min(decay, (1 + step) / (10 + step))."""
    max_steps: int = 500_000
    save_every: int = 5000
    log_every: int = 50
    mixed_precision: str = "auto"
    """auto = bf16 on a GPU, none on the CPU; or no / fp16 / bf16."""
    seed: int = 0
    cpu: bool = False
    threads: int = 0


class EMA:
    """Exponential moving average of a model's parameters; saved in checkpoints (state_dict/load_state_dict)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for shadow, param in zip(self.shadow, model.parameters()):
            shadow.lerp_(param.detach().float(), 1 - decay)

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for shadow, param in zip(self.shadow, model.parameters()):
                param.copy_(shadow.to(param.dtype))
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.steps = state["decay"], state["steps"]
        self.shadow = [t.clone() for t in state["shadow"]]


def make_encoder(spec: str, phrase_table_dim: int = 64) -> TextEncoder:
    if spec == "minilm":
        return minilm_encoder()
    if spec == "phrase_table":
        return PhraseTableEncoder(phrase_table_dim)
    kind, sep, path = spec.partition(":")
    if sep and kind in ("clip", "t5", "bert"):
        return HFTextEncoder(path, kind)
    raise ValueError(f"text_encoder {spec!r}: use minilm, phrase_table, clip:PATH, t5:PATH or bert:PATH")


def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True,
          encoder: TextEncoder | None = None) -> Path:
    """Train and write DIR/final; `encoder` overrides `config.text_encoder` (tests pass a tiny random BERT)."""
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, degrade_batch
    from diffsr.degrade.pipeline import Degrader
    from diffsr.train.loop import LoopSettings, Trainer

    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(output_dir)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and not config.cpu else "no"
    trainer = Trainer(output_dir, LoopSettings.from_config(config, mixed_precision=precision))
    encoder = encoder or make_encoder(config.text_encoder, config.phrase_table_dim)
    learned = isinstance(encoder, PhraseTableEncoder)
    unet = build_unet(config.size, encoder.hidden_size, config.dropout, seed=config.seed)
    dataset = HRFolderDataset(list(config.data), crop_size=config.hr_crop, degradation=None, seed=config.seed)
    if not dataset.files:
        raise ValueError(f"no training images under {', '.join(config.data)}")
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate_pairs,
                        drop_last=len(dataset) > config.batch_size)
    params = list(unet.parameters()) + (list(encoder.parameters()) if learned else [])
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, betas=tuple(config.betas), weight_decay=config.weight_decay)
    if learned:
        unet, encoder, optimizer, loader = trainer.prepare(unet, encoder, optimizer, loader)
    else:
        unet, optimizer, loader = trainer.prepare(unet, optimizer, loader)
        encoder.to(trainer.device)
    ema = EMA(trainer.unwrap(unet), config.ema_decay)
    trainer.register(ema)
    if resume:
        trainer.resume()
    device = trainer.device
    degrader = Degrader(config.degradation, 4, device=device)
    bins = PromptBins()
    policy = PromptPolicy(config.partial_prob, config.drop_prob, config.empty_prob)
    cache = EmbeddingCache(trainer.unwrap(encoder) if learned else encoder)
    scheduler = train_scheduler()
    generator = torch.Generator(device="cpu")

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        batch = degrade_batch(batch, degrader, policy)
        x0 = batch["hr"].to(device) * 2 - 1
        lr_up = upsample_lr(batch["lr"].to(device))
        generator.manual_seed(config.seed * 1_000_003 + index)  # per-step noise: identical after a resume
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        with trainer.accumulate(unet):
            states = cache(batch["prompt"], device)
            pred = predict_noise(unet, noisy, lr_up, t, states)
            loss = F.l1_loss(pred.float(), noise)
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if trainer.accelerator.sync_gradients:
            ema.update(trainer.unwrap(unet))
        return {"loss": float(loss.detach())}

    trainer.run(step, loader, on_progress)
    final = output_dir / "final"
    if trainer.accelerator.is_main_process:
        model = ema.copy_to(copy.deepcopy(trainer.unwrap(unet)).float())
        info = PromptSRConfig(text_encoder={}, size=config.size, degradation=config.degradation, bins=bins.to_dict(),
                              prompt_policy=dataclasses.asdict(policy),
                              training={k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()})
        save_checkpoint(final, model, trainer.unwrap(encoder) if learned else encoder, info)
    return final
