"""The job store on PostgreSQL (``wanpipe serve --store postgresql://...``): several processes, one queue.

:class:`PgJobStore` has the interface and the semantics of the SQLite :class:`~wanpipe.serving.store.JobStore`
(every state change one transaction; a job's files written before its row, removed after it) with what
many processes on many machines need on top:

- ``claim_batch`` takes rows with ``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never claim the
  same job, and neither waits on the other's claim.
- Leases: a claimed job carries its worker's id and ``lease_until``; a heartbeat thread renews the leases
  of the jobs this process runs every ``lease_seconds / 3``. A job whose lease expired (its worker killed,
  its machine lost) goes back to the queue with its seed and one more attempt (failed after
  ``max_attempts``, as the SQLite store's restart recovery does); a worker that lost a lease never
  completes the job (``complete`` and ``fail`` check the owner).
- Cancellation across processes: :meth:`PgJobStore.cancelled` names the running jobs whose rows were
  deleted (by ``DELETE`` on any replica), read at most every ``CANCEL_POLL_S`` from the manager's
  per-step check.
- The schema is created and versioned on start under an advisory lock (several processes may start at
  once on an empty database); a database made by a newer wanpipe is refused (:class:`SchemaTooNewError`).
- While the database is unreachable every call raises :class:`StoreUnavailableError` (a
  ``ConnectionError``: the worker's retry paths treat it like a full disk; the app answers 503) within
  ``CONNECT_TIMEOUT_S``; the pool reconnects when the server is back.

psycopg (3) and psycopg_pool are imported when a store is opened: the SQLite default does not need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from wanpipe.serving.media_store import LocalMedia, MediaStore, write_input
from wanpipe.serving.parsing import JobSpec
from wanpipe.serving.store import (
    MAX_ATTEMPTS,
    Job,
    JobStatus,
    JobStore,
    _error_json,
    upload_key,
)

SCHEMA_VERSION = 1
LEASE_SECONDS = 30.0
CONNECT_TIMEOUT_S = 3
CANCEL_POLL_S = 0.5
RETRY_S = 1.0  # after a failure to reach the database, calls fail at once for this long (fast 503s)
# pg_advisory_xact_lock key held while the schema is created or migrated (any constant of our own)
SCHEMA_LOCK_KEY = 0x57414E50  # "WANP"

# One list per schema version: the statements that take a database from the version before to it.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE wanpipe_jobs (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            model TEXT NOT NULL,
            params TEXT NOT NULL,
            batch_key TEXT NOT NULL,
            source TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            progress INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            batch_size INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            lease_until DOUBLE PRECISION
        )""",
        "CREATE INDEX wanpipe_jobs_by_status ON wanpipe_jobs (status, seq)",
        """CREATE TABLE wanpipe_workers (
            id TEXT PRIMARY KEY,
            models TEXT NOT NULL,
            card TEXT,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL
        )""",
    ],
}


class StoreUnavailableError(ConnectionError):
    """The job database does not answer (down, restarting, network cut): try again later (HTTP 503)."""


class StoreConfigError(RuntimeError):
    """The job database cannot be used at all: a bad URL, wrong credentials, unreachable at start, or a
    schema made by a newer wanpipe. One line, naming the database."""


class SchemaTooNewError(StoreConfigError):
    """The database was made by a newer wanpipe."""


def redact(url: str) -> str:
    """A database URL without its password, to name it in messages."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - not even parseable: name the scheme alone
        return url.split("://", 1)[0] + "://..." if "://" in url else "(unparseable database URL)"
    user = parts.get("user")
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    db = parts.get("dbname") or user or ""
    return f"postgresql://{f'{user}@' if user else ''}{host}:{port}/{db}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()


class PgJobStore(JobStore):
    """Jobs in PostgreSQL; videos and inputs as files in ``folder`` (shared by every process of a
    deployment). Safe to use from several threads."""

    JOBS = "wanpipe_jobs"
    P = "%s"

    def __init__(
        self,
        url: str,
        folder: str | os.PathLike[str],
        *,
        media: MediaStore | None = None,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        pool_size: int = 8,
    ):
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self.name = redact(url)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # the processes of a deployment share the media: shared, so no process removes another's files
        self.media = media if media is not None else LocalMedia(self.folder, shared=True)
        root = self.media.root if isinstance(self.media, LocalMedia) else self.folder
        self.videos_dir = root / "videos"  # the local files' folders (LocalMedia)
        self.inputs_dir = root / "inputs"
        self._lock_file = None  # many processes share the folder: no directory lock
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = max_attempts
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.models: tuple[str, ...] | None = None  # set by recover(): the models this process claims
        self.card: dict[str, Any] | None = None  # a worker's registration: its /v1/models card (roles.py)
        # a worker's resolution of jobs API replicas queued unresolved (batch key ""): job -> (spec, batch
        # key, uploads as resolved); InvalidRequestError fails the job (roles.attach_worker sets it)
        self.resolver: Callable[[Job], tuple[JobSpec, str, dict[str, Any]]] | None = None
        # a worker's running jobs' progress by id, stored with each heartbeat for API replicas to show
        self.progress_of: Callable[[], dict[str, int]] | None = None
        self._mine: set[str] = set()  # running jobs this process claimed (their leases it renews)
        self._mine_lock = threading.Lock()
        self._cancel_cache: tuple[float, frozenset[str]] = (0.0, frozenset())
        self._psycopg = psycopg
        self._down: tuple[float, str] = (-RETRY_S, "")  # when the database last failed to answer, and why
        try:  # fail fast, in one line, on a bad URL, wrong credentials or an unreachable server
            with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
                self._migrate(conn)
        except StoreConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - psycopg.Error, or a malformed URL (ProgrammingError)
            raise StoreConfigError(f"cannot use the job database {self.name}: {_first_line(e)}") from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
            timeout=CONNECT_TIMEOUT_S,
            reconnect_timeout=0,  # keep trying while the server is away
            check=ConnectionPool.check_connection,
            open=False,
        )
        self._pool.open(wait=False)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="wanpipe-lease", daemon=True)
        self._heartbeat.start()

    # -- connection and schema ------------------------------------------------------------------
    def _migrate(self, conn: Any) -> None:
        """Create or migrate the schema, one process at a time (a transaction-scoped advisory lock)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS wanpipe_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            found = conn.execute("SELECT COALESCE(MAX(version), 0) FROM wanpipe_migrations").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise SchemaTooNewError(
                    f"the job database {self.name} was made by a newer wanpipe (schema {found} > "
                    f"{SCHEMA_VERSION}): upgrade wanpipe"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO wanpipe_migrations (version, applied_at) VALUES (%s, %s)",
                    (version, time.time()),
                )

    def schema_version(self) -> int:
        return self._query("SELECT MAX(version) AS v FROM wanpipe_migrations")[0]["v"]

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(5)
        with contextlib.suppress(Exception), self._connection() as conn:
            conn.execute("DELETE FROM wanpipe_workers WHERE id = %s", (self.worker_id,))
        self._pool.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection in a transaction; any failure to reach the server is StoreUnavailableError."""
        from psycopg.rows import dict_row
        from psycopg_pool import PoolTimeout

        psycopg = self._psycopg
        down_at, reason = self._down
        if time.monotonic() - down_at < RETRY_S:  # just failed: answer at once, not after another timeout
            raise StoreUnavailableError(reason)
        try:
            with self._pool.connection() as conn:
                conn.row_factory = dict_row
                with conn.transaction():
                    yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            reason = f"the job database {self.name} is unavailable: {_first_line(e)}"
            self._down = (time.monotonic(), reason)
            raise StoreUnavailableError(reason) from e

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._connection() as conn:
            yield conn

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._connection() as conn:
            return conn.execute(sql, args).fetchall()

    # -- rows: JobStore._job reads them (the same columns) ----------------------------------------
    def _insert(self, row: tuple) -> int:
        with self._connection() as conn:
            return conn.execute(
                "INSERT INTO wanpipe_jobs (id, status, model, params, batch_key, source, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING seq",
                row,
            ).fetchone()["seq"]

    def add_if_room(self, job: Job, images: dict[str, Any] | None, max_queue: int) -> Job | None:
        """Insert a queued job unless ``max_queue`` jobs already wait across every replica (None then):
        the count and the insert under one advisory lock, so replicas never overshoot together."""
        with self._connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY + 1,))
            if self._count(conn, JobStatus.QUEUED) >= max_queue:
                return None
            return self.add(job, images)

    @staticmethod
    def _count(conn: Any, status: JobStatus) -> int:
        return conn.execute(
            "SELECT COUNT(*) AS n FROM wanpipe_jobs WHERE status = %s", (status.value,)
        ).fetchone()["n"]

    def count(self, status: JobStatus) -> int:
        with self._connection() as conn:
            return self._count(conn, status)

    def claim_batch(self, max_batch: int, now: float) -> list[Job]:
        """Requeue jobs whose lease expired, then claim the oldest queued job of this process's models and
        up to ``max_batch - 1`` later queued jobs with its batch key, under a lease (oldest first). Rows
        another worker is claiming at the same moment are skipped, never waited on."""
        self.expire_leases(now)
        if self.resolver is not None:
            self.resolve_pending()
        models = list(self.models) if self.models is not None else None
        of_model = "" if models is None else " AND model = ANY(%s)"
        with self._connection() as conn:
            first = conn.execute(
                f"SELECT batch_key FROM wanpipe_jobs WHERE status = 'queued' AND batch_key <> ''{of_model} "
                "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                () if models is None else (models,),
            ).fetchone()
            if first is None:
                return []
            rows = conn.execute(
                f"SELECT * FROM wanpipe_jobs WHERE status = 'queued' AND batch_key = %s{of_model} "
                "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED",
                (first["batch_key"], *(() if models is None else (models,)), max_batch),
            ).fetchall()
            ids = [row["id"] for row in rows]
            conn.execute(
                "UPDATE wanpipe_jobs SET status = 'in_progress', started_at = %s, progress = 0, worker = %s, "
                "lease_until = %s WHERE id = ANY(%s)",
                (now, self.worker_id, now + self.lease_seconds, ids),
            )
        with self._mine_lock:
            self._mine.update(ids)
        return [replace(self._job(r), status=JobStatus.IN_PROGRESS, started_at=now) for r in rows]

    def _release(self, job_ids: list[str]) -> None:
        with self._mine_lock:
            self._mine.difference_update(job_ids)

    def requeue(self, job_ids: list[str]) -> int:
        """This worker's running jobs back to the queue (at their old place), without a new attempt."""
        self._release(job_ids)
        with self._connection() as conn:
            return conn.execute(
                "UPDATE wanpipe_jobs SET status = 'queued', started_at = NULL, progress = 0, worker = NULL, "
                "lease_until = NULL WHERE id = ANY(%s) AND status = 'in_progress' AND worker = %s",
                (list(job_ids), self.worker_id),
            ).rowcount

    def complete(self, job_id: str, *, batch_size: int, now: float) -> bool:
        """Mark this worker's running job completed; False if it was deleted or its lease was lost."""
        self._release([job_id])
        with self._connection() as conn:
            return (
                conn.execute(
                    "UPDATE wanpipe_jobs SET status = 'completed', progress = 100, completed_at = %s, "
                    "batch_size = %s, lease_until = NULL WHERE id = %s AND status = 'in_progress' "
                    "AND worker = %s",
                    (now, batch_size, job_id, self.worker_id),
                ).rowcount
                == 1
            )

    def fail(
        self, job_id: str, code: str, message: str, *, now: float, batch_size: int | None = None
    ) -> bool:
        """Fail a queued job, or a running one of this worker (not one another worker took over)."""
        self._release([job_id])
        with self._connection() as conn:
            return (
                conn.execute(
                    "UPDATE wanpipe_jobs SET status = 'failed', completed_at = %s, error = %s, batch_size = %s, "
                    "lease_until = NULL WHERE id = %s AND (status = 'queued' OR "
                    "(status = 'in_progress' AND worker = %s))",
                    (now, _error_json(code, message), batch_size, job_id, self.worker_id),
                ).rowcount
                == 1
            )

    def delete(self, job_id: str) -> Job | None:
        with self._connection() as conn:
            row = conn.execute("DELETE FROM wanpipe_jobs WHERE id = %s RETURNING *", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    # -- leases ---------------------------------------------------------------------------------
    def expire_leases(self, now: float) -> dict[str, int]:
        """Running jobs whose lease ran out go back to the queue with one more attempt (same seed: the
        stored spec); those that reached ``max_attempts`` are failed."""
        message = f"the worker running this job stopped {self.max_attempts} times (lease expired)"
        with self._connection() as conn:
            requeued = conn.execute(
                "UPDATE wanpipe_jobs SET status = 'queued', started_at = NULL, progress = 0, worker = NULL, "
                "lease_until = NULL, attempts = attempts + 1 "
                "WHERE status = 'in_progress' AND lease_until < %s",
                (now,),
            ).rowcount
            gave_up = conn.execute(
                "UPDATE wanpipe_jobs SET status = 'failed', completed_at = %s, error = %s "
                "WHERE status = 'queued' AND attempts >= %s",
                (now, _error_json("server_crashed", message), self.max_attempts),
            ).rowcount
        return {"requeued": requeued, "failed_after_crashes": gave_up}

    def renew(self, now: float) -> None:
        """Extend the leases of the jobs this process runs, and say this worker is alive."""
        with self._mine_lock:
            ids = list(self._mine)
        progress = self.progress_of() if self.progress_of is not None else {}
        with self._connection() as conn:
            if ids:
                conn.execute(
                    "UPDATE wanpipe_jobs SET lease_until = %s WHERE id = ANY(%s) AND worker = %s "
                    "AND status = 'in_progress'",
                    (now + self.lease_seconds, ids, self.worker_id),
                )
            for job_id, value in progress.items():
                if job_id in ids:
                    conn.execute(
                        "UPDATE wanpipe_jobs SET progress = %s WHERE id = %s AND worker = %s "
                        "AND status = 'in_progress'",
                        (value, job_id, self.worker_id),
                    )
            if self.models is not None:
                card = None if self.card is None else json.dumps(self.card)
                conn.execute(
                    "INSERT INTO wanpipe_workers (id, models, card, started_at, heartbeat_at) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                    "heartbeat_at = EXCLUDED.heartbeat_at, models = EXCLUDED.models, card = EXCLUDED.card",
                    (self.worker_id, json.dumps(list(self.models)), card, now, now),
                )

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew(time.time())
            except StoreUnavailableError:
                pass  # renewed on the next beat once the database is back; leases outlast a short outage
            except Exception:  # noqa: BLE001 - the heartbeat must not die
                import logging

                logging.getLogger("wanpipe.serving").exception("lease heartbeat failed")

    def cancelled(self, job_ids: frozenset[str]) -> frozenset[str]:
        """The running jobs among ``job_ids`` that are gone from the store or no longer this worker's (deleted
        on another replica, or the lease was lost): read at most every ``CANCEL_POLL_S``."""
        checked_at, gone = self._cancel_cache
        now = time.monotonic()
        if now - checked_at >= CANCEL_POLL_S and job_ids:
            try:
                rows = self._query(
                    "SELECT id FROM wanpipe_jobs WHERE id = ANY(%s) AND status = 'in_progress' AND worker = %s",
                    (list(job_ids), self.worker_id),
                )
            except StoreUnavailableError:
                return gone & job_ids
            gone = frozenset(job_ids - {row["id"] for row in rows})
            self._cancel_cache = (now, gone)
        return gone & job_ids

    def live_models(self, now: float | None = None) -> list[str]:
        """The models that workers with a heartbeat within three lease periods serve."""
        since = (time.time() if now is None else now) - 3 * self.lease_seconds
        rows = self._query("SELECT models FROM wanpipe_workers WHERE heartbeat_at >= %s", (since,))
        return sorted({m for row in rows for m in json.loads(row["models"])})

    def live_cards(self, now: float | None = None) -> list[dict[str, Any]]:
        """The registrations (``{"card", "aliases"}``) of live workers whose model is loaded, oldest first."""
        since = (time.time() if now is None else now) - 3 * self.lease_seconds
        rows = self._query(
            "SELECT card FROM wanpipe_workers WHERE heartbeat_at >= %s AND card IS NOT NULL "
            "ORDER BY started_at",
            (since,),
        )
        return [json.loads(row["card"]) for row in rows]

    def resolve_pending(self, limit: int = 16) -> int:
        """Resolve queued jobs of this worker's models that an API replica queued unresolved: their spec
        and batch key set, their uploads replaced by the resolved ones (one transaction per batch of rows,
        locked with SKIP LOCKED: two workers never resolve the same job); a job the engine refuses fails
        with ``invalid_request``. Returns how many were looked at."""
        from wanpipe.context import InvalidRequestError

        assert self.resolver is not None and self.models is not None
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT * FROM wanpipe_jobs WHERE status = 'queued' AND batch_key = '' AND model = ANY(%s) "
                "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED",
                (list(self.models), limit),
            ).fetchall()
            for row in rows:
                job = self._job(row)
                try:
                    spec, batch_key, images = self.resolver(job)
                except (InvalidRequestError, OSError, ValueError) as e:
                    conn.execute(
                        "UPDATE wanpipe_jobs SET status = 'failed', completed_at = %s, error = %s WHERE id = %s",
                        (time.time(), _error_json("invalid_request", str(e)), job.id),
                    )
                    continue
                for name, array in images.items():
                    write_input(self.media, upload_key(job.id, name), array)
                conn.execute(
                    "UPDATE wanpipe_jobs SET params = %s, batch_key = %s WHERE id = %s",
                    (json.dumps(spec.to_json()), batch_key, job.id),
                )
        return len(rows)

    def recover(self, model: str, *, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """On a worker's start: claim only ``model``'s jobs from now on, register the worker, requeue the
        jobs whose lease expired. Other workers' running jobs and other models' queued jobs are theirs."""
        self.models = (model,)
        self.max_attempts = max_attempts
        now = time.time()
        report = self.expire_leases(now)
        self.renew(now)
        return {**report, "queued": self.count(JobStatus.QUEUED)}
