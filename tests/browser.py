"""Headless Chromium driven over the DevTools protocol: load a page, run JavaScript in it,
and take screenshots of parts of it while it keeps running (the pages under test update
themselves live, which one `--dump-dom` cannot show)."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.request import urlopen

from PIL import Image
from websockets.sync.client import connect

CHROMIUM = Path("/usr/bin/chromium")


class Browser:
    def __init__(self, profile: Path, size=(1200, 900)):
        self.proc = subprocess.Popen([
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1",
            "--hide-scrollbars", "--remote-debugging-port=0", "about:blank",
        ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=10)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        """The JSON value of an expression (awaited when it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0, every: float = 0.2):
        """Polls the expression until it is truthy; its last value otherwise. An expression
        that throws (the page still loading) counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:
                value = None
            if value or time.monotonic() > deadline:
                return value
            time.sleep(every)

    def screenshot(self, selector: str | None = None) -> Image.Image:
        """The page, or the box of the first element matching `selector` (a clip is in page
        coordinates: the viewport's box plus the scroll)."""
        params = {"format": "png"}
        if selector:
            box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                          f"e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); "
                          f"return [r.x + window.scrollX, r.y + window.scrollY, r.width, r.height]; }})()")
            params["clip"] = {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}
        data = self.call("Page.captureScreenshot", **params)["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        # /usr/bin/chromium is a wrapper script: the browser and its helpers are its own
        # process group (start_new_session), ended together.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def drawn(browser, selector: str, colour, minimum: float, tolerance: int = 40, timeout: float = 15.0) -> float:
    """The share of `colour` in the element's pixels once it exceeds `minimum` (a canvas draws
    on the next animation frame, later on a busy machine), or the last share seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = share(browser.screenshot(selector), colour, tolerance)
        if seen > minimum or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def share(image: Image.Image, colour, tolerance: int = 40) -> float:
    """The fraction of the image's pixels within `tolerance` of `colour` on every channel."""
    pixels = list(image.getdata())
    near = sum(1 for p in pixels if all(abs(a - b) <= tolerance for a, b in zip(p, colour, strict=True)))
    return near / max(1, len(pixels))
