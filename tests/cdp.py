"""A minimal Chrome DevTools Protocol client for tests: headless Debian chromium, one page.

::

    with Browser.launch(chromium_path, tmp_dir) as browser:
        page = browser.page
        page.navigate("http://127.0.0.1:8080/ui")
        page.wait_for("document.querySelectorAll('tr').length > 1", timeout=10)
        page.click("button.action-load")
        png = page.screenshot()

Synchronous (``websockets.sync``), one command at a time; every wait has a timeout, and
``Browser.close`` (also on ``__exit__``) kills chromium's whole process group.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

LAUNCH_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 15.0
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
         "--hide-scrollbars", "--window-size=1280,800", "--remote-debugging-address=127.0.0.1"]


class CDPError(RuntimeError):
    """A protocol error, a JS exception, a timeout or a dead browser."""


class Page:
    """One page target: commands, buffered events, and helpers built on them."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []  # every event received, in order
        self._seen = 0  # events before this index were consumed by wait_event

    # --- protocol ---------------------------------------------------------------------------
    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CDPError(f"timed out waiting for {what}")
        try:
            raw = self.ws.recv(timeout=left)
        except TimeoutError:
            raise CDPError(f"timed out waiting for {what}") from None
        except Exception as exc:  # connection closed: chromium died
            raise CDPError(f"DevTools connection lost waiting for {what}: {exc}") from exc
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """Send one command and return its ``result``; events arriving meanwhile are kept."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline, method)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error'].get('message')} {msg['error'].get('data', '')}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """The next not-yet-consumed event called ``method`` (its ``params``)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._seen, len(self.events)):
                if self.events[i]["method"] == method:
                    self._seen = i + 1
                    return self.events[i].get("params", {})
            msg = self._recv(deadline, f"event {method}")
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds: float = 0.0) -> None:
        """Read whatever events arrive within ``seconds`` (keeps ``events`` current)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                raw = self.ws.recv(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            msg = json.loads(raw)
            if "method" in msg:
                self.events.append(msg)

    # --- helpers ----------------------------------------------------------------------------
    def enable(self) -> None:
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def navigate(self, url: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
        """Load ``url`` and wait for its load event."""
        self._seen = len(self.events)
        result = self.send("Page.navigate", {"url": url}, timeout)
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """The value of a JS expression (promises awaited); a JS exception raises CDPError."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text")
            raise CDPError(f"JS exception in {expression[:80]!r}: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1,
                 what: str | None = None) -> Any:
        """Poll a JS expression until its value is truthy (in Python: a DOM node comes back as
        ``{}``, so test for one with ``!!``); return that value, CDPError on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = self.evaluate(expression)
            if last:
                return last
            if time.monotonic() >= deadline:
                raise CDPError(f"timed out after {timeout:g} s waiting for "
                               f"{what or expression} (last value: {last!r})")
            self.pump(interval)

    def click(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element: it must be
        visible, enabled and not covered (checked with elementFromPoint)."""
        box = self.evaluate(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            const x = r.left + r.width / 2, y = r.top + r.height / 2;
            const hit = document.elementFromPoint(x, y);
            return {{x, y, w: r.width, h: r.height, disabled: !!e.disabled,
                     hit: !!hit && (hit === e || e.contains(hit))}};
        }})()""")
        if box is None:
            raise CDPError(f"click: no element matches {selector!r}")
        if box["w"] <= 0 or box["h"] <= 0 or not box["hit"]:
            raise CDPError(f"click: {selector!r} is not visible or is covered ({box})")
        if box["disabled"]:
            raise CDPError(f"click: {selector!r} is disabled")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"],
                                                   "button": "left", "clickCount": 1})

    def screenshot(self) -> bytes:
        """A PNG of the whole page (not only the viewport)."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         timeout=30)["data"]
        return base64.b64decode(data)

    def exceptions(self) -> list[str]:
        """Uncaught JS exceptions seen so far."""
        return [e["params"]["exceptionDetails"].get("exception", {}).get("description")
                or e["params"]["exceptionDetails"].get("text", "")
                for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    def log_entries(self) -> list[dict[str, Any]]:
        """Browser log entries (network errors, CSP violations, console errors ...)."""
        return [e["params"]["entry"] for e in self.events if e["method"] == "Log.entryAdded"]


class Browser:
    """A headless chromium subprocess with one page attached over DevTools."""

    def __init__(self, proc: subprocess.Popen, port: int, page: Page, log_path: Path) -> None:
        self.proc, self.port, self.page, self.log_path = proc, port, page, log_path

    @classmethod
    def launch(cls, chromium: str, tmp_dir: Path, timeout: float = LAUNCH_TIMEOUT_S) -> Browser:
        """Start chromium on a port it picks itself (``--remote-debugging-port=0``, read back
        from ``DevToolsActivePort``), so there is no race for a free port."""
        tmp_dir = Path(tmp_dir)
        profile = tmp_dir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        log_path = tmp_dir / "chromium.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [chromium, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own group: close() kills renderers too
        browser = None
        try:
            deadline = time.monotonic() + timeout
            port_file = profile / "DevToolsActivePort"
            port = None
            while port is None:
                if proc.poll() is not None:
                    raise CDPError(f"chromium exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
                if time.monotonic() >= deadline:
                    raise CDPError(f"chromium gave no DevTools port within {timeout:g} s")
                try:
                    first = port_file.read_text().split("\n", 1)[0].strip()
                    port = int(first) if first else None
                except (OSError, ValueError):
                    pass
                if port is None:
                    time.sleep(0.1)
            ws_url = None
            while ws_url is None:
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2,
                                        trust_env=False).json()
                    ws_url = next((t["webSocketDebuggerUrl"] for t in targets
                                   if t.get("type") == "page"), None)
                except (httpx.HTTPError, ValueError):
                    pass
                if ws_url is None:
                    if time.monotonic() >= deadline:
                        raise CDPError(f"no page target on DevTools port {port} within {timeout:g} s")
                    time.sleep(0.1)
            ws = connect(ws_url, open_timeout=max(1.0, deadline - time.monotonic()),
                         max_size=64 * 2**20, compression=None)
            browser = cls(proc, port, Page(ws), log_path)
            browser.page.enable()
            return browser
        finally:
            if browser is None:
                _kill_group(proc)

    def close(self) -> None:
        try:
            self.page.ws.close()
        except Exception:
            pass
        _kill_group(self.proc)
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # orphaned renderers: SIGKILLed, reaped by init in a moment

    def alive(self) -> bool:
        """True while any process of chromium's group is left (the leader's pid is its id)."""
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == self.proc.pid and fields[0] not in ("Z", "X"):
                    return True
        return False

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM chromium's process group (it leads it), then SIGKILL; idempotent."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return  # the group is gone
        try:
            proc.wait(timeout)
            # the leader is gone; renderers may linger a moment: SIGKILL the rest
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout)


def is_png(data: bytes) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a PNG with a proper IHDR chunk, else None."""
    import struct
    import zlib

    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    length = struct.unpack(">I", data[8:12])[0]
    chunk = data[12:16 + length]
    if struct.unpack(">I", data[16 + length:20 + length])[0] != zlib.crc32(chunk):
        return None
    return struct.unpack(">II", data[16:24])
