"""Animate on the server: the fields parsed (multipart files and JSON data URLs), refused with a 400
naming them on a checkpoint that is not Animate, kept by the store as the engine resolved them."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving_helpers import ThreadServer, assert_error
from wanpipe.media import Video
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import JobSpec, ServeLimits, parse_video_create
from wanpipe.serving.store import Job, JobStatus, JobStore
from wanpipe.serving.uploads import Upload

VIDEOS = ("pose_video", "face_video", "background_video", "mask_video")


def mp4_bytes(tmp_path: Path, frames: int, height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    path = tmp_path / f"v{seed}.mp4"
    Video.from_uint8(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), 16).save(path)
    return path.read_bytes()


def test_parse_animate_fields(tmp_path) -> None:
    """Multipart uploads and JSON data URLs give the same videos; the spec records them."""
    data = {name: mp4_bytes(tmp_path, 3, 32, 32, i) for i, name in enumerate(VIDEOS)}
    form = {name: Upload(data[name], f"{name}.mp4", "video/mp4") for name in VIDEOS}
    new = parse_video_create(
        {"prompt": "a", "mode": "replace", "segment_frame_length": "13", **form}, default_fps=16
    )
    urls = {name: "data:video/mp4;base64," + base64.b64encode(data[name]).decode() for name in VIDEOS}
    as_json = parse_video_create(
        {"prompt": "a", "prev_segment_conditioning_frames": 5, **urls}, default_fps=16
    )
    assert new.animate_videos is not None and as_json.animate_videos is not None
    for name in VIDEOS:
        assert new.animate_videos[name].shape == (3, 32, 32, 3)
        assert np.array_equal(new.animate_videos[name], as_json.animate_videos[name])
        assert getattr(new.spec, f"has_{name}")
    assert (new.spec.mode, new.spec.segment_frame_length) == ("replace", 13)
    assert as_json.spec.prev_segment_conditioning_frames == 5
    assert parse_video_create({"prompt": "a"}, default_fps=16).animate_videos is None


def test_store_keeps_the_driving_videos(tmp_path) -> None:
    store = JobStore(tmp_path / "out")
    rng = np.random.default_rng(0)
    arrays = {
        "pose_video": rng.integers(0, 256, (7, 32, 48, 3), dtype=np.uint8),
        "face_video": rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8),
        "mask_video": rng.integers(0, 256, (7, 32, 48), dtype=np.uint8),
    }
    spec = JobSpec(prompt="a", has_pose_video=True, has_face_video=True, has_mask_video=True, mode="replace")
    job = Job(
        id="video_1",
        status=JobStatus.QUEUED,
        model="m",
        spec=spec,
        batch_key="k",
        source="videos",
        created_at=0.0,
    )
    store.add(job, arrays)
    back = store.read_inputs(store.get("video_1"))
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert np.array_equal(back[name], array) and back[name].dtype == np.uint8
    store.remove_files("video_1")
    assert not list((tmp_path / "out" / "inputs").glob("video_1.*"))
    store.close()


@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    store = JobStore(tmp_path_factory.mktemp("serve") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=ServeLimits())
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert manager.wait_ready(60)
        yield c


@pytest.mark.parametrize(
    "field", [*VIDEOS, "mode", "segment_frame_length", "prev_segment_conditioning_frames"]
)
def test_animate_fields_on_a_text_to_video_checkpoint_are_400(http, tmp_path, field) -> None:
    values = {"mode": "replace", "segment_frame_length": "77", "prev_segment_conditioning_frames": "1"}
    files = {}
    data = {"prompt": "a cat", "size": "32x32", "num_frames": "5"}
    if field in VIDEOS:
        files[field] = (f"{field}.mp4", mp4_bytes(tmp_path, 3, 32, 32, 1), "video/mp4")
    else:
        data[field] = values[field]
    response = (
        http.post("/v1/videos", data=data, files=files) if files else http.post("/v1/videos", data=data)
    )
    error = assert_error(response, 400, field)
    assert "Wan2.2-Animate-14B" in error["message"]


def test_a_still_image_as_a_pose_video_is_400(http, tmp_path) -> None:
    from tests.serving_helpers import png_bytes

    files = {"pose_video": ("pose.png", png_bytes(8, 8), "image/png")}
    response = http.post("/v1/videos", data={"prompt": "a cat"}, files=files)
    assert_error(response, 400, "pose_video", "invalid_video")


def test_job_spec_json_round_trip() -> None:
    spec = JobSpec(prompt="a", has_pose_video=True, mode="animate", segment_frame_length=77)
    assert JobSpec.from_json(spec.to_json()) == spec
    assert replace(spec, mode=None) != spec


def test_an_animate_job_with_its_uploads_survives_kill_9(tmp_path) -> None:
    """A replace-mode job with its four uploads (and the character) is killed mid-run; the restarted
    server runs it again from the stored inputs and makes the video an uninterrupted job made."""
    from tests.serving_helpers import Gate, ServerProcess, png_bytes, wait_until
    from tests.tiny_animate import FACE_SIZE, save_animate_checkpoint

    ckpt = save_animate_checkpoint(tmp_path / "animate-ckpt")
    uploads = {
        "input_reference": ("character.png", png_bytes(40, 36, 1), "image/png"),
        "pose_video": ("src_pose.mp4", mp4_bytes(tmp_path, 7, 32, 48, 1), "video/mp4"),
        "face_video": ("src_face.mp4", mp4_bytes(tmp_path, 7, FACE_SIZE, FACE_SIZE, 2), "video/mp4"),
        "background_video": ("src_bg.mp4", mp4_bytes(tmp_path, 7, 32, 48, 3), "video/mp4"),
        "mask_video": ("src_mask.mp4", mp4_bytes(tmp_path, 7, 32, 48, 4), "video/mp4"),
    }
    form = {"prompt": "a cat", "mode": "replace", "num_inference_steps": "2", "seed": "5"}
    form["segment_frame_length"] = "5"  # two segments of two steps: four steps per job
    args = ("--model", str(ckpt), "--output-dir", str(tmp_path / "jobs"))
    env = {"OMP_NUM_THREADS": "1"}

    def wait_completed(http: httpx.Client, video_id: str) -> dict:
        def check():
            body = http.get(f"/v1/videos/{video_id}").json()
            assert body["status"] != "failed", body
            return body if body["status"] == "completed" else None

        return wait_until(check, 300, f"{video_id} to complete", interval=0.1)

    gate = Gate(tmp_path / "gate-1")
    first = ServerProcess(*args, env={**env, **gate.env})
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=60) as http:
            gate.allow(4)
            whole = http.post("/v1/videos", data=form, files=uploads).json()
            done = wait_completed(http, whole["id"])
            assert done["parameters"]["mode"] == "replace" and done["parameters"]["mask_video"]
            whole_mp4 = http.get(f"/v1/videos/{whole['id']}/content").content
            killed = http.post("/v1/videos", data=form, files=uploads).json()
            gate.hold_at(4 + 3)  # into its second segment
    finally:
        first.kill()
    gate = Gate(tmp_path / "gate-2")
    second = ServerProcess(*args, env={**env, **gate.env})
    try:
        second.wait_ready()
        with httpx.Client(base_url=second.url, timeout=60) as http:
            gate.open()
            wait_completed(http, killed["id"])
            assert http.get(f"/v1/videos/{killed['id']}/content").content == whole_mp4
    finally:
        second.terminate()
