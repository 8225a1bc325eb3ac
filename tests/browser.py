"""A small headless-Chromium driver for tests: open a page, wait until its text shows what we expect, keep a
screenshot. It speaks the DevTools protocol (CDP) over a websocket with aiohttp, which the project already
depends on, so tests need only Debian's `chromium` package and no browser download or driver binary.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

# The flags the project's CI needs: no sandbox (CI runs as root), no GPU, and no calls home, so a page load
# only talks to the address it is given.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--mute-audio",
]


class BrowserError(RuntimeError):
    """The browser could not be started, or a page did not show what the test waited for."""


@dataclass(frozen=True)
class Page:
    url: str  # where the browser ended up (after redirects and client-side routing)
    title: str
    text: str  # document.body.innerText: what a person can read on the page
    screenshot: Path


def find_chromium() -> str:
    """The Chromium executable: $CHROMIUM, else Debian's /usr/bin/chromium or one on PATH."""
    candidates = [os.environ.get("CHROMIUM", ""), "/usr/bin/chromium", "chromium", "chromium-browser"]
    for candidate in candidates:
        if candidate and (path := shutil.which(candidate)):
            return path
    raise BrowserError("Chromium was not found: install Debian's package with `apt-get install -y chromium`.")


class HeadlessChromium:
    """One headless Chromium process; `open()` loads pages in fresh tabs. Use as a context manager."""

    def __init__(self, window: tuple[int, int] = (1440, 1000), start_timeout: float = 60.0) -> None:
        self.window = window
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None
        self._profile: tempfile.TemporaryDirectory | None = None
        self._port = 0

    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        profile = Path(self._profile.name)
        command = [
            find_chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={self.window[0]},{self.window[1]}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
            "about:blank",
        ]
        log = open(profile / "chromium.log", "wb")  # noqa: SIM115 -- kept open for the process's lifetime
        self._process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                self.close()
                raise BrowserError(f"Chromium exited at start with code {self._process.returncode}: {tail}")
            if port_file.exists() and (lines := port_file.read_text().split()):
                self._port = int(lines[0])
                return
            time.sleep(0.1)
        self.close()
        raise BrowserError(f"Chromium did not open its DevTools port within {self.start_timeout:.0f} s.")

    def close(self) -> None:
        if self._process is not None:
            # Chromium's renderer and GPU helpers live in the process group that Popen started for it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._process = None
        if self._profile is not None:
            with contextlib.suppress(OSError):
                self._profile.cleanup()
            self._profile = None

    def open(
        self,
        url: str,
        screenshot: Path,
        wait_for: Sequence[str] = (),
        timeout: float = 60.0,
        wait_for_selector: str | None = None,
    ) -> Page:
        """Load `url` in a new tab, wait until the page has text, every string of `wait_for` appears in it
        (case-sensitive) and, if given, an element matches the CSS selector `wait_for_selector` (e.g. a drawn
        chart line), save a full-window PNG to `screenshot`, and return the page's text.

        Raises BrowserError naming what is missing if it does not appear within `timeout` seconds; the
        screenshot of what the page showed by then is saved all the same, to look at."""
        if self._process is None:
            raise BrowserError("HeadlessChromium.open() called before start().")
        request = urllib.request.Request(f"http://127.0.0.1:{self._port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            target = json.load(response)
        try:
            return asyncio.run(
                self._load(
                    target["webSocketDebuggerUrl"], url, screenshot, wait_for, timeout, wait_for_selector
                )
            )
        finally:
            close = f"http://127.0.0.1:{self._port}/json/close/{target['id']}"
            with contextlib.suppress(OSError), urllib.request.urlopen(close, timeout=10) as response:
                response.read()  # the request itself closes the tab; a browser already gone is fine

    async def _load(
        self,
        websocket_url: str,
        url: str,
        screenshot: Path,
        wait_for: Sequence[str],
        timeout: float,
        wait_for_selector: str | None,
    ) -> Page:
        # Screenshots come back base64-encoded in one message, so no message size cap.
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(websocket_url, max_msg_size=0) as ws,
        ):
            tab = _Tab(ws)
            await tab.call("Page.enable")
            width, height = self.window
            await tab.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            navigation = await tab.call("Page.navigate", {"url": url})
            if navigation.get("errorText"):
                raise BrowserError(f"Chromium could not load {url}: {navigation['errorText']}.")
            selector_check = (
                f"document.querySelector({json.dumps(wait_for_selector)}) !== null"
                if wait_for_selector
                else "true"
            )
            deadline = time.monotonic() + timeout
            while True:
                state = await tab.evaluate(
                    "({ready: document.readyState, text: document.body ? document.body.innerText : '',"
                    f" title: document.title, url: location.href, found: {selector_check}}})"
                )
                text = state["text"]
                missing = [s for s in wait_for if s not in text]
                if not state["found"]:
                    missing.append(f"an element matching {wait_for_selector!r}")
                if not text.strip():
                    missing.append("any text")
                if state["ready"] == "complete" and not missing:
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = await tab.call("Page.captureScreenshot", {"format": "png"})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            if missing:
                raise BrowserError(
                    f"{url} did not show {missing} within {timeout:.0f} s (screenshot: {screenshot}); "
                    f"its text began: {text[:600]!r}"
                )
            return Page(url=state["url"], title=state["title"], text=text, screenshot=screenshot)


class _Tab:
    """Request/response over one tab's CDP websocket; events that arrive in between are skipped."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, params: dict | None = None) -> dict:
        self.next_id += 1
        call_id = self.next_id
        await self.ws.send_json({"id": call_id, "method": method, "params": params or {}})
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"the DevTools connection closed during {method}.")
            reply = json.loads(message.data)
            if reply.get("id") != call_id:
                continue
            if "error" in reply:
                raise BrowserError(f"DevTools {method} failed: {reply['error'].get('message')}.")
            return reply["result"]
        raise BrowserError(f"the DevTools connection closed during {method}.")

    async def evaluate(self, expression: str) -> dict:
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"page script failed: {result['exceptionDetails'].get('text')}.")
        return result["result"]["value"]
