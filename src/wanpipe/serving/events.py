"""Live state of running jobs: each job's step, ETA and latest preview, and the wake-ups of the streams
that watch it (``GET /v1/videos/{id}/events``, ``GET /v1/videos/{id}/preview``: :mod:`wanpipe.serving.live`).

The worker thread reports each denoising step (:meth:`JobEvents.step`, from the manager's ``on_step``)
and each preview (:meth:`JobEvents.preview`); the manager's ``_notify`` reports each finish, failure and
delete (:meth:`JobEvents.notify`). A report wakes the streams watching that job on their event loop
(``loop.call_soon_threadsafe`` sets one ``asyncio.Event`` per stream); a woken stream reads the job's
state once and sends one event. Nothing polls.

Memory is bounded: the step state and latest preview of the last ``max_jobs`` jobs that reported (a
deleted job's are dropped), each preview's frames as the engine made them (``(F, h, w, 3)`` uint8, the
longest side at most 256) until the first ``GET`` that asks for it encodes them to WebP, which is kept
instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wanpipe.context import Preview


@dataclass(frozen=True)
class StepState:
    """Where a job's denoising is: ``step`` steps done of ``num_steps``; ``eta_seconds`` until the last
    step ends (the mean of the batch's steps measured so far times the steps left; None before two steps
    were timed; the decode after the last step is not counted)."""

    step: int
    num_steps: int
    eta_seconds: float | None


@dataclass
class LatestPreview:
    """A job's newest preview: ``frames`` (F, h, w, 3) uint8 after ``step`` steps of ``num_steps``; once
    encoded (on the first request for it), ``webp`` and no frames."""

    step: int
    num_steps: int
    frames: np.ndarray | None
    fps: float
    webp: bytes | None = None


class JobEvents:
    """The hub between the worker thread and the streams (see the module's note)."""

    def __init__(self, max_jobs: int = 16):
        self.max_jobs = max_jobs
        self._lock = threading.Lock()
        self._steps: OrderedDict[str, StepState] = OrderedDict()
        self._previews: OrderedDict[str, LatestPreview] = OrderedDict()
        self._anchors: dict[frozenset[str], tuple[float, int]] = {}  # a batch's first timed step
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    # -- the worker's side ----------------------------------------------------------------------
    def step(self, job_ids: Collection[str], i: int, n: int) -> None:
        """Step ``i`` (0-based) of ``n`` of the batch of ``job_ids`` is done."""
        now = time.monotonic()
        key = frozenset(job_ids)
        with self._lock:
            anchor = self._anchors.get(key)
            if anchor is None or i <= anchor[1]:  # a new batch (or the same jobs run again)
                anchor = self._anchors[key] = (now, i)
            t0, i0 = anchor
            eta = (now - t0) / (i - i0) * (n - 1 - i) if i > i0 else None
            if i >= n - 1:
                self._anchors.pop(key, None)
            state = StepState(step=i + 1, num_steps=n, eta_seconds=None if eta is None else round(eta, 3))
            for job_id in key:
                self._remember(self._steps, job_id, state)
        self.notify_many(key)

    def preview(self, job_id: str, step: int, num_steps: int, frames: np.ndarray, fps: float) -> None:
        """A new preview of a job: ``frames`` (F, h, w, 3) uint8 after ``step`` steps of ``num_steps``."""
        with self._lock:
            self._remember(self._previews, job_id, LatestPreview(step, num_steps, frames, float(fps)))
        self.notify(job_id)

    def previewer(self, job_ids: Sequence[str | None]) -> Callable[[Preview], None] | None:
        """The engine's ``preview`` callback for a batch whose row ``r`` is job ``job_ids[r]`` (None: a job
        that asked for no previews; None for the callback when none did): each ``Preview`` (``step``: the
        0-based index of the step just taken) becomes that job's latest preview."""
        if all(job_id is None for job_id in job_ids):
            return None

        def on_preview(p: Preview) -> None:
            job_id = job_ids[p.row]
            if job_id is not None:
                self.preview(job_id, p.step + 1, p.num_steps, np.asarray(p.frames), p.fps)

        return on_preview

    def _remember(self, table: OrderedDict[str, Any], job_id: str, value: Any) -> None:
        table[job_id] = value
        table.move_to_end(job_id)
        while len(table) > self.max_jobs:
            table.popitem(last=False)

    def forget(self, job_id: str) -> None:
        """Drop a deleted job's state and preview."""
        with self._lock:
            self._steps.pop(job_id, None)
            self._previews.pop(job_id, None)

    # -- the streams' side ----------------------------------------------------------------------
    def state(self, job_id: str) -> StepState | None:
        with self._lock:
            return self._steps.get(job_id)

    def latest_preview(self, job_id: str) -> LatestPreview | None:
        with self._lock:
            return self._previews.get(job_id)

    def preview_webp(
        self, job_id: str, encode: Callable[[np.ndarray, float], bytes]
    ) -> tuple[bytes, int] | None:
        """The latest preview as WebP bytes and its step (encoded once per preview); None before the first
        one. Blocking: call it from a thread."""
        with self._lock:
            latest = self._previews.get(job_id)
            if latest is None:
                return None
            webp, frames = latest.webp, latest.frames  # one of the two
        if webp is None:
            webp = encode(frames, latest.fps)
            with self._lock:
                latest.webp, latest.frames = webp, None
        return webp, latest.step

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set (on the running loop) whenever the job reports something; clear it, read, wait."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._watchers.setdefault(job_id, []).append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                watchers = self._watchers.get(job_id, [])
                if entry in watchers:
                    watchers.remove(entry)
                if not watchers:
                    self._watchers.pop(job_id, None)

    def notify(self, job_id: str) -> None:
        """Wake the streams of a job (from any thread)."""
        self.notify_many((job_id,))

    def notify_many(self, job_ids: Collection[str]) -> None:
        with self._lock:
            watchers = [w for job_id in job_ids for w in self._watchers.get(job_id, ())]
        for loop, event in watchers:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(event.set)

    def notify_all(self) -> None:
        """Wake every stream (the server is stopping)."""
        with self._lock:
            job_ids = list(self._watchers)
        self.notify_many(job_ids)


def sse_event(name: str, data: str) -> bytes:
    """One Server-Sent Event: its name and one line of data (JSON)."""
    return f"event: {name}\ndata: {data}\n\n".encode()
