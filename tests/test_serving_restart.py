"""Jobs survive the server: ``kill -9`` with one job finished, one running and one queued, then a restart;
and SIGTERM stops a running job at a step boundary and keeps it queued. The server runs as
``python -m wanpipe.serving`` subprocesses on 127.0.0.1 (two starts in all), each with the worker's
step gate (``WANPIPE_TEST_STEP_GATE``): the signals arrive while a job is held between two known steps,
however fast the machine."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from tests.serving_helpers import Gate, ServerProcess, assert_error, read_mp4, wait_until
from wanpipe.serving.store import JobStatus, JobStore

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}
# A job the server is killed in (held by the gate after its first step); another shape than SMALL.
LONG = {"size": "48x32", "num_frames": 5, "num_inference_steps": 6}


def status(http: httpx.Client, video_id: str) -> dict:
    response = http.get(f"/v1/videos/{video_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(http: httpx.Client, video_id: str, wanted: str, timeout: float = 120) -> dict:
    def check():
        body = status(http, video_id)
        assert body["status"] != "failed", body
        return body if body["status"] == wanted else None

    return wait_until(check, timeout, f"{video_id} to be {wanted}", interval=0.05)


def test_kill_9_and_restart_lose_nothing_and_sigterm_is_graceful(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    args = ("--model", str(tiny_ckpt), "--output-dir", str(out))
    env = {"OMP_NUM_THREADS": "1"}  # the test process and the server share two cores
    gate = Gate(tmp_path / "gate-1")
    first = ServerProcess(*args, env={**env, **gate.env})
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=30) as http:
            gate.allow(SMALL["num_inference_steps"])
            finished = http.post("/v1/videos", json={"prompt": "a cat walks", **SMALL, "seed": 1}).json()
            wait_status(http, finished["id"], "completed")
            finished_mp4 = http.get(f"/v1/videos/{finished['id']}/content").content
            running = http.post("/v1/videos", json={"prompt": "a long one", **LONG, "seed": 2}).json()
            queued = http.post("/v1/videos", json={"prompt": "a dog runs", **SMALL, "seed": 3}).json()
            gate.hold_at(
                SMALL["num_inference_steps"] + 1
            )  # the long job: one step done, held before its second
            assert status(http, running["id"])["status"] == "in_progress"
            assert status(http, running["id"])["progress"] == 95 // LONG["num_inference_steps"]
            assert status(http, queued["id"])["status"] == "queued"
    finally:
        first.kill()  # kill -9, in the middle of the long job
    assert first.proc.returncode == -9

    gate = Gate(tmp_path / "gate-2")  # the second server counts its steps from 0
    second = ServerProcess(*args, env={**env, **gate.env})
    try:
        with httpx.Client(base_url=second.url, timeout=30) as http:
            # the store answers before the model is loaded
            listed = {v["id"]: v for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]}
            assert set(listed) == {finished["id"], running["id"], queued["id"]}
            assert listed[finished["id"]]["status"] == "completed"
            assert listed[running["id"]]["status"] == "queued"  # back in the queue
            assert http.get(f"/v1/videos/{finished['id']}/content").content == finished_mp4
            second.wait_ready()
            both = SMALL["num_inference_steps"] + LONG["num_inference_steps"]
            gate.allow(both)
            done = wait_status(http, queued["id"], "completed")
            assert done["parameters"]["seed"] == 3
            frames, _ = read_mp4(http.get(f"/v1/videos/{queued['id']}/content").content, tmp_path)
            assert frames.shape == (5, 32, 32, 3)
            wait_status(http, running["id"], "completed")  # the job that was running ran again

            # SIGTERM while a job runs for a waiting /v1/responses call: the job stops at a step and
            # stays queued, the call is answered 503, nothing is half-written
            answer: dict[str, httpx.Response] = {}
            video = {"height": 32, "width": 48, "num_frames": 5, "steps": LONG["num_inference_steps"]}
            body = {"input": "interrupted", "seed": 4, "provider_options": {"video": video}}

            def respond() -> None:
                with httpx.Client(base_url=second.url, timeout=60) as client:
                    answer["response"] = client.post("/v1/responses", json=body)

            waiting = threading.Thread(target=respond)
            waiting.start()
            gate.hold_at(both + 1)  # one step of the last job done, held before its second
            last = http.get("/v1/videos", params={"limit": 1}).json()["data"][0]
            assert last["prompt"] == "interrupted" and last["status"] == "in_progress", last
        code = second.terminate(timeout=30)  # the gate lets a stopping worker go: it stops at that step
        waiting.join(30)
    finally:
        second.kill()
    assert code in (0, -15), "".join(second.output)  # uvicorn exits by the signal it handled
    assert "shutting down" in "".join(second.output)
    assert_error(answer["response"], 503, None, "shutting_down")
    assert last["id"] in answer["response"].json()["error"]["message"]
    store = JobStore(out)
    try:
        jobs = {job.id: job for job in store.list(limit=100)[0]}
        assert jobs[last["id"]].status == JobStatus.QUEUED and jobs[last["id"]].attempts == 0
        assert {jobs[i].status for i in (finished["id"], running["id"], queued["id"])} == {
            JobStatus.COMPLETED
        }
        assert jobs[running["id"]].attempts == 1  # it was running during one crash
        leftovers = [p.name for p in store.videos_dir.iterdir() if p.name.startswith(".")]
        assert leftovers == [] and not store.video_path(last["id"]).exists()
    finally:
        store.close()
