"""The job store and the request parsing of wanpipe serve, without a model; and ``serve``'s command line."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serving_helpers import png_bytes
from wanpipe.serving.errors import APIError
from wanpipe.serving.parsing import JobSpec, parse_responses_create, parse_video_create, unflatten_form_keys
from wanpipe.serving.scalars import frames_for_seconds
from wanpipe.serving.store import Job, JobStatus, JobStore, StoreLockedError, new_job_id


def make_job(key: str = "k1", model: str = "m", **spec) -> Job:
    return Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        model=model,
        spec=JobSpec(prompt="p", **spec),
        batch_key=key,
        source="videos",
        created_at=time.time(),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """The default SQLite store, and the PostgreSQL one on a fresh database (same semantics)."""
    if request.param == "sqlite":
        s = JobStore(tmp_path / "out")
    else:
        from wanpipe.serving.store_pg import PgJobStore

        s = PgJobStore(request.getfixturevalue("postgres_url"), tmp_path / "out")
    yield s
    s.close()


def test_add_list_and_paginate(store: JobStore) -> None:
    ids = [store.add(make_job()).id for _ in range(5)]
    page, more = store.list(limit=2)
    assert [j.id for j in page] == ids[:2:-1][:2] == [ids[4], ids[3]] and more
    page, more = store.list(limit=2, after=ids[3])
    assert [j.id for j in page] == [ids[2], ids[1]] and more
    page, more = store.list(limit=2, after=ids[1])
    assert [j.id for j in page] == [ids[0]] and not more
    page, _ = store.list(limit=10, order="asc")
    assert [j.id for j in page] == ids
    with pytest.raises(KeyError):
        store.list(after="video_unknown")
    assert store.counts()[JobStatus.QUEUED] == 5


def test_claim_batches_jobs_of_one_key_in_order(store: JobStore) -> None:
    a1, b1, a2, a3, a4 = (store.add(make_job(k)) for k in ("a", "b", "a", "a", "a"))
    batch = store.claim_batch(3, time.time())
    assert [j.id for j in batch] == [a1.id, a2.id, a3.id]
    assert all(j.status == JobStatus.IN_PROGRESS for j in batch)
    assert [j.id for j in store.claim_batch(3, time.time())] == [b1.id]  # now the oldest queued
    assert [j.id for j in store.claim_batch(3, time.time())] == [a4.id]
    assert store.claim_batch(3, time.time()) == []
    assert store.requeue([a1.id, b1.id]) == 2
    assert store.get(a1.id).status == JobStatus.QUEUED
    assert store.complete(a2.id, batch_size=3, now=time.time())
    assert not store.complete(a2.id, batch_size=3, now=time.time())  # not running any more
    assert store.fail(a3.id, "out_of_memory", "too big", now=time.time())
    failed = store.get(a3.id)
    assert failed.status == JobStatus.FAILED and failed.error == {
        "code": "out_of_memory",
        "message": "too big",
    }
    assert store.delete(a4.id).id == a4.id and store.get(a4.id) is None and store.delete(a4.id) is None


def test_recover_after_a_crash(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    store = JobStore(folder)
    done = store.add(make_job(), {"image": np.zeros((4, 4, 3), np.uint8)})
    store.claim_batch(1, time.time())
    store.complete(done.id, batch_size=1, now=time.time())
    store.video_path(done.id).write_bytes(b"mp4")
    running = store.add(make_job("r"))
    store.claim_batch(1, time.time())
    queued = store.add(make_job("q"))
    other = store.add(make_job("q", model="another"))
    crashy = store.add(make_job("c"))
    with store._transaction() as db:  # it was running during two crashes already, and now a third
        db.execute("UPDATE jobs SET attempts = 2, status = 'in_progress' WHERE id = ?", (crashy.id,))
    store.close()

    # files of a deleted job, and a temporary left by an interrupted write
    (folder / "videos" / "video_gone.mp4").write_bytes(b"x")
    (folder / "videos" / f".{done.id}.mp4.1234.tmp").write_bytes(b"x")

    store = JobStore(folder)
    report = store.recover("m")
    assert store.get(done.id).status == JobStatus.COMPLETED
    assert store.video_path(done.id).exists() and store.input_path(done.id, "image").exists()
    assert store.get(running.id).status == JobStatus.QUEUED and store.get(running.id).attempts == 1
    assert store.get(queued.id).status == JobStatus.QUEUED
    assert store.get(other.id).error["code"] == "model_changed"
    assert store.get(crashy.id).status == JobStatus.FAILED
    assert store.get(crashy.id).error["code"] == "server_crashed"
    assert sorted(p.name for p in store.videos_dir.iterdir()) == [f"{done.id}.mp4"]
    assert report["files_removed"] == 2 and report["failed_after_crashes"] == 1
    store.close()


def test_one_server_per_output_dir(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "out")
    with pytest.raises(StoreLockedError, match="another wanpipe serve"):
        JobStore(store.folder)
    store.close()


# -- request parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "fps", "frames"),
    [(4, 16, 65), (8, 16, 129), (5, 16, 81), (1, 4, 5), (0, 16, 1), (1.1, 16, 17)],
)
def test_seconds_to_frames(seconds: float, fps: float, frames: int) -> None:
    assert frames_for_seconds(seconds, fps) == frames
    job = parse_video_create({"prompt": "p", "seconds": str(seconds), "fps": str(fps)}, default_fps=16)
    assert job.spec.num_frames == frames and (frames - 1) % 4 == 0


def test_video_form_fields_parse() -> None:
    body = unflatten_form_keys(
        [
            ("prompt", "a cat"),
            ("size", "832x480"),
            ("seed", "12"),
            ("guidance_scale", "4.5"),
            ("num_inference_steps", "30"),
            (
                "input_reference[image_url]",
                "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode(),
            ),
        ]
    )
    job = parse_video_create(body, default_fps=16)
    s = job.spec
    assert (s.width, s.height, s.seed, s.guidance_scale, s.num_inference_steps) == (832, 480, 12, 4.5, 30)
    assert job.image.shape == (8, 8, 3) and s.has_image and not s.has_last_image
    assert job.api_param("height") == "size" and job.api_param("image") == "input_reference"


def test_responses_input_forms() -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode()
    message = {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "a cat"},
            {"type": "input_image", "image_url": url},
            {"type": "input_image", "image_url": url},
        ],
    }
    job, fmt = parse_responses_create({"input": message, "provider_options": {"video": {"steps": 3}}})
    assert job.spec.prompt == "a cat" and job.spec.has_image and job.spec.has_last_image and fmt == "url"
    assert (
        job.spec.num_inference_steps == 3
        and job.api_param("num_inference_steps") == "provider_options.video.steps"
    )
    with pytest.raises(APIError) as info:
        parse_responses_create({"input": {"role": "assistant", "content": "x"}})
    assert info.value.status == 400 and info.value.param == "input"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seed": "\u0663"}, "seed"),  # digits are ASCII digits (int() would take an Arabic-Indic 3)
        ({"num_frames": "1_7"}, "num_frames"),  # no underscores (int() would take them)
        ({"guidance_scale": "5_0"}, "guidance_scale"),
        ({"guidance_scale": "1e400"}, "guidance_scale"),  # exponents of at most two digits: finite
        ({"guidance_scale": 10**400}, "guidance_scale"),  # too large for a float: 400, not a 500
        ({"guidance_scale": 1e30}, "guidance_scale"),  # in [0, 100]: far above, the frames are NaN
        ({"guidance_scale_2": 101}, "guidance_scale_2"),
        ({"flow_shift": 1e-30}, "flow_shift"),  # in [0.01, 100]: far outside, the frames are NaN
        ({"flow_shift": "1e30"}, "flow_shift"),
        ({"seconds": 1.6e308}, "seconds"),  # seconds x fps overflows: 400, not a 500
        ({"size": "\u0663\u0662x32"}, "size"),
        ({"seed": " " * 60 + "12345"}, "seed"),  # numbers as text have at most 64 characters
    ],
)
def test_video_values_the_parser_refuses(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_video_create({"prompt": "p", **body}, default_fps=16)
    assert info.value.status == 400 and info.value.param == param


def test_video_values_the_parser_takes() -> None:
    body = {"prompt": "p", "seed": " +12\n", "guidance_scale": "-0", "flow_shift": "1e1", "seconds": ".25"}
    spec = parse_video_create({**body, "size": " 32 X 16 ", "fps": "8."}, default_fps=16).spec
    assert (spec.seed, spec.guidance_scale, spec.flow_shift, spec.num_frames) == (12, 0.0, 10.0, 1)
    assert (spec.width, spec.height, spec.fps) == (32, 16, 8.0)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream": 0}, "stream"),  # stream is false, null or absent
        ({"stream": "false"}, "stream"),
        ({"provider_options": ""}, "provider_options"),  # an object or null, not any falsy value
        ({"provider_options": {"video": []}}, "provider_options.video"),
        ({"provider_options": {"video": {"response_format": ""}}}, "provider_options.video.response_format"),
    ],
)
def test_responses_values_the_parser_refuses(body: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_responses_create({"input": "a cat", **body})
    assert info.value.status == 400 and info.value.param == param
    job, fmt = parse_responses_create({"input": "a cat", "stream": False, "provider_options": None})
    assert fmt == "url" and job.spec.prompt == "a cat"


# -- the command line ------------------------------------------------------------------------------------
def test_serve_parser_and_a_model_that_does_not_load(tmp_path: Path, capsys) -> None:
    from wanpipe.serving.cli import main

    (tmp_path / "not-a-checkpoint").mkdir()  # a folder: a missing path is refused before the server starts
    code = main(
        ["--model", str(tmp_path / "not-a-checkpoint"), "--port", "0", "--output-dir", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err


def test_serve_refuses_an_output_dir_in_use(tmp_path: Path, capsys) -> None:
    from wanpipe.serving.cli import main

    held = JobStore(tmp_path / "o")
    try:
        assert main(["--model", "owner/x", "--port", "0", "--output-dir", str(tmp_path / "o")]) == 1
    finally:
        held.close()
    assert "in use by another wanpipe serve" in capsys.readouterr().err


def test_wanpipe_serve_is_a_subcommand() -> None:
    import argparse

    from wanpipe.serving.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="wanpipe")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "owner/m", "--max-queue", "3", "--api-key", "k"])
    assert (args.command, args.model, args.max_queue, args.api_key, args.port) == (
        "serve",
        "owner/m",
        3,
        "k",
        8000,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-batch", "0"])
