"""Synthetic LR/HR pairs: Real-ESRGAN's second-order degradation model, presets and PromptSR prompts."""

from diffsr.degrade.config import (
    PRESETS,
    DegradationConfig,
    FinalSettings,
    KernelSettings,
    StageSettings,
    get_config,
)
from diffsr.degrade.jpeg import jpeg_compress
from diffsr.degrade.pipeline import (
    DegradationRecord,
    DegradedBatch,
    Degrader,
    degrade,
    sample_seed,
)
from diffsr.degrade.prompts import Bins, PromptBins, PromptPolicy, normalize_prompt

__all__ = [
    "PRESETS",
    "Bins",
    "DegradationConfig",
    "DegradationRecord",
    "DegradedBatch",
    "Degrader",
    "FinalSettings",
    "KernelSettings",
    "PromptBins",
    "PromptPolicy",
    "StageSettings",
    "degrade",
    "get_config",
    "jpeg_compress",
    "normalize_prompt",
    "sample_seed",
]
