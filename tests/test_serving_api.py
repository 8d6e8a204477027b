"""wanpipe serve over real HTTP on 127.0.0.1: the official openai SDK, Open Responses, errors, batching.

One server (uvicorn in a thread, the session's tiny pipeline) serves the whole module; an API key is set,
so every client here sends it.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.serving_helpers import (
    Gate,
    ThreadServer,
    assert_error,
    png_bytes,
    read_mp4,
    record_served_frames,
    wait_until,
)
from wanpipe.media import Video
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits
from wanpipe.serving.store import JobStatus, JobStore
from wanpipe.streaming import Collect
from wanpipe.video_writer import Tee

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}  # a fast job (a fraction of a second)


def sdk(fields: dict, **extra) -> dict:
    """Keyword arguments for ``client.videos.create``: Wan's own fields travel in ``extra_body``."""
    return {"size": fields["size"], "extra_body": {k: v for k, v in fields.items() if k != "size"} | extra}


LIMITS = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=17, max_steps=200)
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, wan_pipe, tmp_path_factory):
    """The server on the default SQLite store, and on the PostgreSQL store (the same API, the same
    answers: every test of this module runs on both)."""
    folder = tmp_path_factory.mktemp("serve") / "out"
    if request.param == "sqlite":
        store = JobStore(folder)
    else:
        from wanpipe.serving.store_pg import PgJobStore

        store = PgJobStore(request.getfixturevalue("postgres_server").new_database(), folder)
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    app = create_app(manager, api_key=API_KEY, max_body_bytes=MAX_BODY)
    with ThreadServer(app) as srv:
        assert manager.wait_ready(60)
        srv.manager = manager
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def wait_done(http: httpx.Client, video_id: str, timeout: float = 60) -> dict:
    def done():
        body = http.get(f"/v1/videos/{video_id}").json()
        return body if body["status"] in ("completed", "failed") else None

    return wait_until(done, timeout, f"video {video_id} to finish")


def metric(http: httpx.Client, line_start: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# -- health, readiness, models, metrics ---------------------------------------------------------------
def test_health_ready_models_and_metrics(server, http) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready", "model": "wan-tiny"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "wan-tiny"
    assert models["data"][0]["task"] == "t2v" and models["data"][0]["limits"]["max_batch"] == 4
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("wanpipe_queue_depth", "wanpipe_jobs", "wanpipe_step_seconds", "wanpipe_batches_total"):
        assert f"# TYPE {name} " in text
    assert 'wanpipe_jobs{state="completed"}' in text and "wanpipe_ready 1" in text


# -- the openai SDK ----------------------------------------------------------------------------------
def test_openai_sdk_create_poll_download_list_delete(client, http, tmp_path: Path) -> None:
    # seconds + fps: 1 s at 4 fps is 4*round(4/4)+1 = 5 frames
    video = client.videos.create(
        prompt="a cat walks on the grass",
        size="32x32",
        seconds="1",
        extra_body={"fps": 4, "num_inference_steps": 2, "seed": 7, "negative_prompt": "blurred"},
    )
    assert video.object == "video" and video.status in ("queued", "in_progress", "completed")
    assert video.size == "32x32" and video.seconds == "1" and video.model == "wan-tiny"
    extra = video.model_extra
    assert extra["parameters"]["num_frames"] == 5 and extra["parameters"]["seed"] == 7

    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert done.error is None

    content = client.videos.download_content(video.id)
    frames, fps = read_mp4(content.read(), tmp_path)
    assert frames.shape == (5, 32, 32, 3) and fps == pytest.approx(4)
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    with Image.open(io.BytesIO(thumbnail.read())) as image:
        assert image.format == "JPEG" and image.size == (32, 32)

    second = client.videos.create(prompt="a dog runs in the park", **sdk(SMALL, seed=8))
    client.videos.poll(second.id, poll_interval_ms=100)
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == [second.id, video.id]  # newest first
    older = client.videos.list(limit=1, after=second.id)
    assert [v.id for v in older.data] == [video.id]
    ascending = http.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]
    assert [v["id"] for v in ascending].index(video.id) < [v["id"] for v in ascending].index(second.id)

    deleted = client.videos.delete(video.id)
    assert deleted.id == video.id and deleted.deleted and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError) as info:
        client.videos.retrieve(video.id)
    assert info.value.status_code == 404 and info.value.body["param"] == "video_id"
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(video.id)


def test_json_create_and_content_before_completion(server, http) -> None:
    server.manager.pause()
    try:
        response = http.post("/v1/videos", json={"prompt": "a red car at night", **SMALL, "seed": 3})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "queued" and body["progress"] == 0
        assert int(http.get(f"/v1/videos/{body['id']}").headers["openai-poll-after-ms"]) > 0
        assert_error(http.get(f"/v1/videos/{body['id']}/content"), 409, "video_id", "video_not_ready")
    finally:
        server.manager.resume()
    assert wait_done(http, body["id"])["status"] == "completed"
    assert_error(
        http.get(f"/v1/videos/{body['id']}/content", params={"variant": "spritesheet"}), 400, "variant"
    )


def test_openai_sdk_image_to_video_on_a_text_to_video_model_is_refused(client, http) -> None:
    """The upload is decoded and reaches the engine, which a text-to-video checkpoint refuses."""
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(
            prompt="the picture comes alive", input_reference=("ref.png", png_bytes(32, 32)), **sdk(SMALL)
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == "input_reference" and "text-to-video" in info.value.body["message"]
    # an unreadable upload is refused as such
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt="x", input_reference=("ref.png", b"not an image"), **sdk(SMALL))
    assert info.value.body["param"] == "input_reference" and info.value.body["code"] == "invalid_image"


def test_openai_sdk_image_to_video(tmp_path_factory, tmp_path: Path) -> None:
    """An image-to-video checkpoint: the SDK uploads input_reference, the server decodes it, the engine
    gets it as WanRequest.image and the job's video is the engine's video for that image."""
    from tests import tiny_family
    from wanpipe import WanPipeline
    from wanpipe.serving.uploads import decode_image

    folder = tmp_path_factory.mktemp("i2v") / "ckpt"
    tiny_family.i2v_14b(folder)
    pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    seen_images: list[np.ndarray] = []
    make_context, run_contexts = pipe.tokenizer.make_context, pipe.run_contexts

    def spy_make_context(request):
        seen_images.append(request.image)
        return make_context(request)

    pipe.tokenizer.make_context = spy_make_context
    by_job = record_served_frames(pipe)
    picture = png_bytes(32, 48, seed=5)
    manager = JobManager(JobStore(tmp_path / "out"), lambda: pipe, model_name="wan-i2v-tiny")
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(prompt="the picture comes alive", size="48x32")
        extra = {"num_frames": 5, "num_inference_steps": 2, "seed": 11, "guidance_scale": 4.0}
        video = client.videos.create(
            **kw, input_reference=("first.png", picture, "image/png"), extra_body=extra
        )
        assert video.model_extra["parameters"]["image"] is True
        assert client.videos.poll(video.id, poll_interval_ms=100).status == "completed"
        served, _ = read_mp4(client.videos.download_content(video.id).read(), tmp_path, "served.mp4")
        assert served.shape == (5, 32, 48, 3)
        with pytest.raises(openai.BadRequestError) as info:  # an image-to-video checkpoint needs the image
            client.videos.create(**kw, extra_body=extra)
        assert info.value.body["param"] == "input_reference"

        # Open Responses: a user message with the image as a data URL
        data_url = "data:image/png;base64," + base64.b64encode(picture).decode()
        message = {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "the picture comes alive"},
                {"type": "input_image", "image_url": data_url},
            ],
        }
        options = {"height": 32, "width": 48, "num_frames": 5, "steps": 2, "guidance_scale": 4.0}
        response = httpx.post(
            f"{srv.url}/v1/responses",
            json={"input": [message], "seed": 11, "provider_options": {"video": options}},
            timeout=60,
        )
        assert response.status_code == 200, response.text

    pipe.tokenizer.make_context, pipe.run_contexts = make_context, run_contexts
    expected = decode_image(picture, "image")
    images = [image for image in seen_images if image is not None]
    # One context per job, made by the worker: submitting resolves the request without tokens or noise.
    assert len(seen_images) == len(by_job) == 2
    assert len(images) == 2 and all(np.array_equal(image, expected) for image in images)
    direct = pipe.generate(
        "the picture comes alive",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        seed=11,
        guidance_scale=4.0,
        image=expected,
        progress=False,
    ).frames
    assert len(by_job) == 2
    for frames in by_job.values():  # the served jobs computed exactly the engine's video for the upload
        np.testing.assert_array_equal(frames, direct)


# -- Open Responses ----------------------------------------------------------------------------------
def test_open_responses_b64_json_and_url(server, http, tmp_path: Path) -> None:
    options = {"height": 32, "width": 32, "num_frames": 5, "steps": 2, "frames_per_second": 8}
    body = {
        "model": "wan-tiny",
        "input": "A campfire crackles in a forest clearing at night",
        "seed": 5,
        "provider_options": {"video": {**options, "response_format": "b64_json"}},
    }
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "response" and result["status"] == "completed" and result["seed"] == 5
    content = result["output"][0]["content"][0]
    assert result["output"][0]["role"] == "assistant" and content["type"] == "output_video"
    frames, fps = read_mp4(base64.b64decode(content["video_data"]), tmp_path, "b64.mp4")
    assert frames.shape == (5, 32, 32, 3) and fps == pytest.approx(8)

    body["provider_options"]["video"]["response_format"] = "url"
    body["input"] = [{"role": "user", "content": [{"type": "input_text", "text": "a campfire"}]}]
    result = http.post("/v1/responses", json=body).json()
    url = result["output"][0]["content"][0]["video_url"]
    assert url.startswith(server.url) and url.endswith(f"/v1/videos/{result['video_id']}/content")
    assert "video_data" not in result["output"][0]["content"][0]
    frames, _ = read_mp4(http.get(url).content, tmp_path, "url.mp4")
    assert frames.shape == (5, 32, 32, 3)
    # the job is a video like any other
    assert http.get(f"/v1/videos/{result['video_id']}").json()["status"] == "completed"


def test_open_responses_through_the_openai_sdk(client) -> None:
    response = client.responses.create(
        model="wan-tiny",
        input="waves crash against the rocks",
        extra_body={
            "seed": 2,
            "provider_options": {
                "video": {
                    "height": 32,
                    "width": 32,
                    "num_frames": 1,
                    "steps": 1,
                    "response_format": "b64_json",
                }
            },
        },
    )
    content = response.output[0].content[0]
    data = content["video_data"] if isinstance(content, dict) else content.model_extra["video_data"]
    assert base64.b64decode(data)[4:8] == b"ftyp"  # an mp4


# -- errors ------------------------------------------------------------------------------------------
BASE = {"prompt": "a cat", **SMALL}
VIDEO_ERRORS = [
    # (body, status, param, code)
    ({**BASE, "size": "32by32"}, 400, "size", "invalid_value"),
    ({**BASE, "size": "40x32"}, 400, "size", "invalid_value"),  # not a multiple of 16
    ({**BASE, "num_frames": 6}, 400, "num_frames", "invalid_value"),  # not 4k+1
    ({**BASE, "num_inference_steps": "two"}, 400, "num_inference_steps", "invalid_value"),
    ({**BASE, "num_inference_steps": 0}, 400, "num_inference_steps", "invalid_value"),
    ({**BASE, "guidance_scale": "nan"}, 400, "guidance_scale", "invalid_value"),
    ({**BASE, "guidance_scale": -1}, 400, "guidance_scale", "invalid_value"),
    ({**BASE, "seed": -1}, 400, "seed", "invalid_value"),
    ({**BASE, "seed": 1.5}, 400, "seed", "invalid_value"),
    ({**BASE, "flow_shift": 0}, 400, "flow_shift", "invalid_value"),
    ({**BASE, "fps": 0}, 400, "fps", "invalid_value"),
    ({**BASE, "seconds": "-1"}, 400, "seconds", "invalid_value"),
    ({**BASE, "seconds": "4"}, 400, "seconds", "invalid_value"),  # 65 frames, but num_frames is 5
    ({**BASE, "prompt": "   "}, 400, "prompt", "invalid_value"),
    ({"size": "32x32"}, 400, "prompt", "missing_required_parameter"),
    ({**BASE, "prompt": 3}, 400, "prompt", "invalid_value"),
    ({**BASE, "colour": "red"}, 400, "colour", "unknown_parameter"),
    ({**BASE, "input_reference": {"file_id": "file_1"}}, 400, "input_reference", "unsupported_file_id"),
    ({**BASE, "input_reference": "https://example.com/a.png"}, 400, "input_reference", "unsupported_url"),
    ({**BASE, "last_image": "data:image/png;base64,@@@"}, 400, "last_image", "invalid_image"),
    ({**BASE, "size": "80x64"}, 400, "size", "limit_exceeded"),
    ({**BASE, "num_frames": 21}, 400, "num_frames", "limit_exceeded"),
    ({**BASE, "num_inference_steps": 1000}, 400, "num_inference_steps", "limit_exceeded"),
    (
        {"prompt": "a cat"},
        400,
        "size",
        "limit_exceeded",
    ),  # the checkpoint's default 832x480 is over --max-pixels
    ({**BASE, "model": "sora-2"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), VIDEO_ERRORS)
def test_bad_video_requests(http, body, status, param, code) -> None:
    assert_error(http.post("/v1/videos", json=body), status, param, code)


def test_bad_video_requests_as_forms(http) -> None:
    form = {"prompt": "a cat", "size": "32x32", "num_frames": "5", "num_inference_steps": "1.5"}
    assert_error(http.post("/v1/videos", data=form), 400, "num_inference_steps")
    files = {"input_reference": ("a.png", b"\x89PNG broken", "image/png")}
    assert_error(http.post("/v1/videos", data={"prompt": "a cat"}, files=files), 400, "input_reference")
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    assert_error(http.post("/v1/videos", content=b"prompt=a&prompt=b", headers=urlencoded), 400, "prompt")


def test_malformed_bodies(http) -> None:
    headers = {"Content-Type": "application/json"}
    assert_error(http.post("/v1/videos", content=b'{"prompt": ', headers=headers), 400, None, "invalid_json")
    assert_error(http.post("/v1/videos", content=b"[1, 2]", headers=headers), 400, None, "invalid_json")
    assert_error(http.post("/v1/responses", content=b"{nope", headers=headers), 400, None, "invalid_json")
    broken = {"Content-Type": "multipart/form-data"}  # no boundary
    assert_error(http.post("/v1/videos", content=b"--x\r\n", headers=broken), 400, None, "invalid_form")
    garbage = {"Content-Type": "multipart/form-data; boundary=abc"}
    assert_error(http.post("/v1/videos", content=b"--abc\r\nnonsense", headers=garbage), 400, None)
    text = {"Content-Type": "text/plain"}
    assert_error(http.post("/v1/videos", content=b"a cat", headers=text), 415, None, "unsupported_media_type")


def test_oversized_bodies_are_413(server, http) -> None:
    big = {"prompt": "a cat", "negative_prompt": "x" * (MAX_BODY + 10)}
    assert_error(http.post("/v1/videos", json=big), 413, None, "request_too_large")

    def chunks():  # no Content-Length: counted while reading
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"x" * 4096

    response = http.post("/v1/videos", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, None, "request_too_large")


def test_unknown_ids_routes_and_auth(server, http) -> None:
    assert_error(http.get("/v1/videos/video_nope"), 404, "video_id", "not_found")
    assert_error(http.delete("/v1/videos/video_nope"), 404, "video_id", "not_found")
    assert_error(http.get("/v1/videos/video_nope/content"), 404, "video_id", "not_found")
    assert_error(http.get("/v1/nothing"), 404, None, "not_found")
    assert_error(http.put("/v1/videos"), 405, None, "method_not_allowed")
    assert_error(http.get("/v1/videos", params={"limit": 0}), 400, "limit")
    assert_error(http.get("/v1/videos", params={"limit": "many"}), 400, "limit")
    assert_error(http.get("/v1/videos", params={"order": "up"}), 400, "order")
    assert_error(http.get("/v1/videos", params={"after": "video_nope"}), 400, "after")
    no_key = httpx.post(f"{server.url}/v1/videos", json={"prompt": "a cat", **SMALL})
    assert_error(no_key, 401, None, "invalid_api_key")
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{server.url}/v1/videos", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, None, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).videos.list()


RESPONSE_ERRORS = [
    ({"model": "wan-tiny"}, "input", "missing_required_parameter"),
    ({"input": "a cat", "stream": True}, "stream", "invalid_value"),
    ({"input": ""}, "input", "invalid_value"),
    (
        {"input": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "input",
        "invalid_value",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]},
        "input",
        "unsupported_url",
    ),
    (
        {"input": "a cat", "provider_options": {"video": {"fps": 8}}},
        "provider_options.video.fps",
        "unknown_parameter",
    ),
    (
        {"input": "a cat", "provider_options": {"video": {"response_format": "gif"}}},
        "provider_options.video.response_format",
        "invalid_value",
    ),
    (
        {"input": "a cat", "provider_options": {"video": {"steps": "many"}}},
        "provider_options.video.steps",
        "invalid_value",
    ),
    (
        {"input": "a cat", "provider_options": {"video": {"height": 24, "width": 32, "num_frames": 1}}},
        "provider_options.video.height",
        "invalid_value",
    ),
    (
        {"input": "a cat", "provider_options": {"image": {"height": 32}}},
        "provider_options.image",
        "unsupported",
    ),
    ({"input": "a cat", "seed": "x"}, "seed", "invalid_value"),
]


@pytest.mark.parametrize(("body", "param", "code"), RESPONSE_ERRORS)
def test_bad_responses_requests(http, body, param, code) -> None:
    assert_error(http.post("/v1/responses", json=body), 400, param, code)


def test_responses_image_on_a_text_to_video_model(http) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
    message = {
        "role": "user",
        "content": [{"type": "input_text", "text": "go"}, {"type": "input_image", "image_url": url}],
    }
    video = {"height": 32, "width": 32, "num_frames": 1}
    body = {"input": [message], "provider_options": {"video": video}}
    error = assert_error(http.post("/v1/responses", json=body), 400, "input")
    assert "text-to-video" in error["message"]


def test_the_server_answers_the_next_good_request(http) -> None:
    """After all the refusals above, a good request still gets its video."""
    response = http.post("/v1/videos", json={"prompt": "a bird over snowy mountains", **SMALL})
    assert response.status_code == 200, response.text
    assert wait_done(http, response.json()["id"])["status"] == "completed"


def test_failed_generation_marks_the_job_failed_and_the_server_goes_on(
    server, http, wan_pipe, monkeypatch
) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(wan_pipe.executor, "execute", out_of_memory)
    job = http.post("/v1/videos", json={"prompt": "a cat", **SMALL}).json()
    failed = wait_done(http, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory"
    assert "out of memory" in failed["error"]["message"]
    assert_error(http.get(f"/v1/videos/{job['id']}/content"), 409, "video_id")
    response = http.post(
        "/v1/responses",
        json={
            "input": "a cat",
            "provider_options": {"video": {"height": 32, "width": 32, "num_frames": 1, "steps": 1}},
        },
    )
    assert_error(response, 500, None, "out_of_memory")
    monkeypatch.undo()
    again = http.post("/v1/videos", json={"prompt": "a cat", **SMALL}).json()
    assert wait_done(http, again["id"])["status"] == "completed"


def _batch_of_three(server, http, poison: dict) -> list[dict]:
    """Three jobs of one shape queued together (so they run as one batch); the second with ``poison``."""
    server.manager.pause()
    try:
        bodies = [{"prompt": f"clip {i}", **SMALL, "seed": 30 + i} for i in range(3)]
        bodies[1].update(poison)
        return [http.post("/v1/videos", json=body).json() for body in bodies]
    finally:
        server.manager.resume()


def test_a_bad_job_in_a_batch_fails_alone(server, http, wan_pipe, monkeypatch) -> None:
    """An exception in one job of a batch (bad input that slipped through validation): the batch runs
    again job by job; the bad job fails with its message, the others complete."""
    execute = wan_pipe.executor.execute
    sizes: list[int] = []

    def choke_on_the_poison(inputs, *args, **kwargs):
        sizes.append(inputs.latents.shape[0])
        if bool((inputs.guidance_scale == 7.25).any()):
            raise ValueError("the engine cannot take guidance_scale 7.25")
        return execute(inputs, *args, **kwargs)

    monkeypatch.setattr(wan_pipe.executor, "execute", choke_on_the_poison)
    jobs = _batch_of_three(server, http, {"guidance_scale": 7.25})
    done = [wait_done(http, job["id"]) for job in jobs]
    assert [d["status"] for d in done] == ["completed", "failed", "completed"]
    assert done[1]["error"]["code"] == "generation_failed"
    assert "cannot take guidance_scale 7.25" in done[1]["error"]["message"]
    assert sizes == [3, 1, 1, 1] and [done[i]["batch_size"] for i in (0, 2)] == [1, 1]
    print(f"\nFAULT a bad job in a batch of 3: {[d['status'] for d in done]}, {done[1]['error']}")
    assert http.get(f"/v1/videos/{jobs[0]['id']}/content").status_code == 200


def test_a_batch_out_of_memory_runs_its_jobs_alone(server, http, wan_pipe, monkeypatch) -> None:
    """Out of memory in a batch of three: each job runs alone and completes."""
    execute = wan_pipe.executor.execute
    sizes: list[int] = []

    def too_big_together(inputs, *args, **kwargs):
        sizes.append(inputs.latents.shape[0])
        if inputs.latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return execute(inputs, *args, **kwargs)

    monkeypatch.setattr(wan_pipe.executor, "execute", too_big_together)
    jobs = _batch_of_three(server, http, {})
    done = [wait_done(http, job["id"]) for job in jobs]
    assert [d["status"] for d in done] == ["completed"] * 3
    assert sizes == [3, 1, 1, 1] and [d["batch_size"] for d in done] == [1, 1, 1]


# -- cancelling ----------------------------------------------------------------------------------------
@pytest.fixture
def gate(server, tmp_path: Path):
    """The worker's step gate, shut for the test: the worker runs only the steps the test allows."""
    from wanpipe.serving.step_gate import StepGate

    gate = Gate(tmp_path / "gate")
    server.manager.step_gate = StepGate(gate.folder)
    try:
        yield gate
    finally:
        gate.open()  # a worker held at the gate goes on
        server.manager.step_gate = None


def test_delete_cancels_a_running_job_at_the_next_step(server, http, gate, dit_rows) -> None:
    manager = server.manager
    job = http.post("/v1/videos", json={"prompt": "a long one", **SMALL, "num_inference_steps": 10}).json()
    gate.hold_at(3)  # three steps done, the worker held before the fourth
    assert http.get(f"/v1/videos/{job['id']}").json()["status"] == "in_progress"
    assert http.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    assert_error(http.get(f"/v1/videos/{job['id']}"), 404)
    gate.open()
    wait_until(lambda: manager.running_batch_size() == 0, 60, "the worker to drop the cancelled batch", 0.01)
    assert len(dit_rows) == 3  # the fourth step never ran
    assert not manager.store.video_path(job["id"]).exists()


def test_delete_on_another_replica_cancels_at_the_next_step(server, http, gate, dit_rows, tmp_path) -> None:
    """PostgreSQL: the row deleted by another process (an API replica) stops the work at the next step."""
    manager = server.manager
    if not hasattr(manager.store, "url"):
        pytest.skip("one process owns a SQLite store: its DELETE is the test above")
    from wanpipe.serving.store_pg import CANCEL_POLL_S, PgJobStore

    job = http.post("/v1/videos", json={"prompt": "a long one", **SMALL, "num_inference_steps": 10}).json()
    gate.hold_at(3)  # three steps done, the worker held before the fourth
    replica = PgJobStore(manager.store.url, tmp_path / "replica")
    try:
        assert replica.delete(job["id"]).status == JobStatus.IN_PROGRESS
    finally:
        replica.close()
    time.sleep(CANCEL_POLL_S + 0.1)  # the worker reads the deleted rows at most this often
    gate.open()
    wait_until(lambda: manager.running_batch_size() == 0, 60, "the worker to drop the cancelled batch", 0.01)
    assert len(dit_rows) == 3  # the fourth step never ran
    assert not manager.store.video_path(job["id"]).exists()


def test_delete_one_job_of_a_running_batch_stops_its_row(server, http, gate, dit_rows, wan_pipe, monkeypatch):
    """Three jobs run as one batch; one is deleted after two steps: from the third step on the DiT runs
    the other two rows alone, and they complete with the frames of a plain run of the batch."""
    requests, made = [], []
    make_context, run_contexts = wan_pipe.tokenizer.make_context, wan_pipe.run_contexts

    def spy_make_context(request):
        requests.append(request)
        return make_context(request)

    def spy_run_contexts(contexts, *args, **kwargs):  # the server's sinks, and a copy of the frames
        kept = [Collect() for _ in contexts]
        kwargs["sinks"] = [Tee(sink, copy) for sink, copy in zip(kwargs["sinks"], kept)]
        frames, timings = run_contexts(contexts, *args, **kwargs)
        made.append([None if f is None else c.frames() for f, c in zip(frames, kept)])
        return frames, timings

    monkeypatch.setattr(wan_pipe.tokenizer, "make_context", spy_make_context)
    monkeypatch.setattr(wan_pipe, "run_contexts", spy_run_contexts)
    fields = {**SMALL, "num_inference_steps": 5, "guidance_scale": 5.0}
    server.manager.pause()
    try:
        jobs = [
            http.post("/v1/videos", json={"prompt": f"clip {i}", **fields, "seed": 20 + i}).json()
            for i in range(3)
        ]
    finally:
        server.manager.resume()
    gate.hold_at(2)
    assert http.delete(f"/v1/videos/{jobs[1]['id']}").status_code == 200
    gate.open()
    done = [wait_done(http, jobs[i]["id"]) for i in (0, 2)]
    assert [d["status"] for d in done] == ["completed"] * 2 and [d["batch_size"] for d in done] == [3, 3]
    assert dit_rows == [6, 6, 4, 4, 4]  # guided: cond + uncond rows, 3 jobs then 2
    assert_error(http.get(f"/v1/videos/{jobs[1]['id']}"), 404)
    assert not server.manager.store.video_path(jobs[1]["id"]).exists()

    monkeypatch.undo()
    assert len(requests) == 3 and len(made) == 1 and made[0][1] is None
    plain, _ = wan_pipe.run_contexts([wan_pipe.tokenizer.make_context(r) for r in requests], progress=False)
    for i in (0, 2):  # streamed as uint8: at most one level from the plain run's frames, rounded
        assert int(np.abs(made[0][i].astype(int) - Video(plain[i], fps=16).to_uint8()).max()) <= 1
    assert float(np.abs(plain[0] - plain[2]).max()) > 1e-2  # different seeds: the check can fail


def test_delete_a_queued_job(server, http) -> None:
    server.manager.pause()
    try:
        job = http.post("/v1/videos", json={"prompt": "never runs", **SMALL}).json()
        assert http.delete(f"/v1/videos/{job['id']}").status_code == 200
    finally:
        server.manager.resume()
    assert_error(http.get(f"/v1/videos/{job['id']}"), 404)
    assert server.manager.store.get(job["id"]) is None


# -- concurrency, batching, back-pressure ------------------------------------------------------------
def test_concurrent_clients_get_their_videos_in_batches(server, client, http, tmp_path: Path) -> None:
    """Eight clients at once (one shape) and two of another shape: the worker runs them as batches of
    up to --max-batch jobs of one shape."""
    manager = server.manager
    before = {size: metric(http, f'wanpipe_batches_total{{size="{size}"}}') for size in (2, 4)}
    manager.pause()  # let every request be queued before the worker looks
    try:
        shapes = [SMALL] * 8 + [{"size": "48x32", "num_frames": 1, "num_inference_steps": 2}] * 2

        def create(i: int):
            return client.videos.create(prompt=f"clip number {i}", **sdk(shapes[i], seed=i))

        with ThreadPoolExecutor(10) as pool:
            videos = list(pool.map(create, range(10)))
        assert all(v.status == "queued" for v in videos)
        assert metric(http, "wanpipe_queue_depth") == 10
    finally:
        manager.resume()

    def download(video) -> tuple[str, np.ndarray, int]:
        done = client.videos.poll(video.id, poll_interval_ms=100)
        frames, _ = read_mp4(client.videos.download_content(video.id).read(), tmp_path, f"{video.id}.mp4")
        return done.status, frames, done.model_extra["batch_size"]

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(download, videos))
    assert [status for status, _, _ in results] == ["completed"] * 10
    assert all(frames.shape == (5, 32, 32, 3) for _, frames, _ in results[:8])
    assert all(frames.shape == (1, 32, 48, 3) for _, frames, _ in results[8:])
    assert [size for _, _, size in results] == [4] * 8 + [2] * 2
    after = {size: metric(http, f'wanpipe_batches_total{{size="{size}"}}') for size in (2, 4)}
    assert after[4] - before[4] == 2 and after[2] - before[2] == 1
    # different seeds, different videos
    assert np.abs(results[0][1].astype(float) - results[1][1]).mean() > 1


def test_a_full_queue_answers_429_with_retry_after(server, http) -> None:
    manager = server.manager
    manager.pause()
    ids = []
    try:
        for i in range(LIMITS.max_queue):
            response = http.post("/v1/videos", json={"prompt": f"filler {i}", **SMALL})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        response = http.post("/v1/videos", json={"prompt": "one too many", **SMALL})
        assert_error(response, 429, None, "queue_full")
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0).videos.create(
                prompt="and another", **sdk(SMALL)
            )
    finally:
        for video_id in ids:
            http.delete(f"/v1/videos/{video_id}")
        manager.resume()
    assert manager.store.count(JobStatus.QUEUED) == 0


def test_the_web_page_is_served(server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in (
        'id="prompt"',
        'id="negative_prompt"',
        'id="seed"',
        'id="gallery"',
        'id="preset"',
        'type="file"',
        "new EventSource(",  # live progress from the job's event stream
    ):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from outside
    assert "setInterval" not in page.text  # no polling loop


def test_progress_is_reported_while_running(server, http, gate) -> None:
    job = http.post("/v1/videos", json={"prompt": "step by step", **SMALL, "num_inference_steps": 4}).json()
    for steps in (1, 3):  # the worker held after this many of 4 steps
        gate.hold_at(steps)
        body = http.get(f"/v1/videos/{job['id']}").json()
        assert body["status"] == "in_progress" and body["progress"] == 95 * steps // 4, body
    gate.open()
    assert wait_done(http, job["id"])["progress"] == 100


def test_metrics_are_prometheus_histograms_and_counters(server, http) -> None:
    """Read back with prometheus_client's own parser, after the jobs above: histograms with buckets for
    queue wait, step, run and batch time; counters by label; the store's gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    job = http.post("/v1/videos", json={"prompt": "one more", **SMALL}).json()
    assert wait_done(http, job["id"])["status"] == "completed"
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("queue_wait_seconds", "step_seconds", "run_seconds", "batch_seconds"):
        family = families[f"wanpipe_{name}"]
        assert family.type == "histogram", family
        buckets = [s for s in family.samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert len(buckets) > 5 and counts == sorted(counts), buckets  # cumulative
        (count,) = [s.value for s in family.samples if s.name.endswith("_count")]
        assert buckets[-1].labels["le"] == "+Inf" and counts[-1] == count > 0
    completed = server.manager.store.counts()[JobStatus.COMPLETED]
    finished = {
        s.labels["status"]: s.value
        for s in families["wanpipe_jobs_finished"].samples
        if s.name.endswith("_total")
    }
    assert finished["completed"] >= completed > 0
    assert families["wanpipe_queue_depth"].samples[0].value == server.manager.store.count(JobStatus.QUEUED)
    jobs = {s.labels["state"]: s.value for s in families["wanpipe_jobs"].samples}
    assert jobs["completed"] == completed
    assert families["wanpipe_batches"].type == "counter"
