"""Tiny random-weight models in the official Real-ESRGAN checkpoint layouts, built by the tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch


def rrdb_state(nf: int = 8, gc: int = 32, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """RRDBNet x4 weights with the keys of `RealESRGAN_x4plus.pth` (BasicSR names); spandrel fixes gc at 32."""
    gen = torch.Generator().manual_seed(seed)

    def conv(out_ch: int, in_ch: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(out_ch, in_ch, 3, 3, generator=gen) * (0.5 / (in_ch * 9) ** 0.5),
                "bias": torch.randn(out_ch, generator=gen) * 0.01}

    layers = {"conv_first": conv(nf, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out_ch = nf if c == 5 else gc
                layers[f"body.{b}.rdb{r}.conv{c}"] = conv(out_ch, nf + (c - 1) * gc)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        layers[name] = conv(nf, nf)
    layers["conv_last"] = conv(3, nf)
    return {f"{k}.{p}": v for k, d in layers.items() for p, v in d.items()}


def compact_state(nf: int = 8, num_conv: int = 2, scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact weights with the keys of `realesr-animevideov3.pth` (body.N.*)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    index = 0
    in_ch = 3
    for _ in range(num_conv + 1):
        state[f"body.{index}.weight"] = torch.randn(nf, in_ch, 3, 3, generator=gen) * (0.5 / (in_ch * 9) ** 0.5)
        state[f"body.{index}.bias"] = torch.zeros(nf)
        state[f"body.{index + 1}.weight"] = torch.full((nf,), 0.25)
        index += 2
        in_ch = nf
    state[f"body.{index}.weight"] = torch.randn(3 * scale * scale, nf, 3, 3, generator=gen) * 0.05
    state[f"body.{index}.bias"] = torch.zeros(3 * scale * scale)
    return state


def save_pth(path: Path, state: dict[str, torch.Tensor], key: str | None = "params_ema") -> Path:
    torch.save({key: state} if key else state, path)
    return path


def write_ncnn_compact(directory: Path, state: dict[str, torch.Tensor], stem: str = "tiny", fp16: bool = True) -> tuple[Path, Path]:
    """Write a Compact model as ncnn .param/.bin the way ncnn's converter lays them out."""
    convs = sorted({int(k.split(".")[1]) for k in state if state[k].ndim == 4})
    lines, blob = [], bytearray()
    prev = "data"
    layer_lines = ["Input            input.1     0 1 data"]
    for i in range(max(convs) + 1):
        w = state.get(f"body.{i}.weight")
        if w is None:
            continue
        if w.ndim == 4:
            out_ch, in_ch, k, _ = w.shape
            layer_lines.append(f"Convolution      Conv_{i}  1 1 {prev} c{i} 0={out_ch} 1={k} 4=1 5=1 6={w.numel()}")
            if fp16:
                blob += struct.pack("<I", 0x01306B47) + w.numpy().astype("<f2").tobytes()
            else:
                blob += struct.pack("<I", 0) + w.numpy().astype("<f4").tobytes()
            blob += state[f"body.{i}.bias"].numpy().astype("<f4").tobytes()
        else:
            layer_lines.append(f"PReLU            PRelu_{i} 1 1 {prev} c{i} 0={w.numel()}")
            blob += w.numpy().astype("<f4").tobytes()
        prev = f"c{i}"
    lines = ["7767517", f"{len(layer_lines)} {len(layer_lines)}", *layer_lines]
    param, binary = directory / f"{stem}.param", directory / f"{stem}.bin"
    param.write_text("\n".join(lines) + "\n")
    binary.write_bytes(bytes(blob))
    return param, binary


def gradient_image(height: int = 40, width: int = 48, channels: int = 3, seed: int = 0, noise: float = 8.0) -> np.ndarray:
    """A smooth test image with some texture, uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 5 + y * 2) % 256, (y * 6) % 256, (x * y) % 256][:channels], axis=2).astype(np.float64)
    noisy = base + rng.normal(0, noise, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as PNG, creating the folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
