"""Runtime options shared by every diffusion method: device, dtype, attention, offload, compile, noise.

Each method adds `RUNTIME_OPTIONS` (and the tiling option sets, with its own official defaults) to
its option schema, so the CLI, the API and the server offer the same flags everywhere, and builds a
`Runtime` from the chosen values. Random draws go through `NoiseSource`, which is either a seeded
generator or a queue of given tensors: parity tests inject the noise the official code drew.
Progress goes through `diffsr.progress` with the stage names in `STAGES`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from diffsr.options import Option, OptionSet, options
from diffsr.runtime import resolve_device, resolve_dtype

STAGES = ("steps", "tiles", "vae_encode", "vae_decode")
"""Progress stages the diffusion code reports (see diffsr.progress)."""

RUNTIME_OPTIONS: OptionSet = options(
    Option("device", str, "auto", "where to run: auto, cpu, cuda, cuda:N or mps", stage="load"),
    Option("dtype", str, "auto", "weight/activation precision (auto: fp16 on GPUs, fp32 on the CPU)",
           choices=("auto", "fp32", "fp16", "bf16"), stage="load"),
    Option("attention", str, "sdpa", "attention kernel: sdpa (PyTorch fused, low memory) or eager (explicit softmax)",
           choices=("sdpa", "eager"), stage="load"),
    Option("offload", bool, False, "keep idle components in CPU memory and move each to the device only while it runs", stage="load"),
    Option("channels_last", bool, False, "run convolutions in channels-last memory layout (often faster on GPUs)", stage="load"),
    Option("compile", bool, False, "compile the denoiser with torch.compile (slow first image, faster afterwards)", stage="load"),
    Option("seed", int, None, "random seed for the sampler's noise (none: a fresh seed per image)", nullable=True, minimum=0),
)


def latent_tiling_options(tile: int, overlap: int, batch: int = 1) -> OptionSet:
    """Latent-tile options with a method's official defaults (latent pixels)."""
    return options(
        Option("latent_tile", int, tile, "latent tile size for denoising large images (latent pixels = image pixels / 8)", minimum=8),
        Option("latent_overlap", int, overlap, "overlap between latent tiles (latent pixels)", minimum=0),
        Option("tile_batch", int, batch, "latent tiles per denoiser call", minimum=1),
    )


def vae_tiling_options(encoder_tile: int = 512, decoder_tile: int = 64, enabled: bool = True,
                       statistics: str = "exact") -> OptionSet:
    """Tiled-VAE options (see diffsr.vae_tiling); tiles in image pixels (encoder) and latent pixels (decoder)."""
    return options(
        Option("vae_tiling", bool, enabled, "encode/decode large images in tiles with shared normalisation (bounded memory)"),
        Option("vae_encoder_tile", int, encoder_tile, "VAE encoder tile size (image pixels, multiple of 8)", minimum=64),
        Option("vae_decoder_tile", int, decoder_tile, "VAE decoder tile size (latent pixels)", minimum=8),
        Option("vae_statistics", str, statistics,
               "GroupNorm statistics across VAE tiles: exact (whole image, seam-free, keeps every tile's activations), "
               "sampled (estimated on a few tiles, seam-free, least memory) or vaehook (the official OSEDiff/SUPIR hook)",
               choices=("exact", "sampled", "vaehook")),
    )


@dataclass
class Runtime:
    """Where and how the components run; `prepare` applies it to loaded modules."""

    device: torch.device
    dtype: torch.dtype
    attention: str = "sdpa"
    offload: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_options(cls, values: dict[str, Any], supports_fp16: bool = True) -> Runtime:
        device = resolve_device(values.get("device", "auto"))
        dtype = resolve_dtype(values.get("dtype", "auto"), device, supports_fp16=supports_fp16)
        return cls(device, dtype, values.get("attention", "sdpa"), bool(values.get("offload", False)),
                   bool(values.get("channels_last", False)), bool(values.get("compile", False)))

    @property
    def home(self) -> torch.device:
        """Where idle components wait: the CPU when offloading, else the compute device."""
        return torch.device("cpu") if self.offload else self.device

    def module_dtype(self, module: torch.nn.Module) -> torch.dtype:
        """The SDXL VAE overflows in fp16 (its config says force_upcast): such modules stay in fp32."""
        config = getattr(module, "config", None)
        if self.dtype == torch.float16 and config is not None and getattr(config, "force_upcast", False):
            return torch.float32
        return self.dtype

    def prepare(self, module: torch.nn.Module, denoiser: bool = False) -> torch.nn.Module:
        """Cast, place, choose the attention kernel and memory layout; compile the denoiser if asked."""
        module.to(device=self.home, dtype=self.module_dtype(module)).eval().requires_grad_(False)
        if hasattr(module, "set_attn_processor"):
            from diffusers.models.attention_processor import (
                AttnProcessor,
                AttnProcessor2_0,
            )

            module.set_attn_processor(AttnProcessor2_0() if self.attention == "sdpa" else AttnProcessor())
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile and denoiser:
            module.compile()
        return module

    @contextmanager
    def active(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Use `module` on the compute device; with offload it returns to the CPU afterwards."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.home)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


class NoiseExhausted(RuntimeError):
    """More random draws were requested than injected tensors were given."""


@dataclass
class NoiseSource:
    """Every random tensor a pipeline draws: seeded (on the CPU, so results match across devices) or injected.

    Injected tensors are used in order, one per `randn` call; a shape mismatch or running out is an
    error naming the draw, which is how parity tests find a port's draws out of order.
    """

    seed: int | None = None
    injected: Sequence[torch.Tensor] | None = None
    drawn: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._queue = deque(self.injected) if self.injected is not None else None
        self._generator = torch.Generator("cpu")
        if self.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(self.seed)

    @property
    def generator(self) -> torch.Generator:
        """For APIs that take a generator (e.g. `latent_dist.sample(generator=...)`); not used when injecting."""
        return self._generator

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              role: str = "") -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        index = len(self.drawn)
        self.drawn.append((role, shape))
        if self._queue is not None:
            if not self._queue:
                raise NoiseExhausted(f"draw {index} ({role or 'unnamed'}, shape {shape}): no injected noise left")
            tensor = torch.as_tensor(self._queue.popleft())
            if tuple(tensor.shape) != shape:
                raise ValueError(f"draw {index} ({role or 'unnamed'}): injected noise has shape {tuple(tensor.shape)}, "
                                 f"the pipeline needs {shape}")
            return tensor.to(device=device, dtype=dtype)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def randn_like(self, tensor: torch.Tensor, role: str = "") -> torch.Tensor:
        return self.randn(tensor.shape, tensor.device, tensor.dtype, role)

    def remaining(self) -> int:
        """Injected tensors not used yet (a finished parity run should have 0)."""
        return len(self._queue) if self._queue is not None else 0
