"""Loading of the Stable Diffusion bases and of the methods' own checkpoints, offline and without unpickling.

A base comes from a local diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) or from one original-layout file (.safetensors, or a .ckpt read with
``torch.load(weights_only=True)``). Single files are converted with diffusers' own single-file
converters, but with the component configs supplied locally (`diffsr.diffusion.bases`, or the
folder given as `config_dir`): diffusers' `from_single_file` would fetch those configs from the hub.
Tokenizers for single files come from `config_dir`, or are built from open_clip's bundled CLIP
vocabulary. Every failure names the file, what was expected and where users get it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from diffsr.diffusion.bases import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    BaseSpec,
    TextEncoderSpec,
    get_base,
)
from diffsr.models.loading import WeightsError, load_checkpoint, tensors_only

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class BaseComponents:
    """The loaded parts of a base; the lists hold one entry per text encoder (two for SDXL)."""

    spec: BaseSpec
    source: Path
    unet: Any = None
    vae: Any = None
    text_encoders: list[Any] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)
    scheduler: Any = None


def _expected_text(spec: BaseSpec) -> str:
    return (f"expected a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or one of "
            f"{', '.join(spec.filenames)}; get {spec.name} from {spec.source}")


def load_base(source: str | Path, kind: str | BaseSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              config_dir: str | Path | None = None, components: tuple[str, ...] = COMPONENTS,
              state: dict[str, torch.Tensor] | None = None) -> BaseComponents:
    """Load the `components` of base `kind` (see `bases.BASES`) from a diffusers folder or a single file.

    `kind` may also be a `BaseSpec` (e.g. a method checkpoint's own tiny architecture). `state`, an
    original-layout state dict already in memory (a method checkpoint that embeds its base, such as
    StableSR's), is converted instead of reading `source`, which then only names it in messages.
    """
    spec = kind if isinstance(kind, BaseSpec) else get_base(kind)
    path = Path(source)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; use {', '.join(COMPONENTS)}")
    if state is not None:
        loaded = _load_single_file(path, spec, dtype, components, Path(config_dir) if config_dir else None, state)
    elif path.is_dir():
        loaded = _load_folder(path, spec, dtype, components)
    elif path.is_file():
        loaded = _load_single_file(path, spec, dtype, components, Path(config_dir) if config_dir else None)
    else:
        raise WeightsError(f"{path}: base model not found; {_expected_text(spec)}")
    for model in (loaded.unet, loaded.vae, *loaded.text_encoders):
        if model is not None:
            model.to(device).eval().requires_grad_(False)
    return loaded


def _text_names(spec: BaseSpec) -> list[tuple[str, str]]:
    suffixes = [""] + [f"_{i + 1}" for i in range(1, len(spec.text_encoders))]
    return [(f"text_encoder{s}", f"tokenizer{s}") for s in suffixes]


def _load_folder(path: Path, spec: BaseSpec, dtype: torch.dtype, components: tuple[str, ...]) -> BaseComponents:
    import diffusers
    import transformers

    needed = [c for c in ("unet", "vae", "scheduler") if c in components]
    for text_name, tokenizer_name in _text_names(spec):
        needed += [text_name] * ("text_encoder" in components) + [tokenizer_name] * ("tokenizer" in components)
    absent = [name for name in needed if not (path / name).is_dir()]
    if absent:
        raise WeightsError(f"{path}: no {', '.join(n + '/' for n in absent)} in this folder; {_expected_text(spec)}")
    out = BaseComponents(spec, path)
    try:
        if "unet" in components:
            out.unet = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        if "vae" in components:
            out.vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        for text_spec, (text_name, tokenizer_name) in zip(spec.text_encoders, _text_names(spec)):
            if "text_encoder" in components:
                cls = getattr(transformers, text_spec.model_class)
                out.text_encoders.append(cls.from_pretrained(path / text_name, dtype=dtype, local_files_only=True))
            if "tokenizer" in components:
                out.tokenizers.append(transformers.CLIPTokenizer.from_pretrained(path / tokenizer_name, local_files_only=True))
        if "scheduler" in components:
            config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            out.scheduler = _scheduler(config)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot load it as {spec.name} ({str(exc).splitlines()[0][:200]}); {_expected_text(spec)}") from None
    return out


def _scheduler(config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"))
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def unwrap_state_dict(content: dict) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint's `state_dict` (or the dict itself), with DDP/compile prefixes removed."""
    state = content.get("state_dict", content) if isinstance(content.get("state_dict"), dict) else content
    state = tensors_only(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path, what: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors / weights-only checkpoint; `what` names the file's role in messages."""
    try:
        state = unwrap_state_dict(load_checkpoint(path))
    except WeightsError as exc:
        raise WeightsError(f"{exc}{'; ' + what if what else ''}") from None
    if not state:
        raise WeightsError(f"{path}: holds no tensors{'; ' + what if what else ''}")
    return state


def _component_config(config_dir: Path | None, name: str, default: dict[str, Any], filename: str = "config.json") -> dict[str, Any]:
    if config_dir is None:
        return dict(default)
    config_path = config_dir / name / filename
    if not config_path.is_file():
        raise WeightsError(f"{config_dir}: no {name}/{filename}; --config-dir must be a diffusers folder of the same model")
    return json.loads(config_path.read_text())


def _on_meta(cls, config: dict[str, Any]):
    """Build without allocating or initialising weights: they are all replaced by the checkpoint's."""
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _load_converted(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, part: str, spec: BaseSpec, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        detail = f"{len(missing)} weights missing (e.g. {missing[:2]})" if missing else ""
        if wrong:
            k = wrong[0]
            detail += f"{'; ' if detail else ''}{len(wrong)} of other shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
        raise WeightsError(f"{path}: its {part} does not match {spec.name} ({detail}); {_expected_text(spec)}")
    model.load_state_dict({k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in expected}, strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise WeightsError(f"{path}: its {part} left {len(left)} tensors unset (e.g. {left[0]}); {_expected_text(spec)}")


def _load_single_file(path: Path, spec: BaseSpec, dtype: torch.dtype, components: tuple[str, ...], config_dir: Path | None,
                      state: dict[str, torch.Tensor] | None = None) -> BaseComponents:
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    if state is None:
        state = read_state_dict(path, _expected_text(spec))
    out = BaseComponents(spec, path)
    if "unet" in components:
        if not any(k.startswith(LDM_UNET_PREFIX) for k in state):
            raise WeightsError(f"{path}: has no UNet ({LDM_UNET_PREFIX}* keys); {_expected_text(spec)}")
        config = _component_config(config_dir, "unet", spec.unet)
        out.unet = _on_meta(diffusers.UNet2DConditionModel, config)
        _load_converted(out.unet, sfu.convert_ldm_unet_checkpoint(state, config), path, "UNet", spec, dtype)
    if "vae" in components:
        if not any(k.startswith(LDM_VAE_PREFIX) for k in state):
            raise WeightsError(f"{path}: has no VAE ({LDM_VAE_PREFIX}* keys); {_expected_text(spec)}")
        config = _component_config(config_dir, "vae", spec.vae)
        out.vae = _on_meta(diffusers.AutoencoderKL, config)
        _load_converted(out.vae, sfu.convert_ldm_vae_checkpoint(state, config), path, "VAE", spec, dtype)
    for text_spec, (text_name, tokenizer_name) in zip(spec.text_encoders, _text_names(spec)):
        if "text_encoder" in components:
            out.text_encoders.append(_single_file_text_encoder(state, text_spec, path, spec, dtype, config_dir, text_name))
        if "tokenizer" in components:
            if config_dir is not None and (config_dir / tokenizer_name).is_dir():
                out.tokenizers.append(transformers.CLIPTokenizer.from_pretrained(config_dir / tokenizer_name, local_files_only=True))
            else:
                out.tokenizers.append(clip_tokenizer(text_spec.pad_token))
    if "scheduler" in components:
        out.scheduler = _scheduler(_component_config(config_dir, "scheduler", spec.scheduler, "scheduler_config.json"))
    return out


def _single_file_text_encoder(state: dict[str, torch.Tensor], text_spec: TextEncoderSpec, path: Path, spec: BaseSpec,
                              dtype: torch.dtype, config_dir: Path | None, name: str):
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    if not any(k.startswith(text_spec.ldm_prefix) for k in state):
        raise WeightsError(f"{path}: has no text encoder ({text_spec.ldm_prefix}* keys); {_expected_text(spec)}")
    config = _component_config(config_dir, name, text_spec.config)
    cls = getattr(transformers, text_spec.model_class)
    text_config = transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")})
    model = cls(text_config)
    if text_spec.ldm_layout == "openclip":
        converted = sfu.convert_open_clip_checkpoint(model, state, prefix=text_spec.ldm_prefix)
    else:
        converted = {k[len(text_spec.ldm_prefix):]: v for k, v in state.items() if k.startswith(text_spec.ldm_prefix)}
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # SD 2.x uses the penultimate OpenCLIP block: the file's later blocks (and its projection) are not part of the model.
    expected = model.state_dict()
    converted = {k: v for k, v in converted.items() if k in expected}
    converted.update({k: v for k, v in expected.items() if k.endswith("position_ids")})
    _load_converted(model, converted, path, f"text encoder ({text_spec.ldm_prefix}*)", spec, dtype)
    return model


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str):
    """The CLIP BPE tokenizer of SD 2.x / SDXL (49408 ids), built offline from open_clip's vocabulary (cached)."""
    from diffsr.diffusion.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return write_clip_tokenizer(Path(folder), pad_token, real_vocabulary=True)


def load_method_checkpoint(path: str | Path, method: str, expected_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A method's own weights (safetensors or weights-only pickle), checked for the key prefixes it must hold."""
    from diffsr.diffusion.weights import describe_files

    state = read_state_dict(path, describe_files(method))
    if expected_prefixes and not any(k.startswith(expected_prefixes) for k in state):
        sample = ", ".join(sorted(state)[:3])
        raise WeightsError(f"{path}: not a {method} checkpoint (no {'/'.join(p + '*' for p in expected_prefixes)} keys; it has {sample}, ...); "
                           f"{describe_files(method)}")
    return state
