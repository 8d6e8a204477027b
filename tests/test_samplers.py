"""Samplers and schedules as data: request validation, custom sigmas/timesteps, Euler, LCM and DMD.

Parity against diffusers (Euler with shift, LCM) on tiny random checkpoints and against a test-only
copy of the published DMD step-list loop; see docs/fast-sampling.md.
"""

from __future__ import annotations

import pytest

from wanpipe import InvalidRequestError, WanRequest

OK = dict(prompt="a cat", height=32, width=32, num_frames=5)


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        (dict(sampler="ddim"), "sampler", "must be one of unipc, euler, lcm, dmd"),
        (dict(sigmas=[0.5, 0.9]), "sigmas", "strictly decreasing"),
        (dict(sigmas=[0.9, 0.9]), "sigmas", "strictly decreasing"),
        (dict(sigmas=[1.5, 0.5]), "sigmas", r"in \(0, 1\]"),
        (dict(sigmas=[0.9, 0.0]), "sigmas", r"in \(0, 1\]"),
        (dict(sigmas=[0.9, float("nan")]), "sigmas", "finite number"),
        (dict(sigmas=[]), "sigmas", "non-empty list"),
        (dict(sigmas="0.9,0.5"), "sigmas", "non-empty list"),
        (dict(timesteps=[1001.0, 500.0]), "timesteps", r"in \(0, 1000\]"),
        (dict(timesteps=[250, 500]), "timesteps", "strictly decreasing"),
        (dict(timesteps=[1000, 500], num_inference_steps=3), "timesteps", "one value per step"),
        (dict(sigmas=[0.9, 0.5], num_inference_steps=3), "sigmas", "one value per step"),
        (dict(sigmas=[0.9, 0.5], timesteps=[900, 500]), "timesteps", "either sigmas or timesteps"),
    ],
)
def test_bad_schedule_request_is_refused(wan_pipe, change, param, message) -> None:
    for validate in (wan_pipe.tokenizer.resolve, wan_pipe.check, wan_pipe.tokenizer.make_context):
        with pytest.raises(InvalidRequestError, match=message) as info:
            validate(WanRequest(**{**OK, **change}))
        assert info.value.param == param


def test_resolve_fills_sampler_and_step_count(wan_pipe) -> None:
    """The sampler defaults to the checkpoint's; a list sets the step count; resolving twice is a no-op;
    different samplers or lists never share a batch."""
    tokenizer = wan_pipe.tokenizer
    plain = tokenizer.resolve(WanRequest(**OK, seed=1))
    assert plain.sampler == wan_pipe.arch.scheduler.kind and plain.sigmas is None and plain.timesteps is None
    listed = tokenizer.resolve(WanRequest(**OK, seed=1, timesteps=[1000, 750, 500, 250]))
    assert listed.num_inference_steps == 4 and listed.timesteps == [1000.0, 750.0, 500.0, 250.0]
    assert tokenizer.resolve(listed) == listed
    sig = tokenizer.resolve(WanRequest(**OK, seed=1, sigmas=(0.9, 0.5), num_inference_steps=2))
    assert sig.sigmas == [0.9, 0.5] and sig.num_inference_steps == 2
    keys = {
        tokenizer.batch_key(tokenizer.resolve(WanRequest(**OK, seed=1, num_inference_steps=4, **extra)))
        for extra in (
            {},
            dict(sampler="euler"),
            dict(sampler="lcm"),
            dict(sampler="dmd"),
            dict(sampler="dmd", timesteps=[1000, 750, 500, 250]),
            dict(sampler="dmd", sigmas=[1.0, 0.75, 0.5, 0.25]),
        )
    }
    assert len(keys) == 6
