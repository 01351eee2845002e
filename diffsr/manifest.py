"""The batch manifest: what each input became, so a killed batch resumes without redoing work.

`diffsr-manifest.jsonl` in the output folder is an append-only log, one JSON record per finished
input (its path, size, SHA-256 of its bytes, the digest of the settings, the output, the state).
Each record is flushed and fsynced after its output has been renamed into place, so after a kill
at any moment every "done" record names a complete file; a torn last line is ignored. Outputs also
carry the input hash and settings digest in their own metadata, which covers the moment between
the rename and the record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "diffsr-manifest.jsonl"


@dataclass(frozen=True)
class Record:
    input: str
    size: int
    sha256: str
    settings: str
    output: str | None
    """Output path relative to the output folder (None for a failure)."""
    state: str
    """"done" or "failed"."""
    reason: str | None = None
    output_size: int = -1
    """Bytes of the output as written: a changed or truncated output is redone."""
    extra: dict | None = None
    """What else a command keeps per input (e.g. `diffsr degrade`'s prompt and drawn parameters)."""


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of the settings that decide an output's pixels."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, out_dir: Path, records: dict[str, Record]):
        self.out_dir, self.records = out_dir, records
        self.path = out_dir / MANIFEST_NAME

    @staticmethod
    def read(out_dir: Path) -> dict[str, Record]:
        """The latest record of each input in `out_dir`'s manifest (none if there is no manifest)."""
        path = out_dir / MANIFEST_NAME
        records: dict[str, Record] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = Record(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line torn by a kill
                records[record.input] = record
        return records

    @classmethod
    def open(cls, out_dir: Path, fresh: bool = False) -> Manifest:
        """Read the manifest of `out_dir` (`fresh` starts a new one) and clear temporary files a kill left."""
        if fresh:
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        records = {} if fresh else cls.read(out_dir)
        for leftover in out_dir.rglob(".*.part"):
            leftover.unlink(missing_ok=True)
        return cls(out_dir, records)

    def add(self, record: Record) -> None:
        self.records[record.input] = record
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
