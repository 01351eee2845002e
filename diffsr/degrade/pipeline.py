"""The degradation model on batches: plan each sample's chain from its own seed, then run it batched.

Every sample draws its own parameters (kernel, resize factor and mode, noise type and level, JPEG
quality, stage order) from a `random.Random` seeded by the sample's seed, so its parameters do not
depend on the device or on the other samples of the batch, and its noise comes from a torch
generator on the device seeded from the same stream. Real-ESRGAN draws the resize and the noise
type once per batch and uses a pair pool to make up for the lost diversity; drawing per sample gives
the same per-sample distribution without the pool. Samples that share a shape at a step are run as
one batch; after a per-sample resize they run one by one.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from diffsr.degrade.config import DegradationConfig, StageSettings, get_config
from diffsr.degrade.jpeg import jpeg_compress
from diffsr.degrade.kernels import draw_final_sinc, draw_kernel, filter2d, usm_sharpen
from diffsr.degrade.noise import add_noise
from diffsr.degrade.prompts import PromptBins, join, phrases


def sample_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived from `seed` and keys (index, file name, epoch), stable across runs and machines."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass
class DegradationRecord:
    """What was done to one sample: applied steps in order with their drawn parameters (JSON-ready)."""

    seed: int
    preset: str
    scale: int
    hr_size: tuple[int, int]
    lr_size: tuple[int, int]
    steps: list[dict[str, Any]]
    sharpened: bool = False
    clean: bool = False
    """True for the no-degradation samples (the LR is the HR resized, nothing else)."""

    def prompt(self, bins: PromptBins | None = None, stages: Sequence[str] | None = None, brackets: bool = False) -> str:
        return join(phrases(self.steps, bins, stages), brackets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "preset": self.preset,
            "scale": self.scale,
            "hr_size": list(self.hr_size),
            "lr_size": list(self.lr_size),
            "sharpened": self.sharpened,
            "clean": self.clean,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationRecord:
        return cls(
            seed=data["seed"],
            preset=data["preset"],
            scale=data["scale"],
            hr_size=tuple(data["hr_size"]),
            lr_size=tuple(data["lr_size"]),
            steps=list(data["steps"]),
            sharpened=data.get("sharpened", False),
            clean=data.get("clean", False),
        )


@dataclass
class DegradedBatch:
    lr: torch.Tensor
    """N x 3 x H/scale x W/scale in [0, 1], rounded to 8-bit levels."""
    hr: torch.Tensor
    """The input HR, unchanged (not sharpened)."""
    records: list[DegradationRecord]
    prompts: list[str] = field(default_factory=list)
    """Each sample's full ground-truth prompt under the degrader's bins."""


@dataclass
class _Step:
    op: str
    params: dict[str, Any]
    """Recorded parameters (JSON-ready)."""
    kernel: torch.Tensor | None = None
    scale_factor: float | None = None
    size: tuple[int, int] | None = None

    def group_key(self) -> tuple:
        if self.op == "resize":
            return ("resize", self.params["mode"], self.scale_factor, self.size)
        return (self.op,)


class Degrader:
    """Synthesises LR images from HR batches with one `DegradationConfig`, on CPU or GPU."""

    def __init__(
        self,
        config: DegradationConfig | str = "realesrgan",
        scale: int = 4,
        device: torch.device | str | None = None,
        bins: PromptBins | None = None,
        round_output: bool = True,
    ):
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.config = get_config(config)
        self.scale = scale
        self.device = torch.device(device) if device is not None else None
        self.bins = bins or PromptBins()
        self.round_output = round_output

    # ------------------------------------------------------------------------------------- planning

    def plan(self, seed: int, hr_size: tuple[int, int]) -> tuple[list[_Step], DegradationRecord, int]:
        """Draw one sample's chain; returns the steps, their record and the seed of its noise generator."""
        cfg = self.config
        rng = random.Random(seed)
        h, w = hr_size
        lr_size = (h // self.scale, w // self.scale)
        sharpened = cfg.sharpen
        if rng.random() < cfg.no_degradation_prob:
            step = self._resize_step("final", "bicubic", (h, w), lr_size)
            return [step], self._record(seed, hr_size, lr_size, [step], sharpened, clean=True), rng.getrandbits(63)
        shuffle = rng.random() < cfg.shuffle_prob
        size = (h, w)
        steps, size = self._plan_pass(cfg.first, 1, size, lr_size, rng, shuffle)
        if cfg.second is not None and rng.random() < cfg.second_prob:
            second, size = self._plan_pass(cfg.second, 2, size, lr_size, rng, shuffle)
            steps += second
        steps += self._plan_final(size, lr_size, rng)
        noise_seed = rng.getrandbits(63)
        return steps, self._record(seed, hr_size, lr_size, steps, sharpened), noise_seed

    def _record(self, seed, hr_size, lr_size, steps, sharpened, clean=False) -> DegradationRecord:
        return DegradationRecord(seed, self.config.name, self.scale, tuple(hr_size), lr_size, [s.params for s in steps], sharpened, clean)

    def _plan_pass(
        self, stage: StageSettings, index: int, size: tuple[int, int], lr_size: tuple[int, int], rng: random.Random, shuffle: bool
    ) -> tuple[list[_Step], tuple[int, int]]:
        blur = resize = noise = jpeg = None
        if rng.random() < stage.blur_prob:
            kernel, params = draw_kernel(stage.kernel, rng)
            blur = _Step("blur", {"stage": "blur", "pass": index, **params}, kernel=kernel)
        direction = rng.choices(("up", "down", "keep"), weights=stage.resize_probs)[0]
        if direction == "up":
            factor = rng.uniform(1.0, stage.resize_range[1])
        elif direction == "down":
            factor = rng.uniform(stage.resize_range[0], 1.0)
        else:
            factor = 1.0
        mode = rng.choice(stage.resize_modes)
        if rng.random() < stage.noise_prob:
            grey_draw = rng.random()
            if rng.random() < stage.gaussian_prob:
                params = {"type": "gaussian", "sigma": rng.uniform(*stage.noise_sigma)}
            else:
                params = {"type": "poisson", "scale": rng.uniform(*stage.poisson_scale)}
            noise = _Step("noise", {"stage": "noise", "pass": index, **params, "grey": grey_draw < stage.grey_noise_prob})
        if rng.random() < stage.jpeg_prob:
            jpeg = _Step("jpeg", {"stage": "jpeg", "pass": index, "quality": rng.randint(*stage.jpeg_quality)})
        order = ["blur", "resize", "noise", "jpeg"]
        if shuffle:
            rng.shuffle(order)
        steps = []
        for name in order:
            if name == "resize":
                # Pass 1 scales the current image (Real-ESRGAN's scale_factor); pass 2 targets HR/scale x factor.
                if index == 1:
                    if direction == "keep":
                        continue
                    new = (max(1, int(size[0] * factor)), max(1, int(size[1] * factor)))
                    resize = self._resize_step(index, mode, size, new, factor, by_factor=True, direction=direction)
                else:
                    new = (max(1, int(lr_size[0] * factor)), max(1, int(lr_size[1] * factor)))
                    resize = self._resize_step(index, mode, size, new, factor)
                steps.append(resize)
                size = new
            else:
                step = {"blur": blur, "noise": noise, "jpeg": jpeg}[name]
                if step is not None:
                    steps.append(step)
        return steps, size

    def _resize_step(
        self, index, mode: str, size_in, size_out, factor: float | None = None, by_factor: bool = False, direction: str | None = None
    ) -> _Step:
        """A resize to `size_out`; `by_factor` resizes with scale_factor=factor as Real-ESRGAN's first pass does
        (PyTorch then maps coordinates with the factor, not with the size ratio)."""
        if direction is None:
            area_in, area_out = size_in[0] * size_in[1], size_out[0] * size_out[1]
            direction = "up" if area_out > area_in else "down" if area_out < area_in else "keep"
        params = {"stage": "resize", "pass": index, "direction": direction, "mode": mode, "size": list(size_out)}
        if factor is not None:
            params["factor"] = factor
        return _Step("resize", params, scale_factor=factor if by_factor else None, size=tuple(size_out))

    def _plan_final(self, size: tuple[int, int], lr_size: tuple[int, int], rng: random.Random) -> list[_Step]:
        final = self.config.final
        jpeg_first = rng.random() < final.jpeg_first_prob
        mode = rng.choice(final.resize_modes)
        resize = self._resize_step("final", mode, size, lr_size)
        kernel, sinc = draw_final_sinc(final.sinc_sizes, final.sinc_prob, self.config.first.kernel.pad_to, rng)
        group = [resize] + ([_Step("sinc", {"stage": "blur", "pass": "final", **sinc}, kernel=kernel)] if sinc else [])
        if rng.random() < final.jpeg_prob:
            jpeg = _Step("jpeg", {"stage": "jpeg", "pass": "final", "quality": rng.randint(*final.jpeg_quality)})
            return [jpeg] + group if jpeg_first else group + [jpeg]
        return group

    # ------------------------------------------------------------------------------------- running

    def __call__(self, hr: torch.Tensor, seed: int | Sequence[int]) -> DegradedBatch:
        """Degrade an N x 3 x H x W batch in [0, 1]. `seed`: one int (per-sample seeds derived from it
        and the index) or one seed per sample."""
        if hr.dim() != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W RGB batch, got shape {tuple(hr.shape)}")
        if not hr.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1], got {hr.dtype}; divide 8-bit images by 255 first")
        n, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {self.scale}; crop it to a multiple first")
        if h < self.scale or w < self.scale:
            raise ValueError(f"HR size {h}x{w} is smaller than the scale {self.scale}")
        seeds = [sample_seed(seed, i) for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} samples")
        device = self.device or hr.device
        x = hr.to(device=device, dtype=torch.float32)
        plans = [self.plan(s, (h, w)) for s in seeds]
        generators = [torch.Generator(device=device).manual_seed(noise_seed) for _, _, noise_seed in plans]
        source = usm_sharpen(x) if self.config.sharpen else x
        lr = self._run(source, [p[0] for p in plans], generators)
        if self.round_output:
            lr = torch.clamp((lr * 255.0).round(), 0, 255) / 255.0
        records = [p[1] for p in plans]
        return DegradedBatch(lr.to(hr.dtype), hr, records, [r.prompt(self.bins) for r in records])

    def _run(self, x: torch.Tensor, programs: list[list[_Step]], generators: list[torch.Generator]) -> torch.Tensor:
        groups: list[tuple[list[int], torch.Tensor]] = [(list(range(len(programs))), x)]
        for k in range(max(len(p) for p in programs)):
            results: list[tuple[list[int], torch.Tensor]] = []
            for indices, tensor in groups:
                parts: dict[tuple, list[int]] = {}
                for row, i in enumerate(indices):
                    key = programs[i][k].group_key() if k < len(programs[i]) else ("done",)
                    parts.setdefault(key, []).append(row)
                for key, rows in parts.items():
                    sub = tensor[rows] if len(rows) < len(indices) else tensor
                    ids = [indices[r] for r in rows]
                    if key[0] != "done":
                        sub = self._apply([programs[i][k] for i in ids], sub, [generators[i] for i in ids])
                    results.append((ids, sub))
            groups = _merge_by_shape(results)
        (indices, tensor), *rest = groups
        if rest:
            raise AssertionError("samples ended at different sizes")  # every chain ends with the resize to HR/scale
        inverse = torch.empty(len(indices), dtype=torch.long)
        inverse[torch.tensor(indices)] = torch.arange(len(indices))
        return tensor[inverse.to(tensor.device)]

    def _apply(self, steps: list[_Step], x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        op = steps[0].op
        if op in ("blur", "sinc"):
            return filter2d(x, torch.stack([s.kernel for s in steps]).to(x.device))
        if op == "resize":
            first = steps[0]
            if first.scale_factor is not None:
                return F.interpolate(x, scale_factor=first.scale_factor, mode=first.params["mode"])
            return F.interpolate(x, size=first.size, mode=first.params["mode"])
        if op == "noise":
            return add_noise(x, [s.params for s in steps], generators)
        if op == "jpeg":
            return jpeg_compress(x, [s.params["quality"] for s in steps])
        raise AssertionError(f"unknown step {op}")


def _merge_by_shape(groups: list[tuple[list[int], torch.Tensor]]) -> list[tuple[list[int], torch.Tensor]]:
    """Concatenate groups whose tensors share a shape, so the next step runs them as one batch."""
    by_shape: dict[tuple, list[tuple[list[int], torch.Tensor]]] = {}
    for indices, tensor in groups:
        by_shape.setdefault(tuple(tensor.shape[1:]), []).append((indices, tensor))
    merged = []
    for members in by_shape.values():
        if len(members) == 1:
            merged.append(members[0])
        else:
            merged.append(([i for ids, _ in members for i in ids], torch.cat([t for _, t in members])))
    return merged


def degrade(
    hr: torch.Tensor, config: DegradationConfig | str = "realesrgan", scale: int = 4, seed: int | Sequence[int] = 0
) -> DegradedBatch:
    """One-call form of `Degrader(config, scale)(hr, seed)`."""
    return Degrader(config, scale)(hr, seed)
