"""Prompt travel (per-window prompts) on context windows: docs/long-video.md, wanpipe.prompt_travel."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.serving_helpers import ThreadServer, assert_error, read_mp4, wait_until
from wanpipe import WanRequest
from wanpipe.cli import build_parser, main
from wanpipe.context import InvalidRequestError, PromptTravel
from wanpipe.media import read_video
from wanpipe.prompt_travel import frame_prompts, resolve_prompts
from wanpipe.stages.windows import SCHEDULES

SMALL = dict(prompt="a cat walks", height=32, width=32, num_inference_steps=3, seed=7, progress=False)
# 17 frames = 5 latent frames; windows of 9 frames (3 latent) overlapping by 4 (1 latent)
WINDOWS = dict(num_frames=17, context_frames=9, context_overlap=4)


# -- which prompt a window takes ----------------------------------------------------------------------------
def test_frame_prompts_and_the_middle_frame() -> None:
    ranges = [(0, 7, "a"), (8, 12, "b"), (13, 20, "a")]
    # latent frame k holds video frames 4k-3 .. 4k: it takes the range of video frame 4k
    assert frame_prompts(ranges, 6, 4) == (0, 0, 1, 1, 0, 0)  # frames 0 4 8 12 16 20; "a" repeated is one
    travel = PromptTravel(("a", "b"), np.zeros((2, 4)), np.zeros((2, 4)), (0, 0, 1, 1, 0, 0))
    assert travel.prompt_of([0, 1, 2]) == 0  # middle frame 1
    assert travel.prompt_of([1, 2, 3]) == 1  # middle frame 2
    assert travel.prompt_of([4, 5, 0, 1]) == 0  # a looped window: its middle in time order (frame 0)
    assert travel.prompt_of([2, 3, 4, 5]) == 0  # even length: the later of the two middle frames (4)


def test_text_context_per_window_and_select() -> None:
    """A batch of 2 rows with guidance: each prompt's rows, picked per window; a cancelled row dropped
    from every prompt's text."""
    from wanpipe.stages.text import TextContext

    parts = tuple(
        TextContext(torch.full((4, 3, 2), float(k)) + torch.arange(4.0).view(4, 1, 1), None, 2)
        for k in range(2)
    )
    travel = PromptTravel(("a", "b"), np.zeros((2, 3)), np.zeros((2, 3)), (0, 0, 1, 1, 1))
    text = replace(parts[0], travel=parts, prompts=travel)
    pick = text.per_window(guided=True)
    assert pick is not None and parts[0].per_window(True) is None
    assert torch.equal(pick([0, 1, 2])["context"], parts[0].embeds)
    assert torch.equal(pick([2, 3, 4])["context"], parts[1].embeds)
    assert torch.equal(text.per_window(guided=False)([2, 3, 4])["context"], parts[1].embeds[:2])
    kept = text.select([1]).per_window(guided=True)
    assert torch.equal(kept([2, 3, 4])["context"], parts[1].embeds[[1, 3]])  # row 1 and its unconditional row


# -- one range covering the video == no prompts --------------------------------------------------------------
def test_one_range_over_the_video_is_the_run_without_prompts(wan_pipe) -> None:
    plain = wan_pipe.generate(**SMALL, **WINDOWS).frames
    one = wan_pipe.generate(**SMALL, **WINDOWS, prompts=[(0, 16, SMALL["prompt"])]).frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(one))
    same = [(0, 5, SMALL["prompt"]), (6, 16, SMALL["prompt"])]  # two ranges, one prompt: the same again
    assert torch.equal(
        torch.from_numpy(plain), torch.from_numpy(wan_pipe.generate(**SMALL, **WINDOWS, prompts=same).frames)
    )
    other = wan_pipe.generate(
        **SMALL, **WINDOWS, prompts=[(0, 7, SMALL["prompt"]), (8, 16, "a red car")]
    ).frames
    assert float(np.abs(other - plain).max()) > 1e-3  # the second prompt does change the video


# -- each window's DiT call gets its range's prompt ---------------------------------------------------------
def test_each_window_gets_the_embeddings_of_its_ranges_prompt(wan_pipe, monkeypatch) -> None:
    prompts = ["a cat walks", "a red car drives on a long road"]
    executor, runner = wan_pipe.executor, wan_pipe.executor.runner
    calls: list[tuple[int, torch.Tensor]] = []
    forward = runner.forward

    def spy(dit, latents, *args, **kwargs):
        calls.append((latents.shape[2], kwargs["context"]))
        return forward(dit, latents, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", spy)
    # static windows [0 1 2] [2 3 4]: middles 1 (video frame 4, range 0-7) and 3 (video frame 12, 8-16)
    wan_pipe.generate(
        **{**SMALL, "guidance_scale": 5.0},
        **WINDOWS,
        context_schedule="static_standard",
        prompts=[(0, 7, prompts[0]), (8, 16, prompts[1])],
    )
    monkeypatch.undo()
    assert len(calls) == 2 * SMALL["num_inference_steps"] and {f for f, _ in calls} == {3}
    assert SCHEDULES["static_standard"](0, 5, 3, 1) == [[0, 1, 2], [2, 3, 4]]
    tokens = wan_pipe.tokenizer.text_tokenizer(prompts + [wan_pipe.arch.defaults.negative_prompt])
    with torch.no_grad():
        alone = executor.text.encode(torch.as_tensor(tokens.ids), torch.as_tensor(tokens.mask))
    lengths = [int(n) for n in torch.as_tensor(tokens.mask).sum(1)]
    for n, (_, context) in enumerate(calls):
        k = n % 2  # window 0 then window 1 at every step
        assert context.shape[0] == 2  # the conditional row, then the unconditional one
        assert torch.equal(context[0, : lengths[k]], alone[k, : lengths[k]]), (n, k)
        assert not torch.equal(context[0, : lengths[1 - k]], alone[1 - k, : lengths[1 - k]])
        assert torch.equal(context[1, : lengths[2]], alone[2, : lengths[2]])  # one negative prompt for all


def test_each_distinct_prompt_is_encoded_once(wan_pipe, monkeypatch) -> None:
    stage = wan_pipe.executor.text
    stage.cache._rows.clear()
    encoded: list[int] = []
    run = stage._run_encoder

    def counted(tokens, mask):
        encoded.append(tokens.shape[0])
        return run(tokens, mask)

    monkeypatch.setattr(stage, "_run_encoder", counted)
    ranges = [(0, 4, "one"), (5, 8, "two"), (9, 12, "one"), (13, 16, "three")]
    wan_pipe.generate(**{**SMALL, "guidance_scale": 5.0}, **WINDOWS, prompts=ranges)
    assert encoded == [4]  # "one", "two", "three" and the negative prompt, in one encoder call


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, text",
    [
        ({"prompts": [(0, 16, "a")]}, "need context windows"),
        ({**WINDOWS, "prompts": []}, "non-empty list"),
        ({**WINDOWS, "prompts": "0-16:a"}, "non-empty list"),
        ({**WINDOWS, "prompts": [(0, 16)]}, "(start, end, prompt)"),
        ({**WINDOWS, "prompts": [(0, 8, "a"), (8, 16, "b")]}, "overlaps"),
        ({**WINDOWS, "prompts": [(0, 7, "a"), (9, 16, "b")]}, "gap"),
        ({**WINDOWS, "prompts": [(1, 16, "a")]}, "gap"),
        ({**WINDOWS, "prompts": [(0, 7, "a"), (8, 20, "b")]}, "past the video's last frame 16"),
        ({**WINDOWS, "prompts": [(0, 7, "a"), (8, 12, "b")]}, "must cover the video"),
        ({**WINDOWS, "prompts": [(0, 7, "a"), (8, 16, " ")]}, "non-empty"),
        ({**WINDOWS, "prompts": [(0, 7, "a"), (8, 16, 3)]}, "non-empty"),
        ({**WINDOWS, "prompts": [(0, 7.0, "a"), (8, 16, "b")]}, "integers"),
        ({**WINDOWS, "prompts": [(5, 2, "a")]}, "ends before it starts"),
    ],
)
def test_bad_prompts_name_the_field(wan_pipe, fields, text) -> None:
    with pytest.raises(InvalidRequestError) as info:
        wan_pipe.check(WanRequest(**{"prompt": "a", "height": 32, "width": 32, "num_frames": 17, **fields}))
    assert info.value.param == "prompts" and text in str(info.value), str(info.value)


def test_resolved_prompts_and_the_batch_key(wan_pipe) -> None:
    request = WanRequest(
        prompt="a", height=32, width=32, seed=1, **WINDOWS, prompts=[[0, 7, "a"], [8, 16, "b"]]
    )
    resolved = wan_pipe.check(request)
    assert resolved.prompts == ((0, 7, "a"), (8, 16, "b"))
    assert wan_pipe.check(resolved) == resolved  # resolving again changes nothing
    assert resolve_prompts(replace(resolved, prompts=None), 17) == {"prompts": None}
    other = replace(request, prompts=[[0, 7, "a"], [8, 16, "c"]])
    plain = replace(request, prompts=None)
    keys = {wan_pipe.tokenizer.batch_key(wan_pipe.check(r)) for r in (request, other, plain)}
    assert len(keys) == 3
    contexts = [wan_pipe.tokenizer.make_context(r) for r in (request, other, plain)]
    assert len({c.batch_key for c in contexts}) == 3
    travel = contexts[0].prompt_travel
    assert travel is not None and travel.prompts == ("a", "b") and travel.frame_prompt == (0, 0, 1, 1, 1)
    assert contexts[2].prompt_travel is None


# -- CLI ---------------------------------------------------------------------------------------------------------
def test_prompt_at_parses() -> None:
    args = build_parser().parse_args(
        ["generate", "--prompt", "a", "--prompt-at", "0-8:a cat: sleeping", "--prompt-at", " 9 - 16 :a dog "]
    )
    assert args.prompt_at == [(0, 8, "a cat: sleeping"), (9, 16, "a dog")]
    assert build_parser().parse_args(["generate", "--prompt", "a"]).prompt_at is None


@pytest.mark.parametrize(
    "value, text",
    [
        ("0-8", "START-END:TEXT"),
        ("a-8:x", "START-END:TEXT"),
        ("8-2:x", "ends before it starts"),
        ("0-8: ", "empty"),
    ],
)
def test_bad_prompt_at_is_one_line_naming_the_flag(value, text, capsys) -> None:
    assert main(["generate", "--prompt", "a", "--prompt-at", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompt-at" in err and text in err, err


def test_cli_writes_a_prompt_travel_video_and_names_the_flag(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "travel.mp4"
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--height", "32", "--width", "32"]
    argv += ["--num-frames", "17", "--steps", "2", "--seed", "1", "--no-progress", "--output", str(out)]
    argv += ["--context-frames", "9", "--context-overlap", "4"]
    assert main([*argv, "--prompt-at", "0-7:a cat", "--prompt-at", "8-16:a dog"]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (17, 32, 32, 3)
    capsys.readouterr()
    bad = tmp_path / "bad.mp4"
    argv[argv.index(str(out))] = str(bad)
    assert main([*argv, "--prompt-at", "0-7:a cat", "--prompt-at", "9-16:a dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].count("--prompt-at") and "gap" in err and not bad.exists(), err
    no_windows = [a for a in argv if a not in ("--context-frames", "9", "--context-overlap", "4")]
    assert main([*no_windows, "--prompt-at", "0-16:a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prompt-at" in err and "--context-frames" in err, err


# -- server ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.store import JobStore

    limits = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=21, max_steps=20)
    store = JobStore(tmp_path_factory.mktemp("serve-travel") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert manager.wait_ready(60)
        yield c


def test_server_takes_prompts_and_refuses_bad_ones(http, tmp_path: Path) -> None:
    body = {"prompt": "a cat", "size": "32x32", "num_frames": 17, "num_inference_steps": 2, "seed": 2}
    body |= {"context_frames": 9, "context_overlap": 4}
    ranges = [{"start": 0, "end": 7, "prompt": "a cat"}, {"start": 8, "end": 16, "prompt": "a dog"}]
    response = http.post("/v1/videos", json={**body, "prompts": ranges})
    assert response.status_code == 200, response.text
    video_id = response.json()["id"]

    def done():
        job = http.get(f"/v1/videos/{video_id}").json()
        return job if job["status"] in ("completed", "failed") else None

    assert wait_until(done, 120, "the prompt travel job")["status"] == "completed"
    frames, _ = read_mp4(http.get(f"/v1/videos/{video_id}/content").content, tmp_path)
    assert frames.shape[0] == 17
    form = {k: str(v) for k, v in body.items()} | {"prompts": json.dumps(ranges)}
    assert http.post("/v1/videos", data=form).status_code == 200
    gap = [ranges[0], {**ranges[1], "start": 9}]
    overlap = [ranges[0], {**ranges[1], "start": 7}]
    past = [ranges[0], {**ranges[1], "end": 20}]
    for bad in (
        gap,
        overlap,
        past,
        [],
        "[",
        [{"start": 0, "end": 16}],
        [{**ranges[0], "end": 16, "prompt": ""}],
    ):
        assert_error(http.post("/v1/videos", json={**body, "prompts": bad}), 400, "prompts")
    plain = {k: v for k, v in body.items() if not k.startswith("context_")}
    assert_error(
        http.post("/v1/videos", json={**plain, "prompts": [{**ranges[0], "end": 16}]}), 400, "prompts"
    )
    schema = http.get("/openapi.json").json()
    assert "prompts" in json.dumps(schema)
