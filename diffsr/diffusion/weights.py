"""The weight files each diffusion method needs, named as their publishers name them, and where to get them.

`diffsr models` and the methods' error messages read this table, so a user with a missing or wrong
file is told which file is expected and where it comes from. The method modules reference these
entries in their `Method.weights`.
"""

from __future__ import annotations

from diffsr.diffusion.bases import BASES
from diffsr.registry import WeightFile

_STABLESR = "https://huggingface.co/Iceclear/StableSR"
_SLAB = "S-Lab License 1.0 (non-commercial)"

METHOD_BASES: dict[str, tuple[str, ...]] = {
    "stablesr": ("sd21-base", "sd21-v", "sd-turbo"),
    "osediff": ("sd21-base",),
    "supir": ("sdxl-base",),
    "invsr": ("sd-turbo",),
    "promptsr": (),
}

METHOD_WEIGHTS: dict[str, tuple[WeightFile, ...]] = {
    "stablesr": (
        WeightFile("weights", "stablesr_000117.ckpt", _STABLESR, _SLAB + "; SFT code CC BY-NC-SA 4.0"),
        WeightFile("weights", "stablesr_768v_000139.ckpt", _STABLESR, _SLAB),
        WeightFile("weights", "stablesr_turbo.ckpt", _STABLESR, _SLAB),
        WeightFile("cfw_weights", "vqgan_cfw_00011.ckpt", _STABLESR, _SLAB),
    ),
    "osediff": (
        WeightFile("weights", "osediff.pkl", "https://github.com/cswry/OSEDiff (preset/models)", "Apache-2.0 (code); SD 2.1 base: CreativeML Open RAIL++-M"),
        WeightFile("tagger_weights", "ram_swin_large_14m.pth", "https://huggingface.co/spaces/xinyu1205/recognize-anything", "Apache-2.0 (RAM)"),
        WeightFile("tagger_lora", "DAPE.pth", "https://github.com/cswry/OSEDiff (preset/models)", "Apache-2.0"),
    ),
    "supir": (
        WeightFile("weights", "SUPIR-v0Q.ckpt", "https://github.com/Fanghua-Yu/SUPIR (Google Drive / Baidu links in its README)", "SUPIR Software Licence (non-commercial)"),
        WeightFile("weights", "SUPIR-v0F.ckpt", "https://github.com/Fanghua-Yu/SUPIR (Google Drive / Baidu links in its README)", "SUPIR Software Licence (non-commercial)"),
    ),
    "invsr": (
        WeightFile("weights", "noise_predictor_sd_turbo_v5.pth", "https://huggingface.co/OAOA/InvSR", "S-Lab License 1.0 (non-commercial; github.com/zsyOAOA/InvSR)"),
    ),
    "promptsr": (),
}


def base_weight_files(method: str) -> tuple[WeightFile, ...]:
    """The base-model files (--base) a method accepts: each base's single files, or its diffusers folder."""
    return tuple(
        WeightFile("base", name, BASES[base].source, BASES[base].licence)
        for base in METHOD_BASES.get(method, ())
        for name in BASES[base].filenames[:1]
    )


def method_weight_files(method: str) -> tuple[WeightFile, ...]:
    """Everything `method` needs: its own checkpoints, then the base model(s)."""
    if method not in METHOD_WEIGHTS:
        raise ValueError(f"unknown diffusion method '{method}'; known: {', '.join(METHOD_WEIGHTS)}")
    return METHOD_WEIGHTS[method] + base_weight_files(method)


def describe_files(method: str) -> str:
    """One clause for error messages: which files `method` expects and where users get them."""
    files = METHOD_WEIGHTS.get(method, ())
    if not files:
        return f"{method} has no published checkpoint; use weights you trained with diffsr"
    return "expected " + "; ".join(f"--{f.option.replace('_', '-')} {f.filename} (from {f.source})" for f in files)
