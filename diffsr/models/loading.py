"""Safe checkpoint loading: safetensors, or `torch.load(weights_only=True)`; never arbitrary unpickling."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, unsafe or of the wrong model; the message says which and why."""


def load_checkpoint(path: str | Path) -> dict:
    """The raw content of a checkpoint file (a dict of tensors, possibly nested)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: weights file is empty (0 bytes); download it again")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a valid safetensors file ({exc}); download it again") from None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # not a class reference: the bytes are no checkpoint at all
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint (corrupt or another kind of file); download it again") from None
        raise WeightsError(
            f"{path}: holds Python objects that only arbitrary unpickling could load, which diffsr refuses "
            f"because it can run code ({str(exc).splitlines()[0][:120]}); convert it to safetensors where you trust it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, KeyError, ValueError) as exc:  # torch.load on garbage
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc}); it may be truncated, download it again") from None
    if not isinstance(content, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return content


def tensors_only(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
