"""The job store of ``wanpipe serve``: every job in SQLite, its videos and input images in a media store.

:class:`JobStore` keeps every job in ``jobs.sqlite3`` in the output directory (WAL journal,
``synchronous=FULL``: a committed state change survives ``kill -9``). Files live in its media store
(:mod:`wanpipe.serving.media_store`: the output directory by default, ``--media-dir`` or ``--media s3://``).
A finished video is written to ``videos/<id>.mp4`` (and its first frame to ``videos/<id>.jpg``)
atomically, *before* the row says ``completed``; uploaded images are kept as ``inputs/<id>.<name>.png``
(VACE's video and mask, resized to the output size, and Animate's driving videos, resized as the engine
resolved them, as ``inputs/<id>.<name>.npy``) before the row is inserted. So a
row never points at a missing or half-written file. The store holds an exclusive lock on the directory:
two servers never run the same jobs. A database SQLite cannot read whole on start is refused
(:class:`StoreUnreadableError`) and left as it is.

On start, :meth:`JobStore.recover` puts jobs that were running when the process died back in the queue (a
job that was running during three crashes is marked failed instead: it may be what crashes the server),
fails queued jobs of another model, and removes files no row refers to (not in shared media: other
servers' files are there).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wanpipe.serving.media_store import (
    LocalMedia,
    MediaStore,
    array_key,
    input_key,
    is_temporary,
    key_job_id,
    read_input,
    remove_job_media,
    write_input,
)
from wanpipe.serving.parsing import JobSpec

SCHEMA_VERSION = 1
MAX_ATTEMPTS = 3  # a job running during this many crashes is failed, not run again
IMAGE_NAMES = ("image", "last_image")
ARRAY_NAMES = ("video", "mask")  # VACE's inputs, kept as uint8 arrays (.npy)
ANIMATE_ARRAY_NAMES = ("pose_video", "face_video", "background_video", "mask_video")  # uint8 .npy


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


def _error_json(code: str, message: str) -> str:
    """A failed job's ``error`` column: ``{"code", "message"}`` (read back into :attr:`Job.error`)."""
    return json.dumps({"code": code, "message": message})


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


class StoreLockedError(RuntimeError):
    """Another server uses this output directory."""


class StoreUnreadableError(RuntimeError):
    """The job database cannot be opened or read whole; it is left untouched."""


def check_readable(path: Path) -> None:
    """Refuse a job database that SQLite cannot open or read whole (a corrupt, truncated or unreadable
    file), before anything writes to it: a read-only connection runs ``PRAGMA quick_check``. Without a
    WAL file beside it the file is opened as immutable, so not even an empty journal is created."""
    if not path.exists():
        return
    wal = path.with_name(path.name + "-wal").exists()  # after kill -9: committed changes to read too
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}", uri=True)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        finally:
            db.close()
    except sqlite3.Error as e:
        problems = [str(e)]
    if problems != ["ok"]:
        raise StoreUnreadableError(
            f"cannot read the job database {path}: {problems[0]} (left as it is: restore it from a backup, "
            "or move it away to start with an empty job list)"
        )


def upload_key(job_id: str, name: str) -> str:
    """The media key of an upload: arrays (VACE's, Animate's videos) as .npy, images as .png."""
    arrays = ARRAY_NAMES + ANIMATE_ARRAY_NAMES
    return array_key(job_id, name) if name in arrays else input_key(job_id, name)


class JobStore:
    """Jobs in SQLite, videos and input images as files beside it. Safe to use from several threads."""

    JOBS = "jobs"  # the jobs table and the SQL parameter mark: the queries both stores share use them
    P = "?"

    def __init__(
        self, folder: str | os.PathLike[str], *, exclusive: bool = True, media: MediaStore | None = None
    ):
        """``media``: where files live (default: ``folder``, :class:`LocalMedia`)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.media = media if media is not None else LocalMedia(self.folder)
        root = self.media.root if isinstance(self.media, LocalMedia) else self.folder
        self.videos_dir = root / "videos"  # the local files' folders (LocalMedia)
        self.inputs_dir = root / "inputs"
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
        try:
            check_readable(self.path)
        except StoreUnreadableError:
            self._release_lock()
            raise
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
        self._release_lock()

    def _release_lock(self) -> None:
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

    def array_path(self, job_id: str, name: str) -> Path:
        return self.inputs_dir / f"{job_id}.{name}.npy"

    def read_inputs(self, job: Job) -> dict[str, Any]:
        """A job's uploads: its images (uint8 (H, W, 3)); VACE's video, mask (uint8 arrays) and
        reference_images (a list of images); Animate's driving videos (uint8 arrays)."""
        s = job.spec
        names = [n for n, present in zip(IMAGE_NAMES, (s.has_image, s.has_last_image)) if present]
        media = self.media
        inputs: dict[str, Any] = {name: read_input(media, input_key(job.id, name)) for name in names}
        for name, present in zip(ARRAY_NAMES, (s.has_video, s.has_mask)):
            if present:
                inputs[name] = read_input(media, array_key(job.id, name))
        for name in ANIMATE_ARRAY_NAMES:
            if getattr(s, f"has_{name}"):
                inputs[name] = read_input(media, array_key(job.id, name))
        if s.reference_images:
            inputs["reference_images"] = [
                read_input(media, input_key(job.id, f"reference_image.{i}"))
                for i in range(s.reference_images)
            ]
        return inputs

    def remove_files(self, job_id: str) -> None:
        remove_job_media(self.media, job_id)

    # -- rows ---------------------------------------------------------------------------------
    @staticmethod
    def _job(row: Any) -> Job:
        """A row (sqlite3.Row or PostgreSQL's dict row: the same columns) -> Job."""
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
        """Insert a queued job; its inputs are in the media store before the row exists (and removed
        again when the insert fails)."""
        written = []
        try:
            for name, array in (images or {}).items():
                key = upload_key(job.id, name)
                write_input(self.media, key, array)
                written.append(key)
            seq = self._insert(
                (job.id, JobStatus.QUEUED.value, job.model, json.dumps(job.spec.to_json()))
                + (job.batch_key, job.source, job.created_at)
            )
        except BaseException:
            for key in written:
                self.media.delete(key)
            raise
        return replace(job, status=JobStatus.QUEUED, seq=seq)

    def _insert(self, row: tuple) -> int:
        """Insert a queued job's row (id, status, model, params, batch_key, source, created_at) -> its seq."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (id, status, model, params, batch_key, source, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        return int(cursor.lastrowid)

    def add_if_room(self, job: Job, images: dict[str, np.ndarray] | None, max_queue: int) -> Job | None:
        """:meth:`add` unless ``max_queue`` jobs already wait (None then); one process owns this store, so
        the caller's lock makes the count and the insert one step."""
        return None if self.count(JobStatus.QUEUED) >= max_queue else self.add(job, images)

    def cancelled(self, job_ids: frozenset[str]) -> frozenset[str]:
        """Running jobs deleted by another process: none here (one process owns the store; its DELETE
        reaches the worker in memory). The PostgreSQL store reads them from the database."""
        return frozenset()

    def get(self, job_id: str) -> Job | None:
        rows = self._query(f"SELECT * FROM {self.JOBS} WHERE id = {self.P}", (job_id,))
        return self._job(rows[0]) if rows else None

    def list(
        self, *, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> tuple[list[Job], bool]:
        """A page of jobs, newest first (``order="desc"``) or oldest first; ``after`` is the last id of the
        previous page (KeyError if unknown). Returns (jobs, has_more)."""
        descending, p = order == "desc", self.P
        where, args = "", ()
        if after is not None:
            rows = self._query(f"SELECT seq FROM {self.JOBS} WHERE id = {p}", (after,))
            if not rows:
                raise KeyError(after)
            where, args = (f"WHERE seq < {p}" if descending else f"WHERE seq > {p}"), (rows[0]["seq"],)
        rows = self._query(
            f"SELECT * FROM {self.JOBS} {where} ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT {p}",
            (*args, limit + 1),
        )
        return [self._job(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[JobStatus, int]:
        rows = self._query(f"SELECT status, COUNT(*) AS n FROM {self.JOBS} GROUP BY status")
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
                    (now, _error_json(code, message), batch_size, job_id),
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
                    _error_json(
                        "model_changed",
                        f"the server restarted with another model ({model}) before this job ran",
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
                    _error_json(
                        "server_crashed", f"the server stopped {max_attempts} times while running this job"
                    ),
                    max_attempts,
                ),
            ).rowcount
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            ids = {row[0] for row in db.execute("SELECT id FROM jobs")}
        removed = 0
        keys = [] if self.media.shared else self.media.keys("videos/") + self.media.keys("inputs/")
        for key in keys:
            if is_temporary(key) or key_job_id(key) not in ids:
                self.media.delete(key)
                removed += 1
        return {
            "queued": queued,
            "requeued": requeued,
            "failed_after_crashes": gave_up,
            "failed_other_model": other_model,
            "files_removed": removed,
        }
