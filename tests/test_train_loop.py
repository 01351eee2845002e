"""The shared training loop: checkpoints, exact resume, config parsing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("accelerate")

from diffsr.train.loop import ConfigError, LoopSettings, Trainer, config_from_dict, parse_overrides


def _train(out: Path, max_steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    trainer = Trainer(out, LoopSettings(max_steps=max_steps, save_every=2, log_every=1, cpu=True))
    model, optimizer, loader = trainer.prepare(model, optimizer, loader)
    trainer.resume()

    def step(batch, index):
        x, y = batch
        with trainer.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            trainer.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return {"loss": loss.item()}

    trainer.run(step, loader)
    return {k: v.detach().clone() for k, v in trainer.unwrap(model).state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    straight = _train(tmp_path / "a", 7)
    _train(tmp_path / "b", 4)  # stopped at step 4, as a killed run would have left it (checkpoint at 4)
    resumed = _train(tmp_path / "b", 7)
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train-log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step-00000006", "step-00000007"]


def test_partial_checkpoint_is_ignored(tmp_path):
    _train(tmp_path, 2)
    (tmp_path / "checkpoints" / "step-00000004.part").mkdir()
    trainer = Trainer(tmp_path, LoopSettings(max_steps=4, cpu=True))
    assert [p.name for p in trainer.checkpoints()] == ["step-00000002"]


@dataclasses.dataclass
class _Config:
    steps: int = 1
    lr: float = 1e-4
    name: str = "x"
    root: Path | None = None
    sizes: tuple[int, ...] = (1, 2)


def test_config_from_dict_types_and_errors():
    config = config_from_dict(_Config, {"lr": 1, "root": "/data", "sizes": [3, 4], **parse_overrides(["steps=5"])})
    assert config == _Config(steps=5, lr=1.0, root=Path("/data"), sizes=(3, 4))
    with pytest.raises(ConfigError, match="unknown setting.*colour"):
        config_from_dict(_Config, {"colour": 1})
    with pytest.raises(ConfigError, match="steps: expected int"):
        config_from_dict(_Config, {"steps": "many"})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["steps"])
