"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (no websocket library, no Playwright):
headless Debian `chromium` drives the web app in tests/test_app.py's browser test (and makes the README's
screenshot).

    python -m tests.cdp URL IMAGE "QUESTION" OUT.png     (the page at URL: upload, ask, screenshot)

Chromium reads NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--remote-debugging-pipe"]


def chromium_path() -> str | None:
    """Debian's chromium executable, if installed."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with a fresh profile; `page()` opens a tab and returns its session id."""

    def __init__(self, executable: str | None = None, width: int = 1500, height: int = 1000) -> None:
        executable = executable or chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="medsight-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def fds() -> None:  # in the child: the command pipe on fd 3, the reply pipe on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=fds, pass_fds=(3, 4))
        os.close(cmd_r)
        os.close(res_w)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._res_r, 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cond:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        """Send one command and wait for its result (an error reply raises RuntimeError)."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        with self._cond:
            while self._next not in self._replies:
                if not self._cond.wait(timeout=max(deadline - time.time(), 0.01)) and time.time() > deadline:
                    raise TimeoutError(f"CDP {method}: no reply in {timeout} s")
            reply = self._replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"CDP {method}: {reply['error']}")
        return reply.get("result", {})

    def page(self) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str) -> Any:
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                        session)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page script failed: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 120, what: str = "") -> Any:
        """Poll a page expression until it is truthy."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(session, expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"page never showed {what or expression} in {timeout} s")

    def requested_urls(self) -> list[str]:
        with self._cond:
            return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 -- it may be gone already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._cmd_w)
        shutil.rmtree(self.profile, ignore_errors=True)


def ask_in_page(url: str, image: str | Path, question: str, screenshot: str | Path, slice_index: int | None = None,
                width: int = 1500, height: int = 1000) -> dict:
    """Open the app at `url`, upload `image`, ask `question`, wait for the answer and save a PNG screenshot.
    Returns {"urls": every URL the page requested, "legend": legend lines, "chat": the last answer, "seconds"}."""
    import base64

    t0 = time.time()
    browser = Browser(width=width, height=height)
    try:
        s = browser.page()
        for domain in ("Network", "Page", "Runtime", "DOM"):
            browser.send(f"{domain}.enable", session=s)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                            "mobile": False}, s)
        browser.send("Page.navigate", {"url": url}, s)
        browser.wait_for(s, "!!document.querySelector('#ms-upload input[type=file]')", what="the upload box")
        root = browser.send("DOM.getDocument", {"depth": -1, "pierce": True}, s)["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#ms-upload input[type=file]"}, s)
        browser.send("DOM.setFileInputFiles", {"files": [str(Path(image).resolve())], "nodeId": node["nodeId"]}, s)
        browser.wait_for(s, "!!document.querySelector('#ms-overlay img')", what="the uploaded image")
        browser.evaluate(s, "document.querySelector('#ms-question textarea').focus()")
        browser.send("Input.insertText", {"text": question}, s)
        browser.evaluate(s, "document.querySelector('#ms-ask').click()")
        browser.wait_for(s, "document.querySelectorAll('#ms-chat .message').length >= 2"
                            " || document.querySelectorAll('#ms-chat [data-testid=\"bot\"]').length >= 1",
                         what="the answer")
        browser.wait_for(s, "!!document.querySelector('#ms-legend li') || "
                            "(document.querySelector('.ms-legend') || {}).textContent", what="the legend")
        time.sleep(1.0)  # the overlay image finishes loading
        browser.wait_for(s, "(() => { const i = document.querySelector('#ms-overlay img'); "
                            "return i && i.complete && i.naturalWidth > 0; })()", what="the overlay image")
        legend = browser.evaluate(s, "[...document.querySelectorAll('#ms-legend li')].map(li => li.textContent)")
        chat = browser.evaluate(s, "(() => { const m = document.querySelectorAll('#ms-chat .message, "
                                   "#ms-chat [data-testid=\"bot\"]'); return m.length ? m[m.length - 1].textContent : ''; })()")
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False}, s)
        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        return {"urls": browser.requested_urls(), "legend": legend or [], "chat": chat or "",
                "seconds": time.time() - t0}
    finally:
        browser.close()


if __name__ == "__main__":
    url, image, question, out = sys.argv[1:5]
    result = ask_in_page(url, image, question, out)
    print(json.dumps({k: v for k, v in result.items() if k != "urls"} | {"n_urls": len(result["urls"])}, indent=1))
