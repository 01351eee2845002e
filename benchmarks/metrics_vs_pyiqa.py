"""How far diffsr's PSNR-Y, SSIM-Y and NIQE are from pyiqa's values on OSEDiff's DRealSR outputs.

    python benchmarks/metrics_vs_pyiqa.py [--data ../shared/data/bench/drealsr_x4]

Prints, per metric, the largest and the median absolute difference over the 93 images, the image
with the largest one, and both means. Needs ../shared (the data is not part of the repository).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from diffsr.io import read_image
from diffsr.metrics import niqe, psnr, ssim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/bench/drealsr_x4")
    args = parser.parse_args()
    with open(args.data / "osediff_pyiqa_metrics.csv", newline="") as handle:
        reference = list(csv.DictReader(handle))
    ours: dict[str, list[float]] = {"psnr": [], "ssim": [], "niqe": []}
    for row in reference:
        result = read_image(args.data / "osediff" / row["image"]).pixels
        truth = read_image(args.data / "HR" / row["image"]).pixels
        ours["psnr"].append(psnr(result, truth, y_channel=True))
        ours["ssim"].append(ssim(result, truth, y_channel=True))
        ours["niqe"].append(niqe(result))
    print(f"{len(reference)} images of {args.data / 'osediff'} against HR")
    for name, values in ours.items():
        theirs = [float(row[name]) for row in reference]
        gaps = [abs(a - b) for a, b in zip(values, theirs)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        print(f"{name}: largest difference {gaps[worst]:.2e} ({reference[worst]['image']}), median {statistics.median(gaps):.1e}, "
              f"mean diffsr {statistics.fmean(values):.4f}, pyiqa {statistics.fmean(theirs):.4f}")


if __name__ == "__main__":
    main()
