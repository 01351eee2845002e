"""Tiny random-weight Stable Diffusion components, so every loading path and pipeline runs in CI in seconds.

`build_tiny_sd2` and `build_tiny_sdxl` write the same random model twice: as a diffusers folder
(model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/) and as an original-layout
single file (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.model.*`` or
``conditioner.embedders.N.*``) in both .safetensors and Lightning-style .ckpt form. The architectures
are those of the real bases with tiny widths (the same shapes as the official-code fixtures'
tiny models). Every GroupNorm/LayerNorm gets random affine parameters, so a loader that drops them
fails. Tokenizers are CLIP byte-level BPE built offline: a tiny vocabulary learned here, or the
real CLIP vocabulary from open_clip's bundled BPE table (`clip_vocabulary`).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from diffsr.diffusion.bases import BASES, LDM_UNET_PREFIX, LDM_VAE_PREFIX
from diffsr.diffusion.ldm_layout import (
    openclip_text_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
    with_text_model_prefix,
)

TINY_WORDS = ("a photo of a cat, dog, building, city, sky, tree, cinematic, high-contrast, photo-realistic, 8k, "
              "ultra hd, detailing, sharpness, painting, drawing, blurry, noisy, low quality, worst quality")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Plain BPE on the words of `text` (CLIP style: the last symbol of a word carries </w>)."""
    table = _bytes_to_unicode()
    words = Counter(tuple("".join(table[b] for b in w.encode())) for w in text.lower().replace(",", " , ").split())
    corpus = {word[:-1] + (word[-1] + "</w>",): n for word, n in words.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, n in corpus.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for word, n in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = n
        corpus = merged
    return merges


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary (49408 ids, as openai/clip-vit-large-patch14), from open_clip's bundled table."""
    try:
        import open_clip
    except ImportError:
        raise RuntimeError("the real CLIP tokenizer is built from open_clip's vocabulary: pip install 'diffsr[diffusion]' "
                           "(open_clip_torch), or pass a folder that has tokenizer/ files") from None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    return _vocabulary(merges), merges


def _vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(directory: Path, pad_token: str, real_vocabulary: bool = False, merges: int = 64):
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs); returns the loaded tokenizer."""
    from transformers import CLIPTokenizer

    if real_vocabulary:
        vocab, merge_list = clip_vocabulary()
    else:
        merge_list = _learn_merges(TINY_WORDS, merges)
        vocab = _vocabulary(merge_list)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_list), encoding="utf-8")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=pad_token,
                              bos_token=SOT, eos_token=EOT, unk_token=EOT, model_max_length=77)
    tokenizer.save_pretrained(str(directory))
    return CLIPTokenizer.from_pretrained(str(directory))


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Give every GroupNorm/LayerNorm affine values far from 1/0, so dropping them changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
            with torch.no_grad():
                sub.weight.copy_(1 + 0.1 * torch.randn(sub.weight.shape, generator=gen))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=gen))


TINY_SD2_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 32,
    "attention_head_dim": [2, 4], "use_linear_projection": True, "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_SDXL_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4], "use_linear_projection": True, "sample_size": 16, "transformer_layers_per_block": [1, 1, 2],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8,
}
TINY_VAE: dict[str, Any] = {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}
TINY_TEXT: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                             "projection_dim": 32, "max_position_embeddings": 77}


@dataclass(frozen=True)
class TinyBase:
    """Where a tiny base was written: its diffusers folder and the same weights as single files."""

    kind: str
    diffusers_dir: Path
    single_file: Path
    """Original layout, .safetensors."""
    lightning_ckpt: Path
    """The same tensors as {"state_dict": ..., "global_step": 0}, as Lightning saves them."""


def tiny_unet(seed: int = 0, base: str = "sd21-base", **overrides: Any):
    """A random UNet2DConditionModel of `base`'s architecture at tiny widths (SD 2.x or SDXL); `overrides` change the config."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in BASES[base].unet.items() if not k.startswith("_")}
    config.update(TINY_SDXL_UNET if base == "sdxl-base" else TINY_SD2_UNET)
    config.update(overrides)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config).eval()
    randomize_norms(unet, seed + 1)
    return unet


def tiny_vae(seed: int = 0, deterministic_posterior: bool = False, base: str = "sd21-base", **overrides: Any):
    """A random AutoencoderKL with the SD layout (4 levels, x8) at tiny widths; `overrides` change the config."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in BASES[base].vae.items() if not k.startswith("_")}
    config.update(TINY_VAE)
    config.update(overrides)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config).eval()
    randomize_norms(vae, seed + 1)
    if deterministic_posterior:  # log-variance -30: std 3e-7, so sample() ~ mode() for exact comparisons
        latent = config["latent_channels"]
        with torch.no_grad():
            vae.quant_conv.weight[latent:] = 0
            vae.quant_conv.bias[latent:] = -30
    return vae


def _text_encoder(spec, seed: int, vocab_size: int, hidden: int, layers: int):
    import transformers

    config = dict(spec.config)
    config.update(TINY_TEXT, hidden_size=hidden, projection_dim=hidden, num_hidden_layers=layers, vocab_size=vocab_size)
    cls = getattr(transformers, spec.model_class)
    text_config = transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = cls(text_config).eval()
    randomize_norms(model, seed + 1)
    return model


def _write_index(directory: Path, pipeline_class: str, components: dict[str, tuple[str, str]]) -> None:
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1"}
    index.update({name: list(value) for name, value in components.items()})
    if pipeline_class == "StableDiffusionPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))


def _write_single_files(directory: Path, stem: str, state: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    single = directory / f"{stem}.safetensors"
    save_file(state, str(single))
    ckpt = directory / f"{stem}.ckpt"
    torch.save({"state_dict": state, "global_step": 0}, ckpt)
    return single, ckpt


def _scheduler(config: dict[str, Any]):
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def build_tiny_sd2(directory: str | Path, kind: str = "sd21-base", seed: int = 0, real_vocabulary: bool = False,
                   deterministic_posterior: bool = False) -> TinyBase:
    """A tiny SD 2.x-family base (`kind` picks the scheduler and prediction type: sd21-base, sd21-v, sd-turbo)."""
    spec = BASES[kind]
    root = Path(directory)
    folder = root / "diffusers"
    tokenizer = write_clip_tokenizer(folder / "tokenizer", spec.text_encoders[0].pad_token, real_vocabulary)
    unet = tiny_unet(seed, kind)
    vae = tiny_vae(seed + 10, deterministic_posterior, kind)
    text = _text_encoder(spec.text_encoders[0], seed + 20, len(tokenizer), 32, 2)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(str(folder / name))
    _scheduler(spec.scheduler).save_pretrained(str(folder / "scheduler"))
    _write_index(folder, spec.pipeline_class, {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", spec.scheduler["_class_name"]),
    })
    # SD 2.x files hold all 24 OpenCLIP blocks and the model uses the first 23 ("penultimate"); the tiny file
    # likewise carries one block more than the text encoder has, which loading must drop.
    extra = _text_encoder(spec.text_encoders[0], seed + 21, len(tokenizer), 32, 3).state_dict()
    text_state = with_text_model_prefix(text.state_dict())
    text_state.update({k: v for k, v in with_text_model_prefix(extra).items() if k.startswith("text_model.encoder.layers.2.")})
    state = _prefixed(LDM_UNET_PREFIX, unet_to_ldm(unet.state_dict(), dict(unet.config)))
    state.update(_prefixed(LDM_VAE_PREFIX, vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))))
    state.update(_prefixed(spec.text_encoders[0].ldm_prefix, openclip_text_to_ldm(text_state, 3, 32)))
    single, ckpt = _write_single_files(root, f"tiny-{kind}", state)
    return TinyBase(kind, folder, single, ckpt)


def build_tiny_sdxl(directory: str | Path, seed: int = 0, real_vocabulary: bool = False) -> TinyBase:
    """A tiny SDXL base: UNet with text-time embedding, CLIP-L-style and OpenCLIP-bigG-style text encoders."""
    spec = BASES["sdxl-base"]
    root = Path(directory)
    folder = root / "diffusers"
    first, second = spec.text_encoders
    tokenizer = write_clip_tokenizer(folder / "tokenizer", first.pad_token, real_vocabulary)
    write_clip_tokenizer(folder / "tokenizer_2", second.pad_token, real_vocabulary)
    unet = tiny_unet(seed, "sdxl-base")
    vae = tiny_vae(seed + 10, False, "sdxl-base")
    text = _text_encoder(first, seed + 20, len(tokenizer), 16, 3)
    text_2 = _text_encoder(second, seed + 30, len(tokenizer), 16, 3)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text), ("text_encoder_2", text_2)):
        model.save_pretrained(str(folder / name))
    _scheduler(spec.scheduler).save_pretrained(str(folder / "scheduler"))
    _write_index(folder, spec.pipeline_class, {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", spec.scheduler["_class_name"]),
    })
    state = _prefixed(LDM_UNET_PREFIX, unet_to_ldm(unet.state_dict(), dict(unet.config)))
    state.update(_prefixed(LDM_VAE_PREFIX, vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))))
    state.update(_prefixed(first.ldm_prefix, with_text_model_prefix(text.state_dict())))
    state.update(_prefixed(second.ldm_prefix, openclip_text_to_ldm(text_2.state_dict(), 3, 16)))
    single, ckpt = _write_single_files(root, "tiny-sdxl-base", state)
    return TinyBase("sdxl-base", folder, single, ckpt)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}
