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
    # the credentials of the S3 test's local server, given to the workers as a user's cluster would get its own
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": credentials})
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


def test_ray_degrade_gives_the_local_pairs(tmp_path, local_ray, capsys):
    src = tmp_path / "hr"
    src.mkdir()
    for i in range(5):
        Image.fromarray(gradient_image(64, 64, seed=i)).save(src / f"h{i}.png")
    (src / "bad.png").write_text("no")
    common = ["degrade", str(src), "--scale", "4", "--preset", "realesrgan", "--seed", "7", "-q"]
    assert main([*common, "-o", str(tmp_path / "local")]) == 1
    assert main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2", "--ray-batch-size", "2"]) == 1
    assert "bad.png" in capsys.readouterr().err
    local = (tmp_path / "local" / "degradations.jsonl").read_text().splitlines()
    remote = (tmp_path / "ray" / "degradations.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in remote] == [json.loads(x) for x in local] and len(local) == 5  # same prompts, parameters
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "local" / "LR" / f"h{i}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "ray" / "LR" / f"h{i}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


def test_ray_batch_between_s3_folders(tmp_path, local_ray, monkeypatch, capsys):
    from remote_helpers import get, png_bytes, put, s3_server

    with s3_server() as (fs, query):
        monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
        for i in range(3):
            put(fs, f"photos/rin/p{i}.png", png_bytes(i))
        model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
        common = ["upscale", f"s3://photos/rin?{query}", "-q", "--model", model, "--device", "cpu", "--dtype", "fp32",
                  "-o", f"s3://photos/rout?{query}", "--engine", "ray", "--workers", "2"]
        assert main(common) == 0
        assert "written 3" in capsys.readouterr().out
        assert all(get(fs, f"photos/rout/p{i}_out.png")[:8] == b"\x89PNG\r\n\x1a\n" for i in range(3))
        assert len(get(fs, f"photos/rout/{MANIFEST_NAME}").decode().splitlines()) == 3
        assert main(common) == 0
        assert "written 0, skipped 3" in capsys.readouterr().out

