"""`diffsr eval` and `diffsr bench` on small folders made here, and the pieces they are built from."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import save_png
from diffsr.bench import BenchError, parse_method_spec
from diffsr.cli.main import main
from diffsr.io import read_image
from diffsr.metrics import niqe, psnr, ssim
from diffsr.metrics.evaluate import pair_folders


def _photo(size: int, seed: int) -> np.ndarray:
    """uint8 RGB with smooth structure and some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=2) * 0.35 + 0.5
    return np.clip((base + rng.normal(0, 0.03, base.shape)) * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """LR/ (32 px) and HR/ (128 px) pairs with the same names, as DRealSR is laid out."""
    root = tmp_path / "set"
    for index in range(3):
        hr = _photo(128, index)
        save_png(root / "HR" / f"img{index}.png", hr)
        save_png(root / "LR" / f"img{index}.png", np.asarray(Image.fromarray(hr).resize((32, 32), Image.BICUBIC)))
    return root


def test_eval_writes_per_image_values_and_summary(tmp_path: Path, dataset: Path):
    pred = tmp_path / "pred"
    for index in range(3):
        save_png(pred / f"img{index}_out.png", np.asarray(Image.open(dataset / "LR" / f"img{index}.png").resize((128, 128), Image.BILINEAR)))
    out = tmp_path / "report"
    code = main(["eval", "--pred", str(pred), "--gt", str(dataset / "HR"), "-o", str(out), "--suffix", "out",
                 "--metrics", "psnr,ssim", "--y-channel", "--crop-border", "4", "-q"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["image"] for r in rows] == ["img0_out.png", "img1_out.png", "img2_out.png"]
    assert list(rows[0]) == ["image", "psnr", "ssim"]
    a, b = read_image(pred / "img1_out.png").pixels, read_image(dataset / "HR" / "img1.png").pixels
    assert float(rows[1]["psnr"]) == pytest.approx(psnr(a, b, True, 4), abs=1e-6)
    assert float(rows[1]["ssim"]) == pytest.approx(ssim(a, b, True, 4), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert summary["settings"]["y_channel"] is True and summary["settings"]["crop_border"] == 4
    assert "| PSNR |" in (out / "summary.md").read_text()


def test_eval_reports_missing_partners_and_size_mismatches(tmp_path: Path, dataset: Path, capsys):
    pred = tmp_path / "pred"
    save_png(pred / "img0.png", _photo(128, 0))
    save_png(pred / "img1.png", _photo(120, 1))  # wrong size
    save_png(pred / "stray.png", _photo(128, 5))  # no ground truth
    code = main(["eval", "--pred", str(pred), "--gt", str(dataset / "HR"), "-o", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "stray.png: no ground truth named stray.* in" in err
    assert "img2.png: ground truth has no result named img2.* in" in err
    assert "size mismatch: result 120x120, ground truth 128x128" in err
    rows = list(csv.DictReader(open(tmp_path / "r" / "per_image.csv")))
    assert [r["image"] for r in rows] == ["img0.png"] and float(rows[0]["psnr"]) == pytest.approx(80.0)


def test_eval_without_ground_truth_runs_no_reference_metrics(tmp_path: Path, dataset: Path, capsys):
    out = tmp_path / "r"
    assert main(["eval", "--pred", str(dataset / "HR"), "-o", str(out), "-q"]) == 0
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert list(rows[0]) == ["image", "niqe"]
    assert float(rows[0]["niqe"]) == pytest.approx(niqe(read_image(dataset / "HR" / "img0.png").pixels), abs=1e-6)
    assert main(["eval", "--pred", str(dataset / "HR"), "-o", str(out), "--metrics", "psnr"]) == 2
    assert "psnr compare with the ground truth; pass --gt" in capsys.readouterr().err


def test_eval_names_a_missing_pyiqa(tmp_path: Path, dataset: Path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyiqa", None)
    assert main(["eval", "--pred", str(dataset / "HR"), "--gt", str(dataset / "HR"), "-o", str(tmp_path / "r"),
                 "--metrics", "psnr,lpips"]) == 2
    assert "pyiqa is not installed; pip install pyiqa" in capsys.readouterr().err
    assert main(["eval", "--pred", str(dataset / "HR"), "--gt", str(dataset / "HR"), "-o", str(tmp_path / "r"),
                 "--metrics", "fid", "-q"]) == 2
    assert "pyiqa is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was scored or written


def test_pairing_by_stem_handles_suffixes_and_duplicates(tmp_path: Path):
    for name in ("a_out.png", "b_out.jpg", "b_out.png", "c.png"):
        save_png(tmp_path / "pred" / name, _photo(16, 0))
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "gt" / name, _photo(16, 0))
    pairs, problems = pair_folders(tmp_path / "pred", tmp_path / "gt", suffix="out")
    assert [(p.name, p.gt.name) for p in pairs] == [("a_out.png", "a.png"), ("b_out.jpg", "b.png")]
    reasons = " | ".join(r for _, r in problems)
    assert "b_out.png: same stem as b_out.jpg" in reasons and "c.png: name does not end in _out" in reasons


def test_method_specs():
    assert parse_method_spec("bicubic").method == "bicubic"
    spec = parse_method_spec("feedforward:model=realesr-animevideov3-x4, tile-overlap=8")
    assert (spec.method, spec.options, spec.slug) == (
        "feedforward", {"model": "realesr-animevideov3-x4", "tile_overlap": "8"}, "feedforward_model_realesr-animevideov3-x4_tile-overlap_8")
    short = parse_method_spec("realesrgan-x4plus")
    assert (short.label, short.method, short.options) == ("realesrgan-x4plus", "feedforward", {"model": "realesrgan-x4plus"})
    with pytest.raises(BenchError, match="unknown method 'esrgan'; available: bicubic, feedforward"):
        parse_method_spec("esrgan")
    with pytest.raises(BenchError, match="'tile' is not key=value"):
        parse_method_spec("feedforward:tile")


def test_bench_writes_the_report_folder(tmp_path: Path, dataset: Path):
    out = tmp_path / "bench"
    argv = ["bench", "--dataset", str(dataset), "--method", "bicubic", "--method", "feedforward:model=realesr-animevideov3-x4",
            "--y-channel", "--crops", "2", "--crop-size", "48", "-o", str(out), "-q"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    bicubic, compact = results["methods"]
    assert bicubic["error"] is None and compact["error"] is None
    # the recorded score is the score of the saved output
    saved = read_image(out / "outputs" / "bicubic" / "img1.png").pixels
    truth = read_image(dataset / "HR" / "img1.png").pixels
    assert bicubic["per_image"]["img1.png"]["psnr"] == pytest.approx(psnr(saved, truth, y_channel=True), abs=1e-9)
    assert bicubic["means"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in bicubic["per_image"].values()]))
    for method in (bicubic, compact):
        assert method["seconds_per_image"] > 0 and method["peak_rss_bytes"] > 10 * 2**20
        assert len(method["per_image"]) == 3
    assert compact["settings"]["model"] == "realesr-animevideov3-x4"
    report = (out / "report.md").read_text()
    assert "| bicubic |" in report and "| feedforward:model=realesr-animevideov3-x4 |" in report
    assert (out / "command.txt").read_text().strip() == "diffsr " + " ".join(argv)
    for name in ("metrics.png", "quality_vs_speed.png", "crops/img0.png", "crops/img2.png",
                 "per_image/bicubic.csv", "per_image/feedforward_model_realesr-animevideov3-x4.csv"):
        assert (out / name).stat().st_size > 100, name
    assert Image.open(out / "metrics.png").size[0] > 300


def test_bench_refuses_bad_specs_before_running(tmp_path: Path, dataset: Path, capsys):
    code = main(["bench", "--dataset", str(dataset), "--method", "bicubic", "--method", "feedforward:tiles=3",
                 "-o", str(tmp_path / "b"), "-q"])
    assert code == 2
    assert "feedforward:tiles=3: unknown option(s): tiles; options of feedforward: model" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
