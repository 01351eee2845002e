"""Helpers for the server tests: a tiny model folder, test images, a gated method, a live server."""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from diffsr.options import Option, options
from diffsr.progress import report
from diffsr.registry import Method
from tiny_models import compact_state, gradient_image, save_pth


def tiny_model_dir(folder: Path) -> Path:
    """A --model-dir holding `tiny.pth`, a 4x Compact net small enough for milliseconds per image."""
    folder.mkdir(parents=True, exist_ok=True)
    save_pth(folder / "tiny.pth", compact_state(nf=4, num_conv=1))
    return folder


def image_bytes(height: int = 24, width: int = 32, fmt: str = "PNG", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient_image(height, width, seed=seed)).save(buffer, format=fmt)
    return buffer.getvalue()


class Gate:
    """A method whose jobs wait for the test to open the gate, reporting one "steps" event per step."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.loads = 0
        self.started = threading.Event()

    def method(self) -> Method:
        gate = self

        class Pipeline:
            def upscale(self, image, on_progress=None, steps: int = 3, fail: bool = False, **_: Any):
                gate.started.set()
                for step in range(steps):
                    report(on_progress, "steps", step, steps)
                    if not gate.open.wait(10):
                        raise TimeoutError("the test never opened the gate")
                    if fail:
                        raise RuntimeError("boom: the model crashed")
                report(on_progress, "steps", steps, steps)
                pixels = np.repeat(np.repeat(image.pixels, 2, axis=0), 2, axis=1)
                return image.with_pixels(pixels, None)

            def settings(self, **values: Any) -> dict[str, Any]:
                return {"method": "gated", **values}

        def load(variant: str = "a") -> Pipeline:
            gate.loads += 1
            return Pipeline()

        schema = options(
            Option("variant", str, "a", "which pipeline", choices=("a", "b"), stage="load"),
            Option("steps", int, 3, "steps to wait through", minimum=1, maximum=50),
            Option("fail", bool, False, "crash at the first step"),
            licence="test",
        )
        return Method("gated", "a test method that waits for a gate", schema, load, "test")

    def install(self, monkeypatch) -> None:
        """Register as method "gated", the way a new method module is registered."""
        module = types.ModuleType("diffsr_test_gated_method")
        module.METHOD = self.method()
        monkeypatch.setitem(sys.modules, module.__name__, module)
        from diffsr import registry

        monkeypatch.setitem(registry.METHOD_MODULES, "gated", module.__name__)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@contextmanager
def live_server(config) -> Iterator[str]:
    """The app on a real localhost socket, served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    from diffsr.server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=30)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
