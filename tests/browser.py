"""Load a local HTML file in real headless Chromium and report what happened (stdlib only).

The browser is driven over the Chrome DevTools Protocol on ``--remote-debugging-pipe``: commands go in on
the child's fd 3 and replies/events come out on its fd 4, one NUL-terminated JSON message each (what
Playwright and Puppeteer use with ``pipe: true``). No websocket client, no open port, no Node.

:func:`load_page` opens the file in a fresh profile, waits for the load event and then collects:

- ``console``: ``Runtime.consoleAPICalled`` (page scripts' ``console.*``) and ``Log.entryAdded`` (what the
  browser itself logs: CSP violations, failed loads, ...), each as ``{"level", "text", "source"}``;
- ``exceptions``: ``Runtime.exceptionThrown`` (uncaught errors of any script that ran);
- ``dialogs``: every ``alert``/``confirm``/``prompt`` opened (``Page.javascriptDialogOpening``; dismissed);
- ``value``: the result of an optional ``evaluate`` expression (run after load, JSON-serialisable);
- a full-page PNG screenshot when asked.

Run as a script to look at a page by hand: ``python tests/browser.py report.html --screenshot shot.png``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    """``$MEMATTN_CHROMIUM`` when set (only that), else Debian's real binary behind its
    ``/usr/bin/chromium`` wrapper, else one on PATH; None when there is none."""
    chosen = os.environ.get("MEMATTN_CHROMIUM")
    names = ("chromium", "chromium-browser", "google-chrome")
    candidates = [chosen] if chosen else ["/usr/lib/chromium/chromium", *(shutil.which(n) for n in names)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _high_fd(fd: int, lowest: int = 10) -> int:
    """The same pipe end on a descriptor number ≥ ``lowest`` (the old number is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return high


class BrowserError(RuntimeError):
    """Chromium did not start, died, or did not answer in time."""


@dataclass
class PageResult:
    console: list[dict[str, str]] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    value: Any = None
    screenshot: Path | None = None

    @property
    def errors(self) -> list[str]:
        """Console/log entries at error level, and uncaught exceptions."""
        found = [f"{c['source']}: {c['text']}" for c in self.console if c["level"] == "error"]
        return found + [f"exception: {e}" for e in self.exceptions]


class _Pipe:
    """CDP over a pair of pipes: a reader thread splits fd 4's stream into JSON messages."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.write_fd = write_fd
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.on_event: Any = None
        self.reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while chunk := stream.read(1 << 16):
                buffer += chunk
                *complete, buffer = buffer.split(b"\0")
                for message in complete:
                    self.messages.put(json.loads(message))
        self.messages.put(None)  # the browser closed its end

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        except OSError as error:
            raise BrowserError(f"cannot send {method} to Chromium ({error}); did it exit?") from None
        return self.next_id

    def pump(self, deadline: float, until: Any) -> dict[str, Any]:
        """Handle events until ``until(message)`` is true for a message; return that message."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if message is None:
                raise BrowserError("Chromium closed the DevTools pipe (it exited)")
            if "method" in message:
                self.events.append(message)
                if self.on_event is not None:
                    self.on_event(message)
            if until(message):
                return message

    def call(self, method: str, params: dict | None, session: str | None, deadline: float) -> dict[str, Any]:
        ident = self.send(method, params, session)
        reply = self.pump(deadline, lambda m: m.get("id") == ident)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})


def _remote_text(arg: dict[str, Any]) -> str:
    if "value" in arg:
        return str(arg["value"])
    return str(arg.get("description") or arg.get("unserializableValue") or arg.get("type"))


def load_page(
    path: str | Path,
    *,
    screenshot: str | Path | None = None,
    evaluate: str | None = None,
    width: int = 1200,
    height: int = 900,
    settle: float = 0.5,
    timeout: float = 90.0,
    chromium: str | None = None,
) -> PageResult:
    """Open ``path`` (a local file) in headless Chromium; see the module docstring for what is collected."""
    binary = chromium or find_chromium()
    if binary is None:
        raise BrowserError("no Chromium found (apt-get install chromium, or set MEMATTN_CHROMIUM)")
    url = Path(path).resolve().as_uri()
    result = PageResult()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="memattn-chromium-") as profile:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The browser expects the pipe on fds 3 (commands in) and 4 (messages out): bash places them
        # (dash takes single-digit fds only), from numbers ≥ 10 so one redirection cannot overwrite the
        # other's source. No preexec_fn: it is unsafe in a process with threads (torch's, pytest's).
        to_child_r, from_child_w = (_high_fd(to_child_r), _high_fd(from_child_w))
        command = [
            shutil.which("bash") or "/bin/bash",
            "-c",
            f'exec "$@" 3<&{to_child_r} 4>&{from_child_w}',
            "bash",
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        log = Path(profile).parent / f"{Path(profile).name}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                pass_fds=(to_child_r, from_child_w),
                start_new_session=True,
            )
        os.close(to_child_r)
        os.close(from_child_w)
        pipe = _Pipe(from_child_r, to_child_w)
        try:
            _drive(pipe, url, result, deadline, width, height, settle, evaluate, screenshot)
        except BrowserError as error:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BrowserError(f"{error}; Chromium's stderr ends with:\n{tail}") from None
        finally:
            try:
                pipe.send("Browser.close")
            except BrowserError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            os.close(to_child_w)
            log.unlink(missing_ok=True)
    return result


def _drive(
    pipe: _Pipe,
    url: str,
    result: PageResult,
    deadline: float,
    width: int,
    height: int,
    settle: float,
    evaluate: str | None,
    screenshot: str | Path | None,
) -> None:
    target = pipe.call("Target.createTarget", {"url": "about:blank"}, None, deadline)["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True}, None, deadline)[
        "sessionId"
    ]

    def on_event(message: dict[str, Any]) -> None:
        if message.get("sessionId") != session:
            return
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            level = {"warning": "warning", "error": "error", "assert": "error"}.get(params["type"], "info")
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            result.console.append({"level": level, "text": text, "source": f"console.{params['type']}"})
        elif method == "Log.entryAdded":
            entry = params["entry"]
            result.console.append({"level": entry["level"], "text": entry["text"], "source": entry["source"]})
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            result.exceptions.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Page.javascriptDialogOpening":
            result.dialogs.append(f"{params['type']}: {params['message']}")
            pipe.send("Page.handleJavaScriptDialog", {"accept": False}, session)

    pipe.on_event = on_event
    for domain in ("Page", "Runtime", "Log"):
        pipe.call(f"{domain}.enable", None, session, deadline)
    pipe.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session,
        deadline,
    )
    navigation = pipe.call("Page.navigate", {"url": url}, session, deadline)
    if navigation.get("errorText"):
        raise BrowserError(f"navigation to {url} failed: {navigation['errorText']}")
    pipe.pump(deadline, lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == session)
    settled = min(deadline, time.monotonic() + settle)  # late console messages, timers, image errors
    try:
        pipe.pump(settled, lambda m: False)
    except BrowserError:
        if time.monotonic() >= deadline:
            raise
    if evaluate is not None:
        reply = pipe.call(
            "Runtime.evaluate", {"expression": evaluate, "returnByValue": True}, session, deadline
        )
        if "exceptionDetails" in reply:
            raise BrowserError(f"the evaluate expression failed: {reply['exceptionDetails']}")
        result.value = reply["result"].get("value")
    if screenshot is not None:
        metrics = pipe.call("Page.getLayoutMetrics", None, session, deadline)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": max(width, size["width"]), "height": size["height"], "scale": 1}
        shot = pipe.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
            session,
            deadline,
        )
        path = Path(screenshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        result.screenshot = path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    page = load_page(args.html, screenshot=args.screenshot)
    found = {"console": page.console, "exceptions": page.exceptions, "dialogs": page.dialogs}
    print(json.dumps(found, indent=1))
    raise SystemExit(1 if page.errors or page.dialogs else 0)
