"""Helpers for the serving tests: servers on 127.0.0.1 (in a thread or a subprocess), bounded waits.

Every wait here has a deadline; every server binds a loopback port the kernel picks.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy (returned), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ThreadServer:
    """An app served by uvicorn in a thread of the test process (its lifespan starts the worker)."""

    def __init__(self, app: Any):
        import uvicorn

        self.app = app
        self.sock = loopback_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the server to start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop"


class ServerProcess:
    """``python -m wanpipe.serving --port 0 ...`` as a subprocess; the URL is read from its first line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", "wanpipe.serving", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url(60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                return match.group(1)
        self.kill()
        raise AssertionError(f"the server printed no address; output:\n{''.join(self.output)}")

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{''.join(self.output)}")
            try:
                return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout, "the server to be ready", interval=0.1)

    def kill(self) -> None:
        """``kill -9``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class Gate:
    """The test's side of the worker's step gate (``wanpipe.serving.step_gate``): the worker runs only the
    steps a test allows, so the test knows which step a job is at when it deletes, kills or stops."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """The environment that turns the gate on in a server process."""
        from wanpipe.serving.step_gate import ENV

        return {ENV: str(self.folder)}

    def allow(self, steps: int) -> None:
        """Let the worker run ``steps`` steps in all (since the server started)."""
        from wanpipe.serving.step_gate import write_whole

        write_whole(self.folder / "allowed", str(steps))

    def open(self) -> None:
        self.allow(10**9)

    def waiting(self) -> int | None:
        try:
            return int((self.folder / "waiting").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def hold_at(self, steps: int, timeout: float = 60) -> None:
        """Allow ``steps`` steps in all and wait until the worker has run them and holds before the next."""
        self.allow(steps)
        wait_until(lambda: self.waiting() == steps, timeout, f"the worker to hold after {steps} steps", 0.01)


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    """A smooth random picture as PNG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [0.5 + 0.45 * np.sin(rng.uniform(0.1, 0.5) * y + rng.uniform(0.1, 0.5) * x) for _ in range(3)]
    picture = (np.stack(channels, -1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def read_mp4(data: bytes, folder: Path, name: str = "video.mp4") -> tuple[np.ndarray, float]:
    from wanpipe.media import read_video

    path = folder / name
    path.write_bytes(data)
    return read_video(path)


def error_type(status: int) -> str:
    """The OpenAI error type the server gives for an HTTP status."""
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> dict:
    """The response is an OpenAI-style error with this status (and param / code when given)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == error_type(status), error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def record_served_frames(
    pipe: Any, setattr_: Callable[[Any, str, Any], None] = setattr
) -> dict[str, np.ndarray]:
    """Spy on ``pipe.run_contexts`` as the server calls it: each job's float32 frames (F, H, W, 3), by job
    id, before any 8-bit rounding; the spy then writes them into the job's sinks itself, so the server
    still stores the video. (The server streams uint8 into its sinks: this keeps the float frames for
    the tests that compare them with an engine run at 1e-5.) ``setattr_``: e.g. ``monkeypatch.setattr``."""
    import torch

    from wanpipe.stages.stream import write_frames

    seen: dict[str, np.ndarray] = {}
    run_contexts = pipe.run_contexts

    def spy(contexts: list, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        sinks = kwargs.pop("sinks", None)
        frames, timings = run_contexts(contexts, *args, **kwargs)
        if sinks is None:
            return frames, timings
        for sink, made in zip(sinks, frames):
            if made is not None:
                seen[sink.sink.job_id] = made  # DeferredErrors(VideoFiles(media, job_id, ...))
                write_frames(torch.from_numpy(made)[None], [sink])
        return [None if made is None else sink for sink, made in zip(sinks, frames)], timings

    setattr_(pipe, "run_contexts", spy)
    return seen
