"""Several ``wanpipe serve`` processes on one PostgreSQL (tests/postgres.py) and one shared media folder:
two API replicas (``--role api``, no model) and GPU-less workers (``--role worker``, the tiny checkpoint).

One test, to start the processes once (three workers, two replicas, all at once): the worker that took
a job is killed with ``kill -9`` in the middle of its batch (held by the step gate) and loses nothing:
the job runs again on another worker once its lease expires (attempt count 1, same seed); then 20 jobs through both API replicas complete exactly once each, on both workers;
then an image job on the text-to-video checkpoint fails on the worker (``invalid_request``); then
PostgreSQL restarts while jobs run: requests during the outage answer 503 with a JSON error, and
every job completes when it is back. And a bad ``--store`` exits at once with one line naming the
database."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import Gate, ServerProcess, png_bytes, read_mp4, wait_until

psycopg = pytest.importorskip("psycopg")

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}
LONG = {"size": "48x32", "num_frames": 5, "num_inference_steps": 4}
LEASE = "2"
ENV = {"OMP_NUM_THREADS": "1"}


def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(*args, env={**ENV, **(env or {})})


def completed_ids(server: ServerProcess) -> list[str]:
    return re.findall(r"job (video_[0-9a-f]+) completed", "".join(server.output))


def wait_all(http: httpx.Client, ids: list[str], timeout: float = 90) -> dict[str, dict]:
    def done():
        bodies = {i: http.get(f"/v1/videos/{i}").json() for i in ids}
        assert all(b.get("status") != "failed" for b in bodies.values()), bodies
        return bodies if all(b.get("status") == "completed" for b in bodies.values()) else None

    return wait_until(done, timeout, f"{len(ids)} jobs to complete", interval=0.2)


def rows(url: str, ids: list[str]) -> dict[str, tuple[str, int]]:
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT id, status, attempts FROM wanpipe_jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {i: (s, a) for i, s, a in found}


def test_api_replicas_and_workers_share_one_queue(
    tiny_ckpt: Path, postgres_server, postgres_url: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    media = str(tmp_path / "media")
    common = ("--store", postgres_url, "--media-dir", media, "--lease-seconds", LEASE)
    worker = (*common, "--role", "worker", "--model", str(tiny_ckpt), "--max-batch", "4")
    gates = [Gate(tmp_path / f"gate{i}") for i in range(3)]  # every worker held before its first step
    with ThreadPoolExecutor(5) as pool:
        workers_f = [
            pool.submit(start, *worker, "--output-dir", str(tmp_path / f"w{i}"), env=gate.env)
            for i, gate in enumerate(gates)
        ]
        apis_f = [
            pool.submit(start, *common, "--role", "api", "--output-dir", str(tmp_path / f"a{i}"))
            for i in (1, 2)
        ]
        workers = [f.result() for f in workers_f]
        apis = [f.result() for f in apis_f]
    processes = [*workers, *apis]
    try:
        for p in processes:
            p.wait_ready()  # an API replica is ready once a live worker registered its model
        print(f"5 processes ready ({time.monotonic() - t0:.1f} s)")
        one, two = (httpx.Client(base_url=api.url, timeout=30) for api in apis)
        models = one.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [str(tiny_ckpt)] and models[0]["defaults"]["temporal_stride"] == 4
        # a worker answers only /health, /ready and /metrics
        assert httpx.get(f"{workers[0].url}/v1/videos", timeout=10).status_code == 404

        # -- kill -9 in the middle of a batch: its job runs again elsewhere after the lease expires
        held = one.post("/v1/videos", json={"prompt": "held", **LONG, "seed": 10}).json()
        holding = range(len(gates))  # the worker that took it waits at its first step
        (holder,) = wait_until(
            lambda: [i for i in holding if gates[i].waiting() == 0], 60, "a worker to hold"
        )
        gates[holder].hold_at(1)  # one step of the job done, held before the second
        assert two.get(f"/v1/videos/{held['id']}").json()["status"] == "in_progress"
        doomed = workers.pop(holder)
        doomed.kill()
        for i, gate in enumerate(gates):
            if i != holder:
                gate.open()
        done = wait_all(two, [held["id"]])
        assert done[held["id"]]["parameters"]["seed"] == 10
        frames, _ = read_mp4(one.get(f"/v1/videos/{held['id']}/content").content, tmp_path)
        assert frames.shape == (5, 32, 48, 3)
        attempts = rows(postgres_url, [held["id"]])
        print(f"after kill -9: {attempts} ({time.monotonic() - t0:.1f} s)")
        assert attempts[held["id"]] == ("completed", 1)  # one more attempt, on another worker
        assert completed_ids(doomed) == [] and held["id"] in completed_ids(workers[0]) + completed_ids(
            workers[1]
        )

        # -- 20 jobs through both replicas: each completed exactly once, both workers worked
        def submit(i: int) -> str:
            client = (one, two)[i % 2]
            response = client.post("/v1/videos", json={"prompt": f"job {i}", **SMALL, "seed": i})
            assert response.status_code == 200, response.text
            return response.json()["id"]

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(submit, range(20)))
        wait_all(one, ids)
        runs = [completed_ids(w) for w in workers]
        print(
            f"20 jobs: worker 1 ran {len(runs[0])}, worker 2 ran {len(runs[1])} ({time.monotonic() - t0:.1f} s)"
        )
        everything = runs[0] + runs[1]
        assert sorted(i for i in everything if i in ids) == sorted(ids)  # none twice, none lost
        assert all(set(run) & set(ids) for run in runs), runs  # both workers did work
        listed = {v["id"] for v in two.get("/v1/videos", params={"limit": 100}).json()["data"]}
        assert set(ids) <= listed

        # -- an upload through a replica reaches the worker through the shared media; what only the engine
        # refuses (an image on this text-to-video checkpoint) fails the job there (no 400 without a model)
        image = {"input_reference": ("ref.png", png_bytes(32, 32), "image/png")}
        response = two.post("/v1/videos", data={"prompt": "comes alive", "size": "32x32"}, files=image)
        assert response.status_code == 200, response.text
        refused = wait_until(
            lambda: (b := one.get(f"/v1/videos/{response.json()['id']}").json())["status"] == "failed" and b,
            60,
            "the image job to fail",
        )
        assert (
            refused["error"]["code"] == "invalid_request" and "text-to-video" in refused["error"]["message"]
        )

        # -- PostgreSQL restarts while jobs run: 503 JSON during the outage, everything completes after
        later = [submit(100 + i) for i in range(4)]
        postgres_server.stop()
        try:
            started = time.monotonic()
            response = one.get(f"/v1/videos/{later[0]}")
            took = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable" and took < 10, (
                took,
                response.text,
            )
            assert two.post("/v1/videos", json={"prompt": "down", **SMALL}).status_code == 503
            time.sleep(1.0)
        finally:
            postgres_server.start()
        wait_all(one, later, timeout=120)
        assert all(p.proc.poll() is None for p in [*apis, *workers])  # no process died
        print(f"after the restart: done ({time.monotonic() - t0:.1f} s)")
    finally:
        for p in processes:
            p.kill()


@pytest.mark.parametrize("what", ["unreachable", "password"])
def test_bad_store_exits_with_one_line(postgres_server, tmp_path: Path, what: str) -> None:
    url = {
        "unreachable": "postgresql://postgres:x@127.0.0.1:1/postgres",
        "password": postgres_server.url(password="wrong"),
    }[what]
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wanpipe.serving",
            "--role",
            "api",
            "--store",
            url,
            "--port",
            "0",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t0  # mostly Python's start (torch's import): the database answers at once
    print(f"{what}: rc {proc.returncode} in {took:.1f} s: {proc.stderr.strip()}")
    assert proc.returncode != 0 and took < 45
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "job database postgresql://postgres@127.0.0.1:" in lines[0]
