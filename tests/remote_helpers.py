"""A local S3 endpoint (moto) and small helpers for the remote-folder tests."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from PIL import Image

from tiny_models import gradient_image

pafs = pytest.importorskip("pyarrow.fs", reason="remote folders need pyarrow (a dependency of ray[data])")


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient_image(24, 32, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def s3_server() -> Iterator[tuple[object, str]]:
    """A moto S3 server on a free local port with a bucket "photos"; yields (filesystem, URI query for it)."""
    server_module = pytest.importorskip("moto.server", reason="the S3 tests need moto: pip install 'moto[server]'")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir("photos")
        yield fs, f"endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


def put(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as handle:
        handle.write(data)


def get(fs, path: str) -> bytes:
    with fs.open_input_file(path) as handle:
        return handle.read()
