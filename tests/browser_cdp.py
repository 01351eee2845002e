"""Drive Debian's headless Chromium over the DevTools protocol on a pipe (no extra Python package).

Chromium reads commands from fd 3 and writes answers to fd 4, JSON messages ended by NUL
(`--remote-debugging-pipe`); no port is opened, so nothing races for one.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, executable: str, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="diffsr-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # copies at fd >= 10, so moving them to 3 and 4 in the child cannot clobber one another
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire_pipes() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.log_path = Path(self.profile) / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False, preexec_fn=wire_pipes,
            )
        os.close(child_in)
        os.close(child_out)
        self._write, self._read = to_browser_w, from_browser_r
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("method") == "Inspector.targetCrashed":
                raise RuntimeError(f"the page's renderer crashed (while waiting for {method}); Chromium's log ends:\n{self.log_tail()}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for fd in (self._write, self._read):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab, attached with a flat session."""

    def __init__(self, browser: Chromium, width: int = 1280, height: int = 900):
        self.browser = browser
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}: {expression}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"page never satisfied: {expression}")

    def set_file(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        # an absolute path: with a relative one Chromium kills the renderer for a "bad IPC message"
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(path).resolve())]})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def errors(self) -> list[str]:
        """Uncaught script errors and console errors seen so far."""
        found = []
        for event in self.browser.events:
            if event.get("sessionId") != self.session:
                continue
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(event["params"]["exceptionDetails"].get("text", "exception"))
            if event.get("method") == "Runtime.consoleAPICalled" and event["params"].get("type") == "error":
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in event["params"]["args"]))
        return found


def upscale_in_page(
    base_url: str, image: Path, model: str, screenshot: Path, executable: str, timeout: float = 60.0, tile: int = 0
) -> dict[str, Any]:
    """Open the page, pick `model` and `tile`, upload `image`, wait for the comparison, screenshot it.

    Returns what the page shows, and every status line seen while waiting.
    """
    browser = Chromium(executable)
    try:
        page = Page(browser)
        page.call("Page.navigate", {"url": base_url + "/"})
        page.wait_for("document.body && document.body.dataset.ready === 'true'")
        page.evaluate(
            "(() => { const s = document.getElementById('opt-model');"
            f" s.value = JSON.stringify({json.dumps(model)}); s.dispatchEvent(new Event('change'));"
            f" document.getElementById('opt-tile').value = {int(tile)}; return s.value; }})()"
        )
        page.set_file("#file", image)
        page.wait_for("!document.getElementById('start').disabled")
        page.evaluate(
            "window.seenStatus = []; new MutationObserver(() => window.seenStatus.push("
            "document.getElementById('status').textContent)).observe(document.getElementById('status'), "
            "{childList: true, characterData: true, subtree: true}); document.getElementById('start').click()"
        )
        page.wait_for(
            "(() => { const a = document.getElementById('after'); const s = document.getElementById('status').textContent;"
            " return s.startsWith('failed') || s.startsWith('cancelled') ||"
            " (!document.getElementById('compare').hidden && a.complete && a.naturalWidth > 0); })()",
            timeout=timeout,
        )
        time.sleep(0.2)  # let the last layout settle before the picture
        shown = page.evaluate(
            "(() => { const $ = (i) => document.getElementById(i); const a = $('after'), b = $('before');"
            " const r = $('compare').getBoundingClientRect();"
            " return { status: $('status').textContent, after: [a.naturalWidth, a.naturalHeight], before: [b.naturalWidth, b.naturalHeight],"
            " compareHidden: $('compare').hidden, box: [r.x, r.y, r.width, r.height], download: $('download').getAttribute('href'),"
            " sizes: $('sizes').textContent, progress: Number($('progress').dataset.value),"
            " recent: [...document.querySelectorAll('#recent li .state')].map((e) => e.textContent), seen: window.seenStatus }; })()"
        )
        page.screenshot(screenshot)
        shown["errors"] = page.errors()
        return shown
    finally:
        browser.close()
