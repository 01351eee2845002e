"""The web page in a real browser: Debian's headless Chromium uploads an image and shows the result."""

from __future__ import annotations


import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install 'diffsr[server]'")
pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'diffsr[server]'")

from PIL import Image  # noqa: E402

from browser_cdp import find_chromium, upscale_in_page  # noqa: E402
from diffsr.server import ServerConfig  # noqa: E402
from server_helpers import image_bytes, live_server, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed; install Debian's package: apt-get install -y chromium")
    return path


def test_page_uploads_an_image_and_shows_the_comparison(tmp_path, chromium):
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(40, 48))
    config = ServerConfig(model_dir=tiny_model_dir(tmp_path / "models"), work_dir=tmp_path / "work")
    screenshot = tmp_path / "server-page.png"
    with live_server(config) as base:
        shown = upscale_in_page(base, image, "tiny.pth", screenshot, chromium, tile=16)
    print(f"screenshot: {screenshot}")
    assert shown["errors"] == [], shown["errors"]
    assert shown["status"] == "done", shown
    assert shown["after"] == [192, 160], "the result is 4x the 48x40 upload"
    assert shown["before"] == [48, 40]
    assert shown["compareHidden"] is False and shown["box"][2] > 100 and shown["box"][3] > 80
    assert shown["sizes"] == "48×40 → 192×160"
    assert shown["download"].startswith("/api/jobs/") and shown["download"].endswith("/result")
    assert shown["progress"] == 1
    # Which intermediate states the page shows depends on timing (a tiny job can finish before the page
    # subscribes); the event stream's progress is checked deterministically in test_server.py.
    assert shown["seen"][-1] == "done", shown["seen"]
    assert shown["recent"] and shown["recent"][0] == "done"

    picture = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.float32)
    assert picture.shape[:2] == (900, 1280)
    x, y, w, h = (int(round(v)) for v in shown["box"])
    region = picture[y + 4 : y + h - 4, x + 4 : x + w - 4]
    assert region.size and region.std() > 10, "the comparison area shows an image, not a blank box"
