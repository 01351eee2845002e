"""One configuration class for every synthetic degradation, and the named presets of the ported methods.

A `DegradationConfig` describes Real-ESRGAN's second-order model (and first-order chains such as
PromptSR's, where `second` is None) as plain data, so it can be written into a record, a checkpoint or
a JSON file and read back. The presets copy each method's published training settings; the values are
facts about those methods and must stay as they are (see docs/degrade.md for the sources).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


def _odd_sizes(low: int, high: int) -> tuple[int, ...]:
    return tuple(range(low, high + 1, 2))


@dataclass(frozen=True)
class KernelSettings:
    """How one blur kernel is drawn (BasicSR's `random_mixed_kernels` plus the sinc alternative)."""

    sizes: tuple[int, ...] = _odd_sizes(7, 21)
    kinds: tuple[str, ...] = KERNEL_KINDS
    probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma: tuple[float, float] = (0.2, 3.0)
    beta_gaussian: tuple[float, float] = (0.5, 4.0)
    beta_plateau: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    """Probability of a circular low-pass (sinc) kernel instead of a Gaussian-family one."""
    pad_to: int = 21
    """Every kernel is zero-padded to this size, as Real-ESRGAN does, so kernels of a batch stack."""


@dataclass(frozen=True)
class StageSettings:
    """One pass of blur -> resize -> noise -> JPEG.

    In Real-ESRGAN's second pass the JPEG is the final one (`FinalSettings`), so the presets set the
    second pass's `jpeg_prob` to 0.
    """

    blur_prob: float = 1.0
    kernel: KernelSettings = field(default_factory=KernelSettings)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of up, down and keep."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_prob: float = 1.0
    gaussian_prob: float = 0.5
    """Gaussian noise with this probability, otherwise Poisson."""
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    """Gaussian sigma on the 0-255 scale."""
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    grey_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_quality: tuple[int, int] = (30, 95)


@dataclass(frozen=True)
class FinalSettings:
    """The last step: resize to HR/scale (+ sinc filter) and JPEG, in random order (Real-ESRGAN)."""

    resize_modes: tuple[str, ...] = RESIZE_MODES
    sinc_prob: float = 0.8
    sinc_sizes: tuple[int, ...] = _odd_sizes(7, 21)
    jpeg_prob: float = 1.0
    jpeg_quality: tuple[int, int] = (30, 95)
    jpeg_first_prob: float = 0.5
    """Probability that JPEG comes before [resize + sinc]."""


@dataclass(frozen=True)
class DegradationConfig:
    name: str
    first: StageSettings
    second: StageSettings | None
    """None for a first-order chain (then only `final`'s resize, sinc and JPEG follow `first`)."""
    final: FinalSettings
    second_prob: float = 1.0
    """Probability that the second pass's blur/resize/noise run at all (InvSR: 0.5)."""
    shuffle_prob: float = 0.0
    """Probability that a sample's stages run in a random order inside each pass (BSRGAN-style,
    PromptSR v5); the final resize always stays last."""
    sharpen: bool = False
    """Degrade an unsharp-masked copy of the HR (Real-ESRGAN, StableSR); the returned HR is not sharpened."""
    no_degradation_prob: float = 0.0
    """Probability that the LR is just the HR resized (bicubic) with no degradation (StableSR: 0.01)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        """Inverse of `to_dict`; unknown keys are an error so that a typo is not silently ignored."""
        data = dict(data)
        for key, kind in (("first", StageSettings), ("second", StageSettings), ("final", FinalSettings)):
            if data.get(key) is not None:
                data[key] = _build(kind, data[key])
        return _build(cls, data)

    def replace(self, **changes: Any) -> DegradationConfig:
        return replace(self, **changes)

    def validate(self) -> DegradationConfig:
        """Raise ValueError naming the bad field; returns self so presets and loaders can chain it."""
        stages = [("first", self.first)] + ([("second", self.second)] if self.second else [])
        for label, stage in stages:
            k = stage.kernel
            if len(k.kinds) != len(k.probs) or any(kind not in KERNEL_KINDS for kind in k.kinds):
                raise ValueError(f"{label}.kernel: kinds must be among {', '.join(KERNEL_KINDS)} with one prob each")
            if any(s % 2 == 0 or s < 1 or s > k.pad_to for s in k.sizes):
                raise ValueError(f"{label}.kernel.sizes: sizes must be odd and at most pad_to={k.pad_to}")
            if len(stage.resize_probs) != 3 or not math.isclose(sum(stage.resize_probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"{label}.resize_probs: give three probabilities (up, down, keep) that sum to 1")
            if not 0 < stage.resize_range[0] <= 1 <= stage.resize_range[1]:
                raise ValueError(f"{label}.resize_range: needs low <= 1 <= high with low > 0")
            _check_quality(f"{label}.jpeg_quality", stage.jpeg_quality)
            for mode in stage.resize_modes:
                _check_mode(f"{label}.resize_modes", mode)
        _check_quality("final.jpeg_quality", self.final.jpeg_quality)
        for mode in self.final.resize_modes:
            _check_mode("final.resize_modes", mode)
        if any(s % 2 == 0 or s > self.first.kernel.pad_to for s in self.final.sinc_sizes):
            raise ValueError("final.sinc_sizes: sizes must be odd and at most the kernel pad_to")
        return self


def _check_quality(label: str, quality: tuple[int, int]) -> None:
    if not 1 <= quality[0] <= quality[1] <= 100:
        raise ValueError(f"{label}: needs 1 <= low <= high <= 100, got {list(quality)}")


def _check_mode(label: str, mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"{label}: '{mode}' is not one of {', '.join(RESIZE_MODES)}")


def _build(kind: type, data: dict[str, Any]) -> Any:
    known = set(kind.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{kind.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(data)
    if kind is StageSettings and isinstance(values.get("kernel"), dict):
        values["kernel"] = _build(KernelSettings, values["kernel"])
    return kind(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})


# ---------------------------------------------------------------------------------------------- presets

_REALESRGAN = DegradationConfig(
    name="realesrgan",
    first=StageSettings(),
    second=StageSettings(
        blur_prob=0.8,
        kernel=KernelSettings(sigma=(0.2, 1.5)),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_sigma=(1.0, 25.0),
        poisson_scale=(0.05, 2.5),
        jpeg_prob=0.0,
    ),
    final=FinalSettings(),
    sharpen=True,
)

_STABLESR_KERNEL = KernelSettings(sigma=(0.2, 1.5), beta_gaussian=(0.5, 2.0), beta_plateau=(1.0, 1.5))

PRESETS: dict[str, DegradationConfig] = {
    # Real-ESRGAN x4plus (options/train_realesrgan_x4plus.yml): degrades the USM-sharpened GT.
    "realesrgan": _REALESRGAN,
    # OSEDiff (params_realesrgan.yml): the Real-ESRGAN values exactly, with GT sharpening off.
    "osediff": replace(_REALESRGAN, name="osediff", sharpen=False),
    # StableSR (v2-finetune_text_T_512.yaml): a milder space, 1 % clean pairs.
    "stablesr": DegradationConfig(
        name="stablesr",
        first=StageSettings(
            kernel=_STABLESR_KERNEL,
            resize_range=(0.3, 1.5),
            noise_sigma=(1.0, 15.0),
            poisson_scale=(0.05, 2.0),
            jpeg_quality=(60, 95),
        ),
        second=StageSettings(
            blur_prob=0.5,
            kernel=replace(_STABLESR_KERNEL, sigma=(0.2, 1.0)),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.6, 1.2),
            noise_sigma=(1.0, 12.0),
            poisson_scale=(0.05, 1.0),
            jpeg_prob=0.0,
        ),
        final=FinalSettings(jpeg_quality=(60, 100)),
        sharpen=True,
        no_degradation_prob=0.01,
    ),
    # InvSR (sd-turbo-sr-ldis.yaml): kernel sizes 3..19 and 3..13, second pass with probability 0.5.
    "invsr": DegradationConfig(
        name="invsr",
        first=StageSettings(kernel=KernelSettings(sizes=_odd_sizes(3, 19))),
        second=StageSettings(
            blur_prob=0.8,
            kernel=KernelSettings(sizes=_odd_sizes(3, 13), sigma=(0.2, 1.5)),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            noise_sigma=(1.0, 25.0),
            poisson_scale=(0.05, 2.5),
            jpeg_prob=0.0,
        ),
        final=FinalSettings(sinc_sizes=_odd_sizes(3, 19)),
        second_prob=0.5,
    ),
    # PromptSR (research note promptsr.md, section 2.2): first-order blur -> resize -> noise -> JPEG ->
    # final resize; no sinc (no word describes it); each of blur, noise and JPEG with probability 0.9.
    "promptsr": DegradationConfig(
        name="promptsr",
        first=StageSettings(blur_prob=0.9, kernel=KernelSettings(sinc_prob=0.0), noise_prob=0.9, jpeg_prob=0.9),
        second=None,
        final=FinalSettings(sinc_prob=0.0, jpeg_prob=0.0),
    ),
}
# PromptSR v5's random stage order (shuffle with probability 0.5), the note's reference training setting.
PRESETS["promptsr_shuffle"] = replace(PRESETS["promptsr"], name="promptsr_shuffle", shuffle_prob=0.5)


def get_config(name_or_path: str | DegradationConfig) -> DegradationConfig:
    """A preset by name, or a JSON file written from `DegradationConfig.to_dict`."""
    if isinstance(name_or_path, DegradationConfig):
        return name_or_path.validate()
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such degradation config file") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON degradation config ({exc})") from None
        try:
            return DegradationConfig.from_dict(data).validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    raise ValueError(f"unknown degradation preset '{name_or_path}'; use one of {', '.join(PRESETS)} or a .json config")


for _preset in PRESETS.values():
    _preset.validate()
