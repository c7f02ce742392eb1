"""Headless Chromium driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: NUL-terminated JSON on fds 3 and 4), so no
WebSocket library is needed. Blocking; tests call it from a thread while
the reactor serves the bridge."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    def __init__(self, binary: str, width: int = 1280, height: int = 720) -> None:
        self.profile = tempfile.mkdtemp(prefix="ib-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Out of the way of 3 and 4, which the child gets them as.
        self._child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 100)
        self._child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 100)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def child_fds() -> None:
            os.dup2(self._child_in, 3)
            os.dup2(self._child_out, 4)

        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(self._child_in)
        os.close(self._child_out)
        self._write = os.fdopen(to_browser_w, "wb", buffering=0)
        self._read = os.fdopen(from_browser_r, "rb", buffering=0)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._condition = threading.Condition()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            chunk = self._read.read(65536)
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._condition:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self._events.append(message)
                    self._condition.notify_all()
        with self._condition:
            self._condition.notify_all()

    def call(self, method: str, session: bool = False, timeout: float = 30,
             **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._write.write(json.dumps(message).encode() + b"\0")
        with self._condition:
            if not self._condition.wait_for(lambda: message["id"] in self._replies, timeout):
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            reply = self._replies.pop(message["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        with self._condition:
            def found() -> bool:
                return any(e.get("method") == method for e in self._events)

            if not self._condition.wait_for(found, timeout):
                raise TimeoutError(f"no {method} within {timeout} s")
            event = next(e for e in self._events if e.get("method") == method)
            self._events.remove(event)
            return event

    def navigate(self, url: str) -> None:
        with self._condition:
            self._events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of ``expression`` (a Promise is awaited)."""
        result = self.call("Runtime.evaluate", session=True, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(details.get("exception", {}).get("description")
                                 or details.get("text"))
        return result["result"].get("value")

    def wait_until(self, condition: str, timeout_ms: int = 20000) -> str:
        """Wait, without polling, until the JavaScript ``condition`` holds
        (checked on every change to the page); returns the page's text."""
        return self.evaluate(f"""new Promise((resolve, reject) => {{
            const holds = () => {{ try {{ return {condition}; }} catch (e) {{ return false; }} }};
            if (holds()) {{ resolve(document.body.innerText); return; }}
            const observer = new MutationObserver(() => {{
                if (holds()) {{ observer.disconnect(); resolve(document.body.innerText); }}
            }});
            observer.observe(document.body, {{subtree: true, childList: true,
                                              characterData: true, attributes: true}});
            setTimeout(() => {{ observer.disconnect();
                reject(new Error("timed out; the page shows: " + document.body.innerText)); }},
                {timeout_ms});
        }})""", timeout=timeout_ms / 1000 + 10)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session=True,
                                          format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._write.close()
        self._reader.join(10)
        self._read.close()
        shutil.rmtree(self.profile, ignore_errors=True)
