"""`diffsr train describer CONFIG -o DIR`: train PromptSR's degradation describer on our degradation pipeline.

Why this recipe: the describer replaces the paper's multimodal LLM offline, so it must learn the exact
bins of `diffsr.degrade.prompts`; it is trained on the pipeline's own outputs (preset "promptsr") in a
"balanced" variant where every stage is absent with probability 1/4 and the first resize goes up,
down or nowhere with probability 1/3 each, so that no class is rare (research note 4.2). HR crops are
degraded on the fly in each step from per-sample seeds, so a resumed run sees the same data.
Writes DIR/describer.safetensors (weights + config as metadata), which `DegradationDescriber.load` reads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffsr.degrade.config import PRESETS, DegradationConfig
from diffsr.degrade.pipeline import Degrader
from diffsr.models.describer import STAGES, DescriberConfig, DescriberNet, labels_from_steps
from diffsr.progress import OptionalCallback


@dataclasses.dataclass
class Config:
    data: tuple[str, ...] = ("../shared/data/train/bsds500", "../shared/data/train/imagenet_half")
    """HR image folders (never the evaluation set, B100)."""
    hr_crop: int = 128
    """HR crop size; the LR seen in training is hr_crop / 4."""
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    channels: tuple[int, ...] = (16, 32, 48, 64)
    blocks: int = 1
    balanced: bool = True
    """Balanced stage probabilities (see the module docstring); False = the SR training distribution."""
    max_steps: int = 600
    save_every: int = 200
    log_every: int = 10
    mixed_precision: str = "no"
    seed: int = 0
    cpu: bool = False
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""


def degradation(balanced: bool) -> DegradationConfig:
    """The PromptSR preset, or its balanced variant for describer training."""
    preset = PRESETS["promptsr"]
    if not balanced:
        return preset
    first = replace(preset.first, blur_prob=0.75, noise_prob=0.75, jpeg_prob=0.75, resize_probs=(1 / 3, 1 / 3, 1 / 3))
    return replace(preset, name="promptsr_balanced", first=first).validate()


def labels_tensor(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    rows = [labels_from_steps(r["steps"]) for r in records]
    return {stage: torch.tensor([row[stage] for row in rows]) for stage in STAGES}


def save_describer(net: DescriberNet, path: Path, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from diffsr.io.atomic import atomic_path

    metadata = {"describer_config": json.dumps(net.config.to_dict())}
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def train(config: Config, output_dir: str | Path, on_progress: OptionalCallback = None, resume: bool = True) -> Path:
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, degrade_batch
    from diffsr.train.loop import LoopSettings, Trainer

    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(output_dir)
    trainer = Trainer(output_dir, LoopSettings.from_config(config))
    dataset = HRFolderDataset(list(config.data), crop_size=config.hr_crop, degradation=None, seed=config.seed)
    if not dataset.files:
        raise ValueError(f"no training images under {', '.join(config.data)}")
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, collate_fn=collate_pairs, drop_last=len(dataset) > config.batch_size)
    net = DescriberNet(DescriberConfig(channels=tuple(config.channels), blocks=config.blocks))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, config.max_steps) / config.max_steps)).item()))
    net, optimizer, loader, schedule = trainer.prepare(net, optimizer, loader, schedule)
    if resume:
        trainer.resume()
    degrader = Degrader(degradation(config.balanced), 4, device=trainer.device)

    def step(batch: dict[str, Any], index: int) -> dict[str, float]:
        batch = degrade_batch(batch, degrader)
        labels = {k: v.to(trainer.device) for k, v in labels_tensor(batch["record"]).items()}
        with trainer.accumulate(net):
            logits = net(batch["lr"].to(trainer.device))
            losses = {stage: F.cross_entropy(logits[stage].float(), labels[stage], label_smoothing=config.label_smoothing)
                      for stage in STAGES}
            loss = sum(losses.values())
            trainer.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        accuracy = {f"acc_{s}": float((logits[s].argmax(1) == labels[s]).float().mean()) for s in STAGES}
        return {"loss": float(loss.detach()), **accuracy}

    started = time.perf_counter()
    trainer.run(step, loader, on_progress)
    weights = output_dir / "describer.safetensors"
    if trainer.accelerator.is_main_process:
        save_describer(trainer.unwrap(net), weights, {"training": {**dataclasses.asdict(config), "seconds": round(time.perf_counter() - started, 1)}})
    return weights
