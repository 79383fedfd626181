"""Helpers for the service's tests: a `mirasol-serve` process, its HTTP API, SSE and WebSocket clients, and a
headless Chromium driven through the DevTools protocol (Debian's `chromium` package)."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .live_tools import REPO, Lines

TOKEN = "test-token-0123456789abcdef"


class Server:
    """A `mirasol-serve` subprocess on a free loopback port, with the API token."""

    def __init__(self, bundle: Path, *options: str, token: str | None = TOKEN) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mirasol-serve-test-"))
        env = {**os.environ}
        env.pop("MIRASOL_SERVE_TOKEN", None)
        args = [sys.executable, "-m", "mirasol.runtime.cli.serve", str(bundle), "--port", "0", *options]
        if token:
            (self.folder / "token").write_text(token)
            args += ["--token-file", str(self.folder / "token")]
        self.token = token
        self.process = subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.err = Lines(self.process.stderr)
        line = self.err.until(lambda text: "listening on" in text, timeout=90)
        self.host, self.port = re.search(r"http://([\d.]+):(\d+)", line).groups()  # type: ignore[union-attr]
        self.port = int(self.port)
        self.url = f"http://{self.host}:{self.port}"
        self.until(lambda: self.call("GET", "/readyz")[0] == 200, 30, "ready")

    def close(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        finally:
            self.process.kill()
            shutil.rmtree(self.folder, ignore_errors=True)

    def headers(self, token: str | None = "") -> dict[str, str]:
        token = self.token if token == "" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: Any = None, token: str | None = "", raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON or bytes, headers) of one request."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        sent = dict(self.headers(token))
        if body is not None:
            raw = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        try:
            connection.request(method, path, body=raw, headers=sent)
            reply = connection.getresponse()
            data = reply.read()
            found = {k.lower(): v for k, v in reply.getheaders()}
        finally:
            connection.close()
        if found.get("content-type", "").startswith("application/json"):
            return reply.status, json.loads(data), found
        return reply.status, data, found

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        code, data, _ = self.call(method, path, body)
        assert code == status, (method, path, code, data)
        return data

    @staticmethod
    def until(predicate, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def sse(self, method: str, path: str, body: Any = None) -> Iterator[tuple[str, Any]]:
        """(event, data) of a server-sent event stream, until it ends."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {**self.headers(), "Accept": "text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        reply = connection.getresponse()
        assert reply.status == 200, reply.read()
        event, data = None, []
        try:
            for raw in reply:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and event is not None:
                    yield event, json.loads("\n".join(data))
                    event, data = None, []
        finally:
            connection.close()

    @contextmanager
    def websocket(self, token: str | None = ""):
        from websockets.sync.client import connect

        token = self.token if token == "" else token
        query = f"?access_token={token}" if token else ""
        with connect(f"ws://{self.host}:{self.port}/ws{query}", open_timeout=10) as socket:
            yield socket


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (a WebSocket)."""

    def __init__(self, binary: str) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="mirasol-chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = Lines(self.process.stderr).until(lambda text: "DevTools listening on" in text, timeout=60)
        port = int(re.search(r"ws://127\.0\.0\.1:(\d+)/", line).group(1))  # type: ignore[union-attr]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/json/list")
        pages = [t for t in json.loads(connection.getresponse().read()) if t["type"] == "page"]
        self.stack = ExitStack()
        self.socket = self.stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None,
                                                       open_timeout=10))
        self.ids = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        self.socket.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == self.ids:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.stack.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
