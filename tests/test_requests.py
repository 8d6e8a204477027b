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
    with pytest.raises(InvalidRequestError, match=message) as info:
        wan_pipe.tokenizer.make_context(WanRequest(**fields))
    assert info.value.param == param


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
