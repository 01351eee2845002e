"""PromptSR's offline degradation describer: a small CNN that writes the degradation prompt from an LR image.

PromptSR (Chen et al., arXiv 2311.14282) has a multimodal LLM write "[heavy blur, medium noise, ...]"
at test time; no such model can be had offline, so this classifier, trained on our own degradation
pipeline (`diffsr.degrade`, preset "promptsr"), predicts each stage's bin instead (research note
promptsr.md, section 4.2). Heads: blur / noise / compression in {none, light, medium, heavy}, first
resize in {down, keep, up}; the final "downsample" is constant. The LR is never resized before the
network (resizing destroys the noise and JPEG statistics it must see); a fixed high-pass copy of the
image is stacked on the input so that a network this small sees pixel-scale noise from the start.
Logits are averaged over tiles of the LR, since our degradations are global.

The weights trained by `diffsr train describer` ship in the package (`describer.safetensors`, next
to this file) together with their measured held-out accuracy; see docs/promptsr.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.degrade.config import DegradationConfig
from diffsr.degrade.prompts import LEVELS, PromptBins, binned_parameter, join
from diffsr.models.loading import WeightsError

STAGES = ("blur", "resize", "noise", "compression")
CLASSES: dict[str, tuple[str, ...]] = {
    "blur": ("none", *LEVELS),
    "resize": ("down", "keep", "up"),
    "noise": ("none", *LEVELS),
    "compression": ("none", *LEVELS),
}
SHIPPED = Path(__file__).with_name("describer.safetensors")
"""The trained weights that ship with diffsr (absent if training never beat the baselines)."""


@dataclass(frozen=True)
class DescriberConfig:
    channels: tuple[int, ...] = (16, 32, 48, 64)
    """Stage widths; the first stage runs at full LR resolution (noise is a 1-pixel signal)."""
    blocks: int = 1
    """Residual blocks per stage."""
    groups: int = 8
    high_pass_gain: float = 8.0
    """Gain of the stacked (x - 3x3 mean) channels."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DescriberConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DescriberNet(nn.Module):
    """Fully convolutional; mean and standard-deviation pooling; one linear head per stage."""

    def __init__(self, config: DescriberConfig = DescriberConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.stem = nn.Conv2d(6, c[0], 3, 1, 1)
        layers: list[nn.Module] = []
        cin = c[0]
        for index, cout in enumerate(c):
            for b in range(config.blocks):
                layers.append(_Block(cin, cout, 2 if index > 0 and b == 0 else 1, config.groups))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.norm = nn.GroupNorm(min(config.groups, cin), cin)
        self.heads = nn.ModuleDict({stage: nn.Linear(2 * cin, len(CLASSES[stage])) for stage in STAGES})

    def forward(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """`lr`: N x 3 x h x w in [0, 1]; returns logits per stage."""
        high = lr - F.avg_pool2d(F.pad(lr, (1, 1, 1, 1), mode="replicate"), 3, 1)
        x = torch.cat([lr * 2 - 1, high * self.config.high_pass_gain], 1)
        h = F.silu(self.norm(self.body(self.stem(x))))
        pooled = torch.cat([h.mean((2, 3)), h.flatten(2).std(2)], 1)
        return {stage: head(pooled) for stage, head in self.heads.items()}


def prior_shift(trained: DegradationConfig, target: DegradationConfig) -> dict[str, list[float]]:
    """Per-class logit offsets, log(prior_target / prior_trained), for a describer trained on `trained`.

    Why: the describer learns from balanced classes (each stage absent 1/4, resize directions 1/3) so that
    no class is rare, while the prompts the SR model learned follow its own training chain (a stage absent
    1/10, "down" 7/10); Bayes' rule moves the posterior to those priors by these offsets. Only the stage
    probabilities may differ between the two chains: the level shares inside an applied stage (ranges,
    kernels, bin edges) must be equal, which is checked.
    """
    a, b = trained.first, target.first
    same = replace(a, blur_prob=b.blur_prob, noise_prob=b.noise_prob, jpeg_prob=b.jpeg_prob, resize_probs=b.resize_probs)
    if same != b or trained.second is not None or target.second is not None:
        raise ValueError(f"prior_shift: '{trained.name}' and '{target.name}' differ in more than their stage probabilities")

    def applied(p_train: float, p_target: float, levels: int) -> list[float]:
        return [math.log((1 - p_target) / (1 - p_train))] + [math.log(p_target / p_train)] * levels

    up, down, keep = a.resize_probs
    up_t, down_t, keep_t = b.resize_probs
    return {
        "blur": applied(a.blur_prob, b.blur_prob, len(LEVELS)),
        "resize": [math.log(down_t / down), math.log(keep_t / keep), math.log(up_t / up)],  # CLASSES order: down, keep, up
        "noise": applied(a.noise_prob, b.noise_prob, len(LEVELS)),
        "compression": applied(a.jpeg_prob, b.jpeg_prob, len(LEVELS)),
    }


def labels_from_steps(steps: Sequence[dict[str, Any]], bins: PromptBins | None = None) -> dict[str, int]:
    """Class index per stage from a `DegradationRecord`'s first-pass steps (the final resize is not a class)."""
    bins = bins or PromptBins()
    labels = {"blur": 0, "resize": 1, "noise": 0, "compression": 0}
    for step in steps:
        if step.get("pass") == "final":
            continue
        if step["stage"] == "resize":
            labels["resize"] = CLASSES["resize"].index(step["direction"])
        elif (binned := binned_parameter(step, bins)) is not None:
            stage, value, stage_bins = binned
            labels[stage] = 1 + LEVELS.index(stage_bins.word(value))
    return labels


@dataclass
class DegradationPrediction:
    """Per-stage class probabilities of one LR image and the prompt written from them."""

    probabilities: dict[str, dict[str, float]]
    prompt: str
    threshold: float
    left_out: list[str] = field(default_factory=list)
    """Stages whose top probability was below the threshold (their phrase is left out: "not stated")."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_from_classes(classes: dict[str, int], bins: PromptBins | None = None) -> str:
    """Canonical-order prompt (blur, resize, noise, compression, final downsample) from class indices."""
    bins = bins or PromptBins()
    parts = []
    for stage in STAGES:
        if stage not in classes:
            continue
        name = CLASSES[stage][classes[stage]]
        if stage == "resize":
            if name != "keep":
                parts.append(bins.up_word if name == "up" else bins.down_word)
        elif name != "none":
            parts.append(f"{name} {bins.noun(stage)}")
    parts.append(bins.down_word)
    return join(parts)


class DegradationDescriber:
    """`describe(lr)`: the degradation prompt of LR images (tiles of `tile` px, logits averaged)."""

    def __init__(self, net: DescriberNet, metadata: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                 tile: int = 48, threshold: float = 0.5, stages: Sequence[str] | None = None) -> None:
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.metadata = metadata or {}
        self.tile = tile
        self.threshold = threshold
        self.stages = tuple(stages if stages is not None else self.metadata.get("stages", STAGES))
        """Stages the describer states; the shipped weights leave out those that did not beat chance on held-out data."""
        shift = self.metadata.get("logit_shift", {})
        self.logit_shift = {stage: torch.tensor(values, device=self.device) for stage, values in shift.items()}
        """Offsets added to the logits (`prior_shift`): class priors of the SR model's training chain, not the describer's."""

    @classmethod
    def load(cls, path: str | Path | None = None, device: torch.device | str = "cpu", **kwargs: Any) -> DegradationDescriber:
        """The shipped describer (path None) or a `.safetensors` written by `diffsr train describer`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else SHIPPED
        if not path.is_file():
            if path == SHIPPED:
                raise WeightsError(f"{path}: the shipped describer weights are missing from this installation; reinstall diffsr "
                                   "or train one with `diffsr train describer CONFIG -o DIR` and pass its describer.safetensors")
            raise WeightsError(f"{path}: describer weights not found; train them with `diffsr train describer CONFIG -o DIR` "
                               "(writes DIR/describer.safetensors)")
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = dict(handle.metadata() or {})
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                               "expected a describer.safetensors written by `diffsr train describer`") from None
        if "describer_config" not in metadata:
            raise WeightsError(f"{path}: has no describer_config metadata; expected a describer.safetensors written by "
                               "`diffsr train describer`")
        config = DescriberConfig.from_dict(json.loads(metadata["describer_config"]))
        net = DescriberNet(config)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path}: weights do not fit the describer network ({str(exc).splitlines()[0][:160]})") from None
        extra = {k: json.loads(v) for k, v in metadata.items() if k != "describer_config"}
        kwargs.setdefault("tile", int(extra.get("training", {}).get("hr_crop", 192)) // 4)  # tiles as large as its training crops
        return cls(net, extra, device, **kwargs)

    @torch.no_grad()
    def logits(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tile-averaged logits of N x 3 x h x w LR images in [0, 1] (at most 64 evenly spaced tiles each)."""
        lr = lr.to(self.device, torch.float32)
        h, w = lr.shape[-2:]
        if min(h, w) <= self.tile:
            out = self.net(lr)
        else:
            ys, xs = _starts(h, self.tile), _starts(w, self.tile)
            crops = torch.stack([lr[..., y : y + self.tile, x : x + self.tile] for y in ys for x in xs], 1)
            n, k = crops.shape[:2]
            out = {stage: value.view(n, k, -1).mean(1) for stage, value in self.net(crops.flatten(0, 1)).items()}
        return {stage: value + self.logit_shift[stage] if stage in self.logit_shift else value for stage, value in out.items()}

    def describe_many(self, images: Sequence[torch.Tensor], bins: PromptBins | None = None) -> list[DegradationPrediction]:
        """`describe` for 3 x h x w images of different sizes, one at a time."""
        return [self.describe(image[None], bins)[0] for image in images]

    def describe(self, lr: torch.Tensor, bins: PromptBins | None = None) -> list[DegradationPrediction]:
        results = []
        probs = {stage: logit.softmax(-1).cpu() for stage, logit in self.logits(lr).items()}
        for i in range(lr.shape[0]):
            table = {stage: {name: float(p) for name, p in zip(CLASSES[stage], probs[stage][i])} for stage in STAGES}
            classes, left_out = {}, []
            for stage in STAGES:
                best = int(probs[stage][i].argmax())
                if stage in self.stages and float(probs[stage][i][best]) >= self.threshold:
                    classes[stage] = best
                else:
                    left_out.append(stage)
            results.append(DegradationPrediction(table, prompt_from_classes(classes, bins), self.threshold, left_out))
        return results


def _starts(length: int, tile: int, stride: int | None = None, most: int = 8) -> list[int]:
    stride = stride or tile // 2
    count = min(most, 1 + math.ceil((length - tile) / stride))
    if count <= 1:
        return [0]
    return sorted({round(i * (length - tile) / (count - 1)) for i in range(count)})


# ------------------------------------------------------------------------------ classical baselines


def donoho_noise(lr: torch.Tensor) -> torch.Tensor:
    """Noise sigma (0-255) per image from the MAD of the finest diagonal Haar band (Donoho's estimator)."""
    grey = lr.mean(1)
    h, w = grey.shape[-2] // 2 * 2, grey.shape[-1] // 2 * 2
    g = grey[:, :h, :w]
    hh = (g[:, 0::2, 0::2] - g[:, 0::2, 1::2] - g[:, 1::2, 0::2] + g[:, 1::2, 1::2]) / 2
    return hh.flatten(1).abs().median(1).values / 0.6745 * 255


def blockiness(lr: torch.Tensor) -> torch.Tensor:
    """Mean jump across 8-pixel boundaries over the mean jump elsewhere (1 = no blocking)."""
    grey = lr.mean(1)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(1)
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(2)
    ratio = []
    for d in (dx, dy):
        index = torch.arange(d.shape[-1]) % 8 == 7
        ratio.append(d[:, index].mean(1) / d[:, ~index].mean(1).clamp_min(1e-8))
    return (ratio[0] + ratio[1]) / 2


def laplacian_variance(lr: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of the grey image (low = blurry)."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(lr.mean(1, keepdim=True), kernel).flatten(1).var(1)


BASELINES = {"noise": donoho_noise, "compression": blockiness, "blur": laplacian_variance}
"""The note's cheap baselines (section 4.2), each thresholded into classes after calibration."""


@dataclass
class ThresholdClassifier:
    """Classes from one scalar feature by thresholds fitted for accuracy on training data (ordinal classes)."""

    order: list[int]
    """Classes in ascending feature order."""
    thresholds: list[float]

    @classmethod
    def fit(cls, feature: torch.Tensor, labels: torch.Tensor, grid: int = 40) -> ThresholdClassifier:
        present = sorted(set(labels.tolist()))
        order = sorted(present, key=lambda c: float(feature[labels == c].median()))
        candidates = torch.quantile(feature.double(), torch.linspace(0.01, 0.99, grid, dtype=torch.double)).float()
        best: tuple[float, list[float]] = (-1.0, [])
        cuts = len(order) - 1

        def search(start: int, chosen: list[float]) -> None:
            nonlocal best
            if len(chosen) == cuts:
                acc = float((cls(order, chosen).predict(feature) == labels).float().mean())
                if acc > best[0]:
                    best = (acc, list(chosen))
                return
            for i in range(start, len(candidates)):
                search(i + 1, chosen + [float(candidates[i])])

        if len(candidates) > 24 and cuts >= 3:
            candidates = candidates[:: max(1, len(candidates) // 24)]
        search(0, [])
        return cls(order, best[1])

    def predict(self, feature: torch.Tensor) -> torch.Tensor:
        index = torch.bucketize(feature, torch.tensor(self.thresholds, dtype=feature.dtype))
        return torch.tensor(self.order)[index]
