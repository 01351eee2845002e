"""Image I/O: formats, bit depths, modes, alpha, EXIF/ICC, metadata, bad files, atomic writes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageCms

from diffsr.io import ImageError, atomic_write_bytes, decode_image, read_image, read_settings, write_image
from diffsr.io.image import ImageData, encode_image
from tiny_models import gradient_image


def _png_bytes(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_eight_bit_round_trip_in_every_format(tmp_path, fmt, suffix):
    pixels = gradient_image(noise=1.0)
    path = tmp_path / f"in.{suffix}"
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP") else {}))
    image = read_image(path)
    assert image.format == fmt and image.bit_depth == 8 and image.pixels.shape == (40, 48, 3)
    assert image.pixels.dtype == np.float32
    out = tmp_path / f"out.{suffix}"
    write_image(out, image, settings={"model": "x"})
    again = read_image(out)
    if fmt in ("PNG", "TIFF", "BMP"):
        np.testing.assert_array_equal(again.pixels, image.pixels)
    else:
        # lossy at quality 95; WebP always subsamples chroma (4:2:0), JPEG output is 4:4:4
        assert np.abs(again.pixels - image.pixels).mean() < (5 if fmt == "WEBP" else 2) / 255


def test_sixteen_bit_colour_png_keeps_all_sixteen_bits(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    rgb16 = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), rgb16[:, :, ::-1])
    image = read_image(path)
    assert image.bit_depth == 16
    np.testing.assert_array_equal(np.rint(image.pixels * 65535).astype(np.uint16), rgb16)
    out = tmp_path / "deep_out.png"
    write_image(out, image, settings={"a": 1})
    back = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    np.testing.assert_array_equal(back, rgb16)
    assert read_settings(out) == {"a": 1}


def test_sixteen_bit_colour_tiff_with_alpha_and_icc(tmp_path):
    import tifffile

    rng = np.random.default_rng(2)
    rgba16 = rng.integers(0, 65536, (16, 12, 4), dtype=np.uint16)
    rgba16[..., 3] = 30000
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, rgba16, photometric="rgb", extrasamples=[2], extratags=[(34675, "B", len(icc), icc, True)])
    image = read_image(path)
    assert image.bit_depth == 16 and image.alpha is not None and image.icc_profile == icc
    np.testing.assert_allclose(image.alpha, 30000 / 65535, atol=1e-6)
    out = tmp_path / "deep_out.tif"
    write_image(out, image, settings={"b": 2})
    again = read_image(out)
    np.testing.assert_array_equal(np.rint(again.pixels * 65535), rgba16[..., :3])
    assert again.icc_profile == icc and read_settings(out) == {"b": 2}


def test_sixteen_bit_grey_stays_sixteen_bit_grey(tmp_path):
    grey16 = (np.arange(30 * 20, dtype=np.uint32).reshape(30, 20) * 97 % 65536).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path)
    image = read_image(path)
    assert image.is_grey and image.bit_depth == 16
    np.testing.assert_array_equal(np.rint(image.pixels[..., 0] * 65535).astype(np.uint16), grey16)
    out = tmp_path / "grey16_out.png"
    write_image(out, image)
    with Image.open(out) as im:
        assert im.mode in ("I;16", "I")
        np.testing.assert_array_equal(np.asarray(im).astype(np.uint16), grey16)


@pytest.mark.parametrize(
    "mode,channels,has_alpha",
    [("L", 1, False), ("1", 1, False), ("LA", 1, True), ("RGBA", 3, True), ("P", 3, False), ("CMYK", 3, False)],
)
def test_modes_are_mapped(tmp_path, mode, channels, has_alpha):
    base = Image.fromarray(gradient_image(channels=3))
    if mode == "LA":
        im = Image.merge("LA", [base.convert("L"), Image.new("L", base.size, 100)])
    elif mode == "RGBA":
        im = base.copy()
        im.putalpha(Image.new("L", base.size, 128))
    else:
        im = base.convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = tmp_path / f"m.{fmt.lower()}"
    im.save(path, format=fmt)
    image = read_image(path)
    assert image.pixels.shape[2] == channels
    assert (image.alpha is not None) == has_alpha


def test_palette_with_transparency_keeps_alpha(tmp_path):
    im = Image.fromarray(gradient_image()).convert("P")
    im.info["transparency"] = 0
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    image = read_image(path)
    assert image.alpha is not None and image.alpha.min() == 0.0


def test_exif_orientation_is_applied_and_reset_and_icc_carried(tmp_path):
    pixels = gradient_image(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "TestCam"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), icc_profile=icc, quality=100)
    image = read_image(path)
    assert image.pixels.shape[:2] == (30, 20)
    with Image.open(path) as im:
        upright = np.asarray(im.transpose(Image.Transpose.ROTATE_270)).astype(np.float32) / 255
    assert np.abs(image.pixels - upright).max() < 1e-6
    out = tmp_path / "out.jpg"
    write_image(out, image, settings={"model": "m"})
    with Image.open(out) as im:
        assert im.getexif()[0x0112] == 1
        assert im.getexif()[0x010F] == "TestCam"
        assert im.info.get("icc_profile") == icc
    assert read_settings(out) == {"model": "m"}


@pytest.mark.parametrize("suffix", ["png", "webp", "tif"])
def test_settings_are_recorded_in_metadata(tmp_path, suffix):
    image = ImageData(pixels=gradient_image().astype(np.float32) / 255)
    out = tmp_path / f"o.{suffix}"
    write_image(out, image, settings={"model": "realesrgan-x4plus", "outscale": 2.0})
    assert read_settings(out) == {"model": "realesrgan-x4plus", "outscale": 2.0}


def test_animated_gif_reports_frames(tmp_path):
    frames = [Image.fromarray(gradient_image(seed=s)).convert("P") for s in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    image = read_image(path)
    assert image.frame_count == 3 and image.pixels.shape == (40, 48, 3)


def test_bad_files_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    full = _png_bytes(Image.fromarray(gradient_image(64, 64)))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(full[: len(full) // 2])
    cases = {
        empty: "empty file",
        text: "not an image",
        truncated: "truncated or corrupt",
        tmp_path / "missing.png": "no such file",
        tmp_path: "is a folder",
    }
    for path, words in cases.items():
        with pytest.raises(ImageError) as info:
            read_image(path)
        message = str(info.value)
        assert words in message and str(path) in message and "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so permission errors cannot be provoked")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(_png_bytes(Image.new("RGB", (4, 4))))
    path.chmod(0)
    with pytest.raises(ImageError, match="permission denied"):
        read_image(path)


def test_pixel_limit_guards_against_bombs():
    data = _png_bytes(Image.new("RGB", (400, 300)))
    with pytest.raises(ImageError, match="over the limit.*--max-pixels"):
        decode_image(data, "big.png", max_pixels=100_000)
    assert decode_image(data, "big.png", max_pixels=None).pixels.shape == (300, 400, 3)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_sixteen_bit_to_eight_bit_format_is_quantised():
    image = ImageData(pixels=np.full((4, 4, 3), 0.5, np.float32), bit_depth=16)
    with Image.open(io.BytesIO(encode_image(image, "JPEG"))) as im:
        assert im.mode == "RGB"
        assert abs(int(np.asarray(im)[0, 0, 0]) - 128) <= 1
