"""Reading and writing images without losing what the user cares about.

Every method in diffsr works on float32 RGB (or grey) arrays in [0, 1]. This module is the one
place that turns files into those arrays and back, keeping bit depth (8 or 16), grey vs colour,
alpha, the ICC profile and EXIF (with the orientation applied and reset), and recording the
settings used in the output's metadata. Pillow does most formats; 16-bit colour, which Pillow
cannot decode, goes through OpenCV (PNG) and tifffile (TIFF).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from diffsr.io.atomic import atomic_write_bytes

# diffsr applies its own pixel limit (with a clear message and an override) before decoding.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest input accepted by default (100 megapixels), a guard against decompression bombs."""

FORMAT_BY_SUFFIX = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
SUFFIX_BY_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "png"}
READABLE_SUFFIXES = frozenset(FORMAT_BY_SUFFIX) | {".gif"}
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})

_EXIF_ORIENTATION = 0x0112
_EXIF_SOFTWARE = 0x0131
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286
_TIFF_ICC_TAG = 34675
_TIFF_DESCRIPTION = 270
_TIFF_SOFTWARE = 305


class ImageError(ValueError):
    """An image could not be read or written; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class ImageData:
    """Decoded pixels plus everything needed to write a faithful output."""

    pixels: np.ndarray
    """float32, H x W x C with C = 1 (grey) or 3 (RGB), values in [0, 1]."""
    alpha: np.ndarray | None = None
    """float32, H x W in [0, 1], or None."""
    bit_depth: int = 8
    format: str | None = None
    icc_profile: bytes | None = None
    exif: bytes | None = None
    """EXIF block of the source with the orientation already applied (tag reset to 1)."""
    frame_count: int = 1

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def is_grey(self) -> bool:
        return self.pixels.shape[2] == 1

    def with_pixels(self, pixels: np.ndarray, alpha: np.ndarray | None) -> ImageData:
        return replace(self, pixels=pixels, alpha=alpha)


# ---------------------------------------------------------------------------------------- reading


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageData:
    """Decode an image file; raises ImageError with a one-line reason on any problem."""
    return decode_image(read_file(path), name=str(path), max_pixels=max_pixels)


def read_file(path: str | Path) -> bytes:
    """A file's bytes, or an ImageError that says why they cannot be had."""
    path = Path(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image (pass --recursive to upscale a folder's images)") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied; check the file's read permission") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def decode_image(data: bytes, name: str = "<image>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageData:
    """Decode image bytes (content is sniffed, the name is only used in messages)."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes); re-export or re-download it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image in a supported format (PNG, JPEG, WebP, TIFF, BMP, GIF)"
        ) from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise ImageError(f"{name}: corrupt image header ({exc})") from None
    width, height = im.size
    if max_pixels and width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.0f} (a guard against decompression bombs); raise it with --max-pixels"
        )
    try:
        return _decode_opened(im, data, name)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, struct.error, zlib.error) as exc:
        raise ImageError(f"{name}: truncated or corrupt image data ({exc}); re-export or re-download it") from None


def _decode_opened(im: Image.Image, data: bytes, name: str) -> ImageData:
    fmt = im.format
    frame_count = getattr(im, "n_frames", 1)
    icc = im.info.get("icc_profile") or None
    exif = im.getexif()
    orientation = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    im.load()  # decode now so truncation is reported here

    if _is_sixteen_bit_colour(im, data):
        array = _decode_sixteen_bit_colour(fmt, data, name)
        bit_depth = 16
    else:
        array, bit_depth, icc = _pillow_pixels(im, icc)
    array = _apply_orientation(array, orientation)

    scale = 65535.0 if bit_depth == 16 else 255.0
    values = array.astype(np.float32) / scale
    if values.ndim == 2:
        values = values[:, :, None]
    alpha = None
    if values.shape[2] in (2, 4):
        alpha = np.ascontiguousarray(values[:, :, -1])
        values = values[:, :, :-1]
        if np.all(alpha >= 1.0):
            alpha = None  # an opaque alpha channel carries nothing; keep the output simple
    if orientation != 1:
        exif[_EXIF_ORIENTATION] = 1
    exif_bytes = exif.tobytes() if len(exif) else None
    return ImageData(
        pixels=np.ascontiguousarray(values),
        alpha=alpha,
        bit_depth=bit_depth,
        format=fmt,
        icc_profile=icc,
        exif=exif_bytes,
        frame_count=frame_count,
    )


def _is_sixteen_bit_colour(im: Image.Image, data: bytes) -> bool:
    """Pillow silently truncates 16-bit colour PNG/TIFF to 8 bits; detect them from the header."""
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG":
        return data[24] == 16  # IHDR bit depth
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits) == 16
    return False


def _decode_sixteen_bit_colour(fmt: str, data: bytes, name: str) -> np.ndarray:
    if fmt == "TIFF":
        import tifffile

        array = tifffile.imread(io.BytesIO(data))
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ImageError(f"{name}: multi-page or planar 16-bit TIFF is not supported; save it as one RGB page")
        return array
    cv2 = _import_cv2()
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageError(f"{name}: truncated or corrupt 16-bit PNG data; re-export or re-download it")
    order = [2, 1, 0, 3] if array.shape[2] == 4 else [2, 1, 0]
    return array[:, :, order]


def _pillow_pixels(im: Image.Image, icc: bytes | None) -> tuple[np.ndarray, int, bytes | None]:
    """Pixels of any Pillow mode as uint8/uint16 grey, grey+alpha, RGB or RGBA."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16), 16, icc
    if mode == "I":
        array = np.asarray(im)
        if array.min() < 0 or array.max() > 65535:
            raise ImageError("32-bit integer images are not supported; convert the image to 16 bits")
        return array.astype(np.uint16), 16, icc
    if mode == "F":
        raise ImageError("32-bit float images are not supported; convert the image to 16-bit PNG or TIFF")
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im, icc)), 8, None  # the output is sRGB, the CMYK profile no longer applies
    if mode in ("1", "L"):
        return np.asarray(im.convert("L")), 8, icc
    if mode in ("LA", "La", "PA") or (mode == "P" and "transparency" in im.info):
        target = "LA" if mode in ("LA", "La") else "RGBA"
        return np.asarray(im.convert(target)), 8, icc
    if mode in ("RGBA", "RGBa"):
        return np.asarray(im.convert("RGBA")), 8, icc
    return np.asarray(im.convert("RGB")), 8, icc


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: fall back to the naive conversion below
    return im.convert("RGB")


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels upright according to the EXIF orientation tag (values 1-8)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](array)) if orientation in ops else array


def _import_cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImageError(
            f"16-bit colour images need OpenCV, which failed to import ({exc}); "
            "install it with `pip install opencv-python-headless` (or the system's libgl1 for opencv-python)"
        ) from None
    return cv2


# ---------------------------------------------------------------------------------------- writing


def output_format(path: Path) -> str:
    try:
        return FORMAT_BY_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise ImageError(
            f"{path}: cannot write '{path.suffix}' files; use one of {', '.join(sorted(set(FORMAT_BY_SUFFIX)))}"
        ) from None


def write_image(
    path: str | Path,
    image: ImageData,
    settings: dict[str, Any] | None = None,
    quality: int = 95,
) -> None:
    """Encode and write atomically: the file appears complete under its name, or not at all."""
    path = Path(path)
    atomic_write_bytes(path, encode_image(image, output_format(path), settings, quality))


def encode_image(image: ImageData, fmt: str, settings: dict[str, Any] | None = None, quality: int = 95) -> bytes:
    """Encode to bytes in `fmt`, 16-bit where the format allows it, with metadata carried over."""
    sixteen = image.bit_depth == 16 and fmt in SIXTEEN_BIT_FORMATS
    channels = [image.pixels]
    if image.alpha is not None and fmt in ALPHA_FORMATS | {"BMP"}:
        channels.append(image.alpha[:, :, None])
    stacked = np.concatenate(channels, axis=2) if len(channels) > 1 else image.pixels
    scale = 65535.0 if sixteen else 255.0
    array = np.clip(np.rint(stacked * scale), 0, scale).astype(np.uint16 if sixteen else np.uint8)
    comment = json.dumps(settings, sort_keys=True) if settings else None
    if sixteen and array.shape[2] >= 3:
        return _encode_sixteen_bit_colour(array, fmt, image, comment)

    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # L, I;16, LA, RGB or RGBA
    kwargs: dict[str, Any] = {}
    if image.icc_profile and fmt != "BMP":
        kwargs["icc_profile"] = image.icc_profile
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", _software())
        if comment:
            info.add_itxt("diffsr", comment)
        kwargs["pnginfo"] = info
        if image.exif:
            kwargs["exif"] = image.exif
    elif fmt in ("JPEG", "WEBP"):
        kwargs["exif"] = _exif_with_comment(image.exif, comment)
        kwargs["quality"] = quality
        if fmt == "JPEG":
            kwargs["subsampling"] = 0  # 4:4:4: chroma subsampling would throw away detail the model made
    elif fmt == "TIFF":
        kwargs["compression"] = "tiff_lzw"
        kwargs["tiffinfo"] = {_TIFF_SOFTWARE: _software(), **({_TIFF_DESCRIPTION: comment} if comment else {})}
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _software() -> str:
    from diffsr import __version__

    return f"diffsr {__version__}"


def _exif_with_comment(exif_bytes: bytes | None, comment: str | None) -> bytes:
    exif = Image.Exif()
    if exif_bytes:
        exif.load(exif_bytes)
    exif[_EXIF_ORIENTATION] = 1
    exif[_EXIF_SOFTWARE] = _software()
    if comment:
        exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"ASCII\0\0\0" + comment.encode("ascii", "replace")
    return exif.tobytes()


def _encode_sixteen_bit_colour(array: np.ndarray, fmt: str, image: ImageData, comment: str | None) -> bytes:
    if fmt == "TIFF":
        import tifffile

        buffer = io.BytesIO()
        extratags = [(_TIFF_ICC_TAG, "B", len(image.icc_profile), image.icc_profile, True)] if image.icc_profile else []
        tifffile.imwrite(
            buffer,
            array,
            photometric="rgb",
            extrasamples=[2] if array.shape[2] == 4 else None,
            compression="zlib",
            description=comment,
            software=_software(),
            extratags=extratags,
            metadata=None,
        )
        return buffer.getvalue()
    cv2 = _import_cv2()
    order = [2, 1, 0, 3] if array.shape[2] == 4 else [2, 1, 0]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array[:, :, order]))
    if not ok:
        raise ImageError("OpenCV failed to encode a 16-bit PNG")
    chunks = [_png_chunk(b"tEXt", b"Software\0" + _software().encode())]
    if comment:
        chunks.append(_png_chunk(b"iTXt", b"diffsr\0\0\0\0\0" + comment.encode()))
    if image.icc_profile:
        chunks.append(_png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(image.icc_profile)))
    if image.exif:
        exif = image.exif[6:] if image.exif.startswith(b"Exif\0\0") else image.exif
        chunks.append(_png_chunk(b"eXIf", exif))
    return _insert_png_chunks(encoded.tobytes(), chunks)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _insert_png_chunks(png: bytes, chunks: list[bytes]) -> bytes:
    """Place ancillary chunks right after IHDR (the 8-byte signature plus the 25-byte IHDR chunk)."""
    head = 8 + 25
    return png[:head] + b"".join(chunks) + png[head:]


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings diffsr recorded in an output file's metadata, or None."""
    with Image.open(path) as im:
        text = im.info.get("diffsr")
        if text is None and im.format == "TIFF":
            text = im.tag_v2.get(_TIFF_DESCRIPTION)
        if text is None:
            comment = im.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
            if isinstance(comment, bytes):
                text = comment[8:].decode("ascii", "replace")
            elif isinstance(comment, str):
                text = comment
    return json.loads(text) if text else None
