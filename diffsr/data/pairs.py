"""Fixed LR/HR pair sets written to disk: `diffsr degrade` and seeded validation sets.

Each image's seed is derived from the run's seed and the image's relative path, so a file's pair
does not change when other files are added, removed or reordered, and a set can be rebuilt exactly.
Output: OUT/HR/<name>.png (the HR cropped to a multiple of the scale, or to --crop), OUT/LR/<name>.png
(8-bit), OUT/degradations.jsonl (one line per pair: names, prompt, parameters) and
OUT/degradation.json (the config, bins, scale and seed that made the set).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsr.batch import InputFile, collect_inputs
from diffsr.degrade.pipeline import Degrader, sample_seed
from diffsr.io.atomic import atomic_write_bytes
from diffsr.io.image import (
    DEFAULT_MAX_PIXELS,
    ImageData,
    ImageError,
    read_image,
    write_image,
)
from diffsr.progress import OptionalCallback, report

RECORDS_NAME = "degradations.jsonl"
CONFIG_NAME = "degradation.json"


@dataclass
class PairSummary:
    written: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Pending:
    item: InputFile
    name: Path
    hr: np.ndarray
    image: ImageData
    seed: int


def _prepare(pixels: np.ndarray, scale: int, crop: int | None, path: Path) -> np.ndarray:
    h, w = pixels.shape[:2]
    if crop is not None:
        if h < crop or w < crop:
            raise ImageError(f"{path}: {w}x{h} is smaller than --crop {crop}; use a smaller --crop or leave it out")
        top, left = (h - crop) // 2, (w - crop) // 2
        return pixels[top : top + crop, left : left + crop]
    if h < scale or w < scale:
        raise ImageError(f"{path}: {w}x{h} is smaller than the scale {scale}")
    return pixels[: h - h % scale, : w - w % scale]


def make_pairs(
    inputs: list[InputFile],
    out_dir: str | Path,
    degrader: Degrader,
    seed: int = 0,
    crop: int | None = None,
    batch_size: int = 16,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_progress: OptionalCallback = None,
) -> PairSummary:
    """Degrade each input once with its own seed and write the pair set; bad files are reported, not fatal."""
    if crop is not None and crop % degrader.scale:
        raise ValueError(f"--crop {crop} is not a multiple of the scale {degrader.scale}")
    out_dir = Path(out_dir)
    summary = PairSummary()
    entries: list[dict] = []
    pending: list[_Pending] = []
    names: dict[Path, Path] = {}
    done = 0
    report(on_progress, "files", 0, len(inputs))

    def flush() -> None:
        nonlocal done
        by_shape: dict[tuple, list[_Pending]] = {}
        for p in pending:
            by_shape.setdefault(p.hr.shape, []).append(p)
        for group in by_shape.values():
            hr = torch.from_numpy(np.stack([p.hr.transpose(2, 0, 1) for p in group]).astype(np.float32))
            result = degrader(hr, [p.seed for p in group])
            for index, p in enumerate(group):
                try:
                    _write_pair(p, result.lr[index], out_dir, degrader, seed)
                    record = result.records[index]
                    entries.append({
                        "name": p.name.as_posix(),
                        "lr": f"LR/{p.name.as_posix()}",
                        "hr": f"HR/{p.name.as_posix()}",
                        "source": str(p.item.path),
                        "prompt": result.prompts[index],
                        "record": record.to_dict(),
                    })
                    summary.written.append(p.name.as_posix())
                except OSError as exc:
                    summary.failed.append(f"{p.item.path}: cannot write its pair ({exc.strerror or exc}); check the output folder")
                done += 1
                report(on_progress, "files", done, len(inputs), str(p.item.path))
        pending.clear()

    for item in inputs:
        name = item.relative.with_suffix(".png")
        try:
            if name in names:
                raise ImageError(f"{item.path}: its output name {name} is also that of {names[name]}; rename one of them")
            image = read_image(item.path, max_pixels=max_pixels)
            pixels = np.repeat(image.pixels, 3, axis=2) if image.is_grey else image.pixels
            hr = _prepare(pixels, degrader.scale, crop, item.path)
        except ImageError as exc:
            summary.failed.append(str(exc))
            done += 1
            report(on_progress, "files", done, len(inputs), str(item.path))
            continue
        names[name] = item.path
        if image.alpha is not None:
            summary.notes.append(f"{item.path}: transparency dropped (degradations are RGB)")
        pending.append(_Pending(item, name, hr, image, sample_seed(seed, name.as_posix())))
        if len(pending) >= batch_size:
            flush()
    flush()

    entries.sort(key=lambda e: e["name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / RECORDS_NAME, "".join(json.dumps(e) + "\n" for e in entries).encode())
    settings = {"config": degrader.config.to_dict(), "bins": degrader.bins.to_dict(), "scale": degrader.scale, "seed": seed, "crop": crop}
    atomic_write_bytes(out_dir / CONFIG_NAME, json.dumps(settings, indent=1).encode())
    return summary


def _write_pair(p: _Pending, lr: torch.Tensor, out_dir: Path, degrader: Degrader, seed: int) -> None:
    settings = {"preset": degrader.config.name, "scale": degrader.scale, "seed": seed, "source": p.item.path.name}
    hr_image = ImageData(np.ascontiguousarray(p.hr), None, p.image.bit_depth, "PNG", p.image.icc_profile)
    lr_image = ImageData(np.ascontiguousarray(lr.permute(1, 2, 0).cpu().numpy()), None, 8, "PNG", p.image.icc_profile)
    for folder, image in (("HR", hr_image), ("LR", lr_image)):
        target = out_dir / folder / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, image, settings=settings)


def make_validation_set(
    hr_dir: str | Path,
    out_dir: str | Path,
    config: str = "realesrgan",
    scale: int = 4,
    seed: int = 0,
    crop: int | None = 256,
    recursive: bool = True,
) -> PairSummary:
    """A fixed validation set: centre crops of every image under `hr_dir`, each with its own derived seed."""
    inputs, problems = collect_inputs([str(hr_dir)], recursive=recursive)
    summary = make_pairs(inputs, out_dir, Degrader(config, scale), seed=seed, crop=crop)
    summary.failed[:0] = [reason for _, reason in problems]
    return summary
