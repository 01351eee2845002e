"""Device and dtype choice, free-memory queries and out-of-memory detection, shared by all methods."""

from __future__ import annotations

import os
from functools import lru_cache

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but this PyTorch build sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device '{name}' asked for, but MPS is not available here; use --device cpu")
    return device


@lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """True where the CPU has AMX bf16 tile units, which run bf16 convolutions several times faster."""
    try:
        with open("/proc/cpuinfo") as handle:
            return any("amx_bf16" in line for line in handle if line.startswith("flags"))
    except OSError:
        return False


def resolve_dtype(
    name: str,
    device: torch.device,
    supports_fp16: bool = True,
    supports_bf16: bool = True,
    cpu_default: torch.dtype = torch.float32,
) -> torch.dtype:
    """`auto`: fp16 on GPUs (as Real-ESRGAN does), `cpu_default` on the CPU; explicit names are checked."""
    if name == "auto":
        if device.type in ("cuda", "mps") and supports_fp16:
            return torch.float16
        if device.type == "cpu" and cpu_default == torch.bfloat16 and not supports_bf16:
            return torch.float32
        return cpu_default if device.type == "cpu" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; use auto, fp32, fp16 or bf16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and not supports_fp16:
        raise ValueError("this model does not support fp16 (its outputs overflow); use --dtype fp32 or bf16")
    if dtype == torch.bfloat16 and not supports_bf16:
        raise ValueError("this model does not support bf16; use --dtype fp32")
    return dtype


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation can use on `device` right now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA, MPS and CPU allocators each report exhaustion differently."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "DefaultCPUAllocator: can't allocate memory" in text or "MPS backend out of memory" in text
    )


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
