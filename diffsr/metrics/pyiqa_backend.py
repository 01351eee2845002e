"""Learned metrics through pyiqa, for users who have it and its weights; diffsr never downloads them.

pyiqa (PolyForm Noncommercial since 2026-04) fetches each network's weights on first use from the
internet into torch's hub folder. Here nothing may be downloaded, so a metric is loaded with network
access cut short, and a missing package or weight file becomes one clear MetricError.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from diffsr.metrics.registry import MetricError
from diffsr.runtime import resolve_device

INSTALL_HINT = "pip install pyiqa (licence: PolyForm Noncommercial 1.0.0, non-commercial use only)"


def weights_folders() -> list[Path]:
    """Where pyiqa and torchvision look for weights (pyiqa's own, and torch hub checkpoints)."""
    hub = Path(torch.hub.get_dir())
    return [hub / "pyiqa", hub / "checkpoints"]


def import_pyiqa():
    """pyiqa itself, or a MetricError saying how to install it."""
    try:
        import pyiqa
    except ImportError:
        raise MetricError(f"pyiqa is not installed; {INSTALL_HINT}") from None
    return pyiqa


@contextmanager
def _no_long_downloads(seconds: float = 10.0) -> Iterator[None]:
    """A download attempt fails within seconds instead of hanging on a network that drops packets."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class PyiqaMetric:
    """One pyiqa metric, loaded once, scoring H x W x C arrays in [0, 1]."""

    def __init__(self, name: str, network, device: torch.device):
        self.name, self.network, self.device = name, network, device

    def __call__(self, pred: np.ndarray, ref: np.ndarray | None = None, crop_border: int = 0) -> float:
        tensors = [_to_tensor(a, crop_border, self.device) for a in (pred, ref) if a is not None]
        with torch.inference_mode():
            score = self.network(*tensors)
        return float(torch.as_tensor(score).reshape(-1)[0])


def load_pyiqa_metric(name: str, device: str = "cpu") -> PyiqaMetric:
    pyiqa = import_pyiqa()
    torch_device = resolve_device(device)
    try:
        with _no_long_downloads():
            network = pyiqa.create_metric(name, device=torch_device, as_loss=False)
    except Exception as exc:  # pyiqa raises whatever its download or loading code raises
        raise MetricError(_weights_message(name, exc)) from None
    return PyiqaMetric(name, network, torch_device)


def fid_between_folders(pred_dir: Path, gt_dir: Path, device: str = "cpu") -> float:
    """FID between two folders of images (pyiqa's clean-FID, Inception features)."""
    pyiqa = import_pyiqa()
    torch_device = resolve_device(device)
    try:
        with _no_long_downloads():
            network = pyiqa.create_metric("fid", device=torch_device, as_loss=False)
            return float(network(str(pred_dir), str(gt_dir)))
    except Exception as exc:
        raise MetricError(_weights_message("fid", exc)) from None


def _weights_message(name: str, exc: BaseException) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    folders = " and ".join(str(f) for f in weights_folders())
    return (
        f"{name}: pyiqa could not load its network ({type(exc).__name__}: {reason}); nothing is downloaded here: "
        f"copy the weight files pyiqa uses into {folders} from a machine that has them"
    )


def _to_tensor(array: np.ndarray, crop_border: int, device: torch.device) -> torch.Tensor:
    pixels = np.asarray(array, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)  # pyiqa's networks read RGB
    if crop_border:
        pixels = pixels[crop_border:-crop_border, crop_border:-crop_border]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].to(device)
