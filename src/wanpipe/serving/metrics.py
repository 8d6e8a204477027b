"""The counters and sums of ``wanpipe serve`` for ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from wanpipe.serving.store import JobStatus

# The counters of :class:`Metrics`: (attribute, metric name, label, help).
COUNTERS = (
    ("submitted", "wanpipe_jobs_submitted_total", "api", "Jobs accepted, by API."),
    ("rejected", "wanpipe_requests_rejected_total", "reason", "Generation requests refused, by reason."),
    ("finished", "wanpipe_jobs_finished_total", "status", "Jobs finished since start, by outcome."),
    ("batches", "wanpipe_batches_total", "size", "Executor batches run, by the number of jobs in them."),
)
# The sums of :class:`Metrics` shown as summaries (batch_seconds is kept for Retry-After only).
SUMMARIES = (
    ("step_seconds", "Time of one denoising step of a batch."),
    ("queue_wait_seconds", "Time from a job's submission to its start."),
    ("run_seconds", "Time from a job's start to its saved video."),
)


class Metrics:
    """Counters and sums for ``/metrics`` (Prometheus text format)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.batches: Counter[int] = Counter()
        self.step_seconds = [0.0, 0]  # sum, count
        self.queue_wait_seconds = [0.0, 0]
        self.run_seconds = [0.0, 0]
        self.batch_seconds = [0.0, 0]

    def add(self, name: str, value: float, count: int = 1) -> None:
        with self._lock:
            pair = getattr(self, name)
            pair[0] += value
            pair[1] += count

    def count(self, counter: str, key: Any, n: int = 1) -> None:
        with self._lock:
            getattr(self, counter)[key] += n

    def mean_batch_seconds(self) -> float | None:
        with self._lock:
            total, n = self.batch_seconds
        return total / n if n else None

    def render(self, *, ready: bool, counts: dict[JobStatus, int], running_batch: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        def labelled(label: str, items: Iterable[tuple[Any, float]]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{key}"}}', n) for key, n in items]

        with self._lock:
            metric("wanpipe_ready", "gauge", "1 when the model is loaded and the worker runs.", [("", ready)])
            metric("wanpipe_queue_depth", "gauge", "Jobs waiting to run.", [("", counts[JobStatus.QUEUED])])
            states = ((s.value, n) for s, n in counts.items())
            metric("wanpipe_jobs", "gauge", "Jobs in the store by state.", labelled("state", states))
            metric(
                "wanpipe_running_batch_size", "gauge", "Jobs in the batch now running.", [("", running_batch)]
            )
            for counter, name, label, help in COUNTERS:
                metric(name, "counter", help, labelled(label, sorted(getattr(self, counter).items())))
            for name, help in SUMMARIES:
                total, n = getattr(self, name)
                metric(f"wanpipe_{name}", "summary", help, [("_sum", total), ("_count", n)])
        return "\n".join(lines) + "\n"
