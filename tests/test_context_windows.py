"""Context windows (long videos, docs/long-video.md): the schedules against the reference's own lists
(ComfyUI-WanVideoWrapper, tests/reference/wanvideowrapper_context.py), the blending against the DiT run
on each window alone (ours and diffusers'), a window covering the video against a plain run
(bit-identical), the request checks naming the field, the CLI and the server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests import tiny_family
from tests.reference import wanvideowrapper_context as reference
from tests.serving_helpers import ThreadServer, assert_error, read_mp4, wait_until
from wanpipe import WanPipeline, WanRequest
from wanpipe.cli import main
from wanpipe.context import ContextWindows, InvalidRequestError
from wanpipe.stages.windows import SCHEDULES, ordered_halving, window_weights, windowed_forward
from wanpipe.window_request import resolve_windows

SMALL = dict(prompt="a cat walks", height=32, width=32, num_inference_steps=3, seed=7, progress=False)


# -- the schedules -----------------------------------------------------------------------------------------
TRIPLES = [  # (latent frames, window, overlap)
    (6, 3, 1),
    (10, 5, 1),
    (17, 5, 2),
    (21, 5, 1),
    (33, 9, 4),
    (41, 21, 5),
    (44, 8, 3),
    (100, 21, 4),
]


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("triple", TRIPLES, ids=[f"{f}-{w}-{o}" for f, w, o in TRIPLES])
def test_schedules_match_the_reference(name, stride, triple) -> None:
    """Every step's window list is the reference's, for each (frames, window, overlap, stride)."""
    frames, window, overlap = triple
    ours_fn, ref_fn = SCHEDULES[name], reference.get_context_scheduler(name)
    for step in range(12):
        ref = [list(map(int, w)) for w in ref_fn(step, 12, frames, window, stride, overlap)]
        ours = ours_fn(step, frames, window, overlap, stride)
        assert ours == ref, (name, step)
        covered = sorted({i for w in ours for i in w})
        assert covered == list(range(frames)), (name, step)  # no frame left without a prediction


def test_ordered_halving_is_the_reference() -> None:
    assert [ordered_halving(i) for i in range(300)] == [reference.ordered_halving(i) for i in range(300)]


def test_looped_windows_wrap_and_standard_ones_do_not() -> None:
    looped = SCHEDULES["uniform_looped"](1, 16, 5, 1)
    assert any(w != sorted(w) for w in looped)  # a window runs from the end back to the start
    standard = SCHEDULES["uniform_standard"](1, 16, 5, 1)
    assert all(w == list(range(w[0], w[0] + 5)) for w in standard)
    assert SCHEDULES["static_standard"](0, 16, 5, 1) == SCHEDULES["static_standard"](3, 16, 5, 1)


def test_weights() -> None:
    inner = window_weights([3, 4, 5, 6, 7], 12, 2)
    assert inner.tolist() == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    assert window_weights([0, 1, 2, 3, 4], 12, 2).tolist() == pytest.approx([1, 1, 1, 2 / 3, 1 / 3])
    assert window_weights([7, 8, 9, 10, 11], 12, 2).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    # two windows overlapping by exactly `overlap` frames: their ramps sum to 1 there
    first, second = window_weights([0, 1, 2, 3, 4], 8, 2), window_weights([3, 4, 5, 6, 7], 8, 2)
    assert (first[3:] + second[:2]).tolist() == pytest.approx([1, 1])
    assert window_weights([2, 3, 4, 5, 6], 12, 2, "pyramid").tolist() == [1, 2, 3, 2, 1]


# -- the blending --------------------------------------------------------------------------------------
def test_each_window_is_the_dit_on_that_window_alone(wan_pipe, reference_pipe) -> None:
    """Two windows: the frames only one window covers are that window's DiT prediction alone (exactly
    ours, and diffusers' transformer on the same window within 1e-3); the shared frame is their mean;
    with no overlap the prediction is the two windows' side by side."""
    torch.manual_seed(0)
    dit, runner = wan_pipe.executor.experts.get("high"), wan_pipe.executor.runner
    x = torch.randn(1, 16, 5, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 7, reference_pipe.transformer.config.text_dim)

    def ours(v):
        return runner.forward(dit, v, t, text)

    def theirs(v):
        with torch.no_grad():
            return reference_pipe.transformer(v, t, text, return_dict=False)[0]

    with torch.no_grad():
        blended = windowed_forward(ContextWindows(3, 1, "static_standard"), 0, x, ours)
        first, second = ours(x[:, :, 0:3]), ours(x[:, :, 2:5])
    assert torch.equal(blended[:, :, :2], first[:, :, :2])
    assert torch.equal(blended[:, :, 3:], second[:, :, 1:])
    torch.testing.assert_close(blended[:, :, 2], (first[:, :, 2] + second[:, :, 0]) / 2)
    worst = max(
        float((blended[:, :, :2] - theirs(x[:, :, 0:3])[:, :, :2]).abs().max()),
        float((blended[:, :, 3:] - theirs(x[:, :, 2:5])[:, :, 1:]).abs().max()),
    )
    print(f"windowed prediction vs diffusers' transformer per window: worst diff {worst:.2e}")
    assert worst <= 1e-3
    with torch.no_grad():
        apart = windowed_forward(ContextWindows(2, 0, "static_standard"), 0, x[:, :, :4], ours)
        alone = torch.cat([ours(x[:, :, 0:2]), ours(x[:, :, 2:4])], dim=2)
    assert torch.equal(apart, alone)


def test_windowed_step_calls_the_dit_per_window_with_window_sized_inputs(wan_pipe, dit_rows, monkeypatch):
    frames: list[int] = []
    runner = wan_pipe.executor.runner
    forward = runner.forward

    def spy(dit, latents, *args, **kwargs):
        frames.append(latents.shape[2])
        return forward(dit, latents, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", spy)
    wan_pipe.generate(
        **{**SMALL, "num_inference_steps": 2}, num_frames=17, context_frames=9, context_overlap=4
    )
    # 5 latent frames in windows of 3 overlapping by 1: static windows [0-2] [2-4]; at step 1 the uniform
    # schedule moves them (the reference's offset), still 3 frames each
    assert frames and set(frames) == {3}
    assert len(frames) == sum(len(SCHEDULES["uniform_standard"](i, 5, 3, 1)) for i in range(2))


# -- whole-video window == plain run -------------------------------------------------------------------------
def test_a_window_covering_the_video_is_a_plain_run(wan_pipe) -> None:
    plain = wan_pipe.generate(**SMALL, num_frames=17).frames
    whole = wan_pipe.generate(**SMALL, num_frames=17, context_frames=17, context_overlap=8).frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(whole))
    windowed = wan_pipe.generate(**SMALL, num_frames=17, context_frames=9, context_overlap=4).frames
    assert windowed.shape == plain.shape and np.isfinite(windowed).all()
    assert float(np.abs(windowed - plain).max()) > 1e-3  # the windows do change the video
    for schedule in ("uniform_looped", "static_standard"):
        for blend in ("linear", "pyramid"):
            other = wan_pipe.generate(
                **SMALL, num_frames=17, context_frames=9, context_schedule=schedule, context_blend=blend
            ).frames
            assert other.shape == plain.shape and np.isfinite(other).all()


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2v") / "ckpt"
    tiny_family.i2v_14b(folder)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")


def test_image_to_video_windows(i2v) -> None:
    """I2V: the mask + image latents are sliced with the latents; a covering window is a plain run."""
    image = tiny_family.picture(32, 32, 3)
    kw = {**SMALL, "num_frames": 13, "image": image}
    plain = i2v.generate(**kw).frames
    whole = i2v.generate(**kw, context_frames=13, context_overlap=4).frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(whole))
    windowed = i2v.generate(**kw, context_frames=9, context_overlap=4).frames
    assert windowed.shape == plain.shape and np.isfinite(windowed).all()
    assert float(np.abs(windowed - plain).max()) > 1e-3


# -- the request -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "param", "text"),
    [
        ({"context_frames": 21}, "context_frames", "longer than the video"),
        ({"context_frames": 8}, "context_frames", "4k+1"),
        ({"context_frames": 9, "context_overlap": 0}, "context_overlap", "positive multiple of 4"),
        ({"context_frames": 9, "context_overlap": 6}, "context_overlap", "multiple of 4"),
        ({"context_frames": 9, "context_overlap": 12}, "context_overlap", "smaller than the window"),
        ({"context_frames": 9, "context_schedule": "random"}, "context_schedule", "uniform_looped"),
        ({"context_frames": 9, "context_blend": "cosine"}, "context_blend", "pyramid"),
        ({"context_overlap": 4}, "context_overlap", "needs context_frames"),
        ({"context_schedule": "uniform_looped"}, "context_schedule", "needs context_frames"),
        ({"context_frames": 9, "cache": "teacache"}, "cache", "do not combine"),
        ({"context_frames": 9, "context_overlap": "4"}, "context_overlap", "integer"),
    ],
)
def test_bad_window_fields_name_the_field(wan_pipe, fields, param, text) -> None:
    with pytest.raises(InvalidRequestError) as info:
        wan_pipe.check(WanRequest(prompt="a", height=32, width=32, num_frames=17, **fields))
    assert info.value.param == param and text in str(info.value), str(info.value)


def test_defaults_other_modes_and_the_batch_key(wan_pipe) -> None:
    resolved = wan_pipe.check(WanRequest(prompt="a", height=32, width=32, num_frames=33, context_frames=17))
    assert (resolved.context_overlap, resolved.context_schedule, resolved.context_blend) == (
        8,
        "uniform_standard",
        "linear",
    )
    assert wan_pipe.check(resolved) == resolved  # resolving again changes nothing
    request = WanRequest(prompt="a", height=32, width=32, num_frames=33, seed=1)
    plain, windowed = (
        wan_pipe.tokenizer.make_context(r) for r in (request, replace(request, context_frames=17))
    )
    assert plain.batch_key != windowed.batch_key
    assert windowed.approximations.context_windows == ContextWindows(5, 2, "uniform_standard", "linear")
    keys = {
        wan_pipe.tokenizer.batch_key(wan_pipe.check(replace(request, context_frames=f)))
        for f in (None, 17, 33)
    }
    assert len(keys) == 3
    for arch in (replace(wan_pipe.arch, expand_timesteps=True),):
        with pytest.raises(InvalidRequestError, match="not TI2V") as info:
            resolve_windows(WanRequest(prompt="a", context_frames=9), arch, 17)
        assert info.value.param == "context_frames"


# -- CLI and server -------------------------------------------------------------------------------------------
def test_cli_writes_a_windowed_video(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "long.mp4"
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--height", "32", "--width", "32"]
    argv += ["--num-frames", "21", "--steps", "2", "--seed", "1", "--no-progress", "--output", str(out)]
    argv += ["--context-frames", "9", "--context-overlap", "4", "--context-schedule", "uniform_looped"]
    assert main(argv) == 0
    from wanpipe.media import read_video

    frames, _ = read_video(out)
    assert frames.shape == (21, 32, 32, 3)


@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.store import JobStore

    limits = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=21, max_steps=20)
    store = JobStore(tmp_path_factory.mktemp("serve-windows") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert manager.wait_ready(60)
        yield c


def test_server_takes_the_window_fields(http, tmp_path: Path) -> None:
    body = {"prompt": "a cat", "size": "32x32", "num_frames": 21, "num_inference_steps": 2, "seed": 2}
    windows = {"context_frames": 9, "context_overlap": 4, "context_schedule": "static_standard"}
    response = http.post("/v1/videos", json={**body, **windows})
    assert response.status_code == 200, response.text
    video_id = response.json()["id"]

    def done():
        job = http.get(f"/v1/videos/{video_id}").json()
        return job if job["status"] in ("completed", "failed") else None

    assert wait_until(done, 120, "the windowed job")["status"] == "completed"
    frames, _ = read_mp4(http.get(f"/v1/videos/{video_id}/content").content, tmp_path)
    assert frames.shape[0] == 21
    form = {k: str(v) for k, v in {**body, **windows, "context_blend": "pyramid"}.items()}
    assert http.post("/v1/videos", data=form).status_code == 200
    assert_error(
        http.post("/v1/videos", json={**body, "context_frames": 9, "context_overlap": 12}),
        400,
        "context_overlap",
    )
    assert_error(http.post("/v1/videos", json={**body, "context_frames": 25}), 400, "context_frames")
    assert_error(
        http.post("/v1/videos", json={**body, "num_frames": 25, "context_frames": 9}), 400, "num_frames"
    )
    assert_error(http.post("/v1/videos", json={**body, "context_schedule": 3}), 400, "context_schedule")
