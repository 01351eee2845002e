"""`diffsr train osediff`: a 2-step run on a tiny base, its outputs loaded into inference, LPIPS-VGG and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsr.io.image import ImageData
from diffsr.train.loop import ConfigError
from tiny_models import gradient_image, save_png


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of the recipe (l1 in place of LPIPS) on one 64 px HR image, at lr 1e-3 so 2 steps show."""
    from diffsr.diffusion.tiny import build_tiny_sd2
    from diffsr.train.osediff import Config, train

    root = tmp_path_factory.mktemp("osediff_train")
    base = build_tiny_sd2(root / "base")
    hr = gradient_image(64, 64, seed=1)
    save_png(root / "hr" / "a.png", hr)
    config = Config(data=[str(root / "hr")], base=str(base.diffusers_dir), perceptual_loss="l1", gt_size=64, batch_size=1,
                    num_workers=0, max_steps=2, save_every=1, log_every=1, mixed_precision="no", cpu=True, lr=1e-3)
    weights = train(config, root / "run")
    return {"root": root, "base": base, "weights": weights, "hr": hr, "config": config}


def test_run_writes_official_pkl_and_safetensors(run):
    from diffsr.pipelines.osediff import read_weights

    state = torch.load(run["weights"], map_location="cpu", weights_only=True)
    assert state["rank_unet"] == state["rank_vae"] == 4
    assert {"state_dict_unet", "state_dict_vae", "unet_lora_encoder_modules", "vae_lora_encoder_modules"} <= set(state)
    assert "conv_in.base_layer.weight" in state["state_dict_unet"]
    a, b = read_weights(run["weights"]), read_weights(run["weights"].with_suffix(".safetensors"))
    assert a.unet.keys() == b.unet.keys() and all(torch.equal(a.unet[k], b.unet[k]) for k in a.unet)
    assert any(v.abs().max() > 0 for k, v in a.unet.items() if ".lora_B." in k)  # B starts at zero: it was trained
    step_files = sorted(p.name for p in (run["root"] / "run" / "checkpoints").glob("model_*.pkl"))
    assert step_files == ["model_1.pkl", "model_2.pkl"]  # the official per-checkpoint files
    last = read_weights(run["root"] / "run" / "checkpoints" / "model_2.pkl")
    assert all(torch.equal(last.unet[k], a.unet[k]) for k in a.unet)
    log = [json.loads(line) for line in (run["root"] / "run" / "train-log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    assert {"l2", "l1", "vsd", "diffusion", "loss"} <= set(log[0])
    assert all(np.isfinite(e["loss"]) for e in log)


def test_trained_weights_load_into_inference_and_lower_the_loss(run):
    """The trained file changes the pipeline's output and brings it closer to the HR image than the untrained LoRA."""
    from diffsr.pipelines.osediff import load
    from diffsr.resample import resize_array

    untrained = run["root"] / "untrained.pkl"
    state = torch.load(run["weights"], map_location="cpu", weights_only=True)
    for part in ("state_dict_unet", "state_dict_vae"):  # peft's start: B = 0, conv_in = SD's
        state[part] = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state[part].items()}
    from diffsr.diffusion.loading import load_base

    sd_conv = load_base(run["base"].diffusers_dir, "sd21-base", components=("unet",)).unet.conv_in
    state["state_dict_unet"]["conv_in.base_layer.weight"] = sd_conv.weight.detach().clone()
    state["state_dict_unet"]["conv_in.base_layer.bias"] = sd_conv.bias.detach().clone()
    torch.save(state, untrained)
    hr = run["hr"].astype(np.float32) / 255
    lr = np.round(np.clip(resize_array(hr, (16, 16), "bicubic"), 0, 1) * 255) / 255
    image = ImageData(lr.astype(np.float32), None, 8)
    options = {"seed": 0, "align_method": "nofix", "process_size": 64}
    before = load(str(untrained), str(run["base"].diffusers_dir), device="cpu", dtype="fp32").upscale(image, **options).pixels
    after = load(str(run["weights"]), str(run["base"].diffusers_dir), device="cpu", dtype="fp32").upscale(image, **options).pixels
    assert np.abs(after - before).max() > 0.01
    assert np.mean((after - hr) ** 2) < np.mean((before - hr) ** 2)


def test_lpips_is_required_unless_a_stand_in_is_named(tmp_path):
    from diffsr.train.osediff import Config, train

    with pytest.raises(ConfigError, match=r"vgg16-397923af\.pth.*perceptual_loss"):
        train(Config(data=[str(tmp_path)]), tmp_path / "run")
    with pytest.raises(ConfigError, match="perceptual_loss"):
        train(Config(data=[str(tmp_path)], perceptual_loss="ssim"), tmp_path / "run")
    with pytest.raises(ConfigError, match="data"):
        train(Config(), tmp_path / "run")
    with pytest.raises(ConfigError, match="reg_active_adapters"):
        train(Config(data=[str(tmp_path)], perceptual_loss="none", reg_active_adapters=["x"]), tmp_path / "run")


def test_lpips_vgg_loads_torchvision_and_lpips_files(tmp_path):
    """The trunk from a torchvision-layout file, the heads from an lpips-layout file; a missing part is named."""
    from diffsr.models.loading import WeightsError
    from diffsr.train.osediff import LPIPSVgg

    source = LPIPSVgg()
    trunk = {f"features.{k.split('.', 2)[2]}": v for k, v in source.state_dict().items() if k.startswith("net.")}
    heads = {k: v for k, v in source.state_dict().items() if k.startswith("lin")}
    torch.save(trunk, tmp_path / "vgg16-397923af.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = LPIPSVgg()
    loaded.load_weights(tmp_path / "vgg.pth", tmp_path / "vgg16-397923af.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(WeightsError, match="vgg16-397923af"):
        LPIPSVgg().load_weights(tmp_path / "vgg.pth", None)
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    loaded.eval()
    assert loaded(a, a).abs().max() == 0 and loaded(a, b).item() > 0


def test_lpips_vgg_matches_the_lpips_package():
    """Same numbers as lpips.LPIPS(net="vgg") (its real linear heads, a random trunk: ImageNet weights are not here)."""
    lpips = pytest.importorskip("lpips")
    from diffsr.train.osediff import LPIPSVgg

    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    ours = LPIPSVgg().eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("lins.")}  # lins.N aliases linN
    ours.load_state_dict(state)  # the same layout: every other key, strictly
    a, b = torch.rand(2, 3, 48, 48) * 2 - 1, torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours(a, b), reference(a, b), rtol=1e-5, atol=1e-7)


def test_rerun_resumes_from_the_last_checkpoint(run, tmp_path):
    """A rerun of a finished 2-step run with max_steps 3 continues at step 3 (accelerate state: models, optimizers, RNG)."""
    import dataclasses
    import shutil

    from diffsr.train.osediff import train

    folder = tmp_path / "run"
    shutil.copytree(run["root"] / "run", folder)
    before = torch.load(folder / "osediff.pkl", map_location="cpu", weights_only=True)["state_dict_unet"]
    train(dataclasses.replace(run["config"], max_steps=3), folder)
    log = [json.loads(line)["step"] for line in (folder / "train-log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]
    after = torch.load(folder / "osediff.pkl", map_location="cpu", weights_only=True)["state_dict_unet"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
