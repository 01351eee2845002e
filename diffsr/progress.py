"""One progress callback for every consumer: CLI bars, the server's event stream and batch runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units of `stage` ("tiles", "steps", "files", ...) are finished."""

    stage: str
    done: int
    total: int
    item: str | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[Progress], None]
OptionalCallback = Optional[ProgressCallback]


def report(callback: OptionalCallback, stage: str, done: int, total: int, item: str | None = None) -> None:
    if callback is not None:
        callback(Progress(stage, done, total, item))
