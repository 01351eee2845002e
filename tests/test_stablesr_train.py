"""`diffsr train stablesr` smoke tests on a tiny base: stage 1 (encoder + SFT) and stage 2 (CFW).

Each stage starts from a saved random initialisation, so the test can compare the loss of a fixed
batch before and after training; the results must load in the inference pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stablesr_fixture import write_tiny_stablesr
from tiny_models import gradient_image, save_png

from diffsr.diffusion.runtime import NoiseSource
from diffsr.io.image import ImageData
from diffsr.train.loop import ConfigError

TINY_ENCODER = dict(encoder_channels=32, encoder_mult=(2, 2), encoder_res_blocks=1, encoder_attention=(1,), encoder_out_channels=32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stablesr_train")
    tiny = write_tiny_stablesr(root / "models")
    for i in range(2):
        save_png(root / "hr" / f"{i}.png", gradient_image(72, 72, seed=10 + i))
    return root, tiny


def _config(root, tiny, **changes):
    from diffsr.train.stablesr import Config

    values = dict(data=[str(root / "hr")], base=str(tiny.base_dir), gt_size=64, batch_size=2, num_workers=0, max_steps=8,
                  save_every=4, lr=2e-3, gradient_accumulation_steps=1, cpu=True, log_every=1, **TINY_ENCODER)
    values.update(changes)
    return Config(**values)


def _fixed_batch(root, config):
    from diffsr.data.folders import HRFolderDataset, collate_pairs
    from diffsr.train.stablesr import _images

    dataset = HRFolderDataset(config.data, crop_size=config.gt_size, scale=config.scale, degradation=config.degradation, seed=99)
    return _images(collate_pairs([dataset[0], dataset[1]]), torch.device("cpu"), config.use_usm is not False)


def test_stage1_loss_falls_resumes_and_loads(setup):
    from safetensors.torch import load_file, save_file

    from diffsr.diffusion.loading import load_base
    from diffsr.models.stablesr import StableSRAdapter
    from diffsr.pipelines.stablesr import empty_prompt_context, load
    from diffsr.train.stablesr import SFTModel, new_adapter, sft_loss, train

    root, tiny = setup
    base = load_base(tiny.base_dir, "sd21-base")
    torch.manual_seed(0)
    initial = new_adapter(base.unet, _config(root, tiny))
    with torch.no_grad():  # start away from the zero-initialised optimum of the residual branches
        for layer in initial.sft.values():
            layer.mlp_beta.weight.normal_(0, 0.05)
    save_file(initial.official_state_dict(), str(root / "init.safetensors"))
    config = _config(root, tiny, init_weights=str(root / "init.safetensors"), max_steps=4)
    train(config, root / "run1")
    final = train(_config(root, tiny, init_weights=str(root / "init.safetensors")), root / "run1")  # resumes at step 4
    log = (root / "run1" / "train-log.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == list(range(1, 9))

    gt, lr = _fixed_batch(root, config)
    context = empty_prompt_context(base.text_encoders[0], base.tokenizers[0])
    losses = []
    for weights in (root / "init.safetensors", final):
        adapter = StableSRAdapter.from_state(load_file(str(weights)))
        adapter.attach(base.unet)
        with torch.no_grad():
            losses.append(float(sft_loss(SFTModel(adapter.eval(), base.unet), base.vae, context, gt, lr,
                                         torch.Generator().manual_seed(1))))
        adapter.detach()
    assert losses[1] < losses[0], losses

    pipeline = load(weights=str(final), base=str(tiny.base_dir), device="cpu")
    out = pipeline.upscale(ImageData(gradient_image(16, 16, seed=1).astype(np.float32) / 255), steps=2, input_size=32,
                           latent_tile=4, latent_overlap=2, seed=0)
    assert out.pixels.shape == (64, 64, 3) and np.isfinite(out.pixels).all()


def test_stage2_cfw_learns_from_generated_latents_and_loads(setup):
    from safetensors.torch import save_file

    from diffsr.models.stablesr import CFW
    from diffsr.pipelines.stablesr import load, read_stablesr_checkpoint
    from diffsr.train.stablesr import CFWModel, train

    root, tiny = setup
    torch.manual_seed(0)
    initial = CFW({1: 32, 2: 32}, blocks=1)
    save_file(initial.official_state_dict(), str(root / "cfw_init.safetensors"))
    config = _config(root, tiny, stage="cfw", stage1_weights=str(tiny.ckpt), generate_steps=2, perceptual_loss="none",
                     disc_start=3, init_weights=str(root / "cfw_init.safetensors"), max_steps=6, lr=1e-3)
    final = train(config, root / "run2")
    pipeline = load(weights=str(tiny.ckpt), cfw_weights=str(final), base=str(tiny.base_dir), device="cpu")
    vae = pipeline.models.vae
    gt, lr = _fixed_batch(root, config)
    latent = pipeline.sample_image(lr[:1], NoiseSource(seed=3), True, 2).latent
    errors = []
    for state in (read_stablesr_checkpoint(root / "cfw_init.safetensors"), read_stablesr_checkpoint(final)):
        with torch.no_grad():
            rec = CFWModel(CFW.from_state(state), vae)(lr[:1], latent, 1.0)
        errors.append(float((rec - gt[:1]).abs().mean()))
    assert errors[1] < errors[0], errors
    assert any(line for line in (root / "run2" / "train-log.jsonl").read_text().splitlines() if '"d": 0.0' not in line)


def test_config_errors(setup):
    from diffsr.train.stablesr import train

    root, tiny = setup
    with pytest.raises(ConfigError, match="stage"):
        train(_config(root, tiny, stage="vae"), root / "bad")
    with pytest.raises(ConfigError, match="pairs"):
        train(_config(root, tiny, stage="cfw", data=[], perceptual_loss="none"), root / "bad")
    with pytest.raises(ConfigError, match="VGG16"):
        train(_config(root, tiny, stage="cfw", stage1_weights=str(tiny.ckpt)), root / "bad")
