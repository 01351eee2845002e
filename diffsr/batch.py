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
    read_image,
    write_image,
)
from diffsr.progress import OptionalCallback, report

GLOB_CHARS = frozenset("*?[")


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
        out = [f"written {len(self.written)}, skipped {len(self.skipped)} (output exists; --overwrite redoes them), failed {len(self.failed)}"]
        out += [f"  note: {note}" for note in self.notes]
        out += [f"  failed: {reason}" for _, reason in self.failed]
        return out


def collect_inputs(inputs: list[str], recursive: bool = False) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Files, folders (their images; sub-folders with `recursive`) and glob patterns, in a stable order."""
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
    summary = Summary()
    planned: dict[Path, Path] = {}
    inputs = {item.path.resolve() for item in items}
    report(on_progress, "files", 0, len(items))
    for index, item in enumerate(items):
        try:
            _run_one(item, process, out_dir, settings, ext, suffix, overwrite, max_pixels, quality, summary, planned, inputs)
        except (ImageError, ValueError) as exc:
            summary.failed.append((str(item.path), str(exc)))
        except MemoryError as exc:
            summary.failed.append((str(item.path), f"{item.path}: {exc}"))
        except OSError as exc:
            summary.failed.append((str(item.path), f"{item.path}: cannot write output ({exc.strerror or exc})"))
        report(on_progress, "files", index + 1, len(items), str(item.path))
    return summary


def _run_one(item, process, out_dir, settings, ext, suffix, overwrite, max_pixels, quality, summary, planned, inputs) -> None:
    image = read_image(item.path, max_pixels=max_pixels)
    target, note = output_path(item, out_dir, image, ext, suffix)
    resolved = target.resolve()
    if resolved in inputs:
        raise ImageError(f"{item.path}: output {target} would overwrite an input; choose another -o or --suffix")
    if resolved in planned:
        raise ImageError(f"{item.path}: output {target} is also the output of {planned[resolved]}; use --ext auto or another --suffix")
    planned[resolved] = item.path
    if target.exists() and not overwrite:
        summary.skipped.append(target)
        return
    if note:
        summary.notes.append(note)
    if image.frame_count > 1:
        summary.notes.append(f"{item.path}: animated ({image.frame_count} frames): only the first frame was upscaled")
    result = process(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image(target, result, settings={**settings, "source": item.path.name}, quality=quality)
    summary.written.append(target)
