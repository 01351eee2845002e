"""Running a method over many files: input collection, output naming, per-file errors, a summary.

A bad file never stops the batch: it is reported with its reason and the rest go on. Outputs are
written atomically next to nothing but their final name, and an input is never overwritten.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffsr.io.image import (
    ALPHA_FORMATS,
    FORMAT_BY_SUFFIX,
    READABLE_SUFFIXES,
    SUFFIX_BY_FORMAT,
    ImageData,
    ImageError,
    decode_image,
    read_file,
    read_settings,
    write_image,
)
from diffsr.manifest import Manifest, Record, content_hash, settings_digest
from diffsr.progress import OptionalCallback, report

GLOB_CHARS = frozenset("*?[")
LIST_SUFFIXES = frozenset({".txt", ".lst"})


@dataclass(frozen=True)
class InputFile:
    path: Path
    relative: Path
    """Path below the folder it was found in (keeps sub-folders apart in the output)."""


@dataclass
class Summary:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        out = [
            f"written {len(self.written)}, skipped {len(self.skipped)} (done before, or existing files; "
            f"--overwrite redoes them), failed {len(self.failed)}"
        ]
        out += [f"  note: {note}" for note in self.notes]
        out += [f"  failed: {reason}" for _, reason in self.failed]
        return out


def collect_inputs(inputs: list[str], recursive: bool = False) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Files, folders (their images; sub-folders with `recursive`), glob patterns and .txt/.lst lists of
    paths, in a stable order, each file once."""
    found: list[InputFile] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, relative: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(InputFile(path, relative))

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            images = sorted(p for p in path.glob(pattern) if _is_image_name(p) and p.is_file())
            if not images:
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                problems.append((text, f"{text}: folder has no images{hint}"))
            for image in images:
                add(image, image.relative_to(path))
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            listed, missing = _read_list(path)
            problems += missing
            for entry in listed:
                add(entry, Path(entry.name))
        elif path.exists():
            add(path, Path(path.name))
        elif GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append((text, f"{text}: pattern matches no files"))
            for match in matches:
                add(match, Path(match.name))
        else:
            problems.append((text, f"{text}: no such file or folder"))
    return found, problems


def _read_list(list_file: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Paths named one per line in a text file (blank lines and # comments skipped), relative to it."""
    paths, problems = [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        if path.is_file():
            paths.append(path)
        else:
            problems.append((entry, f"{list_file}:{number}: {entry}: no such file"))
    return paths, problems


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in READABLE_SUFFIXES and not path.name.startswith(".")


def output_path(item: InputFile, out_dir: Path, image: ImageData, ext: str, suffix: str) -> tuple[Path, str | None]:
    """Where an input's output goes, `{name}_{suffix}.{ext}`, and a note if the format had to change."""
    note = None
    if ext == "auto":
        target = SUFFIX_BY_FORMAT.get(image.format or "", "png")
    else:
        target = ext.lower().lstrip(".")
    fmt = FORMAT_BY_SUFFIX.get(f".{target}")
    if fmt is None:
        raise ImageError(f"--ext {ext}: cannot write that format; use auto, png, jpg, webp, tif or bmp")
    if image.alpha is not None and fmt not in ALPHA_FORMATS:
        note = f"{item.path}: has transparency, which {fmt} cannot store: written as PNG"
        target = "png"
    stem = f"{item.relative.stem}_{suffix}" if suffix else item.relative.stem
    return out_dir / item.relative.parent / f"{stem}.{target}", note


Process = Callable[[ImageData], ImageData]


def run_batch(
    items: list[InputFile],
    process: Process,
    out_dir: Path,
    settings: dict[str, Any],
    ext: str = "auto",
    suffix: str = "out",
    overwrite: bool = False,
    max_pixels: int | None = None,
    quality: int = 95,
    on_progress: OptionalCallback = None,
) -> Summary:
    """Process every input, resuming from the output folder's manifest unless `overwrite`."""
    job = _Job(out_dir, settings, ext, suffix, overwrite, max_pixels, quality, {item.path.resolve() for item in items})
    summary = Summary()
    report(on_progress, "files", 0, len(items))
    for index, item in enumerate(items):
        try:
            job.run_one(item, process, summary)
        except (ImageError, ValueError, MemoryError) as exc:
            job.fail(item, f"{item.path}: {exc}" if isinstance(exc, MemoryError) else str(exc), summary)
        except OSError as exc:
            job.fail(item, f"{item.path}: cannot write output ({exc.strerror or exc})", summary)
        report(on_progress, "files", index + 1, len(items), str(item.path))
    return summary


class _Job:
    """The state of one batch: its manifest, the outputs planned so far, the settings digest."""

    def __init__(self, out_dir, settings, ext, suffix, overwrite, max_pixels, quality, inputs):
        self.out_dir, self.settings, self.ext, self.suffix = out_dir, settings, ext, suffix
        self.overwrite, self.max_pixels, self.quality, self.inputs = overwrite, max_pixels, quality, inputs
        self.digest = settings_digest({**settings, "ext": ext, "suffix": suffix, "quality": quality})
        self.manifest = Manifest.open(out_dir, fresh=overwrite)
        self.planned: dict[Path, Path] = {}

    def run_one(self, item: InputFile, process: Process, summary: Summary) -> None:
        data = read_file(item.path)
        key, sha = str(item.path.resolve()), content_hash(data)
        done = self.manifest.finished(key, sha, self.digest)
        if done:
            summary.skipped.append(self.out_dir / done.output)
            return
        image = decode_image(data, name=str(item.path), max_pixels=self.max_pixels)
        target, note = output_path(item, self.out_dir, image, self.ext, self.suffix)
        self._claim(item, target)
        relative = str(target.relative_to(self.out_dir))
        if target.exists() and not self.overwrite:
            made = _recorded_source(target)
            if made == (sha, self.digest):  # finished just before a kill could record it
                self.manifest.add(Record(key, len(data), sha, self.digest, relative, "done", output_size=target.stat().st_size))
                summary.skipped.append(target)
                return
            if made is None and key not in self.manifest.records:
                summary.skipped.append(target)  # not diffsr's output of this batch: leave it alone
                return
        if note:
            summary.notes.append(note)
        if image.frame_count > 1:
            summary.notes.append(f"{item.path}: animated ({image.frame_count} frames): only the first frame was upscaled")
        result = process(image)
        target.parent.mkdir(parents=True, exist_ok=True)
        provenance = {"source": item.path.name, "source_sha256": sha, "settings_digest": self.digest}
        write_image(target, result, settings={**self.settings, **provenance}, quality=self.quality)
        self.manifest.add(Record(key, len(data), sha, self.digest, relative, "done", output_size=target.stat().st_size))
        summary.written.append(target)

    def fail(self, item: InputFile, reason: str, summary: Summary) -> None:
        summary.failed.append((str(item.path), reason))
        try:
            size = item.path.stat().st_size
        except OSError:
            size = -1
        self.manifest.add(Record(str(item.path.resolve()), size, "", self.digest, None, "failed", reason))

    def _claim(self, item: InputFile, target: Path) -> None:
        resolved = target.resolve()
        if resolved in self.inputs:
            raise ImageError(f"{item.path}: output {target} would overwrite an input; choose another -o or --suffix")
        if resolved in self.planned:
            raise ImageError(
                f"{item.path}: output {target} is also the output of {self.planned[resolved]}; use --ext auto or another --suffix"
            )
        self.planned[resolved] = item.path


def _recorded_source(path: Path) -> tuple[str, str] | None:
    """(input hash, settings digest) that diffsr recorded in an output file, or None for other files."""
    try:
        settings = read_settings(path)
    except Exception:  # unreadable or foreign files simply carry no record
        return None
    if not settings or "settings_digest" not in settings:
        return None
    return settings.get("source_sha256", ""), settings["settings_digest"]
