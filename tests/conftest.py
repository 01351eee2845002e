"""Shared test fixtures: the optional ../shared folder (benchmarks, fixtures) and a private cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFSR_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is absent (as on a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: it exists only beside the development checkout and in CI")
    return path


def fixture_folder(method: str) -> Path:
    """A method's official-output fixture folder: $DIFFSR_FIXTURE_<METHOD>, else ../shared/fixtures/<method>."""
    return Path(os.environ.get(f"DIFFSR_FIXTURE_{method.upper()}") or SHARED / "fixtures" / method)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: their many tiny ops are per-operation overhead,
    which thread hand-offs only add to (several times slower on a busy 2-core CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep converted weights out of the user's cache, but share them across the session's tests."""
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path_factory.getbasetemp() / "diffsr_home"))
