"""LoRA per request (``wanpipe serve --lora-dir``): a served sequence of jobs with different LoRA sets
gives the frames of a pipeline loaded with those adapters, jobs with the same set run in one batch, the
base weights come back bit for bit, bad sets are refused with ``param`` loras, ``GET /v1/loras`` lists
the folder's files, and a job queued with a set runs with it after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests import tiny_formats
from tests.serving_helpers import ThreadServer, assert_error, record_served_frames, wait_until
from wanpipe import WanPipeline
from wanpipe.serving.app import create_app
from wanpipe.serving.loras import LoraLibrary
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits, parse_video_create
from wanpipe.serving.store import JobStatus, JobStore

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 4.0}
LIMITS = ServeLimits(max_queue=16, max_batch=4, max_pixels=64 * 64, max_frames=9, max_steps=4)
TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_ckpt: Path, tmp_path_factory):
    """(the served pipeline, a reference pipeline, the LoRA folder, the base state dict)."""
    served = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    reference = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    folder = tmp_path_factory.mktemp("loras")
    dit = served.executor.transformer
    tiny_formats.write_lora(tiny_formats.lora_weights(dit, 1), folder / "alpha.safetensors", "peft")
    tiny_formats.write_lora(tiny_formats.lora_weights(dit, 2), folder / "beta.safetensors", "kohya")
    torch.save({"x": torch.zeros(1)}, folder / "not-served.pth")  # only .safetensors files are served
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    return served, reference, folder, base


def expected_frames(reference: WanPipeline, folder: Path, loras: list[tuple[str, float]], seed: int):
    for name, scale in loras:
        reference.load_lora(folder / f"{name}.safetensors", scale)
    try:
        return reference.generate(
            "a cat",
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=4.0,
            seed=seed,
            progress=False,
        ).frames
    finally:
        reference.unload_lora()


def assert_base(pipe: WanPipeline, base: dict[str, torch.Tensor]) -> None:
    state = pipe.executor.transformer.state_dict()
    assert set(state) == set(base)
    for k, v in state.items():
        assert torch.equal(v, base[k]), k


def wait_done(http: httpx.Client, video_id: str) -> dict:
    def done():
        body = http.get(f"/v1/videos/{video_id}").json()
        assert body["status"] != "failed", body
        return body if body["status"] == "completed" else None

    return wait_until(done, 120, f"{video_id} to complete", interval=0.05)


def test_jobs_switch_lora_sets_batch_by_set_and_restore_the_base(setup, tmp_path: Path, monkeypatch) -> None:
    served, reference, folder, base = setup
    store = JobStore(tmp_path / "out")
    manager = JobManager(
        store, lambda: served, model_name="wan-tiny", limits=LIMITS, loras=LoraLibrary(folder, cache_size=1)
    )
    frames = record_served_frames(served, monkeypatch.setattr)
    sets = {
        "none": [],
        "a": [{"name": "alpha", "scale": 0.8}],
        "ab": [{"name": "beta", "scale": 0.5}, {"name": "alpha", "scale": 0.7}],  # sorted by name
    }
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert manager.wait_ready(60)
        listed = http.get("/v1/loras").json()
        assert [c["id"] for c in listed["data"]] == ["alpha", "beta"]
        assert listed["data"][0]["size_bytes"] == (folder / "alpha.safetensors").stat().st_size
        assert listed["data"][0]["layers"] is None  # not read yet
        document = http.get("/openapi.json").json()
        assert "/v1/loras" in document["paths"]
        body = document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        item = body["properties"]["loras"]["anyOf"][1]
        assert item["properties"]["name"]["enum"] == ["alpha", "beta"]

        manager.pause()  # queue all, then run: the same set batches together
        order = [("none", 1), ("a", 2), ("ab", 3), ("a", 4), ("none", 5)]
        ids = []
        for which, seed in order:
            body = {"prompt": "a cat", **SMALL, "seed": seed, "loras": sets[which]}
            response = http.post("/v1/videos", json=body)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        # a form sends the list as JSON text
        form = {k: str(v) for k, v in SMALL.items()} | {"prompt": "a cat", "seed": "6"}
        form["loras"] = json.dumps(sets["a"])
        response = http.post("/v1/videos", files={k: (None, v) for k, v in form.items()})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
        order.append(("a", 6))
        manager.resume()
        done = [wait_done(http, i) for i in ids]
        assert [d["parameters"]["loras"] for d in done[1:3]] == [
            [{"name": "alpha", "scale": 0.8}],
            [{"name": "alpha", "scale": 0.7}, {"name": "beta", "scale": 0.5}],
        ]
        assert [d["batch_size"] for d in done] == [2, 3, 1, 3, 2, 3]
        # after the A+B batch, one more job without LoRA: the base weights again
        last = http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "seed": 7}).json()
        wait_done(http, last["id"])
        order.append(("none", 7))
        ids.append(last["id"])
        cards = {c["id"]: c for c in http.get("/v1/loras").json()["data"]}
        assert cards["alpha"]["layers"] == 2 * len(tiny_formats.LORA_LAYERS)
        assert cards["alpha"]["unmatched_keys"] == 0
    assert_base(served, base)
    pairs = {
        k: [(x["name"], x["scale"]) for x in sorted(v, key=lambda x: x["name"])] for k, v in sets.items()
    }
    base_frames = None
    for job_id, (which, seed) in zip(ids, order):
        want = expected_frames(reference, folder, pairs[which], seed)
        diff = float(np.abs(frames[job_id].astype(np.float64) - want).max())
        print(f"job {which} seed {seed}: max abs diff {diff:.3g}")
        assert diff <= TOL, (which, seed, diff)
        if seed == 1:
            base_frames = want
        if seed == 2:
            assert float(np.abs(want - base_frames).max()) > 1e-2  # the adapter changes the video


def test_bad_sets_are_refused_with_param_loras(setup, tmp_path: Path) -> None:
    served, _, folder, base = setup
    manager = JobManager(
        JobStore(tmp_path / "out"),
        lambda: served,
        model_name="wan-tiny",
        limits=LIMITS,
        loras=LoraLibrary(folder),
    )
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert manager.wait_ready(60)
        for loras in (
            [{"name": "gamma"}],  # not in the folder
            [{"name": "not-served"}],  # a .pth file is not served
            [{"name": "../alpha"}],  # no paths
            [{"name": "alpha", "scale": 11}],
            [{"name": "alpha", "scale": "0.5"}],
            [{"name": "alpha", "scale": True}],
            [{"name": "alpha"}, {"name": "alpha", "scale": 0.5}],
            [{"name": "alpha", "weight": 1}],
            ["alpha"],
            "[{not json",
            [{"name": "alpha"}] * 9,
        ):
            response = http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "loras": loras})
            assert_error(response, 400, param="loras")
        body = {
            "model": "wan-tiny",
            "input": "a cat",
            "provider_options": {"video": {"loras": [{"name": "x"}]}},
        }
        assert_error(http.post("/v1/responses", json=body), 400, param="provider_options.video.loras")
        assert manager.store.count(JobStatus.QUEUED) == 0
    plain = JobManager(JobStore(tmp_path / "plain"), lambda: served, model_name="wan-tiny", limits=LIMITS)
    with ThreadServer(create_app(plain)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert plain.wait_ready(60)
        assert http.get("/v1/loras").json() == {"object": "list", "data": []}
        response = http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "loras": [{"name": "alpha"}]})
        assert_error(response, 400, param="loras")
        assert "--lora-dir" in response.json()["error"]["message"]
    assert_base(served, base)


def test_a_queued_job_keeps_its_set_across_a_restart(setup, tmp_path: Path, monkeypatch) -> None:
    served, reference, folder, base = setup
    out = tmp_path / "out"
    first = JobManager(
        JobStore(out), lambda: served, model_name="wan-tiny", limits=LIMITS, loras=LoraLibrary(folder)
    )
    first.start()
    assert first.wait_ready(60)
    first.pause()
    body = {"prompt": "a cat", **SMALL, "seed": 9, "loras": [{"name": "beta", "scale": 0.9}]}
    job = first.submit(parse_video_create(body, default_fps=16), "test")
    first.stop()
    second = JobManager(
        JobStore(out), lambda: served, model_name="wan-tiny", limits=LIMITS, loras=LoraLibrary(folder)
    )
    frames = record_served_frames(served, monkeypatch.setattr)
    second.start()
    try:
        wait_until(lambda: second.store.get(job.id).status == JobStatus.COMPLETED, 120, "the job to run")
        assert second.store.get(job.id).spec.loras == (("beta", 0.9),)
    finally:
        second.stop()
    want = expected_frames(reference, folder, [("beta", 0.9)], 9)
    diff = float(np.abs(frames[job.id].astype(np.float64) - want).max())
    print(f"restarted job: max abs diff {diff:.3g}")
    assert diff <= TOL
    served.lora_manager.switch("request", [])  # what the next batch without a set would do
    assert_base(served, base)
    # a server restarted without --lora-dir fails such a job, and says why
    third = JobManager(
        JobStore(out), lambda: served, model_name="wan-tiny", limits=LIMITS, loras=LoraLibrary(folder)
    )
    third.start()
    assert third.wait_ready(60)
    third.pause()
    queued = third.submit(parse_video_create(body, default_fps=16), "test")
    third.stop()
    fourth = JobManager(JobStore(out), lambda: served, model_name="wan-tiny", limits=LIMITS)
    fourth.start()
    try:
        wait_until(lambda: fourth.store.get(queued.id).finished, 60, "the job to finish")
        failed = fourth.store.get(queued.id)
        assert failed.status == JobStatus.FAILED and "--lora-dir" in failed.error["message"]
    finally:
        fourth.stop()


def test_wanpipe_serve_lora_dir(setup, tiny_ckpt: Path, tmp_path: Path) -> None:
    """The command line: ``--lora-dir`` serves the folder's adapters; a job with one completes and says so."""
    from tests.serving_helpers import ServerProcess

    _, _, folder, _ = setup
    server = ServerProcess(
        "--model",
        str(tiny_ckpt),
        "--output-dir",
        str(tmp_path / "out"),
        "--lora-dir",
        str(folder),
        env={"OMP_NUM_THREADS": "1"},
    )
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert [c["id"] for c in http.get("/v1/loras").json()["data"]] == ["alpha", "beta"]
            body = {"prompt": "a cat", **SMALL, "seed": 3, "loras": [{"name": "beta", "scale": 0.25}]}
            job = http.post("/v1/videos", json=body).json()
            done = wait_done(http, job["id"])
            assert done["parameters"]["loras"] == [{"name": "beta", "scale": 0.25}]
            bad = http.post("/v1/videos", json={**body, "loras": [{"name": "gamma"}]})
            assert_error(bad, 400, param="loras")
    finally:
        assert server.terminate() in (0, -15)
