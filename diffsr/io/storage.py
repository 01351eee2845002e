"""Batch inputs and outputs on local disk or on any filesystem pyarrow understands (s3://, gs://, hdfs://, ...).

A remote folder is named by a URI, as pyarrow's `FileSystem.from_uri` reads it, query included
(`s3://bucket/photos?region=eu-west-1`, `...&endpoint_override=host:9000&scheme=http` for an
S3-compatible server); credentials come from the usual places (AWS_* variables, ~/.aws, instance
roles), never from diffsr. Writes are as atomic as the store allows: an object store publishes an
object only when its upload completes, so a killed upload leaves nothing under the final name;
other filesystems get a hidden `.part` file that is renamed into place.

A remote output folder's manifest is kept in a local state folder (object stores cannot append)
and uploaded beside the outputs when the batch ends, so a rerun on the same machine resumes from
the local copy and one on another machine from the uploaded one; outputs also carry their input's
hash in their own metadata, so an output finished after the last upload is still recognised.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from diffsr.io.atomic import atomic_write_bytes

URI_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
OBJECT_STORES = frozenset({"s3", "gcs"})
"""pyarrow filesystem types whose uploads appear whole or not at all (no rename needed)."""


class StorageError(OSError):
    """A remote folder that cannot be opened, listed, read or written."""


def is_uri(text: str | Path) -> bool:
    """True for `scheme://...` (two or more letters, so a Windows drive `C:\\` is a path)."""
    return isinstance(text, str) and bool(URI_PATTERN.match(text))


def _require_pyarrow():
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise StorageError("remote folders need pyarrow, which is not installed: pip install pyarrow") from None
    return pafs


@lru_cache(maxsize=64)
def _open(root: str) -> tuple[Any, str]:
    """(filesystem, path inside it) of a folder URI; cached, so every file of a folder shares one client."""
    pafs = _require_pyarrow()
    try:
        return pafs.FileSystem.from_uri(root)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with the store's own message
        raise StorageError(f"{label(root)}: cannot open ({exc}); check the URI and your credentials") from None


def label(uri: str) -> str:
    """A URI without its query (which may name endpoints or options), for messages and records."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def child(uri: str, relative: str | PurePosixPath) -> str:
    """The URI of `relative` below the folder `uri`, keeping the folder's query."""
    parts = urlsplit(uri)
    path = parts.path.rstrip("/") + "/" + str(PurePosixPath(relative)).lstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True)
class RemoteFile:
    """One file on a remote filesystem: the folder URI it was found in and its path below it."""

    root: str
    relative: str

    @property
    def label(self) -> str:
        return label(child(self.root, self.relative))

    def _location(self) -> tuple[Any, str]:
        fs, base = _open(self.root)
        return fs, f"{base.rstrip('/')}/{self.relative}" if base else self.relative

    def read(self) -> bytes:
        fs, path = self._location()
        try:
            with fs.open_input_file(path) as handle:
                return handle.read()
        except FileNotFoundError:
            raise StorageError(f"{self.label}: no such file") from None
        except OSError as exc:
            raise StorageError(f"{self.label}: cannot read ({exc})") from None

    def size(self) -> int | None:
        """Bytes, or None if there is no such file."""
        pafs = _require_pyarrow()
        fs, path = self._location()
        info = fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None


def list_remote(uri: str, recursive: bool, accept) -> list[RemoteFile] | None:
    """Files below a folder URI (in path order) whose relative path `accept`s; a file URI gives itself;
    a last component with * ? [ is matched against the files of its folder. None if nothing is there."""
    pafs = _require_pyarrow()
    parts = urlsplit(uri)
    if set("*?[") & set(parts.path):
        folder, pattern = parts.path.rsplit("/", 1)
        root = urlunsplit((parts.scheme, parts.netloc, folder, parts.query, ""))
        found = list_remote(root, False, accept) or []
        return [f for f in found if fnmatch.fnmatchcase(f.relative, pattern)]
    fs, path = _open(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            parent = urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/", 1)[0], parts.query, ""))
            return [RemoteFile(parent, parts.path.rsplit("/", 1)[1])]
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{label(uri)}: cannot list ({exc}); check the URI and your credentials") from None
    base = path.rstrip("/") + "/"
    files = sorted(e.path[len(base):] for e in entries if e.type == pafs.FileType.File and e.path.startswith(base))
    if not files and info.type == pafs.FileType.NotFound:
        return None
    return [RemoteFile(uri, name) for name in files if accept(PurePosixPath(name))]


class LocalOutput:
    """An output folder on this machine: outputs written through a temporary file and a rename."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def locate(self, relative: PurePosixPath) -> Path:
        return self.folder / relative

    def identity(self, relative: PurePosixPath) -> str:
        """The same string an input at this location has as its key, to refuse overwriting an input."""
        return str((self.folder / relative).resolve())

    def size(self, relative: str | PurePosixPath) -> int | None:
        path = self.folder / relative
        return path.stat().st_size if path.is_file() else None

    def openable(self, relative: PurePosixPath) -> Path:
        """What Pillow opens to read an output's metadata: the path (only the header is read)."""
        return self.folder / relative

    def write(self, relative: PurePosixPath, data: bytes) -> None:
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)

    def manifest_folder(self) -> Path:
        return self.folder

    def publish_manifest(self) -> None:
        """Nothing to do: the manifest already lives in the output folder."""


class RemoteOutput:
    """An output folder on a pyarrow filesystem (see the module docstring for atomicity and the manifest)."""

    def __init__(self, uri: str, state_root: Path | None = None):
        self.uri = uri
        self.fs, self.base = _open(uri)
        from diffsr.hub import cache_dir

        digest = hashlib.sha256(label(uri).encode()).hexdigest()[:16]
        self.state = (state_root or cache_dir() / "batches") / digest

    def _path(self, relative: str | PurePosixPath) -> str:
        return f"{self.base.rstrip('/')}/{PurePosixPath(relative)}"

    def locate(self, relative: PurePosixPath) -> str:
        return label(child(self.uri, relative))

    def identity(self, relative: PurePosixPath) -> str:
        return self.locate(relative)

    def size(self, relative: str | PurePosixPath) -> int | None:
        pafs = _require_pyarrow()
        info = self.fs.get_file_info(self._path(relative))
        return info.size if info.type == pafs.FileType.File else None

    def read(self, relative: str | PurePosixPath) -> bytes:
        with self.fs.open_input_file(self._path(relative)) as handle:
            return handle.read()

    def openable(self, relative: PurePosixPath) -> io.BytesIO:
        """What Pillow opens to read an output's metadata: its bytes, fetched."""
        return io.BytesIO(self.read(relative))

    def write(self, relative: str | PurePosixPath, data: bytes) -> None:
        target = self._path(relative)
        try:
            if self.fs.type_name in OBJECT_STORES:
                with self.fs.open_output_stream(target) as handle:
                    handle.write(data)
                return
            parent, name = target.rsplit("/", 1)
            self.fs.create_dir(parent, recursive=True)
            temporary = f"{parent}/.{name}.part"
            with self.fs.open_output_stream(temporary) as handle:
                handle.write(data)
            self.fs.move(temporary, target)
        except OSError as exc:
            raise StorageError(f"{self.locate(PurePosixPath(relative))}: cannot write ({exc})") from None

    def manifest_folder(self) -> Path:
        """The local state folder of this output URI, seeded from the uploaded manifest on first use."""
        from diffsr.manifest import MANIFEST_NAME

        local = self.state / MANIFEST_NAME
        if not local.exists():
            self.state.mkdir(parents=True, exist_ok=True)
            (self.state / "output.txt").write_text(label(self.uri) + "\n", encoding="utf-8")
            if self.size(MANIFEST_NAME) is not None:
                atomic_write_bytes(local, self.read(MANIFEST_NAME))
        return self.state

    def publish_manifest(self) -> None:
        """Upload the local manifest beside the outputs."""
        from diffsr.manifest import MANIFEST_NAME

        local = self.state / MANIFEST_NAME
        if local.is_file():
            self.write(MANIFEST_NAME, local.read_bytes())


def open_output(folder: str | Path) -> LocalOutput | RemoteOutput:
    return RemoteOutput(folder) if is_uri(folder) else LocalOutput(Path(folder))

