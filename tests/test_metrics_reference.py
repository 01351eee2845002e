"""diffsr's PSNR, SSIM and NIQE against pyiqa's published values for OSEDiff's DRealSR outputs."""

from __future__ import annotations

import csv

import numpy as np
from conftest import shared_path

from diffsr.io import read_image
from diffsr.metrics import niqe, psnr, ssim
from diffsr.metrics.niqe import pristine_model

TOLERANCE = {"psnr": 0.01, "ssim": 0.001, "niqe": 0.02}


def test_every_osediff_image_matches_pyiqa():
    root = shared_path("data", "bench", "drealsr_x4")
    with open(root / "osediff_pyiqa_metrics.csv", newline="") as handle:
        reference = list(csv.DictReader(handle))
    assert len(reference) == 93
    off = []
    for row in reference:
        result = read_image(root / "osediff" / row["image"]).pixels
        truth = read_image(root / "HR" / row["image"]).pixels
        ours = {
            "psnr": psnr(result, truth, y_channel=True),
            "ssim": ssim(result, truth, y_channel=True),
            "niqe": niqe(result),
        }
        off += [
            f"{row['image']} {name}: {value:.6f} vs pyiqa {float(row[name]):.6f}"
            for name, value in ours.items()
            if abs(value - float(row[name])) > TOLERANCE[name]
        ]
    assert not off, "\n".join(off)


def test_shipped_niqe_parameters_are_the_published_ones():
    published = np.load(shared_path("data", "metrics", "niqe_pris_params.npz"))
    mean, cov = pristine_model()
    assert np.array_equal(mean, published["mu_pris_param"].reshape(-1))
    assert np.array_equal(cov, published["cov_pris_param"])
