"""wanpipe serve under load: 16 clients at once send a few hundred mixed requests (create, get, list,
content, delete) while the worker runs the jobs they create. No 5xx, every answer one the request may
get, nothing lost: each created job ends completed, or deleted when a client deleted it. The GET
latencies are printed (``pytest -s``); docs/reliability.md records them with the command and machine.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from tests.serving_helpers import ServerProcess, wait_until
from wanpipe.serving.store import JobStore

CLIENTS = 16
REQUESTS_PER_CLIENT = 25  # 400 in all
MIX = {"create": 0.25, "get": 0.30, "list": 0.20, "content": 0.15, "delete": 0.10}
# What each request may answer: a client gets, fetches or deletes one of its own jobs, which may be
# queued, running, completed or deleted (by itself) by then.
ALLOWED = {
    "create": {200},
    "get": {200, 404},
    "list": {200},
    "content": {200, 404, 409},
    "delete": {200, 404},
}
# A few tenths of a second per batch of 4 on the tiny checkpoint: the worker stays busy.
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 4}


def _client(url: str, index: int, log: list[tuple[str, int, float, str | None]], gone: set[str]) -> list[str]:
    """One client's requests, in an order drawn from ``index``; its created ids."""
    rng = random.Random(index)
    created: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for n in range(REQUESTS_PER_CLIENT):
            op = "create" if n == 0 else rng.choices(list(MIX), weights=list(MIX.values()))[0]
            target = rng.choice(created) if created and op in ("get", "content", "delete") else None
            if target is None and op in ("get", "content", "delete"):
                op = "create"
            t0 = time.perf_counter()
            if op == "create":
                body = {"prompt": f"client {index} clip {n}", **SMALL, "seed": index * 1000 + n}
                response = http.post("/v1/videos", json=body)
                if response.status_code == 200:
                    created.append(response.json()["id"])
            elif op == "get":
                response = http.get(f"/v1/videos/{target}")
            elif op == "list":
                response = http.get("/v1/videos", params={"limit": 20})
            elif op == "content":
                response = http.get(f"/v1/videos/{target}/content")
            else:
                response = http.delete(f"/v1/videos/{target}")
                if response.status_code == 200:
                    gone.add(target)
            log.append((op, response.status_code, time.perf_counter() - t0, target))
    return created


def _busy_fraction(jobs: list, start: float, end: float) -> float:
    """The part of [start, end] (wall-clock times) in which the worker ran a batch: the union of the
    jobs' [started_at, completed_at]."""
    spans = sorted((max(j.started_at, start), min(j.completed_at, end)) for j in jobs if j.completed_at)
    covered, reach = 0.0, start
    for a, b in spans:
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return covered / (end - start)


def test_sixteen_clients_mixed_requests_no_5xx_nothing_lost(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    limits = ("--max-queue", "1000", "--max-batch", "4", "--max-pixels", str(64 * 64), "--max-steps", "10")
    server = ServerProcess(
        "--model", str(tiny_ckpt), "--output-dir", str(out), *limits, env={"OMP_NUM_THREADS": "1"}
    )
    log: list[tuple[str, int, float, str | None]] = []
    gone: set[str] = set()  # list.append and set.add are atomic under the GIL
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            start = time.time()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                created = [
                    job_id
                    for ids in pool.map(lambda i: _client(server.url, i, log, gone), range(CLIENTS))
                    for job_id in ids
                ]
            load_s, end = time.perf_counter() - t0, time.time()
            deleted = set(gone)
            remaining = [job_id for job_id in created if job_id not in deleted]

            def status(job_id: str) -> str:
                return http.get(f"/v1/videos/{job_id}").json()["status"]

            def drained() -> bool:
                return all(status(i) in ("completed", "failed") for i in remaining)

            wait_until(drained, 300, "every job to finish", interval=0.5)
            drain_s = time.perf_counter() - t0 - load_s
            statuses = Counter(status(i) for i in remaining)
            for job_id in remaining:
                assert http.get(f"/v1/videos/{job_id}/content").content[4:8] == b"ftyp"
            for job_id in deleted:
                assert http.get(f"/v1/videos/{job_id}").status_code == 404
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
    store = JobStore(out)
    try:
        jobs = store.list(limit=10_000)[0]
        assert not [p for p in store.videos_dir.iterdir() if p.name.split(".")[0] in deleted]
    finally:
        store.close()

    answers = Counter((op, status) for op, status, _, _ in log)
    assert len(log) == CLIENTS * REQUESTS_PER_CLIENT
    assert [a for a in answers if a[1] >= 500] == []
    assert all(status in ALLOWED[op] for op, status in answers), answers
    for op, status, _, target in log:  # a 404 only for a job its client had deleted
        assert status != 404 or target in deleted, (op, status, target)
    assert len(set(created)) == len(created) == answers[("create", 200)]
    assert {job.id for job in jobs} == set(remaining)  # nothing lost, nothing left over
    assert statuses == {"completed": len(remaining)}, statuses
    gets = np.array([s for op, _, s, _ in log if op in ("get", "list", "content")]) * 1000
    by_op = {
        op: np.percentile([s * 1000 for o, _, s, _ in log if o == op], [50, 99]).round(1).tolist()
        for op in ("get", "list", "content")
    }
    batches = Counter(job.batch_size for job in jobs)
    print(
        f"\nLOAD {CLIENTS} clients, {len(log)} requests in {load_s:.1f} s ({len(log) / load_s:.0f}/s); "
        f"a batch running {_busy_fraction(jobs, start, end):.0%} of that time; "
        f"the queue drained {drain_s:.1f} s later\n"
        f"LOAD answers: {dict(sorted(answers.items()))}\n"
        f"LOAD jobs: {len(created)} created, {len(deleted)} deleted, {dict(statuses)}; batch sizes {dict(batches)}\n"
        f"LOAD GET latency ms: all p50 {np.percentile(gets, 50):.1f} p99 {np.percentile(gets, 99):.1f} "
        f"max {gets.max():.1f}; by route p50/p99 {by_op}"
    )
