"""PromptSR training recipes on tiny configs: diffusion (EMA, resume, encoders) and the describer."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")

from diffsr.models.promptsr import PhraseTableEncoder, read_config
from diffsr.pipelines.promptsr import PromptSRPipeline
from diffsr.train import TRAINERS
from diffsr.train.promptsr import EMA, Config, train
from test_promptsr import tiny_bert
from tiny_models import gradient_image, save_png


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(4):
        save_png(folder / f"p{i}.png", gradient_image(40, 48, seed=i))
    return folder


def _steps(folder):
    return [json.loads(line)["step"] for line in (folder / "train-log.jsonl").read_text().splitlines()]


def test_promptsr_trains_resumes_and_loads(photos, tmp_path):
    assert TRAINERS["promptsr"] == "diffsr.train.promptsr"
    bert = tiny_bert(tmp_path / "bert")
    config = Config(data=(str(photos),), hr_crop=16, batch_size=2, size="tiny", text_encoder=f"bert:{bert}",
                    max_steps=2, save_every=1, log_every=1, cpu=True, ema_decay=0.9)
    out = tmp_path / "run"
    train(config, out)
    final = train(Config(**{**config.__dict__, "max_steps": 3}), out)  # resumes at step 2
    assert _steps(out) == [1, 2, 3]
    saved = read_config(final)
    assert saved.text_encoder["kind"] == "bert" and saved.training["max_steps"] == 3
    assert saved.prompt_policy["empty_prob"] == 0.1 and saved.degradation == "promptsr_shuffle"
    from diffsr.models.promptsr import HFTextEncoder

    pipe = PromptSRPipeline.from_pretrained(final, text_encoder=HFTextEncoder(bert, "bert"))
    assert pipe(torch.rand(1, 3, 4, 4), "heavy noise", steps=1, seed=0).shape == (1, 3, 16, 16)


def test_phrase_table_is_trained_and_saved(photos, tmp_path):
    config = Config(data=(str(photos),), hr_crop=16, batch_size=2, size="tiny", text_encoder="phrase_table",
                    max_steps=1, save_every=1, log_every=1, cpu=True, learning_rate=1e-2)
    final = train(config, tmp_path / "run")
    pipe = PromptSRPipeline.from_pretrained(final)
    assert isinstance(pipe.text_encoder, PhraseTableEncoder)
    assert not torch.allclose(pipe.text_encoder.table, PhraseTableEncoder(64).table)  # moved by the optimiser


def test_ema_warms_up_and_round_trips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, 0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # warm-up decay min(0.9999, 2 / 11)
    assert float(ema.shadow[0][0, 0]) == pytest.approx(1 - 2 / 11)
    other = EMA(torch.nn.Linear(2, 1, bias=False), 0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.copy_to(torch.nn.Linear(2, 1, bias=False)).weight, ema.shadow[0])


def test_describer_trains_from_the_command_line(photos, tmp_path):
    from diffsr.cli.main import main
    from diffsr.models.describer import DegradationDescriber

    assert TRAINERS["describer"] == "diffsr.train.describer"
    config = tmp_path / "describer.json"
    config.write_text(json.dumps({"data": [str(photos)], "hr_crop": 32, "batch_size": 4, "max_steps": 2, "save_every": 1,
                                  "log_every": 1, "cpu": True}))
    assert main(["train", "describer", str(config), "-o", str(tmp_path / "run"), "-q"]) == 0
    describer = DegradationDescriber.load(tmp_path / "run" / "describer.safetensors")
    assert describer.tile == 8 and describer.metadata["training"]["max_steps"] == 2
    assert _steps(tmp_path / "run") == [1, 2]
