"""Jobs that survive: the SQLite job store, the bounded queue, and the one worker that owns the model.

* :class:`JobStore` keeps every job in ``jobs.sqlite3`` in the output directory (WAL journal,
  ``synchronous=FULL``: a committed state change survives ``kill -9``). A finished video is written to
  ``videos/<id>.mp4`` (and its first frame to ``videos/<id>.jpg``) atomically, *before* the row says
  ``completed``; uploaded images are kept as ``inputs/<id>.<name>.png`` before the row is inserted. So
  a row never points at a missing or half-written file. The store holds an exclusive lock on the
  directory: two servers never run the same jobs.
* On start, :meth:`JobStore.recover` puts jobs that were running when the process died back in the queue
  (a job that was running during three crashes is marked failed instead: it may be what crashes the
  server), fails queued jobs of another model, and removes files no row refers to.
* :class:`JobManager` runs one worker thread: it loads the pipeline, then loops: claim the oldest queued
  job and the later queued jobs of the same batch key (same latent shape and schedule, up to
  ``max_batch``), run them as one executor batch, save each video, mark each job. HTTP handlers only
  talk to the store and never wait on the model. ``DELETE`` of a running job stops its batch at the
  next denoising step once every job of the batch is deleted (a batch's other jobs keep running: the
  deleted job's video is discarded). Shutdown stops the running batch at the next step and puts its jobs
  back in the queue: nothing is finished half-way and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from wanpipe.context import InvalidRequestError, WanContext, WanRequest
from wanpipe.executor import CancelledError
from wanpipe.media import Video, read_image
from wanpipe.serving.parsing import JobSpec, NewJob, ServeLimits

if TYPE_CHECKING:
    from wanpipe.pipeline import WanPipeline
    from wanpipe.serving.distributed import BatchLeader

logger = logging.getLogger("wanpipe.serving")

SCHEMA_VERSION = 1
MAX_ATTEMPTS = 3  # a job running during this many crashes is failed, not run again
IMAGE_NAMES = ("image", "last_image")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    """One row of the store: a generation request and its state."""

    id: str
    status: JobStatus
    model: str
    spec: JobSpec
    batch_key: str
    source: str  # "videos" or "responses": the API that made the job
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    progress: int = 0
    error: dict[str, str] | None = None  # {"code", "message"} when failed
    batch_size: int | None = None
    attempts: int = 0
    seq: int = 0

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.FAILED)


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class StoreLockedError(RuntimeError):
    """Another server uses this output directory."""


class JobStore:
    """Jobs in SQLite, videos and input images as files beside it. Safe to use from several threads."""

    def __init__(self, folder: str | os.PathLike[str], *, exclusive: bool = True):
        self.folder = Path(folder)
        self.videos_dir = self.folder / "videos"
        self.inputs_dir = self.folder / "inputs"
        for d in (self.folder, self.videos_dir, self.inputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        if exclusive:
            self._lock_file = open(self.folder / ".lock", "a+")  # noqa: SIM115 - held for the store's life
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise StoreLockedError(
                    f"{self.folder} is in use by another wanpipe serve; give each server its own --output-dir"
                ) from None
        self.path = self.folder / "jobs.sqlite3"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was made by a newer wanpipe (schema {version} > {SCHEMA_VERSION})"
            )
        with self._transaction() as db:
            db.execute(
                """CREATE TABLE IF NOT EXISTS jobs (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    id TEXT NOT NULL UNIQUE,
                    status TEXT NOT NULL,
                    model TEXT NOT NULL,
                    params TEXT NOT NULL,
                    batch_key TEXT NOT NULL,
                    source TEXT NOT NULL,
                    created_at REAL NOT NULL,
                    started_at REAL,
                    completed_at REAL,
                    progress INTEGER NOT NULL DEFAULT 0,
                    error TEXT,
                    batch_size INTEGER,
                    attempts INTEGER NOT NULL DEFAULT 0
                )"""
            )
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq)")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- files --------------------------------------------------------------------------------
    def video_path(self, job_id: str) -> Path:
        return self.videos_dir / f"{job_id}.mp4"

    def thumbnail_path(self, job_id: str) -> Path:
        return self.videos_dir / f"{job_id}.jpg"

    def input_path(self, job_id: str, name: str) -> Path:
        return self.inputs_dir / f"{job_id}.{name}.png"

    def read_inputs(self, job: Job) -> dict[str, np.ndarray]:
        names = [
            n for n, present in zip(IMAGE_NAMES, (job.spec.has_image, job.spec.has_last_image)) if present
        ]
        return {name: read_image(self.input_path(job.id, name)) for name in names}

    def remove_files(self, job_id: str) -> None:
        paths = [self.video_path(job_id), self.thumbnail_path(job_id)]
        paths += [self.input_path(job_id, name) for name in IMAGE_NAMES]
        for path in paths:
            path.unlink(missing_ok=True)

    @staticmethod
    def _write_png(array: np.ndarray, dest: Path) -> None:
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "wb") as f:
                Image.fromarray(array).save(f, format="PNG")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- rows ---------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"],
            status=JobStatus(row["status"]),
            model=row["model"],
            spec=JobSpec.from_json(json.loads(row["params"])),
            batch_key=row["batch_key"],
            source=row["source"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            progress=row["progress"],
            error=json.loads(row["error"]) if row["error"] else None,
            batch_size=row["batch_size"],
            attempts=row["attempts"],
            seq=row["seq"],
        )

    def add(self, job: Job, images: dict[str, np.ndarray] | None = None) -> Job:
        """Insert a queued job; its input images are on disk before the row exists."""
        written = []
        try:
            for name, array in (images or {}).items():
                path = self.input_path(job.id, name)
                self._write_png(array, path)
                written.append(path)
            with self._transaction() as db:
                cursor = db.execute(
                    "INSERT INTO jobs (id, status, model, params, batch_key, source, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        JobStatus.QUEUED.value,
                        job.model,
                        json.dumps(job.spec.to_json()),
                        job.batch_key,
                        job.source,
                        job.created_at,
                    ),
                )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return replace(job, status=JobStatus.QUEUED, seq=cursor.lastrowid)

    def get(self, job_id: str) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list(
        self, *, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> tuple[list[Job], bool]:
        """A page of jobs, newest first (``order="desc"``) or oldest first; ``after`` is the last id of the
        previous page (KeyError if unknown). Returns (jobs, has_more)."""
        descending = order == "desc"
        where, args = "", ()
        if after is not None:
            rows = self._query("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not rows:
                raise KeyError(after)
            where, args = ("WHERE seq < ?" if descending else "WHERE seq > ?"), (rows[0]["seq"],)
        rows = self._query(
            f"SELECT * FROM jobs {where} ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?",
            (*args, limit + 1),
        )
        return [self._job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[JobStatus, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        found = {row["status"]: row["n"] for row in rows}
        return {status: found.get(status.value, 0) for status in JobStatus}

    def count(self, status: JobStatus) -> int:
        return self._query("SELECT COUNT(*) AS n FROM jobs WHERE status = ?", (status.value,))[0]["n"]

    def claim_batch(self, max_batch: int, now: float) -> list[Job]:
        """Mark the oldest queued job and up to ``max_batch - 1`` later queued jobs with its batch key as
        running, and return them (oldest first)."""
        with self._transaction() as db:
            first = db.execute(
                "SELECT batch_key FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if first is None:
                return []
            rows = db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' AND batch_key = ? ORDER BY seq LIMIT ?",
                (first["batch_key"], max_batch),
            ).fetchall()
            db.executemany(
                "UPDATE jobs SET status = 'in_progress', started_at = ?, progress = 0 WHERE id = ?",
                [(now, row["id"]) for row in rows],
            )
        return [replace(self._job(r), status=JobStatus.IN_PROGRESS, started_at=now) for r in rows]

    def requeue(self, job_ids: list[str]) -> int:
        """Running jobs back to the queue (at their old place: the queue is ordered by creation)."""
        with self._transaction() as db:
            return sum(
                db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL, progress = 0 "
                    "WHERE id = ? AND status = 'in_progress'",
                    (job_id,),
                ).rowcount
                for job_id in job_ids
            )

    def complete(self, job_id: str, *, batch_size: int, now: float) -> bool:
        """Mark a running job completed; False if it was deleted meanwhile."""
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, batch_size = ? "
                    "WHERE id = ? AND status = 'in_progress'",
                    (now, batch_size, job_id),
                ).rowcount
                == 1
            )

    def fail(
        self, job_id: str, code: str, message: str, *, now: float, batch_size: int | None = None
    ) -> bool:
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE jobs SET status = 'failed', completed_at = ?, error = ?, batch_size = ? "
                    "WHERE id = ? AND status IN ('queued', 'in_progress')",
                    (now, json.dumps({"code": code, "message": message}), batch_size, job_id),
                ).rowcount
                == 1
            )

    def delete(self, job_id: str) -> Job | None:
        """Remove a job's row (its files are the caller's: see :meth:`remove_files`); the job as it was."""
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return self._job(row)

    def recover(self, model: str, *, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """After a start: requeue jobs that were running, fail queued jobs of another model and jobs that
        were running during ``max_attempts`` crashes, remove files no job refers to."""
        now = time.time()
        with self._transaction() as db:
            other_model = db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error = ? "
                "WHERE status IN ('queued', 'in_progress') AND model != ?",
                (
                    now,
                    json.dumps(
                        {
                            "code": "model_changed",
                            "message": f"the server restarted with another model ({model}) before this job ran",
                        }
                    ),
                    model,
                ),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, progress = 0, attempts = attempts + 1 "
                "WHERE status = 'in_progress'"
            ).rowcount
            gave_up = db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error = ? "
                "WHERE status = 'queued' AND attempts >= ?",
                (
                    now,
                    json.dumps(
                        {
                            "code": "server_crashed",
                            "message": f"the server stopped {max_attempts} times while running this job",
                        }
                    ),
                    max_attempts,
                ),
            ).rowcount
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            ids = {row[0] for row in db.execute("SELECT id FROM jobs")}
        removed = 0
        for folder in (self.videos_dir, self.inputs_dir):
            for path in folder.iterdir():
                temporary = path.name.startswith(".") and path.name.endswith(".tmp")
                if temporary or path.name.split(".", 1)[0] not in ids:
                    path.unlink(missing_ok=True)
                    removed += 1
        return {
            "queued": queued,
            "requeued": requeued,
            "failed_after_crashes": gave_up,
            "failed_other_model": other_model,
            "files_removed": removed,
        }


# ---------------------------------------------------------------------------------------------------------
# Metrics


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

        with self._lock:
            metric("wanpipe_ready", "gauge", "1 when the model is loaded and the worker runs.", [("", ready)])
            metric("wanpipe_queue_depth", "gauge", "Jobs waiting to run.", [("", counts[JobStatus.QUEUED])])
            metric(
                "wanpipe_jobs",
                "gauge",
                "Jobs in the store by state.",
                [(f'{{state="{s.value}"}}', n) for s, n in counts.items()],
            )
            metric(
                "wanpipe_running_batch_size", "gauge", "Jobs in the batch now running.", [("", running_batch)]
            )
            metric(
                "wanpipe_jobs_submitted_total",
                "counter",
                "Jobs accepted, by API.",
                [(f'{{api="{a}"}}', n) for a, n in sorted(self.submitted.items())],
            )
            metric(
                "wanpipe_requests_rejected_total",
                "counter",
                "Generation requests refused, by reason.",
                [(f'{{reason="{r}"}}', n) for r, n in sorted(self.rejected.items())],
            )
            metric(
                "wanpipe_jobs_finished_total",
                "counter",
                "Jobs finished since start, by outcome.",
                [(f'{{status="{s}"}}', n) for s, n in sorted(self.finished.items())],
            )
            metric(
                "wanpipe_batches_total",
                "counter",
                "Executor batches run, by the number of jobs in them.",
                [(f'{{size="{size}"}}', n) for size, n in sorted(self.batches.items())],
            )
            for name, help in (
                ("step_seconds", "Time of one denoising step of a batch."),
                ("queue_wait_seconds", "Time from a job's submission to its start."),
                ("run_seconds", "Time from a job's start to its saved video."),
            ):
                total, n = getattr(self, name)
                metric(f"wanpipe_{name}", "summary", help, [("_sum", total), ("_count", n)])
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The worker


class NotReadyError(RuntimeError):
    """The model is still loading (or failed to load)."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and takes no new work."""


class QueueFullError(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModelError(ValueError):
    """The request names a model this server does not serve."""


class LimitExceededError(InvalidRequestError):
    """A request larger than the server's configured limits."""


def batch_key_digest(ctx: WanContext) -> str:
    """A stable text form of ``ctx.batch_key`` for the store (equal keys -> equal digests)."""
    return hashlib.sha256(repr(ctx.batch_key).encode()).hexdigest()[:32]


class JobManager:
    """The queue and the one worker thread that owns the pipeline."""

    def __init__(
        self,
        store: JobStore,
        load_pipeline: Callable[[], WanPipeline],
        *,
        model_name: str,
        model_aliases: tuple[str, ...] = (),
        limits: ServeLimits | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        leader: BatchLeader | None = None,
    ):
        """``leader``: under torchrun, rank 0's link to the follower ranks (``wanpipe.serving.distributed``):
        each batch, each step's cancel flag and the stop go to them; any failure stops the server."""
        self.store = store
        self._leader = leader
        self._world_broken = False
        self.fatal_error: BaseException | None = None  # under torchrun: the failure that stopped the server
        self.model_name = model_name
        self.model_names = {model_name, *model_aliases}
        self.limits = limits or ServeLimits()
        self.metrics = Metrics()
        self.pipe: WanPipeline | None = None
        self.load_error: BaseException | None = None
        self._load_pipeline = load_pipeline
        self._on_fatal = on_fatal
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._paused = False
        self._submit_lock = threading.Lock()
        self._tokenize_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._progress: dict[str, int] = {}
        self._running: frozenset[str] = frozenset()
        self._cancelled: set[str] = set()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.recovery = store.recover(model_name)
        if any(self.recovery.values()):
            logger.info(
                "job store %s: %s", store.folder, ", ".join(f"{k} {v}" for k, v in self.recovery.items())
            )
        self._thread = threading.Thread(target=self._main, name="wanpipe-worker", daemon=True)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def pause(self) -> None:
        """Start no new batch until :meth:`resume` (the running batch goes on)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def begin_shutdown(self) -> None:
        """Take no new work; stop the running batch at its next step and put its jobs back in the queue."""
        if not self._stopping.is_set():
            logger.info("shutting down: a running batch stops at its next step and stays queued")
        self._stopping.set()
        self._wake.set()
        with self._state_lock:
            job_ids = list(self._watchers)
        for job_id in job_ids:
            self._notify(job_id)

    def stop(self, timeout: float = 60.0) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "the worker did not stop within %.0f s; its jobs run again after a restart", timeout
            )
        else:
            self.store.close()

    # -- the HTTP side ------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise UnknownModelError(
                f"the model {name!r} is not served here; this server serves {self.model_name!r}"
            )

    def submit(self, new: NewJob, source: str) -> Job:
        """Validate a request against the limits and the model, and queue it. Raises NotReadyError,
        ShuttingDownError, UnknownModelError, InvalidRequestError (LimitExceededError) or QueueFullError."""
        if self._stopping.is_set():
            raise ShuttingDownError("the server is shutting down")
        pipe = self.pipe
        if pipe is None or not self._ready.is_set():
            raise NotReadyError("the model is still loading")
        self.check_model(new.model)
        self._check_limits(pipe, new.spec)
        with self._tokenize_lock:  # the engine validates the rest (an image on a text-to-video model, ...)
            ctx = pipe.tokenizer.make_context(_wan_request(new.spec, new.image, new.last_image))
        spec = replace(
            new.spec,
            height=ctx.height,
            width=ctx.width,
            num_frames=ctx.num_frames,
            num_inference_steps=ctx.num_inference_steps,
            guidance_scale=ctx.guidance_scale,
            guidance_scale_2=getattr(ctx, "guidance_scale_2", new.spec.guidance_scale_2),
            flow_shift=ctx.flow_shift,
            seed=ctx.seed,
            fps=new.spec.fps if new.spec.fps is not None else float(ctx.fps),
        )
        job = Job(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            model=self.model_name,
            spec=spec,
            batch_key=batch_key_digest(ctx),
            source=source,
            created_at=time.time(),
        )
        images = {"image": new.image, "last_image": new.last_image}
        with self._submit_lock:
            queued = self.store.count(JobStatus.QUEUED)
            if queued >= self.limits.max_queue:
                self.metrics.count("rejected", "queue_full")
                raise QueueFullError(
                    f"the queue is full ({queued} jobs waiting, --max-queue {self.limits.max_queue}); "
                    "try again later",
                    self.retry_after(queued),
                )
            job = self.store.add(job, {k: v for k, v in images.items() if v is not None})
        self.metrics.count("submitted", source)
        self._wake.set()
        return job

    def retry_after(self, queued: int | None = None) -> int:
        """Seconds until the queue has room, roughly: the batches ahead times a batch's mean time."""
        queued = self.store.count(JobStatus.QUEUED) if queued is None else queued
        per_batch = self.metrics.mean_batch_seconds() or 10.0
        return int(min(3600, max(1, math.ceil(max(queued, 1) / self.limits.max_batch) * per_batch)))

    def _check_limits(self, pipe: WanPipeline, spec: JobSpec) -> None:
        d, lim = pipe.arch.defaults, self.limits
        height = d.height if spec.height is None else spec.height
        width = d.width if spec.width is None else spec.width
        frames = d.num_frames if spec.num_frames is None else spec.num_frames
        steps = d.num_inference_steps if spec.num_inference_steps is None else spec.num_inference_steps
        if height * width > lim.max_pixels:
            raise LimitExceededError(
                f"size {width}x{height} is {width * height} pixels; this server allows at most "
                f"{lim.max_pixels} (--max-pixels)",
                "height",
            )
        if frames > lim.max_frames:
            raise LimitExceededError(
                f"num_frames {frames} is more than this server allows ({lim.max_frames}, --max-frames)",
                "num_frames",
            )
        if steps > lim.max_steps:
            raise LimitExceededError(
                f"num_inference_steps {steps} is more than this server allows ({lim.max_steps}, --max-steps)",
                "num_inference_steps",
            )

    def progress(self, job: Job) -> int:
        if job.status == JobStatus.COMPLETED:
            return 100
        if job.status == JobStatus.IN_PROGRESS:
            with self._state_lock:
                return self._progress.get(job.id, job.progress)
        return job.progress

    def running_batch_size(self) -> int:
        with self._state_lock:
            return len(self._running)

    def delete(self, job_id: str) -> Job | None:
        """Delete a job: a queued one never runs, a running one is cancelled (its batch stops at the next
        step once all of its jobs are deleted), a finished one's files are removed."""
        job = self.store.delete(job_id)
        if job is None:
            return None
        if job.status == JobStatus.IN_PROGRESS:
            with self._state_lock:
                self._cancelled.add(job_id)
        if not job.finished:
            self.metrics.count("finished", "cancelled")
            logger.info("job %s cancelled (%s)", job_id, job.status.value)
        self.store.remove_files(job_id)
        self._notify(job_id)
        return job

    async def wait_finished(self, job_id: str, is_disconnected: Callable[[], Awaitable[bool]]) -> Job | None:
        """Wait, without blocking the event loop, until a job is finished; None if it was deleted. A client
        that went away ends the wait with the job as it is; ShuttingDownError if the server stops first."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._state_lock:
            self._watchers.setdefault(job_id, []).append(entry)
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job.finished:
                    return job
                if self._stopping.is_set():
                    raise ShuttingDownError("the server is shutting down")
                if await is_disconnected():
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 1.0)
                event.clear()
        finally:
            with self._state_lock:
                watchers = self._watchers.get(job_id, [])
                if entry in watchers:
                    watchers.remove(entry)
                if not watchers:
                    self._watchers.pop(job_id, None)

    def _notify(self, job_id: str) -> None:
        with self._state_lock:
            watchers = list(self._watchers.get(job_id, []))
        for loop, event in watchers:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(event.set)

    # -- the worker thread --------------------------------------------------------------------
    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pipe = self._load_pipeline()
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            self.load_error = e
            logger.error("cannot load the model: %s", e)
            if self._on_fatal is not None:
                self._on_fatal(e)
            return
        logger.info("model %s loaded in %.1f s: ready", self.model_name, time.perf_counter() - t0)
        self._ready.set()
        while not self._stopping.is_set():
            if self._paused:
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            self._wake.clear()
            batch = self.store.claim_batch(self.limits.max_batch, time.time())
            if not batch:
                self._wake.wait(1.0)
                continue
            try:
                self._run_batch(batch)
            except Exception as e:  # a bug here must not stop the worker: fail the batch, go on
                logger.exception("worker error")
                for job in batch:
                    self._fail(job, "server_error", "internal error in the worker", None)
                if self._leader is not None:
                    self._break_world(e)
        if self._leader is not None and not self._world_broken:
            try:
                self._leader.send_stop()
            except Exception:
                logger.exception("cannot tell the other ranks to stop")
        logger.info("worker stopped")

    def _break_world(self, error: BaseException) -> None:
        """Under torchrun: after a failure the ranks may sit in different collectives; stop the server."""
        self._world_broken = True
        self.fatal_error = error
        logger.error("a batch failed under torchrun (%s): stopping the server; restart it", error)
        self.begin_shutdown()
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _fail(self, job: Job, code: str, message: str, batch_size: int | None) -> None:
        if self.store.fail(job.id, code, message, now=time.time(), batch_size=batch_size):
            self.metrics.count("finished", "failed")
            logger.warning("job %s failed (%s): %s", job.id, code, message)
        self._notify(job.id)

    def _run_batch(self, jobs: list[Job]) -> None:
        pipe = self.pipe
        assert pipe is not None
        runnable: list[tuple[Job, WanRequest, WanContext]] = []
        for job in jobs:
            try:
                images = self.store.read_inputs(job)
                request = _wan_request(job.spec, images.get("image"), images.get("last_image"))
                with self._tokenize_lock:
                    runnable.append((job, request, pipe.tokenizer.make_context(request)))
            except (InvalidRequestError, OSError, ValueError) as e:
                self._fail(job, "invalid_request", str(e), None)
        if not runnable:
            return
        key = runnable[0][2].batch_key
        later = [job.id for job, _, ctx in runnable if ctx.batch_key != key]  # a stale stored key
        if later:
            self.store.requeue(later)
        runnable = [item for item in runnable if item[2].batch_key == key]
        jobs = [job for job, _, _ in runnable]
        contexts = [ctx for _, _, ctx in runnable]
        if self._leader is not None:
            try:  # the followers make the same contexts from the resolved requests (seeds fixed)
                self._leader.send_batch([request for _, request, _ in runnable])
            except Exception as e:
                self.store.requeue([job.id for job in jobs])
                self._break_world(e)
                return
        ids = frozenset(job.id for job in jobs)
        with self._state_lock:
            self._running = ids
            self._progress.update(dict.fromkeys(ids, 0))

        def on_step(i: int, n: int, _t: float) -> None:
            value = int(95 * (i + 1) / n)
            with self._state_lock:
                self._progress.update(dict.fromkeys(ids, value))

        def local_cancel() -> bool:
            if self._stopping.is_set():
                return True
            with self._state_lock:
                return ids <= self._cancelled

        def should_cancel() -> bool:
            if self._leader is None:
                return local_cancel()
            return self._leader.should_cancel(local_cancel())  # every rank stops at the same step

        size = len(jobs)
        spec = jobs[0].spec
        t0 = time.perf_counter()
        try:
            frames, timings = pipe.run_contexts(
                contexts, on_step, progress=False, should_cancel=should_cancel
            )
        except CancelledError:
            if self._stopping.is_set():
                n = self.store.requeue(list(ids))
                logger.info("stopped a batch of %d at shutdown: %d job(s) stay queued", size, n)
            return
        except Exception as e:  # out of memory (WanOutOfMemoryError) or any other failure of the engine
            from wanpipe.pipeline import WanOutOfMemoryError

            code = "out_of_memory" if isinstance(e, WanOutOfMemoryError) else "generation_failed"
            if code == "generation_failed":
                logger.exception("generation failed for %s", ", ".join(sorted(ids)))
            for job in jobs:
                self._fail(job, code, str(e) or type(e).__name__, size)
            if self._leader is not None:
                self._break_world(e)
            return
        finally:
            with self._state_lock:
                self._running = frozenset()
                for job_id in ids:
                    self._progress.pop(job_id, None)
                cancelled = ids & self._cancelled
                self._cancelled -= ids
        self.metrics.count("batches", size)
        self.metrics.add("step_seconds", timings.denoise_s, spec.num_inference_steps or 1)
        for job, video_frames in zip(jobs, frames):
            if job.id in cancelled:
                continue
            try:
                video = Video(frames=video_frames, fps=job.spec.fps or 16)
                video.save(self.store.video_path(job.id))
                Video(frames=video_frames[:1], fps=video.fps).save(
                    self.store.thumbnail_path(job.id), format="jpg"
                )
            except Exception as e:
                logger.exception("saving the video of %s failed", job.id)
                self._fail(job, "save_failed", f"cannot save the video: {e}", size)
                continue
            now = time.time()
            if not self.store.complete(job.id, batch_size=size, now=now):  # deleted while it was saved
                self.store.remove_files(job.id)
                continue
            wait_s = (job.started_at or now) - job.created_at
            run_s = now - (job.started_at or now)
            self.metrics.count("finished", "completed")
            self.metrics.add("queue_wait_seconds", wait_s)
            self.metrics.add("run_seconds", run_s)
            s = job.spec
            logger.info(
                "job %s completed: %dx%d, %d frames, %d steps, batch %d, queue wait %.2f s, run %.2f s",
                job.id,
                s.width,
                s.height,
                s.num_frames,
                s.num_inference_steps,
                size,
                wait_s,
                run_s,
            )
            self._notify(job.id)
        self.metrics.add("batch_seconds", time.perf_counter() - t0)


def _wan_request(spec: JobSpec, image: Any, last_image: Any) -> WanRequest:
    return WanRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        height=spec.height,
        width=spec.width,
        num_frames=spec.num_frames,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        guidance_scale_2=spec.guidance_scale_2,
        flow_shift=spec.flow_shift,
        seed=spec.seed,
        image=image,
        last_image=last_image,
    )
