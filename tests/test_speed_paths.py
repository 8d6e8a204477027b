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
from wanpipe.runtime.step_cache import (
    TEACACHE_WAN_COEFFICIENTS,
    FirstBlockCache,
    TeaCache,
    teacache_coefficients,
    teacache_variant,
)

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
        assert timings["guided_steps"] == REQUEST["num_inference_steps"]  # cfg_truncation 1.0: every step
    # Bigger VAE chunks: the same operations, oneDNN may sum in another order (float rounding only).
    frames, _ = run(pipe, RuntimeOptions(vae_chunk_frames=3))
    np.testing.assert_allclose(frames, plain, atol=1e-6)


def _placements(pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch, options: RuntimeOptions) -> list[str]:
    """What model offload puts on the device, in order, during one generation: "+name" when a module
    goes to the device, "-name" when it goes back; "step:name" at each DiT forward with the modules on
    the device then. On the CPU the moves change nothing, so the test watches the decisions."""
    events: list[str] = []
    on_device: set[str] = set()
    names = {
        id(pipe.executor.text_encoder): "text_encoder",
        id(pipe.executor.vae): "vae",
        id(pipe.executor.transformer): "dit",
    }
    apply_runtime_options(pipe, options)
    offload = pipe.executor.placement.offload
    assert offload is not None and pipe.executor.experts.offload is offload

    def to(module: torch.nn.Module, device: torch.device | str) -> None:
        name = names.get(id(module), type(module).__name__)
        on = torch.device(device) == offload.device and device is offload.device
        (on_device.add if on else on_device.discard)(name)
        events.append(("+" if on else "-") + name)

    real_to = torch.nn.Module.to

    def spy(module: torch.nn.Module, *args, **kwargs):
        if id(module) in names and args:
            to(module, args[0])
        return real_to(module, *args, **kwargs)

    runner = pipe.executor.runner
    forward = runner.forward

    def step(*args, **kwargs):
        events.append("step:" + ",".join(sorted(on_device)))
        return forward(*args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    monkeypatch.setattr(runner, "forward", step)
    try:
        pipe.generate_batch([WanRequest(**REQUEST)], progress=False)
    finally:
        monkeypatch.undo()
        apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False))
    return events


def test_model_offload_puts_each_module_on_the_device_for_its_stage_only(pipe, monkeypatch) -> None:
    events = _placements(pipe, monkeypatch, RuntimeOptions(offload="model"))
    steps = REQUEST["num_inference_steps"]
    # text encoder for the text stage, the DiT for the loop (only it on the device at each step), the VAE
    # to decode; each back to host memory before the next one comes.
    assert events == ["+text_encoder", "-text_encoder", "+dit", *["step:dit"] * steps, "-dit", "+vae", "-vae"]


def test_text_encoder_device_keeps_the_encoder_out_of_model_offload(pipe, monkeypatch) -> None:
    events = _placements(pipe, monkeypatch, RuntimeOptions(offload="model", text_encoder_device="cpu"))
    assert not any(e.endswith("text_encoder") for e in events)  # it stays where the option put it
    assert events[0] == "+dit" and events[-2:] == ["+vae", "-vae"]


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


# The tiny test DiT has no published TeaCache coefficients: the published 1.3B set, given explicitly.
TINY_TEACACHE = {"teacache_coefficients": TEACACHE_WAN_COEFFICIENTS["t2v-1.3B"]}


def _cache(kind: str, threshold: float) -> RuntimeOptions:
    return RuntimeOptions(
        cache=kind, residual_threshold=threshold, **(TINY_TEACACHE if kind == "teacache" else {})
    )


@pytest.mark.parametrize("kind", ["first-block", "teacache"])
def test_cache_never_skips_at_zero(pipe, plain, kind) -> None:
    frames, timings = run(pipe, _cache(kind, 0.0))
    assert timings["skipped_steps"] == 0
    np.testing.assert_array_equal(frames, plain)


@pytest.mark.parametrize("kind", ["first-block", "teacache"])
def test_cache_skips_when_the_threshold_allows(pipe, plain, kind) -> None:
    frames, timings = run(pipe, _cache(kind, 1e6))
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


def test_teacache_takes_published_coefficients_or_refuses(pipe) -> None:
    from wanpipe.models.transformer_layers import TransformerConfig

    def dit(dim: int, **kw) -> TransformerConfig:
        return TransformerConfig(num_attention_heads=dim // 128, attention_head_dim=128, **kw)

    plain = {"two_experts": False, "per_token_timesteps": False}
    assert teacache_variant(dit(1536), **plain) == "t2v-1.3B"
    assert teacache_variant(dit(5120), **plain) == "t2v-14B"
    i2v = dit(5120, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
    assert teacache_variant(i2v, **plain) == "i2v-14B"
    patch = i2v.patch_size
    # 480P: a 480x832 video's latent frame (60x104); 720P above it (90x160)
    assert teacache_coefficients("i2v-14B", (60, 104), patch) == TEACACHE_WAN_COEFFICIENTS["i2v-14B-480P"]
    assert teacache_coefficients("i2v-14B", (90, 160), patch) == TEACACHE_WAN_COEFFICIENTS["i2v-14B-720P"]
    flf2v = dit(5120, in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514)
    for config, kw, named in (
        (dit(5120), {"two_experts": True, "per_token_timesteps": False}, "Wan 2.2 A14B"),
        (
            dit(3072, in_channels=48, out_channels=48),
            {"two_experts": False, "per_token_timesteps": True},
            "TI2V-5B",
        ),
        (flf2v, plain, "FLF2V"),
        (dit(2048), plain, "width 2048"),
    ):
        with pytest.raises(
            ValueError, match=rf"no published coefficients for .*{named}.*--teacache-coefficients"
        ):
            teacache_variant(config, **kw)
    # The tiny test model is refused when it is configured, not in the middle of a request ...
    before = pipe.executor.runtime
    with pytest.raises(ValueError, match=r"width \d+"):
        apply_runtime_options(pipe, RuntimeOptions(cache="teacache", residual_threshold=0.1))
    assert pipe.executor.runtime is before  # refused before anything changed
    apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False))
    # ... and runs with coefficients of its own.
    frames, timings = run(pipe, _cache("teacache", 1e6))
    assert timings["skipped_steps"] == REQUEST["num_inference_steps"] - 2


def test_cli_arguments_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    args = parser.parse_args(
        ["--compile", "--offload", "block", "--cache", "teacache", "--cfg-truncation", "0.8"]
    )
    options = options_from_args(args)
    assert options.compile and options.offload == "block" and options.cache == "teacache"
    assert options.residual_threshold > 0 and options.cfg_truncation == 0.8
    coefficients = options_from_args(parser.parse_args(["--teacache-coefficients", "2.5,-1e3,0"]))
    assert coefficients.teacache_coefficients == (2.5, -1000.0, 0.0)
    for bad in ("", "1,x", "1,nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--teacache-coefficients", bad])
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
