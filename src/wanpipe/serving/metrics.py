"""The metrics of ``wanpipe serve`` for ``GET /metrics``, through ``prometheus_client``.

Each :class:`Metrics` has its own ``CollectorRegistry`` (several servers may live in one process, as in
the tests): counters of jobs and batches, histograms of queue wait, step, run and batch times, and the
gauges of the store's state, set at each scrape by :meth:`Metrics.render`.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wanpipe.serving.store import JobStatus

# The Prometheus text format 0.0.4 that generate_latest writes (prometheus_client's
# CONTENT_TYPE_PLAIN_0_0_4; its CONTENT_TYPE_LATEST names 1.0.0 in recent releases).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The counters: (the key :meth:`Metrics.count` takes, the metric name without ``_total``, label, help).
COUNTERS = (
    ("submitted", "wanpipe_jobs_submitted", "api", "Jobs accepted, by API."),
    ("rejected", "wanpipe_requests_rejected", "reason", "Generation requests refused, by reason."),
    ("finished", "wanpipe_jobs_finished", "status", "Jobs finished since start, by outcome."),
    ("batches", "wanpipe_batches", "size", "Executor batches run, by the number of jobs in them."),
)
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# The histograms: (the key :meth:`Metrics.observe` takes, help, buckets in seconds).
HISTOGRAMS = (
    (
        "step_seconds",
        "Time of one denoising step of a batch (its denoise time over its steps, once per step).",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    ),
    ("queue_wait_seconds", "Time from a job's submission to its start.", _SECONDS),
    ("run_seconds", "Time from a job's start to its saved video.", _SECONDS),
    ("batch_seconds", "Time of one executor batch, its videos saved.", _SECONDS),
)


class Metrics:
    """The counters, histograms and gauges behind ``/metrics``, in a registry of their own."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._counters = {
            key: Counter(name, help, [label], registry=r) for key, name, label, help in COUNTERS
        }
        self._histograms = {
            key: Histogram(f"wanpipe_{key}", help, buckets=buckets, registry=r)
            for key, help, buckets in HISTOGRAMS
        }
        self._ready = Gauge("wanpipe_ready", "1 when the model is loaded and the worker runs.", registry=r)
        self._queue_depth = Gauge("wanpipe_queue_depth", "Jobs waiting to run.", registry=r)
        self._jobs = Gauge("wanpipe_jobs", "Jobs in the store by state.", ["state"], registry=r)
        self._running = Gauge("wanpipe_running_batch_size", "Jobs in the batch now running.", registry=r)
        self._lock = threading.Lock()
        self._batch_total = 0.0  # for Retry-After: the mean batch time
        self._batch_count = 0

    def count(self, counter: str, key: Any, n: int = 1) -> None:
        """Add ``n`` to the counter ``counter`` (submitted, rejected, finished, batches) at label ``key``."""
        self._counters[counter].labels(str(key)).inc(n)

    def observe(self, name: str, seconds: float, times: int = 1) -> None:
        """Observe ``seconds`` in the histogram ``name``, ``times`` times."""
        histogram = self._histograms[name]
        for _ in range(times):
            histogram.observe(seconds)
        if name == "batch_seconds":
            with self._lock:
                self._batch_total += seconds
                self._batch_count += times

    def mean_batch_seconds(self) -> float | None:
        with self._lock:
            return self._batch_total / self._batch_count if self._batch_count else None

    def render(self, *, ready: bool, counts: dict[JobStatus, int], running_batch: int) -> bytes:
        """The Prometheus text (format 0.0.4, :data:`CONTENT_TYPE`), the gauges set to the given state."""
        self._ready.set(int(ready))
        self._queue_depth.set(counts[JobStatus.QUEUED])
        for state, n in counts.items():
            self._jobs.labels(state.value).set(n)
        self._running.set(running_batch)
        return generate_latest(self.registry)
