"""Training datasets: HR folders degraded on the fly, and paired LR/HR folders.

`HRFolderDataset` gives random HR crops (flips and 90-degree rotations) and, with a degradation,
the LR, its prompt and parameters, computed in the DataLoader workers. With `degradation=None` it
gives HR crops and their seeds only; `degrade_batch` then degrades the collated batch on a GPU with
the same per-sample seeds, so both paths draw the same parameters. Every sample's randomness comes
from `sample_seed(seed, epoch, index)`: the data do not depend on the number of workers.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from diffsr.degrade.config import DegradationConfig
from diffsr.degrade.pipeline import Degrader, sample_seed
from diffsr.degrade.prompts import PromptBins, PromptPolicy
from diffsr.io.image import (
    DEFAULT_MAX_PIXELS,
    READABLE_SUFFIXES,
    ImageError,
    read_image,
)

_MAX_RETRIES = 10


def find_images(roots: str | Path | Sequence[str | Path], recursive: bool = True) -> list[Path]:
    """Image files under one or more folders, sorted, hidden files left out."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    found: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise ValueError(f"{root}: not a folder of images")
        pattern = "**/*" if recursive else "*"
        found += sorted(p for p in root.glob(pattern) if p.suffix.lower() in READABLE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not found:
        raise ValueError(f"no images found under {', '.join(map(str, roots))}" + ("" if recursive else " (sub-folders were not searched)"))
    return found


def load_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """H x W x 3 float32 in [0, 1]: grey is repeated to RGB, alpha is dropped (degradations are RGB)."""
    pixels = read_image(path, max_pixels=max_pixels).pixels
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def random_crop(pixels: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A size x size crop; smaller images are reflect-padded first (as BasicSR pads small GTs)."""
    h, w = pixels.shape[:2]
    if h < size or w < size:
        pixels = np.pad(pixels, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
        h, w = pixels.shape[:2]
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return pixels[top : top + size, left : left + size]


def augment(arrays: list[np.ndarray], rng: random.Random, flip: bool, rotate: bool) -> list[np.ndarray]:
    """The same random horizontal flip, vertical flip and transpose (so all 8 orientations) for all arrays."""
    hflip = flip and rng.random() < 0.5
    vflip = rotate and rng.random() < 0.5
    transpose = rotate and rng.random() < 0.5
    out = []
    for array in arrays:
        if hflip:
            array = array[:, ::-1]
        if vflip:
            array = array[::-1]
        if transpose:
            array = array.transpose(1, 0, 2)
        out.append(array)
    return out


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32))


class HRFolderDataset(Dataset):
    """HR folders -> {"hr", "lr", "prompt", "record", "seed", "path"} with random crops and on-the-fly degradation."""

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        crop_size: int = 256,
        scale: int = 4,
        degradation: DegradationConfig | str | None = "realesrgan",
        seed: int = 0,
        flip: bool = True,
        rotate: bool = True,
        prompt_policy: PromptPolicy | None = None,
        bins: PromptBins | None = None,
        recursive: bool = True,
    ):
        if crop_size % scale:
            raise ValueError(f"crop_size {crop_size} is not a multiple of the scale {scale}")
        self.files = find_images(roots, recursive)
        self.crop_size, self.scale, self.seed = crop_size, scale, seed
        self.flip, self.rotate = flip, rotate
        self.degrader = Degrader(degradation, scale, device="cpu", bins=bins) if degradation is not None else None
        self.bins = bins or PromptBins()
        self.prompt_policy = prompt_policy
        self.epoch = 0
        self.bad_files: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        """New crops and degradations each epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _crop(self, index: int, rng: random.Random) -> tuple[np.ndarray, Path]:
        for attempt in range(_MAX_RETRIES):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                pixels = load_rgb(path)
            except ImageError as exc:
                if str(path) not in self.bad_files:
                    self.bad_files[str(path)] = str(exc)
                    warnings.warn(f"skipping unreadable training image: {exc}", stacklevel=2)
                continue
            crop = random_crop(pixels, self.crop_size, rng)
            return augment([crop], rng, self.flip, self.rotate)[0], path
        raise ImageError(f"{_MAX_RETRIES} images in a row from index {index} could not be read; check the data folder")

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed = sample_seed(self.seed, self.epoch, index)
        rng = random.Random(seed)
        pixels, path = self._crop(index, rng)
        item: dict[str, Any] = {"hr": to_tensor(pixels), "seed": seed, "path": str(path)}
        if self.degrader is not None:
            batch = self.degrader(item["hr"][None], [seed])
            record = batch.records[0]
            item["lr"] = batch.lr[0]
            item["record"] = record.to_dict()
            item["prompt"] = self.prompt_policy.apply(record.steps, self.bins, rng) if self.prompt_policy else batch.prompts[0]
        return item


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one torch thread per worker, as workers already run in parallel
    (several threads per worker oversubscribe the CPU, which was 8x slower on a busy 2-core machine)."""
    torch.set_num_threads(1)


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors, keep prompts, records, seeds and paths as lists (they are not tensors)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def degrade_batch(batch: dict[str, Any], degrader: Degrader, prompt_policy: PromptPolicy | None = None) -> dict[str, Any]:
    """Degrade a collated batch of HR crops (from `degradation=None`) on the degrader's device."""
    result = degrader(batch["hr"], batch["seed"])
    batch = dict(batch, hr=result.hr, lr=result.lr, record=[r.to_dict() for r in result.records])
    if prompt_policy is None:
        batch["prompt"] = result.prompts
    else:
        batch["prompt"] = [
            prompt_policy.apply(r.steps, degrader.bins, random.Random(sample_seed(r.seed, "prompt"))) for r in result.records
        ]
    return batch


class PairedFolderDataset(Dataset):
    """LR and HR folders with the same file names (any image format) -> {"lr", "hr", "path"[, "prompt", "record"]}.

    `records`: a degradations.jsonl written by `diffsr degrade`; found beside the folders if not given.
    `crop_size` (HR pixels) gives paired random crops with flips/rotations; None gives whole images.
    """

    def __init__(
        self,
        lr_root: str | Path,
        hr_root: str | Path,
        scale: int = 4,
        crop_size: int | None = None,
        flip: bool = False,
        rotate: bool = False,
        seed: int = 0,
        records: str | Path | None = None,
    ):
        if crop_size is not None and crop_size % scale:
            raise ValueError(f"crop_size {crop_size} is not a multiple of the scale {scale}")
        self.lr_root, self.hr_root = Path(lr_root), Path(hr_root)
        lr_files = {p.relative_to(self.lr_root).with_suffix(""): p for p in find_images(self.lr_root)}
        hr_files = {p.relative_to(self.hr_root).with_suffix(""): p for p in find_images(self.hr_root)}
        missing_lr, missing_hr = sorted(set(hr_files) - set(lr_files)), sorted(set(lr_files) - set(hr_files))
        if missing_lr or missing_hr:
            parts = []
            if missing_lr:
                parts.append(f"{len(missing_lr)} HR image(s) have no LR ({', '.join(map(str, missing_lr[:3]))})")
            if missing_hr:
                parts.append(f"{len(missing_hr)} LR image(s) have no HR ({', '.join(map(str, missing_hr[:3]))})")
            raise ValueError(f"{self.lr_root} and {self.hr_root} do not pair up: {'; '.join(parts)}; give both the same file names")
        self.keys = sorted(hr_files)
        self.lr_files, self.hr_files = lr_files, hr_files
        self.scale, self.crop_size, self.flip, self.rotate, self.seed = scale, crop_size, flip, rotate, seed
        self.epoch = 0
        self.records = self._load_records(records)

    def _load_records(self, records: str | Path | None) -> dict[str, dict[str, Any]]:
        path = Path(records) if records else self.hr_root.parent / "degradations.jsonl"
        if not path.exists():
            if records:
                raise ValueError(f"{path}: no such records file")
            return {}
        found = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    found[str(Path(entry["name"]).with_suffix(""))] = entry
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{path}:{number}: not a diffsr degrade record ({exc})") from None
        return found

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        lr, hr = load_rgb(self.lr_files[key]), load_rgb(self.hr_files[key])
        expected = (lr.shape[0] * self.scale, lr.shape[1] * self.scale)
        if hr.shape[:2] != expected:
            raise ImageError(
                f"{self.hr_files[key]}: HR is {hr.shape[1]}x{hr.shape[0]} but its LR times {self.scale} is "
                f"{expected[1]}x{expected[0]}; check --scale or the pairing"
            )
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        if self.crop_size is not None:
            lr_size = self.crop_size // self.scale
            if lr.shape[0] < lr_size or lr.shape[1] < lr_size:
                raise ImageError(f"{self.lr_files[key]}: LR is smaller than the crop ({lr_size} px); use a smaller crop_size")
            top, left = rng.randint(0, lr.shape[0] - lr_size), rng.randint(0, lr.shape[1] - lr_size)
            lr = lr[top : top + lr_size, left : left + lr_size]
            s = self.scale
            hr = hr[top * s : (top + lr_size) * s, left * s : (left + lr_size) * s]
        lr, hr = augment([lr, hr], rng, self.flip, self.rotate)
        item: dict[str, Any] = {"lr": to_tensor(lr), "hr": to_tensor(hr), "path": str(self.hr_files[key])}
        entry = self.records.get(str(key))
        if entry is not None:
            item["prompt"] = entry["prompt"]
            item["record"] = entry["record"]
        return item

