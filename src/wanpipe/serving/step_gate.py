"""A test-only hook: the worker waits before each denoising step until a test allows it.

Tests that delete, kill or stop a server while a job runs must know which step the job is at, however
fast the machine. With ``WANPIPE_TEST_STEP_GATE=<folder>`` in its environment, ``wanpipe serve``'s
worker (rank 0's under torchrun: the other ranks follow it step by step) passes a gate before each
denoising step:

* ``<folder>/allowed`` (written by the test): how many steps the worker may start in all, counted
  from the server's start over every batch; missing means 0.
* ``<folder>/waiting`` (written by the worker): how many steps it has run when it stops at the gate.
  ``waiting == n`` means: n steps done (DiT forward, sampler step, progress reported), the worker held
  before step n + 1, the check that cancels a deleted job's work not yet made.

Both files are written whole (a temporary file renamed). A worker that is shutting down leaves the gate
at once. Not for production: a server with the variable set stops at its first step until the file says
otherwise. Unset (the normal case) it costs one ``is None`` check per step.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ENV = "WANPIPE_TEST_STEP_GATE"
POLL_S = 0.002


class StepGate:
    """The worker's side of the gate (see the module's note)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = 0

    @classmethod
    def from_environment(cls) -> StepGate | None:
        folder = os.environ.get(ENV)
        return cls(folder) if folder else None

    def allowed(self) -> int:
        try:
            return int((self.folder / "allowed").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait(self, stopping: threading.Event) -> None:
        """Before a step: hold until the test allows one more step (or the server stops)."""
        if self.allowed() <= self.started:
            write_whole(self.folder / "waiting", str(self.started))
            while self.allowed() <= self.started and not stopping.wait(POLL_S):
                pass
        self.started += 1


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old text or the new, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
