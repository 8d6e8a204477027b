"""Bad requests get a clear error that says what is allowed; long prompts are truncated with a warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from wanpipe import InvalidRequestError, WanOutOfMemoryError, WanRequest

OK = dict(height=32, width=32, num_frames=5, num_inference_steps=2)


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        (dict(height=40), "height", "multiple of 16"),
        (dict(width=20), "width", "multiple of 16"),
        (dict(height=0), "height", "at least 1"),
        (dict(width=32.5), "width", "must be an integer"),
        (dict(num_frames=6), "num_frames", r"4k\+1"),
        (dict(num_frames=0), "num_frames", "at least 1"),
        (dict(num_inference_steps=0), "num_inference_steps", "at least 1"),
        (dict(guidance_scale=-1.0), "guidance_scale", ">= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale", "finite number"),
        (dict(flow_shift=0.0), "flow_shift", "> 0"),
        (dict(flow_shift=float("inf")), "flow_shift", "finite number"),
        (dict(seed=-3), "seed", "at least 0"),
        (dict(prompt="   "), "prompt", "non-empty"),
        (dict(prompt=""), "prompt", "non-empty"),
        (dict(output_format="avi"), "output_format", "must be one of"),
        (dict(latents=np.zeros((1, 16, 2, 4, 8), np.float32)), "latents", r"shape \(1, 16, 2, 2, 2\)"),
    ],
)
def test_bad_request_is_refused(wan_pipe, change, param, message) -> None:
    fields = dict(prompt="a cat", **OK)
    if "latents" in change:
        fields.update(height=16, width=16)
    fields.update(change)
    # resolve (the server's submit), check (the CLI's early exit) and make_context refuse it alike
    for validate in (wan_pipe.tokenizer.resolve, wan_pipe.check, wan_pipe.tokenizer.make_context):
        with pytest.raises(InvalidRequestError, match=message) as info:
            validate(WanRequest(**fields))
        assert info.value.param == param


def test_resolve_fills_every_default_once(wan_pipe, monkeypatch) -> None:
    """resolve: defaults filled in and the seed drawn, no tokens and no noise; resolving again changes
    nothing; the context of the resolved request is the context of the request with that seed."""
    from wanpipe import tokenizer as tokenizer_module

    def no(*args, **kwargs):
        raise AssertionError("resolve must not tokenize or draw noise")

    tokenizer = wan_pipe.tokenizer
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer.text_tokenizer, "__call__", no, raising=False)
        patch.setattr(type(tokenizer.text_tokenizer), "__call__", no)
        patch.setattr(tokenizer_module, "draw_noise", no)
        resolved = tokenizer.resolve(WanRequest(prompt="a cat"))
    d = wan_pipe.arch.defaults
    assert (resolved.height, resolved.width, resolved.num_frames) == (d.height, d.width, d.num_frames)
    assert (
        resolved.num_inference_steps == d.num_inference_steps and resolved.guidance_scale == d.guidance_scale
    )
    assert resolved.flow_shift == wan_pipe.arch.scheduler.flow_shift and isinstance(resolved.seed, int)
    assert tokenizer.resolve(resolved) == resolved
    a = tokenizer.make_context(resolved)
    b = tokenizer.make_context(WanRequest(prompt="a cat", seed=resolved.seed))
    assert a.batch_key == b.batch_key and np.array_equal(a.latents, b.latents)
    assert np.array_equal(a.tokens, b.tokens) and a.seed == b.seed
    # requests whose resolved batch keys are equal make contexts that can share a batch
    other = tokenizer.resolve(WanRequest(prompt="a dog", seed=5))
    assert tokenizer.batch_key(other) == tokenizer.batch_key(resolved)
    assert tokenizer.make_context(other).batch_key == a.batch_key
    longer = tokenizer.resolve(WanRequest(prompt="a dog", num_inference_steps=d.num_inference_steps + 1))
    assert tokenizer.batch_key(longer) != tokenizer.batch_key(resolved)


def test_long_prompt_is_truncated_with_a_warning(wan_pipe, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        ctx = wan_pipe.tokenizer.make_context(WanRequest(prompt="a cat walks " * 400, **OK))
    assert "truncated" in caplog.text
    assert ctx.mask.all()  # all 512 positions used
    assert ctx.tokens[-1] == wan_pipe.tokenizer.text_tokenizer.eos_id


def test_out_of_memory_names_the_options(wan_pipe, monkeypatch) -> None:
    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(wan_pipe.executor, "execute", boom)
    with pytest.raises(WanOutOfMemoryError, match=r"--height/--width.*--num-frames.*bfloat16"):
        wan_pipe.generate("a cat", **OK, progress=False)
