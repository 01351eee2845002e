"""Degradation throughput (pairs per second, 256-px HR crops, batches of 16) and JPEG closeness to Pillow.

Needs the shared photos (../shared/data/train/bsds500, or --photos DIR). Run:
    PYTHONPATH=. python benchmarks/bench_degrade.py [--device cpu] [--threads N] [--batches 5] [--presets realesrgan,promptsr]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsr.degrade import PRESETS, Degrader
from diffsr.degrade.jpeg import jpeg_compress

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "train" / "bsds500"


def load_crops(folder: Path, count: int, size: int) -> np.ndarray:
    files = sorted(folder.glob("*.jpg"))[:count]
    if len(files) < count:
        sys.exit(f"bench_degrade: {folder} has {len(files)} JPEG photos, {count} needed; pass --photos DIR")
    crops = []
    for path in files:
        image = np.asarray(Image.open(path).convert("RGB"))
        top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
        crops.append(image[top : top + size, left : left + size])
    return np.stack(crops)


def throughput(preset: str, crops: torch.Tensor, batch: int, batches: int, device: str) -> float:
    degrader = Degrader(preset, 4, device=device)
    degrader(crops[:batch].to(device), seed=0)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(batches):
        chunk = crops[(index * batch) % len(crops) :][:batch]
        out = degrader(chunk.to(device), seed=index + 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert out.lr.shape[-1] == crops.shape[-1] // 4
    return batches * batch / (time.perf_counter() - start)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


def jpeg_table(crops: np.ndarray) -> None:
    batch = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    print(f"\nJPEG vs Pillow {Image.__version__} (4:2:0, same integer quality), {len(crops)} crops of {crops.shape[1]} px")
    print("quality  ours-vs-Pillow PSNR  identical pixels  max |diff|  Pillow-vs-original PSNR  ours ms/batch  Pillow ms/batch")
    for quality in (30, 40, 50, 60, 70, 80, 90, 95):
        start = time.perf_counter()
        ours = (jpeg_compress(batch, [quality] * len(crops)).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        ours_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        pillow = []
        for crop in crops:
            buffer = io.BytesIO()
            Image.fromarray(crop).save(buffer, "JPEG", quality=quality)
            pillow.append(np.asarray(Image.open(buffer).convert("RGB")))
        pillow_ms = (time.perf_counter() - start) * 1000
        pillow = np.stack(pillow)
        gap = np.mean([psnr(o, p) for o, p in zip(ours, pillow)])
        same = np.mean(ours == pillow)
        worst = int(np.abs(ours.astype(int) - pillow).max())
        loss = np.mean([psnr(p, c) for p, c in zip(pillow, crops)])
        print(f"{quality:7d}  {gap:19.2f}  {same:16.3f}  {worst:10d}  {loss:23.2f}  {ours_ms:13.1f}  {pillow_ms:15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-jpeg-table", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    crops = load_crops(args.photos, 32, 256)
    tensor = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f}, device {args.device}; "
          f"{args.batches} batches of {args.batch} HR crops 256x256 -> LR 64x64 after one warm-up batch")
    for preset in args.presets.split(","):
        print(f"{preset:18s} {throughput(preset, tensor, args.batch, args.batches, args.device):7.1f} pairs/s")
    if not args.no_jpeg_table:
        jpeg_table(crops)


if __name__ == "__main__":
    main()
