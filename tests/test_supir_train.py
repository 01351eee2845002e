"""`diffsr train supir`: both reconstructed stages run on the fixture's tiny weights, write a checkpoint the pipeline loads, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from supir_fixture import base_spec, cases, fixture_root, write_config_dir
from tiny_models import gradient_image, save_png

from diffsr.diffusion.runtime import NoiseSource
from diffsr.noncommercial.supir.pipeline import SUPIRPipeline, read_supir_checkpoint, resolve_settings
from diffsr.train.loop import ConfigError, config_from_dict
from diffsr.train.supir import Config, train

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = fixture_root()
    folder = tmp_path_factory.mktemp("supir_train")
    for i in range(2):
        save_png(folder / "hq" / f"img{i}.png", gradient_image(72, 80, seed=i))
    (folder / "captions.json").write_text(json.dumps({"img0.png": "a gradient"}))
    common = dict(base=str(root / "weights" / "sdxl_base_tiny.safetensors"), config_dir=str(write_config_dir(base_spec(root), folder / "cfg")),
                  data=[str(folder / "hq")], captions=str(folder / "captions.json"), crop_size=64, scale=4, batch_size=1,
                  accept_licence=True, cpu=True, save_every=1, log_every=1, lr=1e-3)
    return root, folder, common


def test_encoder_then_adaptor_stage(setup):
    root, folder, common = setup
    encoder_out = train(config_from_dict(Config, {**common, "stage": "encoder", "max_steps": 2}), folder / "enc")
    stage1 = read_supir_checkpoint(encoder_out)
    from diffsr.diffusion.loading import read_state_dict

    base = read_state_dict(common["base"])
    key = "first_stage_model.denoise_encoder.conv_in.weight"
    assert not torch.equal(stage1[key], base["first_stage_model.encoder.conv_in.weight"].float())  # the encoder learned
    assert torch.count_nonzero(stage1["model.diffusion_model.project_modules.0.zero_conv.weight"]) == 0  # connectors untouched
    log = [json.loads(line) for line in (folder / "enc" / "train-log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)

    adaptor_out = train(config_from_dict(Config, {**common, "stage": "adaptor", "weights": str(encoder_out), "max_steps": 2}),
                        folder / "ada")
    stage2 = read_supir_checkpoint(adaptor_out)
    assert torch.equal(stage2[key], stage1[key])  # the denoise encoder stays frozen in the adaptor stage
    assert torch.count_nonzero(stage2["model.diffusion_model.project_modules.0.zero_conv.weight"]) > 0
    hint = "model.control_model.input_hint_block.0.weight"
    assert torch.count_nonzero(stage1[hint]) == 0 and torch.count_nonzero(stage2[hint]) > 0

    # the result loads and runs like an official checkpoint
    pipeline = SUPIRPipeline.from_files(adaptor_out, common["base"], device="cpu", dtype="fp32", base_spec=base_spec(root), accept_licence=True)
    case = cases(root)[0]
    result = pipeline.restore(case.lq(), resolve_settings({"steps": 1}), NoiseSource(seed=0))
    assert torch.isfinite(result.output).all()

    # a rerun with more steps, through `diffsr train supir CONFIG`, resumes from the newest checkpoint
    from diffsr.cli.main import main

    (folder / "adaptor.json").write_text(json.dumps({**common, "stage": "adaptor", "weights": str(encoder_out), "max_steps": 3}))
    assert main(["train", "supir", str(folder / "adaptor.json"), "-o", str(folder / "ada"), "-q"]) == 0
    steps = [json.loads(line)["step"] for line in (folder / "ada" / "train-log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_config_errors(setup):
    _, _, common = setup
    with pytest.raises(ConfigError, match="stage"):
        train(config_from_dict(Config, {**common, "stage": "lora"}), "unused")
    with pytest.raises(ConfigError, match="multiple of 64"):
        train(config_from_dict(Config, {**common, "crop_size": 96}), "unused")
    with pytest.raises(ConfigError, match="unknown setting"):
        config_from_dict(Config, {**common, "learning_rate": 1})
