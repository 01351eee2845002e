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


# Lightning checkpoints (StableSR's .ckpt files) pickle the trainer's callback objects, and sometimes
# hparams (AttributeDict) or numpy scalars, next to the weights. Those names are replaced by inert
# stand-in classes that only record the state they are given: nothing from those modules is imported
# or run. Any other global still makes the file unreadable.
LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_NUMPY_RECONSTRUCTORS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype")


class LightningStub:
    """Stands for a pickled Lightning object; keeps its arguments and state as plain data."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


def _allowed_global(name: str) -> object | None:
    if name.startswith(LIGHTNING_MODULES):
        return type(name.rsplit(".", 1)[-1], (LightningStub,), {"__module__": name.rsplit(".", 1)[0]})
    if name in _NUMPY_RECONSTRUCTORS or name.startswith(("numpy.dtypes.", "numpy.core.multiarray._reconstruct")):
        import importlib

        module, attr = name.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
    return None


def load_lightning_checkpoint(path: str | Path) -> dict:
    """A checkpoint `torch.load(weights_only=True)` reads, also when Lightning pickled its callbacks into it.

    The globals the file references are listed without unpickling; Lightning's are mapped to inert
    stubs and numpy's scalar/dtype reconstructors are allowed; any other one is refused, naming it.
    """
    path = Path(path)
    try:  # scans the pickle only (no tensor data), so a refused file is not read twice
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if path.is_file() else []
    except Exception:  # noqa: BLE001 - not a zip checkpoint: load_checkpoint says what is wrong with it
        needed = []
    if not needed:
        return load_checkpoint(path)
    allowed = {name: _allowed_global(name) for name in needed}
    refused = sorted(name for name, obj in allowed.items() if obj is None)
    if refused:
        raise WeightsError(f"{path}: holds Python objects of {', '.join(refused[:4])}, which only arbitrary unpickling could load; "
                           "diffsr refuses that because it can run code; convert it to safetensors where you trust it")
    safe = [(obj, name) for name, obj in allowed.items()]
    if "numpy.dtype" in allowed:  # a dtype is rebuilt as an instance of its numpy.dtypes class, then given its state
        import numpy as np

        safe += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    with torch.serialization.safe_globals(safe):
        try:  # memory-mapped: optimizer states and other unused tensors are never read into memory
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(content, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return content
