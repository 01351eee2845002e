"""The training loop every recipe shares, on accelerate.

Why shared: mixed precision, gradient accumulation, multi-GPU, checkpointing and exact resume are the
same for every method; a recipe only says how one batch becomes a loss. Checkpoints are accelerate's
`save_state` folders (models as safetensors, optimizers, schedulers, RNG states) written under a
temporary name and renamed, so a run killed at any moment resumes from the newest complete one, at
the same step and the same position in the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffsr.io.atomic import atomic_write_bytes
from diffsr.progress import OptionalCallback, report

CHECKPOINTS = "checkpoints"
LOG_NAME = "train-log.jsonl"


class ConfigError(ValueError):
    """A training config names an unknown key or gives a value of the wrong type."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a dict (YAML needs PyYAML, which accelerate brings)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs from the command line; values parsed as YAML scalars (1, 1e-4, true, [1, 2])."""
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        result[key.strip()] = yaml.safe_load(value)
    return result


def config_from_dict(cls: type, data: dict[str, Any]):
    """Build the recipe's dataclass, naming unknown keys and mistyped values in one line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for {cls.__module__}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        values[key] = _coerce(key, value, hints[key])
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        hint = options[0]
        origin = typing.get_origin(hint)
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"setting {key}: expected {hint.__name__}, got {value!r}")
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"setting {key}: expected a list, got {value!r}")
    if origin is tuple:
        return tuple(value)
    return value


@dataclasses.dataclass
class LoopSettings:
    """The loop's own settings; recipes embed these fields in their Config and pass them here."""

    max_steps: int
    save_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16" (accelerate's names)."""
    gradient_accumulation_steps: int = 1
    seed: int = 0
    cpu: bool = False
    """Train on the CPU even when a GPU is present."""

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> LoopSettings:
        """The loop's fields of a recipe's Config (those it declares; defaults for the rest), `overrides` on top."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in dataclasses.asdict(config).items() if k in names}, **overrides})


class Trainer:
    """Runs `step(batch, step_index) -> {name: float}` until `max_steps`, with checkpoints and resume.

    The recipe builds its models, optimizers and data, passes them through `prepare`, and calls
    `run`. Inside `step` it computes its losses and calls `self.backward(loss)` and its optimizers'
    `step`/`zero_grad` under `self.accumulate(model)`, as accelerate documents.
    """

    def __init__(self, output_dir: str | Path, settings: LoopSettings) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

        self.output_dir = Path(output_dir)
        self.settings = settings
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(
            mixed_precision=settings.mixed_precision,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            cpu=settings.cpu,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
            # shuffling seeded by (seed, epoch), so a resumed run sees the same order as an unbroken one
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(settings.seed)
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, *objects: Any) -> Any:
        return self.accelerator.prepare(*objects)

    def register(self, *objects: Any) -> None:
        """Extra state saved in checkpoints (anything with state_dict/load_state_dict, e.g. an EMA)."""
        for obj in objects:
            self.accelerator.register_for_checkpointing(obj)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def accumulate(self, *models: torch.nn.Module):
        return self.accelerator.accumulate(*models)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    # checkpoints

    def _checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / CHECKPOINTS / f"step-{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder is complete once renamed from its .part name)."""
        root = self.output_dir / CHECKPOINTS
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "diffsr-state.json").is_file())

    def save_checkpoint(self) -> Path:
        final = self._checkpoint_dir(self.step)
        partial = final.with_name(final.name + ".part")
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            (partial / "diffsr-state.json").write_text(json.dumps({"step": self.step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.checkpoints()[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step it was saved at."""
        found = self.checkpoints()
        if found:
            self.accelerator.load_state(str(found[-1]))
            self.step = json.loads((found[-1] / "diffsr-state.json").read_text())["step"]
        self._trim_log()
        return self.step

    def _trim_log(self) -> None:
        """Drop log lines of steps after the checkpoint, which the resumed run will log again."""
        log_path = self.output_dir / LOG_NAME
        if self.accelerator.is_main_process and log_path.is_file():
            kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
            atomic_write_bytes(log_path, "".join(line + "\n" for line in kept).encode())

    # the loop

    def _batches(self, loader: Iterable) -> Iterator[Any]:
        """Endless batches starting where step `self.step` left off (epochs of a sized loader)."""
        per_epoch = len(loader) if hasattr(loader, "__len__") else 0
        epoch, skip = (divmod(self.step, per_epoch) if per_epoch else (0, 0))
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            elif hasattr(getattr(loader, "dataset", None), "set_epoch"):
                loader.dataset.set_epoch(epoch)
            source = self.accelerator.skip_first_batches(loader, skip) if skip else loader
            yield from source
            epoch, skip = epoch + 1, 0

    def run(self, step: Callable[[Any, int], dict[str, float]], loader: Iterable, on_progress: OptionalCallback = None) -> None:
        settings = self.settings
        log_path = self.output_dir / LOG_NAME
        started = time.perf_counter()
        batches = self._batches(loader)
        report(on_progress, "steps", self.step, settings.max_steps)
        while self.step < settings.max_steps:
            losses = step(next(batches), self.step)
            self.step += 1
            report(on_progress, "steps", self.step, settings.max_steps)
            if self.accelerator.is_main_process and (self.step % settings.log_every == 0 or self.step == settings.max_steps):
                entry = {"step": self.step, "seconds": round(time.perf_counter() - started, 3), **{k: float(v) for k, v in losses.items()}}
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(entry) + "\n")
            if self.step % settings.save_every == 0 or self.step == settings.max_steps:
                self.save_checkpoint()
