"""A batch killed with SIGKILL part-way resumes: nothing lost, nothing half-written, nothing redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffsr.cli.main import main
from diffsr.manifest import MANIFEST_NAME
from tiny_models import compact_state, gradient_image, save_pth

REPO = Path(__file__).resolve().parents[1]
COUNT = 16


def _done_records(out: Path) -> list[dict]:
    path = out / MANIFEST_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in records if r["state"] == "done"]


def test_sigkill_then_resume_completes_the_batch_exactly(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(COUNT):
        Image.fromarray(gradient_image(192, 192, seed=i)).save(src / f"img{i:02d}.png")
    model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
    args = ["upscale", str(src), "-q", "--model", model, "--device", "cpu", "--dtype", "fp32"]

    reference = tmp_path / "reference"
    assert main([*args, "-o", str(reference)]) == 0

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "diffsr.cli.main", *args, "-o", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(_done_records(out)) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = {r["output"]: (out / r["output"]).stat().st_mtime_ns for r in _done_records(out)}
    assert 4 <= len(finished_before) < COUNT, "the kill should land part-way through the batch"
    for name in os.listdir(out):  # whatever carries a final name is complete
        if name.endswith(".png") and not name.startswith("."):
            assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name)))

    assert main([*args, "-o", str(out)]) == 0

    outputs = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert outputs == sorted(p.name for p in reference.iterdir() if p.suffix == ".png")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for name in outputs:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(reference / name))), name
    for name, mtime in finished_before.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    done = [r["output"] for r in _done_records(out)]
    assert sorted(set(done)) == outputs and len(done) == len(set(done)) == COUNT
