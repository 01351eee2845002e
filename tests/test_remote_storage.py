"""Batches whose inputs and outputs live on a pyarrow filesystem: an S3 server (moto) and file:// URIs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffsr.cli.main import main
from diffsr.io.image import read_settings
from diffsr.io.storage import child, is_uri, label
from diffsr.manifest import MANIFEST_NAME
from remote_helpers import get, pafs, png_bytes, put, s3  # noqa: F401  (s3 is a fixture)
from tiny_models import compact_state, save_pth


def test_uri_helpers():
    assert is_uri("s3://bucket/x") and is_uri("file:///tmp/a") and not is_uri("C:\\photos") and not is_uri("in/a.png")
    assert child("s3://b/in?region=x", "sub/a.png") == "s3://b/in/sub/a.png?region=x"
    assert label("s3://b/in/a.png?endpoint_override=h:1") == "s3://b/in/a.png"


def test_s3_batch_writes_resumes_and_reports_bad_files(s3, tmp_path, monkeypatch, capsys):
    fs, query = s3
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    for i in range(3):
        put(fs, f"photos/in/p{i}.png", png_bytes(i))
    put(fs, "photos/in/sub/q.png", png_bytes(7))
    put(fs, "photos/in/broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    put(fs, "photos/in/notes.txt", b"not an image")
    model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
    common = ["upscale", f"s3://photos/in?{query}", "--recursive", "-q", "--model", model, "--device", "cpu",
              "--dtype", "fp32", "-o", f"s3://photos/out?{query}"]

    assert main(common) == 1
    captured = capsys.readouterr()
    assert "written 4" in captured.out and "failed 1" in captured.out
    assert "s3://photos/in/broken.png" in captured.err and "endpoint_override" not in captured.err

    # the outputs are in the bucket, complete, with the input's hash in their metadata, as a local run makes them
    assert main(["upscale", str(save_local(fs, tmp_path / "local-in")), "-q", "--model", model, "--device", "cpu",
                 "--dtype", "fp32", "-o", str(tmp_path / "local-out")]) == 0
    capsys.readouterr()
    for i in range(3):
        remote = get(fs, f"photos/out/p{i}_out.png")
        local = (tmp_path / "local-out" / f"p{i}_out.png").read_bytes()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(remote))), np.asarray(Image.open(io.BytesIO(local))))
        assert read_settings(io.BytesIO(remote))["source"] == f"p{i}.png"
    assert fs.get_file_info("photos/out/sub/q_out.png").type == pafs.FileType.File
    published = [json.loads(line) for line in get(fs, f"photos/out/{MANIFEST_NAME}").decode().splitlines()]
    assert {r["input"] for r in published if r["state"] == "done"} == {f"s3://photos/in/p{i}.png" for i in range(3)} | {
        "s3://photos/in/sub/q.png"}

    # a rerun skips what is done (from the local state folder) and retries only the bad file
    assert main(common) == 1
    assert "written 0, skipped 4" in capsys.readouterr().out

    # another machine (no local state) resumes from the published manifest; a changed input is redone
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "elsewhere"))
    put(fs, "photos/in/p1.png", png_bytes(11))
    assert main(common) == 1
    assert "written 1, skipped 3" in capsys.readouterr().out

    # with neither manifest, outputs are still recognised by the hash they carry
    fs.delete_file(f"photos/out/{MANIFEST_NAME}")
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "third"))
    assert main(common) == 1
    assert "written 0, skipped 4" in capsys.readouterr().out


def save_local(fs, folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(get(fs, f"photos/in/p{i}.png"))
    return folder


def test_listed_and_globbed_remote_inputs(s3, tmp_path, monkeypatch, capsys):
    fs, query = s3
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    for i in range(3):
        put(fs, f"photos/glob/g{i}.png", png_bytes(i))
    listing = tmp_path / "todo.txt"
    listing.write_text(f"s3://photos/glob/g0.png?{query}\ns3://photos/glob/missing.png?{query}\n")
    out = tmp_path / "out"
    model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
    common = ["-q", "--model", model, "--device", "cpu", "--dtype", "fp32", "-o", str(out)]
    assert main(["upscale", str(listing), *common]) == 1
    captured = capsys.readouterr()
    assert "written 1" in captured.out and "todo.txt:2" in captured.err and "no such file" in captured.err
    assert main(["upscale", f"s3://photos/glob/g[12].png?{query}", *common]) == 0
    assert "written 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["g0_out.png", "g1_out.png", "g2_out.png"]


def test_file_uri_output_uses_rename_and_never_leaves_parts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"p{i}.png").write_bytes(png_bytes(i))
    model = str(save_pth(tmp_path / "tiny.pth", compact_state()))
    out_uri = (tmp_path / "out").as_uri()
    common = ["upscale", str(src), "-q", "--model", model, "--device", "cpu", "--dtype", "fp32", "-o", out_uri]
    assert main(common) == 0
    assert "written 2" in capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [MANIFEST_NAME, "p0_out.png", "p1_out.png"]
    assert list((tmp_path / "home" / "batches").glob(f"*/{MANIFEST_NAME}"))
    assert main(common) == 0
    assert "written 0, skipped 2" in capsys.readouterr().out


def test_unreachable_store_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    (tmp_path / "a.png").write_bytes(png_bytes(0))
    code = main(["upscale", str(tmp_path / "a.png"), "-q", "-o", "nosuchscheme://bucket/out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "nosuchscheme://bucket/out: cannot open" in err[0]
