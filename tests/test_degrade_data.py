"""Datasets, pair sets and the `diffsr degrade` command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image
from test_degrade import photo_like, pillow_jpeg, psnr
from torch.utils.data import DataLoader

from diffsr.cli.main import main
from diffsr.data import (
    HRFolderDataset,
    PairedFolderDataset,
    collate_pairs,
    degrade_batch,
    make_validation_set,
)
from diffsr.degrade import Degrader, PromptPolicy
from diffsr.degrade.jpeg import jpeg_compress


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def hr_folder(tmp_path: Path) -> Path:
    root = tmp_path / "hr"
    for index, (h, w) in enumerate([(80, 96), (72, 64), (40, 48)]):  # the last is smaller than a 64 crop
        write_png(root / f"img{index}.png", photo_like(h, w, seed=index))
    write_png(root / "sub" / "grey.png", photo_like(64, 80, seed=9)[:, :, 0])
    return root


def test_hr_folder_dataset_gives_degraded_crops(hr_folder):
    data = HRFolderDataset(hr_folder, crop_size=64, scale=4, degradation="promptsr", seed=1)
    assert len(data) == 4
    for index in range(len(data)):
        item = data[index]
        assert item["hr"].shape == (3, 64, 64) and item["lr"].shape == (3, 16, 16)
        assert item["prompt"] == Degrader("promptsr").plan(item["seed"], (64, 64))[1].prompt()
        assert item["record"]["lr_size"] == [16, 16]


def test_hr_folder_dataset_is_reproducible_per_epoch(hr_folder):
    data = HRFolderDataset(hr_folder, crop_size=32, scale=2, degradation="realesrgan", seed=5)
    first = data[1]
    again = HRFolderDataset(hr_folder, crop_size=32, scale=2, degradation="realesrgan", seed=5)[1]
    assert torch.equal(first["hr"], again["hr"]) and torch.equal(first["lr"], again["lr"])
    data.set_epoch(1)
    assert not torch.equal(data[1]["lr"], first["lr"])


def test_gpu_style_batches_draw_the_same_parameters_as_workers(hr_folder):
    workers = HRFolderDataset(hr_folder, crop_size=32, scale=4, degradation="realesrgan", seed=2)
    crops = HRFolderDataset(hr_folder, crop_size=32, scale=4, degradation=None, seed=2)
    loader = DataLoader(crops, batch_size=4, collate_fn=collate_pairs)
    batch = degrade_batch(next(iter(loader)), Degrader("realesrgan", 4))
    assert batch["lr"].shape == (4, 3, 8, 8)
    for index in range(4):
        item = workers[index]
        assert torch.equal(batch["hr"][index], item["hr"])
        assert batch["record"][index] == item["record"]
        assert batch["prompt"][index] == item["prompt"]


def test_prompt_policy_in_the_dataset_drops_phrases(hr_folder):
    data = HRFolderDataset(hr_folder, crop_size=32, scale=4, degradation="promptsr", prompt_policy=PromptPolicy(empty_prob=1.0))
    assert data[0]["prompt"] == ""


def test_unreadable_training_images_are_skipped_with_a_warning(hr_folder):
    (hr_folder / "broken.png").write_bytes(b"not a png")
    data = HRFolderDataset(hr_folder, crop_size=32, scale=4, degradation=None)
    broken = next(i for i, p in enumerate(data.files) if p.name == "broken.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item = data[broken]
    assert item["path"] != str(hr_folder / "broken.png") and item["hr"].shape == (3, 32, 32)
    assert any("broken.png" in str(w.message) for w in caught)


def test_dataset_refuses_crops_that_do_not_divide(hr_folder):
    with pytest.raises(ValueError, match="multiple of the scale"):
        HRFolderDataset(hr_folder, crop_size=30, scale=4)
    empty = hr_folder.parent / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        HRFolderDataset(empty, crop_size=32)


def test_paired_dataset_crops_stay_aligned(tmp_path):
    hr = photo_like(64, 96)
    lr = hr.reshape(16, 4, 24, 4, 3).mean(axis=(1, 3)).round().astype(np.uint8)  # box x4: alignment is checkable
    write_png(tmp_path / "HR" / "a.png", hr)
    write_png(tmp_path / "LR" / "a.png", lr)
    data = PairedFolderDataset(tmp_path / "LR", tmp_path / "HR", scale=4, crop_size=32, flip=True, rotate=True, seed=3)
    for epoch in range(4):
        data.set_epoch(epoch)
        item = data[0]
        assert item["hr"].shape == (3, 32, 32) and item["lr"].shape == (3, 8, 8)
        pooled = torch.nn.functional.avg_pool2d(item["hr"][None], 4)[0]
        assert (pooled - item["lr"]).abs().max() <= 0.5 / 255 + 1e-6


def test_paired_dataset_reports_unpaired_and_mis_sized_files(tmp_path):
    write_png(tmp_path / "HR" / "a.png", photo_like(32, 32))
    write_png(tmp_path / "HR" / "b.png", photo_like(32, 32))
    write_png(tmp_path / "LR" / "a.png", photo_like(10, 8))
    with pytest.raises(ValueError, match=r"1 HR image\(s\) have no LR \(b\)"):
        PairedFolderDataset(tmp_path / "LR", tmp_path / "HR")
    (tmp_path / "HR" / "b.png").unlink()
    with pytest.raises(ValueError, match="HR is 32x32 but its LR times 4 is 32x40"):
        PairedFolderDataset(tmp_path / "LR", tmp_path / "HR", scale=4)[0]


def test_degrade_command_writes_matching_pairs_and_records(hr_folder, tmp_path, capsys):
    (hr_folder / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    out = tmp_path / "out"
    rc = main(["degrade", str(hr_folder), "-o", str(out), "--scale", "2", "--preset", "promptsr", "--seed", "0", "--recursive", "-q"])
    captured = capsys.readouterr()
    assert rc == 1, "a bad file makes the exit status non-zero"
    assert "broken.jpg" in captured.err and captured.err.count("\n") == 1
    assert "written 4 pairs" in captured.out
    lines = [json.loads(line) for line in (out / "degradations.jsonl").read_text().splitlines()]
    assert sorted(e["name"] for e in lines) == ["img0.png", "img1.png", "img2.png", "sub/grey.png"]
    for entry in lines:
        lr, hr = Image.open(out / entry["lr"]), Image.open(out / entry["hr"])
        assert (hr.width, hr.height) == (lr.width * 2, lr.height * 2)
        assert lr.mode == "RGB"
        assert entry["record"]["lr_size"] == [lr.height, lr.width]
        assert entry["prompt"].endswith("downsample")
    settings = json.loads((out / "degradation.json").read_text())
    assert settings["config"]["name"] == "promptsr" and settings["seed"] == 0

    paired = PairedFolderDataset(out / "LR", out / "HR", scale=2)
    item = paired[0]
    assert item["prompt"] == lines[0]["prompt"] and item["hr"].shape[1] == 2 * item["lr"].shape[1]

    assert main(["degrade", str(hr_folder), "-o", str(out), "-q"]) == 1
    assert "already holds a pair set" in capsys.readouterr().err


def test_pair_sets_are_reproducible_and_per_file(hr_folder, tmp_path):
    first = make_validation_set(hr_folder, tmp_path / "a", config="realesrgan", scale=4, seed=3, crop=32)
    assert first.ok and len(first.written) == 4
    again = make_validation_set(hr_folder, tmp_path / "b", config="realesrgan", scale=4, seed=3, crop=32)
    for name in first.written:
        assert (tmp_path / "a" / "LR" / name).read_bytes() == (tmp_path / "b" / "LR" / name).read_bytes()
    (hr_folder / "img0.png").unlink()  # other files keep their pairs
    fewer = make_validation_set(hr_folder, tmp_path / "c", config="realesrgan", scale=4, seed=3, crop=32)
    assert "img1.png" in fewer.written
    assert (tmp_path / "a" / "LR" / "img1.png").read_bytes() == (tmp_path / "c" / "LR" / "img1.png").read_bytes()
    assert again.written == first.written


def test_crop_larger_than_an_image_is_reported(hr_folder, tmp_path, capsys):
    rc = main(["degrade", str(hr_folder), "-o", str(tmp_path / "o"), "--crop", "64", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "img2.png: 48x40 is smaller than --crop 64" in err


def test_bad_options_are_one_line_errors(hr_folder, tmp_path, capsys):
    assert main(["degrade", str(hr_folder), "-o", str(tmp_path / "o"), "--preset", "nope", "-q"]) == 2
    assert "unknown degradation preset 'nope'" in capsys.readouterr().err
    assert main(["degrade", str(hr_folder), "-o", str(tmp_path / "o"), "--crop", "30", "-q"]) == 2
    assert "not a multiple of --scale" in capsys.readouterr().err


def test_jpeg_matches_pillow_on_real_photos():
    folder = shared_path("data", "train", "bsds500")
    files = sorted(folder.glob("*.jpg"))[:4]
    images = [np.asarray(Image.open(f).convert("RGB"))[:128, :128] for f in files]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    for quality in (30, 70, 95):
        ours = (jpeg_compress(batch, [quality] * len(images)).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        gaps = [psnr(ours[i], pillow_jpeg(images[i], quality)) for i in range(len(images))]
        assert min(gaps) > 45.0, gaps
