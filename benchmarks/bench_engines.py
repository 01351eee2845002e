"""Images per second for the local engine and for Ray with 1 and 2 workers, on the default model.

    python benchmarks/bench_engines.py [--count 16] [--size 48] [--model realesrgan-x4plus]

Small images make the per-image overhead visible: each run is a whole `diffsr upscale` process
(start-up included), plus the throughput measured once the first output appeared.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_inputs(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(count):
        base = np.stack([(x * (3 + i)) % 256, (y * 5) % 256, (x * y + i * 17) % 256], 2)
        Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")


def timed_run(src: Path, out: Path, model: str, extra: list[str]) -> tuple[float, float]:
    command = [sys.executable, "-m", "diffsr.cli.main", "upscale", str(src), "-o", str(out), "-q", "--model", model, *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while process.poll() is None:
        if first is None and any(out.glob("*_out.png")):
            first = time.perf_counter()
        time.sleep(0.01)
    end = time.perf_counter()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with {process.returncode}")
    return end - start, end - (first or end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--model", default="realesrgan-x4plus")
    args = parser.parse_args()
    runs = [
        ("local", []),
        ("ray, 1 worker", ["--engine", "ray", "--workers", "1"]),
        ("ray, 2 workers", ["--engine", "ray", "--workers", "2"]),
        ("ray, 1 worker, batch 8", ["--engine", "ray", "--workers", "1", "--batch-size", "8"]),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        make_inputs(src, args.count, args.size)
        print(f"{args.count} images of {args.size}x{args.size}, {args.model}, default dtype")
        print(f"{'engine':<24} {'whole run s':>12} {'images/s (whole)':>17} {'images/s (after first)':>23}")
        rates = {}
        for label, extra in runs:
            total, steady = timed_run(src, Path(tmp) / label.replace(" ", "_").replace(",", ""), args.model, extra)
            rates[label] = (args.count - 1) / steady if steady > 0 else float("nan")
            print(f"{label:<24} {total:>12.1f} {args.count / total:>17.2f} {rates[label]:>23.2f}")
        overhead = 1 / rates["ray, 1 worker"] - 1 / rates["local"]
        print(f"per-image overhead of Ray with 1 worker over the local engine: {overhead * 1000:.0f} ms")


if __name__ == "__main__":
    main()
