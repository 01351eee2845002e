"""PromptSR's degradation prompts: each applied stage's parameter binned into a level word, in applied order.

"heavy blur, upsample, medium noise, light compression, downsample". The paper does not publish its
bin edges; the defaults are the equal-width thirds of the Real-ESRGAN first-order ranges that the
project's research note (promptsr.md, section 2.2) proposes. Intervals are closed on the left and
open on the right in ascending parameter order, except the highest, which is closed; values outside
the range fall into the nearest end bin (second-order presets reach past the first-order ranges).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

STAGE_NAMES = ("blur", "resize", "noise", "compression", "final")
"""Stage names for short prompts: "final" is the last resize to the LR size."""


@dataclass(frozen=True)
class Bins:
    """Ascending edges (len(words) + 1 of them) and the word of each interval, in ascending parameter order."""

    edges: tuple[float, ...]
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.words) + 1 or list(self.edges) != sorted(self.edges):
            raise ValueError(f"bins: need ascending edges, one more than words; got edges {list(self.edges)} for words {list(self.words)}")

    def index(self, value: float) -> int:
        return min(max(bisect.bisect_right(self.edges, value) - 1, 0), len(self.words) - 1)

    def word(self, value: float) -> str:
        return self.words[self.index(value)]


LEVELS = ("light", "medium", "heavy")


@dataclass(frozen=True)
class PromptBins:
    """Bin edges and words of every stage; all of it is configuration (research note, decision 6.4)."""

    blur: Bins = Bins((0.2, 1.0, 2.0, 3.0), LEVELS)
    """On the Gaussian sigma; for anisotropic kernels the larger of the two."""
    gaussian_noise: Bins = Bins((1.0, 10.0, 20.0, 30.0), LEVELS)
    """On sigma, 0-255 scale."""
    poisson_noise: Bins = Bins((0.05, 1.0, 2.0, 3.0), LEVELS)
    """On the Poisson scale."""
    compression: Bins = Bins((30.0, 52.0, 74.0, 95.0), ("heavy", "medium", "light"))
    """On JPEG quality: low quality is heavy compression."""
    blur_word: str = "blur"
    noise_word: str = "noise"
    compression_word: str = "compression"
    up_word: str = "upsample"
    down_word: str = "downsample"

    def noun(self, stage: str) -> str:
        """The word after the level in a stage's phrase ("heavy <noun>"): blur, noise or compression."""
        return {"blur": self.blur_word, "noise": self.noise_word, "compression": self.compression_word}[stage]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptBins:
        values = dict(data)
        for key in ("blur", "gaussian_noise", "poisson_noise", "compression"):
            if isinstance(values.get(key), dict):
                values[key] = Bins(tuple(values[key]["edges"]), tuple(values[key]["words"]))
        return cls(**values)


def binned_parameter(step: dict[str, Any], bins: PromptBins) -> tuple[str, float, Bins] | None:
    """(stage name, the parameter its level word is binned on, those bins) for a blur, noise or JPEG step.

    None for other steps and for sinc blur (ringing has no word in PromptSR's vocabulary). Anisotropic blur
    is binned on the larger sigma; Gaussian noise on sigma, Poisson noise on its scale.
    """
    kind = step["stage"]
    if kind == "blur":
        return None if step.get("kernel") == "sinc" else ("blur", max(step["sigma_x"], step["sigma_y"]), bins.blur)
    if kind == "noise":
        if step["type"] == "gaussian":
            return "noise", step["sigma"], bins.gaussian_noise
        return "noise", step["scale"], bins.poisson_noise
    if kind == "jpeg":
        return "compression", step["quality"], bins.compression
    return None


def phrase(step: dict[str, Any], bins: PromptBins) -> tuple[str, str] | None:
    """(stage name, phrase) for one applied step of a record, or None for steps without a word (sinc)."""
    if step["stage"] == "resize":
        stage = "final" if step["pass"] == "final" else "resize"
        if stage == "final":
            return stage, bins.down_word  # the net result is always 1/scale of the HR
        if step["direction"] == "keep":
            return None
        return stage, bins.up_word if step["direction"] == "up" else bins.down_word
    binned = binned_parameter(step, bins)
    if binned is None:
        return None
    stage, value, stage_bins = binned
    return stage, f"{stage_bins.word(value)} {bins.noun(stage)}"


def phrases(steps: Iterable[dict[str, Any]], bins: PromptBins | None = None, stages: Iterable[str] | None = None) -> list[str]:
    """The phrases of the applied steps, in applied order; `stages` keeps only those stage names."""
    bins = bins or PromptBins()
    wanted = None if stages is None else set(stages)
    if wanted is not None and not wanted <= set(STAGE_NAMES):
        raise ValueError(f"unknown prompt stage(s) {', '.join(sorted(wanted - set(STAGE_NAMES)))}; use {', '.join(STAGE_NAMES)}")
    out = []
    for step in steps:
        found = phrase(step, bins)
        if found and (wanted is None or found[0] in wanted):
            out.append(found[1])
    return out


def join(parts: list[str], brackets: bool = False) -> str:
    text = ", ".join(parts)
    return f"[{text}]" if brackets else text


def normalize_prompt(text: str) -> str:
    """User text to the trained form: "[Light Noise]" -> "light noise" (lower case, no brackets, ", ")."""
    inner = text.strip().lower().strip("[]")
    return ", ".join(part.strip() for part in inner.split(",") if part.strip())


@dataclass(frozen=True)
class PromptPolicy:
    """Training-time prompt corruption, so that a missing phrase means "not stated" (research note 2.4)."""

    partial_prob: float = 0.2
    """Probability that a prompt is made partial ..."""
    drop_prob: float = 0.5
    """... by dropping each non-final phrase with this probability."""
    empty_prob: float = 0.1
    """Probability of the empty prompt (the unconditional branch for classifier-free guidance)."""
    keep: tuple[str, ...] = field(default=("final",))
    """Stages never dropped in partial prompts."""

    def apply(self, steps: list[dict[str, Any]], bins: PromptBins, rng: random.Random) -> str:
        if rng.random() < self.empty_prob:
            return ""
        found = [p for p in (phrase(step, bins) for step in steps) if p]
        if rng.random() < self.partial_prob:
            found = [p for p in found if p[0] in self.keep or rng.random() >= self.drop_prob]
        return join([text for _, text in found])
