"""InvSR training on tiny models: a few steps with all three losses, resume, the result loads for inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from diffsr.train.invsr import (  # noqa: E402
    Config,
    LatentLPIPS,
    build_discriminator,
    generator_gan_loss,
    hinge_d_loss,
)

TINY_PREDICTOR = {"block_out_channels": [16, 32], "layers_per_block": [1, 1], "norm_num_groups": 8,
                  "attention_head_dim": 8, "temb_channels": 32}
TINY_DISCRIMINATOR = {"block_out_channels": [16, 32, 32], "layers_per_block": [1, 1, 1], "norm_num_groups": 8,
                      "cross_attention_dim": 32, "attention_head_dim": [2, 4, 4], "addition_embed_type_num_heads": 4}


def test_losses_and_modules():
    real = [torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 2, 2), -1.0)]
    fake = [torch.full((2, 1, 4, 4), -2.0), torch.full((2, 1, 2, 2), 1.0)]
    # head 1: relu(1-2)=0, relu(1-2)=0 -> 0; head 2: 0.5 * (relu(2) + relu(2)) = 2 -> mean over heads 1.0
    assert hinge_d_loss(real, fake).tolist() == [1.0, 1.0]
    assert generator_gan_loss(fake).tolist() == [0.5, 0.5]
    d = build_discriminator(TINY_DISCRIMINATOR)
    keys = d.state_dict()
    assert "feature_in.weight" in keys and "out_blocks.3.5.weight" in keys and not any(k.startswith("conv_out") for k in keys)
    assert keys["down_blocks.1.resnets.0.conv1.weight"].shape[1] == 16 + 8  # every down block also sees the input's features
    logits = d(torch.randn(2, 4, 8, 8), torch.tensor([199, 99]), torch.randn(2, 77, 32))
    assert [tuple(x.shape) for x in logits] == [(2, 1, 2, 2), (2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 8, 8)]
    lpips = LatentLPIPS().eval()
    for lin in lpips.lins:  # trained LPIPS heads are non-negative (LPIPS clamps them); random ones are not
        lin.model[1].weight.data.abs_()
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert lpips(a, a).abs().max() < 1e-6 and (lpips(a, b) > 0).all()
    assert "net.slice5.28.weight" in lpips.state_dict() and lpips.net.slice1[0].in_channels == 4


def _setup(tmp_path: Path) -> Config:
    from tiny_models import gradient_image, save_png

    from diffsr.diffusion.tiny import build_tiny_sd2

    base = build_tiny_sd2(tmp_path / "base", "sd-turbo")
    save_png(tmp_path / "hr" / "0.png", gradient_image(72, 80))
    return Config(data=[str(tmp_path / "hr")], base=str(base.diffusers_dir), lpips_weights="random", predictor=TINY_PREDICTOR,
                  discriminator=TINY_DISCRIMINATOR, gt_size=32, batch_size=1, num_workers=0, max_steps=2, save_every=2,
                  log_every=1, warmup_steps=2, dis_init_steps=1, mixed_precision="no", cpu=True, seed=1,
                  gradient_checkpointing=False)


def test_train_two_steps_and_load(tmp_path):
    """Two steps (the second with the generator's GAN term), a checkpoint, and EMA weights inference loads."""
    from diffsr.models.invsr import NoisePredictorConfig, load_noise_predictor
    from diffsr.train import TRAINERS
    from diffsr.train.invsr import train

    assert TRAINERS["invsr"] == "diffsr.train.invsr"
    weights = train(_setup(tmp_path), tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train-log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]
    assert "ldis" not in log[0] and "ldis" in log[1]  # the generator's GAN term starts after dis_init_steps
    assert all(np.isfinite(entry[k]) for entry in log for k in ("ldif", "llpips", "loss", "dis"))
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "diffsr-state.json").is_file()
    config_json = json.loads(weights.with_suffix(".json").read_text())
    predictor = load_noise_predictor(str(weights), NoisePredictorConfig.from_dict(config_json))
    with torch.no_grad():
        mean, logvar = predictor(torch.rand(1, 3, 16, 16), 199.0)
    assert mean.shape == (1, 4, 8, 8) and torch.isfinite(logvar).all()


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """2 steps + resume to 3 gives the same EMA weights as 3 steps in one go (data order, noise, optimizers)."""
    from safetensors.torch import load_file

    from diffsr.train.invsr import train

    config = _setup(tmp_path)
    config.max_steps = 3
    straight = load_file(str(train(config, tmp_path / "straight")))
    config.max_steps = 2
    train(config, tmp_path / "resumed")
    config.max_steps = 3
    resumed = load_file(str(train(config, tmp_path / "resumed")))
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
