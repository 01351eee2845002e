"""Image files in and out (see `diffsr.io.image`) and atomic writes."""

from diffsr.io.atomic import atomic_write_bytes
from diffsr.io.image import (
    DEFAULT_MAX_PIXELS,
    READABLE_SUFFIXES,
    ImageData,
    ImageError,
    decode_image,
    encode_image,
    read_file,
    read_image,
    read_settings,
    write_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "READABLE_SUFFIXES",
    "ImageData",
    "ImageError",
    "atomic_write_bytes",
    "decode_image",
    "encode_image",
    "read_file",
    "read_image",
    "read_settings",
    "write_image",
]
