"""The speed and memory paths (wanpipe.runtime) give the plain path's frames on a tiny checkpoint;
the step caches skip when the threshold allows and never at 0; guidance truncation."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from wanpipe import WanPipeline, WanRequest
from wanpipe.runtime import RuntimeOptions, add_runtime_arguments, apply_runtime_options, options_from_args
from wanpipe.runtime.offload import BlockStreamer
from wanpipe.runtime.step_cache import FirstBlockCache, TeaCache

REQUEST = dict(
    prompt="a dog runs in the park",
    negative_prompt="worst quality",
    height=32,
    width=32,
    num_frames=9,
    num_inference_steps=6,
    guidance_scale=5.0,
    seed=3,
)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> WanPipeline:
    """A pipeline of its own: the tests change its runtime options."""
    return WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


def run(pipe: WanPipeline, options: RuntimeOptions | None = None, **kw):
    apply_runtime_options(pipe, options or RuntimeOptions(trim_host_memory=False))
    try:
        video = pipe.generate_batch([WanRequest(**{**REQUEST, **kw})], progress=False)[0]
    finally:
        apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False))
    return video.frames, video.timings


@pytest.fixture(scope="module")
def plain(pipe: WanPipeline) -> np.ndarray:
    return run(pipe)[0]


def test_exact_options_give_the_same_frames(pipe, plain) -> None:
    for options in (
        RuntimeOptions(trim_host_memory=True),
        RuntimeOptions(offload="model"),
        RuntimeOptions(text_encoder_device="cpu"),
        RuntimeOptions(cfg_truncation=1.0),
    ):
        frames, timings = run(pipe, options)
        np.testing.assert_array_equal(frames, plain, err_msg=str(options))
        assert timings["skipped_steps"] == 0
    # Bigger VAE chunks: the same operations, oneDNN may sum in another order (float rounding only).
    frames, _ = run(pipe, RuntimeOptions(vae_chunk_frames=3))
    np.testing.assert_allclose(frames, plain, atol=1e-6)


def test_block_offload_streams_blocks_and_gives_the_same_frames(pipe, plain) -> None:
    apply_runtime_options(pipe, RuntimeOptions(offload="block", offload_buffers=1))
    streamer = pipe.executor.runner.streamer
    assert isinstance(streamer, BlockStreamer) and len(streamer.buffers) == 0
    frames = pipe.generate_batch([WanRequest(**REQUEST)], progress=False)[0].frames
    num_blocks = len(pipe.executor.transformer.blocks)
    # every block of every step was copied into the one buffer
    assert streamer.copies == num_blocks * REQUEST["num_inference_steps"]
    assert len(streamer.buffers) == 1
    apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False))
    np.testing.assert_array_equal(frames, plain)


@pytest.mark.parametrize("kind", ["first-block", "teacache"])
def test_cache_never_skips_at_zero(pipe, plain, kind) -> None:
    frames, timings = run(pipe, RuntimeOptions(cache=kind, residual_threshold=0.0))
    assert timings["skipped_steps"] == 0
    np.testing.assert_array_equal(frames, plain)


@pytest.mark.parametrize("kind", ["first-block", "teacache"])
def test_cache_skips_when_the_threshold_allows(pipe, plain, kind) -> None:
    frames, timings = run(pipe, RuntimeOptions(cache=kind, residual_threshold=1e6))
    steps = REQUEST["num_inference_steps"]
    stats = pipe.executor.last_cache_stats
    if kind == "first-block":  # every step after the first reuses the cached residual
        assert timings["skipped_steps"] == steps - 1
        assert stats.skipped == {"cond": steps - 1, "uncond": steps - 1}
    else:  # the first and the last step always run
        assert timings["skipped_steps"] == steps - 2
    assert frames.shape == plain.shape and np.isfinite(frames).all()
    assert np.abs(frames - plain).max() > 0


def test_request_threshold_turns_on_first_block_cache(pipe, plain) -> None:
    frames, timings = run(pipe, residual_threshold=1e6)
    assert timings["skipped_steps"] == REQUEST["num_inference_steps"] - 1
    frames0, timings0 = run(pipe, residual_threshold=0.0)
    assert timings0["skipped_steps"] == 0
    np.testing.assert_array_equal(frames0, plain)


def test_first_block_cache_decides_per_stream() -> None:
    cache = FirstBlockCache(0.1)
    r = torch.ones(1, 4, 8)
    assert not cache.can_skip("cond", r)  # nothing cached yet
    cache.store("cond", r, torch.zeros(1, 4, 8))
    cache.store("uncond", r, torch.zeros(1, 4, 8))
    assert cache.can_skip("cond", r * 1.05)
    assert not cache.can_skip("uncond", r * 1.5)
    cache.bind(object())  # another expert: the residuals are dropped
    assert not cache.can_skip("cond", r)


def test_teacache_accumulates_the_rescaled_change() -> None:
    cache = TeaCache(0.25, coefficients=(1.0, 0.0))  # rescaled = relative change
    cache.residuals["cond"] = torch.zeros(1)
    e = torch.ones(4)
    assert cache.should_compute(e, 0, 10)  # first step
    assert not cache.should_compute(e * 1.1, 1, 10)  # 0.1
    assert not cache.should_compute(e * 1.21, 2, 10)  # 0.2
    assert cache.should_compute(e * 1.331, 3, 10)  # 0.3 >= 0.25: compute, reset
    assert cache.should_compute(e * 1.331, 9, 10)  # the last step


def test_cfg_truncation(pipe, plain) -> None:
    steps = REQUEST["num_inference_steps"]
    frames, timings = run(pipe, cfg_truncation=0.5)
    assert timings["guided_steps"] == steps // 2
    assert np.abs(frames - plain).max() > 0
    # no guided step at all: the frames of a run without guidance
    none, timings = run(pipe, cfg_truncation=0.0)
    unguided, _ = run(pipe, guidance_scale=1.0)
    assert timings["guided_steps"] == 0
    np.testing.assert_allclose(none, unguided, atol=1e-6)


def test_compiled_blocks_give_the_same_frames(pipe, plain) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    frames, timings = run(pipe, RuntimeOptions(compile=True))
    assert timings["compile_s"] > 0
    assert np.abs(frames - plain).max() < 1e-4


def test_cli_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    args = parser.parse_args(
        ["--compile", "--offload", "block", "--cache", "teacache", "--cfg-truncation", "0.8"]
    )
    options = options_from_args(args)
    assert options.compile and options.offload == "block" and options.cache == "teacache"
    assert options.residual_threshold > 0 and options.cfg_truncation == 0.8
    assert options_from_args(parser.parse_args([])) == RuntimeOptions()
    with pytest.raises(ValueError):
        RuntimeOptions(offload="disk")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_block_offload_on_cuda(tiny_ckpt: Path) -> None:
    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="float32")
    ref = pipe.generate_batch([WanRequest(**REQUEST)], progress=False)[0].frames
    apply_runtime_options(pipe, RuntimeOptions(offload="block"))
    out = pipe.generate_batch([WanRequest(**REQUEST)], progress=False)[0].frames
    assert np.abs(out - ref).max() < 1e-5
    assert all(p.device.type == "cpu" for p in pipe.executor.transformer.blocks.parameters())


def test_attention_backend_is_reported_and_can_be_forced(pipe, plain) -> None:
    from wanpipe.runtime.attention import ATTENTION_BACKENDS

    frames, timings = run(pipe)
    names = [part.split(": ")[1] for part in timings["attention"].split(", ")]
    assert timings["attention"].startswith("self: ") and len(names) == 2
    assert all(n in ATTENTION_BACKENDS for n in names)
    frames, timings = run(pipe, RuntimeOptions(trim_host_memory=False, attention_backend="math"))
    assert timings["attention"] == "self: math, cross: math"
    assert np.abs(frames - plain).max() < 1e-5  # every kernel computes the same attention


def test_attention_backend_that_cannot_run_is_refused(pipe) -> None:
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        RuntimeOptions(attention_backend="fastest")
    # cuDNN attention does not run on the CPU: refused before the loop, with the reason
    with pytest.raises(ValueError, match="'cudnn' cannot run"):
        run(pipe, RuntimeOptions(trim_host_memory=False, attention_backend="cudnn"))
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    assert options_from_args(parser.parse_args(["--attention-backend", "math"])).attention_backend == "math"
