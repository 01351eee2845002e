"""`--engine ray` on a local Ray instance gives the local engine's outputs, failures and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffsr.cli.main import main
from diffsr.manifest import MANIFEST_NAME
from tiny_models import compact_state, gradient_image, save_pth

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'diffsr[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_batch_matches_the_local_engine(tmp_path, local_ray, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(gradient_image(48, 56, seed=i)).save(src / f"p{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
    common = ["upscale", str(src), "-q", "--model", model, "--device", "cpu", "--dtype", "fp32"]

    assert main([*common, "-o", str(tmp_path / "local")]) == 1
    local_err = capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2", "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    assert "written 6" in captured.out and "failed 1" in captured.out
    failure = [line for line in captured.err.splitlines() if "broken.png" in line]
    assert failure and failure[0] in local_err  # the same one-line reason as the local engine

    for i in range(6):
        a = np.asarray(Image.open(tmp_path / "local" / f"p{i}_out.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "ray" / f"p{i}_out.png")).astype(int)
        assert np.abs(a - b).max() <= 1  # thread counts may change the last bit of a convolution

    records = [json.loads(line) for line in (tmp_path / "ray" / MANIFEST_NAME).read_text().splitlines()]
    assert sorted(r["output"] for r in records if r["state"] == "done") == [f"p{i}_out.png" for i in range(6)]

    first = (tmp_path / "ray" / "p0_out.png").stat().st_mtime_ns
    assert main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"]) == 1
    assert "written 0, skipped 6" in capsys.readouterr().out
    assert (tmp_path / "ray" / "p0_out.png").stat().st_mtime_ns == first
