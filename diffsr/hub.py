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


def weights_dir() -> Path:
    """Where users may keep the method checkpoints they download (`diffsr models` lists what is there)."""
    return cache_dir() / "weights"


def find_weights(value: str | Path) -> Path:
    """A weights argument: the path as given when it exists, else that name inside weights_dir().

    So `--weights osediff.pkl` works from any folder once the file sits in ~/.cache/diffsr/weights;
    a name found nowhere is returned unchanged for the loader to report as missing."""
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return path
    stored = weights_dir() / path
    return stored if stored.exists() else path
