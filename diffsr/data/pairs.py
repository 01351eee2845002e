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
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from diffsr.batch import InputFile, collect_inputs
from diffsr.degrade.pipeline import Degrader, sample_seed
from diffsr.io.atomic import atomic_write_bytes
from diffsr.io.image import (
    DEFAULT_MAX_PIXELS,
    ImageData,
    ImageError,
    decode_image,
    read_file,
    write_image,
)
from diffsr.manifest import Manifest, Record, content_hash, settings_digest
from diffsr.progress import OptionalCallback, report

RECORDS_NAME = "degradations.jsonl"
CONFIG_NAME = "degradation.json"


@dataclass
class PairSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Pairs finished by an earlier run of the same settings on unchanged inputs."""
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
    sha256: str
    size: int


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


@dataclass(frozen=True)
class PairOutcome:
    item: InputFile
    state: str
    """"written", "skipped" (finished by an earlier run) or "failed"."""
    record: Record | None = None
    reason: str | None = None
    note: str | None = None


class PairWorker:
    """Degrades inputs into pairs, batching images of one size; the same for the local and Ray engines.

    It reads the manifest's records but never writes the manifest: it yields outcomes, and the
    caller records them.
    """

    def __init__(self, out_dir: Path, degrader: Degrader, seed: int, crop: int | None, batch_size: int,
                 max_pixels: int | None, finished: dict[str, Record]):
        self.out_dir, self.degrader, self.seed, self.crop = out_dir, degrader, seed, crop
        self.batch_size, self.max_pixels, self.finished = batch_size, max_pixels, finished
        self.digest = settings_digest(pair_settings(degrader, seed, crop))

    def __call__(self, items: list[InputFile]) -> Iterator[PairOutcome]:
        pending: list[_Pending] = []
        for item in items:
            name = item.relative.with_suffix(".png")
            try:
                data = read_file(item.path)
                sha = content_hash(data)
                if _finished(self.finished.get(str(item.path.resolve())), sha, self.digest, self.out_dir):
                    yield PairOutcome(item, "skipped")
                    continue
                image = decode_image(data, name=str(item.path), max_pixels=self.max_pixels)
                pixels = np.repeat(image.pixels, 3, axis=2) if image.is_grey else image.pixels
                hr = _prepare(pixels, self.degrader.scale, self.crop, item.path)
            except ImageError as exc:
                yield PairOutcome(item, "failed", reason=str(exc))
                continue
            pending.append(_Pending(item, name, hr, image, sample_seed(self.seed, name.as_posix()), sha, len(data)))
            if len(pending) >= self.batch_size:
                yield from self._flush(pending)
        yield from self._flush(pending)

    def _flush(self, pending: list[_Pending]) -> Iterator[PairOutcome]:
        by_shape: dict[tuple, list[_Pending]] = {}
        for p in pending:
            by_shape.setdefault(p.hr.shape, []).append(p)
        pending.clear()
        for group in by_shape.values():
            hr = torch.from_numpy(np.stack([p.hr.transpose(2, 0, 1) for p in group]).astype(np.float32))
            result = self.degrader(hr, [p.seed for p in group])
            for index, p in enumerate(group):
                note = f"{p.item.path}: transparency dropped (degradations are RGB)" if p.image.alpha is not None else None
                try:
                    _write_pair(p, result.lr[index], self.out_dir, self.degrader, self.seed)
                except OSError as exc:
                    yield PairOutcome(p.item, "failed", reason=f"{p.item.path}: cannot write its pair ({exc.strerror or exc}); check the output folder")
                    continue
                entry = {
                    "name": p.name.as_posix(),
                    "lr": f"LR/{p.name.as_posix()}",
                    "hr": f"HR/{p.name.as_posix()}",
                    "source": str(p.item.path),
                    "prompt": result.prompts[index],
                    "record": result.records[index].to_dict(),
                }
                lr_size = (self.out_dir / entry["lr"]).stat().st_size
                record = Record(str(p.item.path.resolve()), p.size, p.sha256, self.digest, entry["lr"], "done",
                                output_size=lr_size, extra=entry)
                yield PairOutcome(p.item, "written", record, note=note)


def pair_settings(degrader: Degrader, seed: int, crop: int | None) -> dict:
    """What decides a pair set's pixels; its digest tells an earlier run's pairs apart."""
    return {"config": degrader.config.to_dict(), "bins": degrader.bins.to_dict(), "scale": degrader.scale, "seed": seed, "crop": crop}


PairRunner = Callable[[list[InputFile], dict[str, Record]], Iterable[PairOutcome]]


def make_pairs(
    inputs: list[InputFile],
    out_dir: str | Path,
    degrader: Degrader,
    seed: int = 0,
    crop: int | None = None,
    batch_size: int = 16,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_progress: OptionalCallback = None,
    overwrite: bool = False,
    runner: PairRunner | None = None,
) -> PairSummary:
    """Degrade each input once with its own seed and write the pair set; bad files are reported, not fatal.

    Resumable: each finished pair is recorded in the output folder's manifest (with its prompt and
    parameters), so a rerun after a kill skips finished pairs of unchanged inputs and redoes the rest;
    `overwrite` starts afresh. The JSONL of all pairs is rebuilt from the manifest at the end.
    `runner` runs the PairWorker elsewhere (the Ray engine); by default it runs here.
    """
    if crop is not None and crop % degrader.scale:
        raise ValueError(f"--crop {crop} is not a multiple of the scale {degrader.scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PairSummary()
    settings = pair_settings(degrader, seed, crop)
    manifest = Manifest.open(out_dir, fresh=overwrite)
    done = 0
    report(on_progress, "files", 0, len(inputs))

    names: dict[Path, Path] = {}
    todo = []
    for item in inputs:  # names are decided by paths alone, so clashes are found before any work
        name = item.relative.with_suffix(".png")
        if name in names:
            summary.failed.append(f"{item.path}: its output name {name} is also that of {names[name]}; rename one of them")
            done += 1
            report(on_progress, "files", done, len(inputs), str(item.path))
            continue
        names[name] = item.path
        todo.append(item)

    if runner is None:
        worker = PairWorker(out_dir, degrader, seed, crop, batch_size, max_pixels, manifest.records)
        outcomes: Iterable[PairOutcome] = worker(todo)
    else:
        outcomes = runner(todo, manifest.records)
    for outcome in outcomes:
        if outcome.record is not None:
            manifest.add(outcome.record)
        name = outcome.item.relative.with_suffix(".png").as_posix()
        if outcome.state == "written":
            summary.written.append(name)
        elif outcome.state == "skipped":
            summary.skipped.append(name)
        else:
            summary.failed.append(outcome.reason)
        if outcome.note:
            summary.notes.append(outcome.note)
        done += 1
        report(on_progress, "files", done, len(inputs), str(outcome.item.path))

    digest = settings_digest(settings)
    wanted = {str(item.path.resolve()) for item in inputs}
    entries = sorted(
        (r.extra for key, r in manifest.records.items() if key in wanted and r.state == "done" and r.settings == digest and r.extra),
        key=lambda e: e["name"],
    )
    atomic_write_bytes(out_dir / RECORDS_NAME, "".join(json.dumps(e) + "\n" for e in entries).encode())
    atomic_write_bytes(out_dir / CONFIG_NAME, json.dumps(settings, indent=1).encode())
    return summary


def _finished(record: Record | None, sha256: str, digest: str, out_dir: Path) -> bool:
    """A pair recorded as done for these bytes and settings, with both of its files still complete."""
    if not record or record.state != "done" or record.sha256 != sha256 or record.settings != digest or not record.extra:
        return False
    lr, hr = out_dir / record.extra["lr"], out_dir / record.extra["hr"]
    return lr.is_file() and lr.stat().st_size == record.output_size and hr.is_file()


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
