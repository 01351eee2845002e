"""Bounded load test against a real `diffsr serve` on localhost (the same code as benchmarks/bench_server.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'diffsr[server]'")
pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'diffsr[server]'")
if not Path("/proc/self/status").exists():
    pytest.skip("reads the server's memory from /proc (Linux only)", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_server", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "jobs, max_queue",
    [
        (16, 2),  # about 15 s here: CI runs this one
        pytest.param(50, 4, marks=pytest.mark.slow),  # the figures, about 26 s here
    ],
)
def test_jobs_from_eight_clients_against_a_small_queue(jobs, max_queue):
    figures = load_bench().run_load(jobs=jobs, clients=8, max_queue=max_queue, workers=1)
    assert figures["unexpected"] == [], "every answer to a submission is 202 or 503"
    assert figures["accepted"] + figures["rejected"] == jobs
    assert figures["rejected"] >= 1, "eight clients must overflow one worker and its queue"
    assert figures["rejection_statuses"] == [503] and figures["rejections_without_retry_after"] == 0
    assert figures["completed"] == figures["accepted"] and figures["wrong_or_failed"] == []
    assert figures["duplicate_ids"] == 0 and figures["duplicate_results"] == 0
    assert figures["jobs_left_on_server"] == 0
    grown = figures["rss_after_mib"] - figures["rss_baseline_mib"]
    assert grown < 32, f"the server kept {grown:.0f} MiB after every job was deleted"
