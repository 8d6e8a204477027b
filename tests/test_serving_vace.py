"""VACE on the server: the fields of ``POST /v1/videos`` (``video``, ``mask``, ``reference_image``,
``conditioning_scale``) parsed from multipart files and JSON data URLs, uploads checked before and while
they are decoded, refusals as 400s naming the field, and the inputs kept with the job in the store."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving_helpers import (
    Gate,
    ServerProcess,
    ThreadServer,
    assert_error,
    png_bytes,
    read_mp4,
    wait_until,
)
from tests.tiny_vace import save_vace_checkpoint
from wanpipe import WanPipeline
from wanpipe.media import Video, read_image, read_video
from wanpipe.serving.app import create_app
from wanpipe.serving.errors import APIError
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import JobSpec, ServeLimits, parse_video_create, unflatten_form_keys
from wanpipe.serving.store import Job, JobStatus, JobStore
from wanpipe.serving.uploads import Upload

LIMITS = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=9, max_steps=20)


def mp4_bytes(frames: int, height: int, width: int, folder: Path, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    path = folder / f"v{seed}-{frames}.mp4"
    Video(frames=rng.uniform(0, 1, (frames, height, width, 3)).astype(np.float32), fps=8).save(path)
    return path.read_bytes()


def gif_bytes(frames: int, height: int, width: int) -> bytes:
    images = [Image.new("RGB", (width, height), (40 * i, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def parse(body: dict) -> object:
    return parse_video_create(
        body, default_fps=16, max_image_pixels=LIMITS.max_image_pixels, max_frames=LIMITS.max_frames,
        max_video_pixels=LIMITS.max_video_pixels,
    )  # fmt: skip


def test_vace_fields_parse_from_forms_and_json(tmp_path: Path) -> None:
    video = mp4_bytes(5, 32, 48, tmp_path)
    mask_png = png_bytes(32, 48, seed=1)
    form = unflatten_form_keys(
        [
            ("prompt", "a cat"),
            ("video", Upload(video, "control.mp4", "video/mp4")),
            ("mask", Upload(mask_png, "mask.png", "image/png")),
            ("reference_image", Upload(png_bytes(20, 30, seed=2), "a.png", "image/png")),
            ("reference_image", Upload(png_bytes(30, 20, seed=3), "b.png", "image/png")),
            ("conditioning_scale", "0.5, 1"),
        ]
    )
    new = parse(form)
    assert new.video.shape == (5, 32, 48, 3) and new.video.dtype == np.uint8
    assert new.mask.shape == (1, 32, 48, 3)
    assert [r.shape for r in new.reference_images] == [(20, 30, 3), (30, 20, 3)]
    assert (new.spec.has_video, new.spec.has_mask, new.spec.reference_images) == (True, True, 2)
    assert new.spec.conditioning_scale == [0.5, 1.0]
    # JSON: data URLs, one reference image or a list, the mask as a video
    body = {
        "prompt": "a cat",
        "video": data_url(video, "video/mp4"),
        "mask": data_url(gif_bytes(5, 32, 48), "image/gif"),
        "reference_image": data_url(png_bytes(20, 30, seed=2), "image/png"),
        "conditioning_scale": 2,
    }
    new_json = parse(body)
    np.testing.assert_array_equal(new_json.video, new.video)
    assert new_json.mask.shape == (5, 32, 48, 3) and len(new_json.reference_images) == 1
    np.testing.assert_array_equal(new_json.reference_images[0], new.reference_images[0])
    assert new_json.spec.conditioning_scale == 2.0
    assert parse({**body, "reference_image": [body["reference_image"]] * 3}).spec.reference_images == 3


@pytest.mark.parametrize(
    ("field", "value", "code", "said"),
    [
        ("video", "png", "invalid_video", "still PNG image"),
        ("video", "garbage", "invalid_video", "not a video"),
        ("video", "long", "invalid_video", "more than 9 frames"),
        ("video", "large", "invalid_video", "more than this server decodes"),
        ("video", "url", "unsupported_url", "does not fetch"),
        ("mask", "garbage", "invalid_image", "not an image"),
        ("reference_image", "many", "invalid_value", "at most 8"),
        ("reference_image", "mp4", "invalid_image", "a video"),
        ("conditioning_scale", "1,x", "invalid_value", "finite number"),
        ("conditioning_scale", "empty", "invalid_value", "non-empty list"),
    ],
)
def test_vace_uploads_the_parser_refuses(field, value, code, said, tmp_path: Path) -> None:
    values = {
        "png": Upload(png_bytes(32, 48)),
        "garbage": Upload(b"\x00garbage" * 10, "v.bin", None),
        "long": Upload(mp4_bytes(12, 32, 48, tmp_path), "v.mp4", "video/mp4"),
        "large": Upload(mp4_bytes(2, 144, 144, tmp_path), "v.mp4", "video/mp4"),
        "url": "https://example.com/v.mp4",
        "many": [data_url(png_bytes(8, 8), "image/png")] * 9,
        "mp4": Upload(mp4_bytes(2, 16, 16, tmp_path), "r.mp4", "video/mp4"),
        "1,x": "1,x",
        "empty": [],
    }
    with pytest.raises(APIError) as info:
        parse({"prompt": "a cat", field: values[value]})
    assert (info.value.status, info.value.param, info.value.code) == (400, field, code), info.value.message
    assert said in info.value.message


@pytest.fixture(scope="module")
def t2v_server(wan_pipe, tmp_path_factory):
    store = JobStore(tmp_path_factory.mktemp("serve-vace") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    with ThreadServer(create_app(manager, max_body_bytes=2**20)) as srv:
        assert manager.wait_ready(60)
        yield srv


def test_vace_fields_on_a_plain_checkpoint_are_400s(t2v_server, tmp_path: Path) -> None:
    """A text-to-video checkpoint refuses each VACE field, naming it; nothing is queued."""
    small = {"prompt": "a cat", "size": "48x32", "num_frames": "5", "num_inference_steps": "1"}
    uploads = {
        "video": ("control.mp4", mp4_bytes(5, 32, 48, tmp_path), "video/mp4"),
        "mask": ("mask.png", png_bytes(32, 48), "image/png"),
        "reference_image": ("ref.png", png_bytes(20, 30), "image/png"),
    }
    with httpx.Client(base_url=t2v_server.url, timeout=60) as http:
        for name, upload in uploads.items():
            error = assert_error(
                http.post("/v1/videos", data=small, files={name: upload}), 400, name, "invalid_value"
            )
            assert "VACE" in error["message"]
        error = assert_error(
            http.post(
                "/v1/videos",
                json={
                    "prompt": "a cat",
                    "size": "48x32",
                    "num_frames": 5,
                    "num_inference_steps": 1,
                    "conditioning_scale": [1, 2],
                },
            ),
            400,
            "conditioning_scale",
            "invalid_value",
        )
        assert "VACE" in error["message"]
        assert http.get("/v1/videos").json()["data"] == []


def test_store_keeps_vace_inputs(tmp_path: Path) -> None:
    """The store writes a job's video and mask (uint8 arrays) and reference images before the row, reads
    them back exactly, and removes them with the job."""
    store = JobStore(tmp_path / "out")
    try:
        rng = np.random.default_rng(0)
        video = rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
        mask = rng.integers(0, 256, (1, 32, 48), dtype=np.uint8)
        refs = [
            rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
            rng.integers(0, 256, (9, 7, 3), dtype=np.uint8),
        ]
        spec = JobSpec(
            prompt="a", has_video=True, has_mask=True, reference_images=2, conditioning_scale=[1.0, 0.5]
        )
        job = Job(
            id="video_" + "0" * 32, status=JobStatus.QUEUED, model="m", spec=spec, batch_key="k", source="videos",
            created_at=0.0,
        )  # fmt: skip
        images = {"video": video, "mask": mask, "reference_image.0": refs[0], "reference_image.1": refs[1]}
        store.add(job, images)
        stored = store.get(job.id)
        assert stored.spec == spec
        inputs = store.read_inputs(stored)
        assert set(inputs) == {"video", "mask", "reference_images"}
        np.testing.assert_array_equal(inputs["video"], video)
        np.testing.assert_array_equal(inputs["mask"], mask)
        for got, want in zip(inputs["reference_images"], refs, strict=True):
            np.testing.assert_array_equal(got, want)
        assert store.read_inputs(
            replace(stored, spec=replace(spec, has_video=False, reference_images=0))
        ).keys() == {"mask"}
        store.remove_files(job.id)
        assert list(store.inputs_dir.iterdir()) == []
    finally:
        store.close()


def test_vace_job_survives_kill_9_with_its_uploads(tmp_path: Path) -> None:
    """A VACE job with an uploaded control video, mask and reference image, killed (-9) mid-run, runs
    again after a restart from the inputs kept with it, and gives the frames of a direct call."""

    ckpt = save_vace_checkpoint(tmp_path / "vace-tiny")
    control, mask, reference = (
        mp4_bytes(5, 32, 48, tmp_path, seed=4),
        png_bytes(32, 48, 5),
        png_bytes(24, 20, 6),
    )
    fields = {"prompt": "a cat walks", "size": "48x32", "num_frames": "5", "num_inference_steps": "3"}
    fields |= {"seed": "9", "conditioning_scale": "0.5,1.5"}
    files = [
        ("video", ("control.mp4", control, "video/mp4")),
        ("mask", ("mask.png", mask, "image/png")),
        ("reference_image", ("ref.png", reference, "image/png")),
    ]
    out = tmp_path / "jobs"
    args = ("--model", str(ckpt), "--output-dir", str(out))
    env = {"OMP_NUM_THREADS": "1"}
    gate = Gate(tmp_path / "gate-1")
    first = ServerProcess(*args, env={**env, **gate.env})
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=30) as http:
            response = http.post("/v1/videos", data=fields, files=files)
            assert response.status_code == 200, response.text
            job = response.json()
            assert (
                job["parameters"] | {"video": True, "mask": True, "reference_images": 1} == job["parameters"]
            )
            assert job["parameters"]["conditioning_scale"] == [0.5, 1.5]
            gate.hold_at(1)  # one step done, held before the second
            assert http.get(f"/v1/videos/{job['id']}").json()["status"] == "in_progress"
    finally:
        first.kill()
    stored = sorted(p.name.split(".", 1)[1] for p in (out / "inputs").iterdir())
    assert stored == ["mask.npy", "reference_image.0.png", "video.npy"]

    gate = Gate(tmp_path / "gate-2")
    second = ServerProcess(*args, env={**env, **gate.env})
    try:
        second.wait_ready()
        gate.open()
        with httpx.Client(base_url=second.url, timeout=30) as http:

            def completed():
                body = http.get(f"/v1/videos/{job['id']}").json()
                assert body["status"] != "failed", body
                return body if body["status"] == "completed" else None

            wait_until(completed, 120, "the VACE job to complete")
            served, _ = read_mp4(http.get(f"/v1/videos/{job['id']}/content").content, tmp_path, "served.mp4")
    finally:
        second.kill()

    (tmp_path / "control.mp4").write_bytes(control)
    (tmp_path / "mask.png").write_bytes(mask)
    (tmp_path / "ref.png").write_bytes(reference)
    pipe = WanPipeline.from_pretrained(ckpt, device="cpu", dtype="float32")
    direct = pipe.generate(
        "a cat walks", height=32, width=48, num_frames=5, num_inference_steps=3, seed=9, progress=False,
        video=read_video(tmp_path / "control.mp4")[0], mask=read_image(tmp_path / "mask.png"),
        reference_images=[read_image(tmp_path / "ref.png")], conditioning_scale=[0.5, 1.5],
    )  # fmt: skip
    Video(frames=direct.frames, fps=16).save(tmp_path / "direct.mp4")  # as the server saves a job's video
    expected, _ = read_video(tmp_path / "direct.mp4")
    np.testing.assert_array_equal(served, expected)


def test_vace_server_takes_num_frames_from_the_video(tmp_path: Path) -> None:
    """Without num_frames a VACE job has the control video's frame count (within --max-frames, although
    the checkpoint's default is more); JSON data URLs work as the files do; a mask whose frame count
    differs from the video's is a 400 naming mask."""

    pipe = WanPipeline.from_pretrained(save_vace_checkpoint(tmp_path / "vace"), device="cpu", dtype="float32")
    assert pipe.arch.defaults.num_frames > LIMITS.max_frames
    store = JobStore(tmp_path / "out")
    manager = JobManager(store, lambda: pipe, model_name="vace-tiny", limits=LIMITS)
    body = {
        "prompt": "a cat",
        "size": "48x32",
        "num_inference_steps": 1,
        "video": data_url(mp4_bytes(7, 32, 48, tmp_path), "video/mp4"),
        "mask": data_url(png_bytes(32, 48), "image/png"),
        "reference_image": [data_url(png_bytes(16, 16, seed=1), "image/png")],
    }
    with (
        ThreadServer(create_app(manager, max_body_bytes=2**22)) as srv,
        httpx.Client(base_url=srv.url) as http,
    ):
        assert manager.wait_ready(60)
        response = http.post("/v1/videos", json=body)
        assert response.status_code == 200, response.text
        video_id = response.json()["id"]
        assert response.json()["parameters"]["num_frames"] == 5  # 7 frames -> 4k+1

        def done():
            job = http.get(f"/v1/videos/{video_id}").json()
            return job if job["status"] in ("completed", "failed") else None

        assert wait_until(done, 120, "the job")["status"] == "completed"
        mask_video = data_url(mp4_bytes(3, 32, 48, tmp_path, seed=2), "video/mp4")
        assert_error(http.post("/v1/videos", json={**body, "mask": mask_video}), 400, "mask", "invalid_value")
        small = data_url(mp4_bytes(5, 16, 16, tmp_path, seed=3), "video/mp4")
        assert_error(http.post("/v1/videos", json={**body, "video": small}), 400, "video", "invalid_value")
        scale = {**body, "conditioning_scale": [1, 2, 3]}
        assert_error(http.post("/v1/videos", json=scale), 400, "conditioning_scale", "invalid_value")
