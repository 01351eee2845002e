"""Running a method over many files: input collection, output naming, per-file errors, a summary.

A bad file never stops the batch: it is reported with its reason and the rest go on. Outputs are
written atomically (a temporary file beside the final name, then a rename), an input is never
overwritten, and the output folder's manifest (diffsr.manifest) lets a rerun resume where a killed
run stopped. The per-file work (FileWorker) is the same for the local loop and the Ray engine.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from diffsr.io.image import (
    ALPHA_FORMATS,
    FORMAT_BY_SUFFIX,
    READABLE_SUFFIXES,
    SUFFIX_BY_FORMAT,
    ImageData,
    ImageError,
    decode_image,
    encode_image,
    output_format,
    read_file,
    read_settings,
)
from diffsr.io.storage import LocalOutput, RemoteFile, RemoteOutput, StorageError, is_uri, list_remote, open_output
from diffsr.manifest import Manifest, Record, content_hash, settings_digest
from diffsr.progress import OptionalCallback, report

GLOB_CHARS = frozenset("*?[")
LIST_SUFFIXES = frozenset({".txt", ".lst"})


@dataclass(frozen=True)
class InputFile:
    path: Path
    """The local file; for a remote one, its path below the folder it was found in."""
    relative: Path
    """Path below the folder it was found in (keeps sub-folders apart in the output)."""
    remote: RemoteFile | None = None
    """Set for a file on a remote filesystem (see diffsr.io.storage)."""

    @property
    def label(self) -> str:
        """How messages and summaries name it: the path, or the URI without its query."""
        return self.remote.label if self.remote else str(self.path)

    def key(self) -> str:
        """Its identity in the manifest: the resolved path, or the URI without its query."""
        return self.remote.label if self.remote else str(self.path.resolve())

    def read(self) -> bytes:
        if self.remote is None:
            return read_file(self.path)
        try:
            return self.remote.read()
        except StorageError as exc:
            raise ImageError(str(exc)) from None

    def size(self) -> int:
        """Bytes (-1 if it cannot be had)."""
        try:
            size = self.remote.size() if self.remote else self.path.stat().st_size
        except OSError:
            return -1
        return -1 if size is None else size


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


def collect_inputs(
    inputs: list[str], recursive: bool = False, exclude: Callable[[str], bool] | None = None
) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Files, folders (their images; sub-folders with `recursive`), glob patterns and .txt/.lst lists of
    paths, local or remote URIs, in a stable order, each file once, leaving out those whose key
    (`InputFile.key`: resolved path or URI) `exclude` accepts."""
    found: list[InputFile] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(item: InputFile) -> None:
        key = item.key()
        if exclude is not None and exclude(key):
            return
        if key not in seen:
            seen.add(key)
            found.append(item)

    def add_remote(uri: str, where: str, keep_folders: bool) -> None:
        try:
            files = list_remote(uri, recursive, _is_image_name)
        except StorageError as exc:
            problems.append((uri, str(exc)))
            return
        if not files:
            problems.append((uri, f"{where}: no such file or folder" if files is None else f"{where}: no images there"))
        for remote in files or ():
            relative = Path(remote.relative) if keep_folders else Path(PurePosixPath(remote.relative).name)
            add(InputFile(Path(remote.relative), relative, remote))

    for text in inputs:
        if is_uri(text):
            add_remote(text, text, keep_folders=True)
            continue
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            images = sorted(p for p in path.glob(pattern) if _is_image_name(p) and p.is_file())
            if not images:
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                problems.append((text, f"{text}: folder has no images{hint}"))
            for image in images:
                add(InputFile(image, image.relative_to(path)))
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            listed, remote, missing = _read_list(path)
            problems += missing
            for entry in listed:
                add(InputFile(entry, Path(entry.name)))
            for uri, where in remote:
                add_remote(uri, where, keep_folders=False)
        elif path.exists():
            add(InputFile(path, Path(path.name)))
        elif GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append((text, f"{text}: pattern matches no files"))
            for match in matches:
                add(InputFile(match, Path(match.name)))
        else:
            problems.append((text, f"{text}: no such file or folder"))
    return found, problems


def own_outputs(output: LocalOutput | RemoteOutput) -> Callable[[str], bool]:
    """Tells the files an earlier run recorded as outputs in `output`, so they are never read back as inputs."""
    records = Manifest.read(output.manifest_folder()).values()
    outputs = {output.identity(PurePosixPath(r.output)) for r in records if r.output}
    return outputs.__contains__


def _read_list(list_file: Path) -> tuple[list[Path], list[tuple[str, str]], list[tuple[str, str]]]:
    """Paths named one per line in a text file (blank lines and # comments skipped), relative to it,
    and the remote URIs it names (with the line they are on)."""
    paths, remote, problems = [], [], []
    for number, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if is_uri(entry):
            remote.append((entry, f"{list_file}:{number}: {entry}"))
            continue
        path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
        if path.is_file():
            paths.append(path)
        else:
            problems.append((entry, f"{list_file}:{number}: {entry}: no such file"))
    return paths, remote, problems


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in READABLE_SUFFIXES and not path.name.startswith(".")


def output_path(
    item: InputFile, out_dir: Path, source_format: str | None, has_alpha: bool, ext: str, suffix: str
) -> tuple[Path, str | None]:
    """Where an input's output goes, `{name}_{suffix}.{ext}` (below `out_dir`; `Path()` gives the path
    relative to the output folder), and a note if the format had to change."""
    note = None
    if ext == "auto":
        target = SUFFIX_BY_FORMAT.get(source_format or "", "png")
    else:
        target = ext.lower().lstrip(".")
    fmt = FORMAT_BY_SUFFIX.get(f".{target}")
    if fmt is None:
        raise ImageError(f"--ext {ext}: cannot write that format; use auto, png, jpg, webp, tif or bmp")
    if has_alpha and fmt not in ALPHA_FORMATS:
        note = f"{item.label}: has transparency, which {fmt} cannot store: written as PNG"
        target = "png"
    stem = f"{item.relative.stem}_{suffix}" if suffix else item.relative.stem
    return out_dir / item.relative.parent / f"{stem}.{target}", note


Process = Callable[[ImageData], ImageData]


@dataclass(frozen=True)
class BatchConfig:
    """Everything about a batch that decides where and how outputs are written (picklable for workers)."""

    out_dir: Path | str
    """A local folder or a remote folder URI (diffsr.io.storage)."""
    settings: dict[str, Any]
    """The requested method and options; their digest decides whether an earlier output is still valid."""
    ext: str = "auto"
    suffix: str = "out"
    overwrite: bool = False
    max_pixels: int | None = None
    quality: int = 95

    @property
    def digest(self) -> str:
        return settings_digest({**self.settings, "ext": self.ext, "suffix": self.suffix, "quality": self.quality})

    def output(self) -> LocalOutput | RemoteOutput:
        return open_output(self.out_dir)


@dataclass(frozen=True)
class Outcome:
    """What became of one input: written, skipped (done before, or a file that is not ours) or failed."""

    item: InputFile
    state: str
    record: Record | None = None
    target: Path | str | None = None
    """The output: a local path, or a remote URI without its query."""
    reason: str | None = None
    notes: tuple[str, ...] = ()


class FileWorker:
    """The work on one file, the same for every engine: read, skip if done, decode, process, write.

    It holds no shared state: the manifest's records come in, outcomes go out, and the caller
    (the local loop or the Ray driver) records them. `claim` lets the caller refuse an output that
    would replace an input or another input's output before any pixel is computed.
    """

    def __init__(
        self,
        config: BatchConfig,
        finished: dict[str, Record],
        claim: Callable[[InputFile, Path], None] | None = None,
        details: dict[str, Any] | None = None,
    ):
        self.config, self.finished, self.claim = config, finished, claim
        self.output = config.output()
        self.details = details or {}
        """What the loaded pipeline resolved (dtype, architecture): written to metadata, not digested."""
        self.digest = config.digest

    def __call__(self, item: InputFile, process: Process) -> Outcome:
        try:
            return self._run(item, process)
        except (ImageError, ValueError, MemoryError) as exc:
            return self._failed(item, f"{item.label}: {exc}" if isinstance(exc, MemoryError) else str(exc))
        except OSError as exc:
            return self._failed(item, f"{item.label}: cannot write output ({exc.strerror or exc})")

    def _run(self, item: InputFile, process: Process) -> Outcome:
        config, output = self.config, self.output
        data = item.read()
        key, sha = item.key(), content_hash(data)
        done = self.finished.get(key)
        if (done and done.state == "done" and done.sha256 == sha and done.settings == self.digest and done.output
                and output.size(done.output) == done.output_size):
            return Outcome(item, "skipped", target=output.locate(PurePosixPath(done.output)))
        image = decode_image(data, name=item.label, max_pixels=config.max_pixels)
        relative, note = output_path(item, Path(), image.format, image.alpha is not None, config.ext, config.suffix)
        relative = PurePosixPath(relative.as_posix())
        target = output.locate(relative)
        if self.claim:
            self.claim(item, output.identity(relative))
        existing = output.size(relative)
        if existing is not None and not config.overwrite:
            made = _recorded_source(output, relative)
            if made == (sha, self.digest):  # finished just before a kill could record it
                record = Record(key, len(data), sha, self.digest, str(relative), "done", output_size=existing)
                return Outcome(item, "skipped", record, target)
            if made is None and key not in self.finished:
                return Outcome(item, "skipped", target=target)  # not diffsr's output of this batch: left alone
        notes = [note] if note else []
        if image.frame_count > 1:
            notes.append(f"{item.label}: animated ({image.frame_count} frames): only the first frame was upscaled")
        result = process(image)
        provenance = {"source": item.path.name, "source_sha256": sha, "settings_digest": self.digest}
        payload = encode_image(result, output_format(Path(relative.name)), {**config.settings, **self.details, **provenance},
                               config.quality)
        output.write(relative, payload)
        record = Record(key, len(data), sha, self.digest, str(relative), "done", output_size=len(payload))
        return Outcome(item, "written", record, target, notes=tuple(notes))

    def _failed(self, item: InputFile, reason: str) -> Outcome:
        return failure(item, reason, self.digest)


def failure(item: InputFile, reason: str, digest: str) -> Outcome:
    """A failed outcome, recorded so the manifest says why (a rerun retries it)."""
    return Outcome(item, "failed", Record(item.key(), item.size(), "", digest, None, "failed", reason), reason=reason)


class Recorder:
    """The driver side of a batch: the manifest, the summary and progress, fed with outcomes."""

    def __init__(self, config: BatchConfig, total: int, on_progress: OptionalCallback = None):
        self.output = config.output()
        self.manifest = Manifest.open(self.output.manifest_folder(), fresh=config.overwrite)
        self.summary = Summary()
        self.total, self.count, self.on_progress = total, 0, on_progress
        report(on_progress, "files", 0, total)

    def __call__(self, outcome: Outcome) -> None:
        if outcome.record is not None:
            self.manifest.add(outcome.record)
        if outcome.state == "written":
            self.summary.written.append(outcome.target)
        elif outcome.state == "skipped":
            self.summary.skipped.append(outcome.target)
        else:
            self.summary.failed.append((outcome.item.label, outcome.reason))
        self.summary.notes.extend(outcome.notes)
        self.count += 1
        report(self.on_progress, "files", self.count, self.total, outcome.item.label)

    def close(self) -> None:
        """Publish the manifest beside remote outputs (local ones already have it)."""
        self.output.publish_manifest()


class OutputClaims:
    """Refuses an output that would replace an input, or that another input already produces."""

    def __init__(self, items: list[InputFile]):
        self.inputs = {item.key() for item in items}
        self.planned: dict[str, str] = {}

    def __call__(self, item: InputFile, target: str) -> None:
        """`target`: the output's identity (LocalOutput/RemoteOutput.identity), comparable with input keys."""
        if target in self.inputs:
            raise ImageError(f"{item.label}: output {target} would overwrite an input; choose another -o or --suffix")
        if target in self.planned and self.planned[target] != item.label:
            raise ImageError(
                f"{item.label}: output {target} is also the output of {self.planned[target]}; use --ext auto or another --suffix"
            )
        self.planned[target] = item.label


def run_batch(
    items: list[InputFile],
    process: Process,
    config: BatchConfig,
    on_progress: OptionalCallback = None,
    details: dict[str, Any] | None = None,
) -> Summary:
    """Process every input in this process, resuming from the output folder's manifest unless overwrite."""
    recorder = Recorder(config, len(items), on_progress)
    worker = FileWorker(config, recorder.manifest.records, OutputClaims(items), details)
    try:
        for item in items:
            recorder(worker(item, process))
    finally:
        recorder.close()
    return recorder.summary


def _recorded_source(output: LocalOutput | RemoteOutput, relative: PurePosixPath) -> tuple[str, str] | None:
    """(input hash, settings digest) that diffsr recorded in an output file, or None for other files."""
    try:
        settings = read_settings(output.openable(relative))
    except Exception:  # unreadable or foreign files simply carry no record
        return None
    if not settings or "settings_digest" not in settings:
        return None
    return settings.get("source_sha256", ""), settings["settings_digest"]
