"""`diffsr upscale` and `diffsr models` end to end: inputs, naming, skipping, bad files, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsr.cli.main import main
from diffsr.io import read_image, read_settings
from tiny_models import compact_state, gradient_image, save_pth

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_pth(tmp_path_factory.mktemp("m") / "tiny.pth", compact_state()))


def _photo(path: Path, size=(20, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient_image(size[1], size[0])).convert(mode).save(path)
    return path


def _upscale(*args: str) -> int:
    return main(["upscale", "-q", *args])


def test_folder_batch_names_outputs_and_records_settings(tmp_path, model):
    src = tmp_path / "in"
    _photo(src / "a.png")
    _photo(src / "b.jpg")
    _photo(src / "sub" / "c.png")
    out = tmp_path / "out"
    assert _upscale(str(src), "-o", str(out), "--model", model, "--device", "cpu") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_out.png", "b_out.jpg", "diffsr-manifest.jsonl"]
    assert read_image(out / "a_out.png").pixels.shape == (64, 80, 3)
    settings = read_settings(out / "a_out.png")
    assert settings["model"] == "tiny" and settings["source"] == "a.png"
    assert _upscale(str(src), "-o", str(out), "--model", model, "--recursive", "--suffix", "x2", "-s", "2") == 0
    assert read_image(out / "sub" / "c_x2.png").pixels.shape == (32, 40, 3)


def test_finished_outputs_are_skipped_and_changed_ones_redone(tmp_path, model, capsys):
    source = _photo(tmp_path / "a.png")
    out = tmp_path / "out"
    assert _upscale(str(source), "-o", str(out), "--model", model) == 0
    target = out / "a_out.png"
    first = target.stat().st_mtime_ns
    assert _upscale(str(source), "-o", str(out), "--model", model) == 0
    assert target.stat().st_mtime_ns == first and "skipped 1" in capsys.readouterr().out
    target.write_bytes(target.read_bytes()[:100])  # a damaged output is not "done"
    assert _upscale(str(source), "-o", str(out), "--model", model) == 0
    assert read_image(target).pixels.shape == (64, 80, 3)
    _photo(source, size=(24, 16))  # a changed input is redone
    assert _upscale(str(source), "-o", str(out), "--model", model) == 0
    assert read_image(target).pixels.shape == (64, 96, 3)
    assert "written 1" in capsys.readouterr().out.splitlines()[-1]


def test_foreign_files_are_kept_unless_overwrite(tmp_path, model, capsys):
    source = _photo(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_out.png").write_bytes(b"someone else's file")
    assert _upscale(str(source), "-o", str(out), "--model", model) == 0
    assert (out / "a_out.png").read_bytes() == b"someone else's file"
    assert _upscale(str(source), "-o", str(out), "--model", model, "--overwrite") == 0
    assert read_image(out / "a_out.png").pixels.shape == (64, 80, 3)


def test_bad_files_are_reported_and_the_batch_goes_on(tmp_path, model, capsys):
    src = tmp_path / "in"
    _photo(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    out = tmp_path / "out"
    code = _upscale(str(src), str(tmp_path / "missing.png"), "-o", str(out), "--model", model)
    captured = capsys.readouterr()
    assert code == 1
    assert (out / "good_out.png").is_file()
    assert "written 1" in captured.out and "failed 3" in captured.out
    for words in ("empty.png: empty file", "text.jpg: not an image", "missing.png: no such file"):
        assert words in captured.err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_glob_ext_and_alpha(tmp_path, model):
    rgba = Image.fromarray(gradient_image(16, 20)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "one.png")
    _photo(tmp_path / "two.png", mode="L")
    out = tmp_path / "out"
    assert _upscale(str(tmp_path / "*.png"), "-o", str(out), "--model", model, "--ext", "jpg") == 0
    translucent = read_image(out / "one_out.png")  # transparency cannot go into JPEG: written as PNG
    assert translucent.alpha is not None and abs(float(translucent.alpha.mean()) - 128 / 255) < 0.02
    grey = read_image(out / "two_out.jpg")
    assert grey.is_grey


def test_inputs_are_never_overwritten(tmp_path, model, capsys):
    source = _photo(tmp_path / "a.png")
    before = source.read_bytes()
    assert _upscale(str(source), "-o", str(tmp_path), "--model", model, "--suffix", "", "--overwrite") == 1
    assert source.read_bytes() == before
    assert "would overwrite an input" in capsys.readouterr().err


def test_missing_or_wrong_weights_and_bad_options(tmp_path, capsys):
    source = _photo(tmp_path / "a.png")
    assert _upscale(str(source), "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope.pth")) == 1
    assert "neither a built-in model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _upscale(str(source), "-o", str(tmp_path / "o"), "--outscale", "-3")
    assert info.value.code == 2
    assert "below the minimum" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, model, capsys):
    source = _photo(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _upscale(str(source), "-o", str(blocker / "out"), "--model", model) == 1
    assert "cannot create output folder" in capsys.readouterr().err


def test_models_lists_the_default_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "realesrgan-x4plus" in out and "installed" in out and "feedforward" in out
    assert "osediff" in out and "supir" in out


def test_weights_found_by_name_in_the_weights_folder(tmp_path, monkeypatch):
    from diffsr.hub import find_weights, weights_dir

    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    assert find_weights("osediff.pkl") == Path("osediff.pkl")  # nowhere: left for the loader to report
    weights_dir().mkdir(parents=True)
    (weights_dir() / "osediff.pkl").write_bytes(b"x")
    assert find_weights("osediff.pkl") == tmp_path / "home" / "weights" / "osediff.pkl"
    local = tmp_path / "osediff.pkl"
    local.write_bytes(b"y")
    assert find_weights(local) == local  # an existing path wins


def test_convert_refuses_methods_without_checkpoints(tmp_path, capsys):
    source = tmp_path / "model.pth"
    source.write_bytes(b"x")
    assert main(["convert", "--method", "feedforward", str(source)]) == 1
    assert "has no checkpoint to convert" in capsys.readouterr().err
    assert not source.with_suffix(".safetensors").exists()


def test_console_script_upscales_the_sample_with_the_default_model(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "diffsr.cli.main", "upscale", str(REPO / "examples" / "sample.png"), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    image = read_image(out / "sample_out.png")
    assert image.pixels.shape == (480, 640, 3)
    assert read_settings(out / "sample_out.png")["model"] == "realesrgan-x4plus"
    assert np.std(image.pixels) > 0.05


def test_a_text_file_lists_the_inputs(tmp_path, model, capsys):
    _photo(tmp_path / "pics" / "x.png")
    _photo(tmp_path / "pics" / "y.png")
    listing = tmp_path / "todo.txt"
    listing.write_text("# to upscale\npics/x.png\n\npics/y.png\npics/gone.png\n")
    out = tmp_path / "out"
    assert _upscale(str(listing), "-o", str(out), "--model", model) == 1
    assert (out / "x_out.png").is_file() and (out / "y_out.png").is_file()
    assert "todo.txt:5: pics/gone.png: no such file" in capsys.readouterr().err


def test_outputs_are_never_read_back_as_inputs(tmp_path, model, capsys):
    for case, inside in (("nested", "upscaled"), ("same", "")):  # an output folder inside the inputs, or the same folder
        photos = tmp_path / case
        _photo(photos / "a.png")
        out = photos / inside
        for _ in range(2):
            assert _upscale(str(photos), "--recursive", "-o", str(out), "--model", model) == 0
        assert "written 0, skipped 1 " in capsys.readouterr().out.splitlines()[-1]
        assert sorted(p.name for p in out.iterdir() if p.name.endswith("_out.png")) == ["a_out.png"]


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    source = _photo(tmp_path / "a.png")
    assert _upscale(str(source), "-o", str(tmp_path / "o"), "--model", model, "--engine", "ray") == 1
    assert "pip install 'diffsr[ray]'" in capsys.readouterr().err
    assert main(["degrade", str(source), "-o", str(tmp_path / "p"), "--engine", "ray", "-q"]) == 2
    assert "pip install 'diffsr[ray]'" in capsys.readouterr().err
