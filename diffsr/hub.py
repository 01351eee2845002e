"""Where diffsr keeps converted weights: $DIFFSR_HOME, else $XDG_CACHE_HOME/diffsr, else ~/.cache/diffsr."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("DIFFSR_HOME"):
        root = Path(os.environ["DIFFSR_HOME"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffsr"
    return root


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
