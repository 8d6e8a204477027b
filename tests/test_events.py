"""Live progress over real HTTP: ``GET /v1/videos/{id}/events`` (Server-Sent Events) and
``GET /v1/videos/{id}/preview``, on the tiny checkpoint, with the worker's step gate holding each job at
a known step."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving_helpers import Gate, ThreadServer, assert_error, wait_until
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits
from wanpipe.serving.store import JobStore

API_KEY = "events-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL = {"size": "32x32", "num_frames": 5}
LIMITS = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=17, max_steps=50)


@pytest.fixture(scope="module")
def server(wan_pipe, tmp_path_factory):
    manager = JobManager(
        JobStore(tmp_path_factory.mktemp("events") / "out"),
        lambda: wan_pipe,
        model_name="wan-tiny",
        limits=LIMITS,
    )
    with ThreadServer(create_app(manager, api_key=API_KEY)) as srv:
        assert manager.wait_ready(60)
        srv.manager = manager
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture
def gate(server, tmp_path: Path):
    """The worker's step gate, shut: the worker runs only the steps the test allows."""
    from wanpipe.serving.step_gate import StepGate

    gate = Gate(tmp_path / "gate")
    server.manager.step_gate = StepGate(gate.folder)
    try:
        yield gate
    finally:
        gate.open()
        server.manager.step_gate = None


class EventReader:
    """The events of one text/event-stream response, in order: ``(name, data)``; EOFError at its end."""

    def __init__(self, response: httpx.Response):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        self.lines: Iterator[str] = response.iter_lines()
        self.seen: list[tuple[str, dict]] = []

    def next(self) -> tuple[str, dict]:
        name, data = None, []
        for line in self.lines:
            if line.startswith(":"):  # a keep-alive comment
                continue
            if not line:
                if name is not None:
                    self.seen.append((name, json.loads("\n".join(data))))
                    return self.seen[-1]
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        raise EOFError("the stream ended")

    def until(self, predicate) -> tuple[str, dict]:
        while True:
            name, data = self.next()
            if predicate(name, data):
                return name, data


def submit(http: httpx.Client, steps: int, **extra) -> dict:
    response = http.post(
        "/v1/videos", json={"prompt": "a fox in the snow", **SMALL, "num_inference_steps": steps, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_running_job_streams_each_step_then_completed(server, http, gate) -> None:
    job = submit(http, 4)
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = EventReader(response)
        name, first = events.next()  # the state at once: queued, or held before the first step
        assert name == "progress" and first["id"] == job["id"] and first["step"] == 0, first
        assert first["status"] in ("queued", "in_progress") and first["num_steps"] == 4
        assert first["eta_seconds"] is None and "preview_url" not in first
        for k in range(1, 5):
            gate.allow(k)
            name, data = events.until(lambda n, d, k=k: d["step"] >= k or n != "progress")
            assert (name, data["step"], data["status"]) == ("progress", k, "in_progress"), (name, data)
            assert data["progress"] == int(95 * k / 4)
            if k >= 2:  # two steps timed: the ETA is the mean step time times the steps left
                assert data["eta_seconds"] is not None and data["eta_seconds"] >= 0
        assert data["eta_seconds"] == 0
        name, final = events.next()
        assert name == "completed", events.seen
        assert (final["status"], final["progress"], final["step"], final["num_steps"]) == (
            "completed",
            100,
            4,
            4,
        )
        assert final["parameters"]["num_inference_steps"] == 4 and final["size"] == "32x32"
        with pytest.raises(EOFError):  # exactly one final event, then the stream ends
            events.next()
    steps = [d["step"] for n, d in events.seen]
    assert steps == sorted(steps) and {1, 2, 3, 4} <= set(steps), events.seen
    print("events:", [(n, d["status"], d["step"], d["eta_seconds"]) for n, d in events.seen])


def test_a_late_client_gets_the_current_state_and_leaving_changes_nothing(server, http, gate) -> None:
    manager = server.manager
    job = submit(http, 6)
    gate.hold_at(3)
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        name, data = EventReader(response).next()
        assert (name, data["status"], data["step"], data["num_steps"]) == ("progress", "in_progress", 3, 6)
        assert data["progress"] == int(95 * 3 / 6) and data["eta_seconds"] > 0, data
    # the client went away mid-stream: the job runs to its end, the stream's watcher is gone
    gate.open()
    wait_until(lambda: http.get(f"/v1/videos/{job['id']}").json()["status"] == "completed", 60, "completion")
    wait_until(lambda: job["id"] not in manager.events._watchers, 10, "the stream to end")
    # a finished job's stream: its final event alone
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = EventReader(response)
        name, data = events.next()
        assert (name, data["status"], data["step"], data["progress"]) == ("completed", "completed", 6, 100)
        with pytest.raises(EOFError):
            events.next()


def test_a_deleted_job_ends_with_cancelled(server, http, gate) -> None:
    job = submit(http, 6)
    gate.hold_at(2)
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = EventReader(response)
        assert events.next()[1]["step"] == 2
        assert http.delete(f"/v1/videos/{job['id']}").status_code == 200
        name, data = events.next()
        assert (name, data["id"], data["status"]) == ("cancelled", job["id"], "cancelled"), data
        with pytest.raises(EOFError):
            events.next()


def test_a_failed_job_ends_with_failed(server, http, wan_pipe, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("the DiT fell over")

    monkeypatch.setattr(wan_pipe.executor, "execute", broken)
    job = submit(http, 2)
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = EventReader(response)
        name, data = events.until(lambda n, d: n != "progress")
        assert name == "failed" and data["status"] == "failed", data
        assert data["error"]["code"] == "generation_failed" and "fell over" in data["error"]["message"]
        with pytest.raises(EOFError):
            events.next()


def test_unknown_ids_and_the_key(server, http) -> None:
    assert_error(http.get("/v1/videos/video_nope/events"), 404, "video_id", "not_found")
    assert_error(http.get("/v1/videos/video_nope/preview"), 404, "video_id", "not_found")
    job = submit(http, 1)
    assert_error(httpx.get(f"{server.url}/v1/videos/{job['id']}/events", timeout=30), 401)
    assert_error(httpx.get(f"{server.url}/v1/videos/{job['id']}/preview", timeout=30), 401)


def test_preview_is_404_before_the_first_then_a_webp(server, http, gate) -> None:
    job = submit(http, 4, preview_every=2)
    gate.hold_at(1)
    assert_error(http.get(f"/v1/videos/{job['id']}/preview"), 404, "video_id", "preview_not_ready")
    with http.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        events = EventReader(response)
        assert "preview_url" not in events.next()[1]
        gate.allow(2)
        name, data = events.until(lambda n, d: "preview_url" in d or n != "progress")
        assert name == "progress" and data["preview_step"] == 2, data
    assert data["preview_url"] == f"{server.url}/v1/videos/{job['id']}/preview"
    response = http.get(data["preview_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert response.headers["x-preview-step"] == "2"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "WEBP" and image.size[0] > 0
    print("preview:", image.size, getattr(image, "n_frames", 1), "frames,", len(response.content), "bytes")
    gate.open()
    wait_until(lambda: http.get(f"/v1/videos/{job['id']}").json()["status"] == "completed", 60, "completion")


def test_a_job_without_previews_has_none_and_bad_values_are_refused(server, http, gate) -> None:
    response = http.post(
        "/v1/videos",
        data={
            "prompt": "a fox",
            "size": "32x32",
            "num_frames": "5",
            "num_inference_steps": "3",
            "preview": "false",
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["parameters"]["preview"] is False and job["parameters"]["preview_every"] == 2  # resolved
    gate.hold_at(2)  # a job with previews would have one now
    assert_error(http.get(f"/v1/videos/{job['id']}/preview"), 404, "video_id", "preview_not_ready")
    gate.open()
    wait_until(lambda: http.get(f"/v1/videos/{job['id']}").json()["status"] == "completed", 60, "completion")
    assert_error(http.get(f"/v1/videos/{job['id']}/preview"), 404, "video_id", "preview_not_ready")
    every = submit(http, 1, preview=True, preview_every=1)["parameters"]
    assert (every["preview"], every["preview_every"]) == (True, 1)
    for body, param in (({"preview": "yes"}, "preview"), ({"preview_every": 0}, "preview_every")):
        response = http.post("/v1/videos", json={"prompt": "a fox", **SMALL, **body})
        assert_error(response, 400, param)


def test_shutdown_ends_the_streams_without_a_final_event(wan_pipe, tmp_path: Path) -> None:
    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    from wanpipe.serving.step_gate import StepGate

    gate = Gate(tmp_path / "gate")
    manager.step_gate = StepGate(gate.folder)
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        assert manager.wait_ready(60)
        job = submit(client, 4)
        gate.hold_at(1)
        with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
            events = EventReader(response)
            assert events.next()[1]["step"] == 1
            manager.begin_shutdown()  # what SIGTERM does first (wanpipe serve's handle_exit)
            with pytest.raises(EOFError):
                events.next()
        assert [n for n, _ in events.seen] == ["progress"]
    store = JobStore(tmp_path / "out")
    assert store.get(job["id"]).status.value == "queued"  # it runs again after a restart
    store.close()


def test_the_hub_keeps_few_previews_and_forgets_deleted_jobs() -> None:
    from wanpipe.context import Preview
    from wanpipe.media import encode_webp
    from wanpipe.serving.events import JobEvents

    hub = JobEvents(max_jobs=2)
    frames = np.repeat(np.array([0, 120, 240], np.uint8), 8 * 8 * 3).reshape(3, 8, 8, 3)  # 3 different frames
    on_preview = hub.previewer(["a", None, "b"])
    assert hub.previewer([None, None]) is None  # no job wants previews: none are made
    for row in range(3):
        on_preview(Preview(row=row, step=1, num_steps=4, frames=frames, fps=8.0))
    assert hub.latest_preview("a").step == 2 and hub.latest_preview("b") is not None  # steps done
    webp, step = hub.preview_webp("a", encode_webp)
    assert step == 2 and Image.open(io.BytesIO(webp)).n_frames == 3
    assert hub.latest_preview("a").frames is None  # the WebP is kept instead of the frames
    assert hub.preview_webp("a", encode_webp) == (webp, 2)
    hub.preview("c", 1, 4, frames, 8.0)  # a third job: the oldest ("a") goes
    assert hub.latest_preview("a") is None and hub.latest_preview("c") is not None
    hub.step(["c"], 0, 4)
    hub.forget("c")
    assert hub.latest_preview("c") is None and hub.state("c") is None
