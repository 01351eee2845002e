"""Tiled inference: difference to the untiled result, and peak memory as the image grows.

    python benchmarks/bench_tiling.py [--image PATH] [--sizes 512,1024,2048] [--model NAME] [--tile 256]

1. Tiled vs untiled: the default model (fp32) on a 192x192 crop, tiles of 64, several overlaps;
   prints the largest difference in 8-bit levels.
2. Peak memory: each size runs in a fresh process with a fixed tile; prints peak RSS next to the
   memory that the input and output images themselves need, which no tiling can avoid.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "bench" / "b100" / "HR"

MEMORY_WORKER = """
import json, resource, sys, time
import numpy as np
from diffsr import Upscaler
from diffsr.io.image import ImageData
size, model, tile = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
up = Upscaler.from_pretrained(model, device="cpu")
rng = np.random.default_rng(0)
y, x = np.mgrid[0:size, 0:size] / size
pixels = np.stack([np.sin(20 * x) * 0.3 + 0.5, np.cos(17 * y) * 0.3 + 0.5, x * y], 2).astype(np.float32)
pixels += rng.normal(0, 0.02, pixels.shape).astype(np.float32)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = up.upscale(ImageData(pixels=np.clip(pixels, 0, 1)), tile=tile)
print(json.dumps({"seconds": time.perf_counter() - start, "baseline_kib": baseline,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "out": list(out.pixels.shape)}))
"""


def tiled_vs_untiled(image_path: Path) -> None:
    from diffsr import Upscaler
    from diffsr.io import read_image

    image = read_image(image_path)
    crop = image.with_pixels(np.ascontiguousarray(image.pixels[:192, :192]), None)
    up = Upscaler.from_pretrained("realesrgan-x4plus", device="cpu", dtype="fp32")
    whole = np.rint(up.upscale(crop, tile=10_000).pixels * 255)
    print(f"tiled vs untiled, realesrgan-x4plus fp32, 192x192 crop of {image_path.name}, tile 64:")
    for overlap in (16, 32, 64, 96):
        tiled = np.rint(up.upscale(crop, tile=64, tile_overlap=overlap).pixels * 255)
        diff = np.abs(tiled - whole)
        print(f"  overlap {overlap:>3}: max {diff.max():>5.0f} levels, mean {diff.mean():.4f}, pixels off by >1: {(diff > 1).mean():.5%}")


def peak_memory(sizes: list[int], model: str, tile: int) -> None:
    print(f"peak memory, {model}, tile {tile}, default dtype, fresh process per size:")
    print(f"  {'input':>9} {'output':>11} {'seconds':>8} {'peak RSS MiB':>13} {'after load MiB':>15} {'image buffers MiB':>18}")
    for size in sizes:
        result = subprocess.run([sys.executable, "-c", MEMORY_WORKER, str(size), model, str(tile)],
                                capture_output=True, text=True, cwd=REPO, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        out_h, out_w, channels = report["out"]
        # float32 input + output, plus the tile runner's accumulator and weight planes
        buffers = (size * size * 3 + out_h * out_w * (2 * channels + 1)) * 4 / 2**20
        print(f"  {size:>4}x{size:<4} {out_h:>5}x{out_w:<5} {report['seconds']:>8.1f} {report['peak_kib'] / 1024:>13.0f}"
              f" {report['baseline_kib'] / 1024:>15.0f} {buffers:>18.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, default=None, help="image for the tiled-vs-untiled check")
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--model", default="realesr-animevideov3-x4")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--skip-diff", action="store_true")
    args = parser.parse_args()
    if not args.skip_diff:
        image = args.image or next(iter(sorted(DEFAULT_IMAGE.glob("*"))), None)
        if image is None:
            sys.exit(f"no image for the tiled-vs-untiled check; pass --image (looked in {DEFAULT_IMAGE})")
        tiled_vs_untiled(image)
    peak_memory([int(s) for s in args.sizes.split(",")], args.model, args.tile)


if __name__ == "__main__":
    main()
