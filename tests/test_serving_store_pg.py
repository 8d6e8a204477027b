"""The PostgreSQL job store on a real server (tests/postgres.py): what several processes need beyond the
SQLite store's semantics (which tests/test_serving_store.py checks on both): claims that never overlap,
leases, cross-process cancellation, the cluster-wide queue limit, the versioned schema, and failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.test_serving_store import make_job
from wanpipe.serving.store import JobStatus

psycopg = pytest.importorskip("psycopg")

from wanpipe.serving.store_pg import (  # noqa: E402
    SCHEMA_VERSION,
    PgJobStore,
    SchemaTooNewError,
    StoreConfigError,
    StoreUnavailableError,
)


@pytest.fixture
def open_store(postgres_url: str, tmp_path: Path):
    stores: list[PgJobStore] = []

    def make(**kwargs) -> PgJobStore:
        store = PgJobStore(postgres_url, tmp_path / "media", **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def test_schema_is_made_once_when_processes_start_together(postgres_url: str, tmp_path: Path) -> None:
    """Six stores (each its own connections, as six processes) open one empty database at once: one
    migration row, every store works."""
    versions: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        try:
            start.wait()
            store = PgJobStore(postgres_url, tmp_path / "media")
            versions.append(store.schema_version())
            store.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and versions == [SCHEMA_VERSION] * 6
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT version FROM wanpipe_migrations").fetchall()
    assert rows == [(SCHEMA_VERSION,)]


def test_newer_schema_is_refused(open_store, postgres_url: str) -> None:
    open_store().close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO wanpipe_migrations VALUES (%s, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNewError, match=rf"newer wanpipe \(schema {SCHEMA_VERSION + 1} > "):
        open_store()


def test_two_workers_never_claim_the_same_job(open_store) -> None:
    """Two stores (two workers) claim from one queue in parallel threads: every job exactly once."""
    a, b = open_store(), open_store()
    ids = {a.add(make_job(f"k{i % 3}")).id for i in range(40)}
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def work(name: str, store: PgJobStore) -> None:
        while batch := store.claim_batch(4, time.time()):
            claimed[name] += [job.id for job in batch]
            for job in batch:
                assert store.complete(job.id, batch_size=len(batch), now=time.time())

    threads = [threading.Thread(target=work, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = claimed["a"] + claimed["b"]
    print(f"claimed: a {len(claimed['a'])}, b {len(claimed['b'])}")
    assert sorted(everything) == sorted(ids)  # each once: none twice, none lost
    assert a.counts()[JobStatus.COMPLETED] == 40


def test_expired_lease_requeues_with_an_attempt_then_fails(open_store) -> None:
    dead = open_store(lease_seconds=0.3, max_attempts=2)
    alive = open_store(lease_seconds=0.3, max_attempts=2)
    dead._stop.set()  # its heartbeat stops: as if the process was killed
    dead._heartbeat.join()
    job = dead.add(make_job(seed=7))
    assert [j.id for j in dead.claim_batch(1, time.time())] == [job.id]
    assert alive.claim_batch(1, time.time()) == []  # leased
    time.sleep(0.4)
    again = alive.claim_batch(1, time.time())  # the lease expired: back in the queue, claimed by alive
    assert [j.id for j in again] == [job.id] and again[0].attempts == 1 and again[0].spec.seed == 7
    assert not dead.complete(job.id, batch_size=1, now=time.time())  # the lost lease completes nothing
    assert dead.cancelled(frozenset({job.id})) == {job.id}  # and the dead worker's batch drops it
    alive._stop.set()
    alive._heartbeat.join()
    time.sleep(0.4)
    assert alive.claim_batch(1, time.time()) == []  # second expiry: attempts 2 = max -> failed
    failed = alive.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.attempts == 2
    assert failed.error["code"] == "server_crashed"


def test_heartbeat_keeps_a_running_job(open_store) -> None:
    worker = open_store(lease_seconds=0.6)
    other = open_store(lease_seconds=0.6)
    job = worker.add(make_job())
    worker.claim_batch(1, time.time())
    worker.progress_of = lambda: {job.id: 47}  # what the manager reports; stored with each heartbeat
    time.sleep(1.5)  # 2.5 leases: renewed by the heartbeat every 0.2 s
    assert other.claim_batch(1, time.time()) == []
    assert other.get(job.id).progress == 47
    assert worker.get(job.id).attempts == 0
    assert worker.complete(job.id, batch_size=1, now=time.time())


def test_delete_on_another_replica_reaches_the_worker(open_store) -> None:
    worker, api = open_store(), open_store()
    a, b = worker.add(make_job()), worker.add(make_job())
    ids = frozenset(j.id for j in worker.claim_batch(2, time.time()))
    assert ids == {a.id, b.id} and worker.cancelled(ids) == frozenset()
    assert api.delete(a.id).status == JobStatus.IN_PROGRESS
    time.sleep(0.6)  # the worker reads at most every CANCEL_POLL_S
    assert worker.cancelled(ids) == {a.id}


def test_queue_limit_holds_across_replicas(open_store) -> None:
    one, two = open_store(), open_store()
    results: list[object] = []

    def submit(store: PgJobStore) -> None:
        for _ in range(5):
            results.append(store.add_if_room(make_job(), None, 6))

    threads = [threading.Thread(target=submit, args=(s,)) for s in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(r is not None for r in results) == 6 and one.count(JobStatus.QUEUED) == 6


def test_workers_register_their_models(open_store) -> None:
    worker, api = open_store(), open_store()
    assert api.live_models() == []
    worker.recover("wan-tiny")
    assert api.live_models() == ["wan-tiny"]
    worker.close()
    assert api.live_models() == []


@pytest.mark.parametrize("what", ["unreachable", "password", "database", "malformed"])
def test_bad_database_is_one_line_within_seconds(postgres_server, tmp_path: Path, what: str) -> None:
    url = {
        "unreachable": "postgresql://postgres:x@127.0.0.1:1/postgres",
        "password": postgres_server.url(password="wrong"),
        "database": postgres_server.url("no_such_database"),
        "malformed": "postgresql://postgres@127.0.0.1:notaport/x",
    }[what]
    t0 = time.monotonic()
    with pytest.raises(StoreConfigError) as info:
        PgJobStore(url, tmp_path)
    message = str(info.value)
    print(f"{what}: {time.monotonic() - t0:.2f} s: {message}")
    assert time.monotonic() - t0 < 5 and "\n" not in message
    assert message.startswith("cannot use the job database postgresql://") and "wrong" not in message


def test_outage_is_unavailable_then_recovers(open_store, postgres_server) -> None:
    store = open_store()
    job = store.add(make_job())
    postgres_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="is unavailable"):
            store.get(job.id)
        assert time.monotonic() - t0 < 8
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError):  # just failed: the next call does not wait again
            store.count(JobStatus.QUEUED)
        assert time.monotonic() - t0 < 0.5
    finally:
        postgres_server.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert store.get(job.id).id == job.id
            break
        except StoreUnavailableError:
            assert time.monotonic() < deadline, "the store did not reconnect"
            time.sleep(0.2)
