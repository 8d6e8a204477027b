"""Samplers and schedules as data: request validation, custom sigmas/timesteps, Euler, LCM and DMD.

Parity against diffusers (Euler with shift, LCM) on tiny random checkpoints and against a test-only
copy of the published DMD step-list loop; see docs/fast-sampling.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wanpipe import InvalidRequestError, WanRequest
from wanpipe.schedulers import (
    SAMPLERS,
    Schedule,
    SchedulerConfig,
    default_sigmas,
    make_schedule,
    new_state,
    step,
)

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


# ---------------------------------------------------------------------------------------------------
# Schedules as data
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("grid", ["diffusers", "original"])
def test_default_sigmas_given_back_give_the_default_schedule(sampler, grid) -> None:
    """default_sigmas -> make_schedule(sigmas=...) is the default schedule bit for bit (also its
    video-to-video tails), for every sampler, grid, shift and step count tried."""
    for config in (
        SchedulerConfig(kind="unipc", sigma_grid=grid),
        SchedulerConfig(kind="euler", sigma_grid=grid),
        SchedulerConfig(kind="unipc", sigma_grid=grid, final_sigmas_type="sigma_min", solver_order=3),
        SchedulerConfig(kind="euler", shift_terminal=0.1),
    ):
        for n in (1, 2, 3, 4, 8, 20, 50):
            for shift in (1.0, 3.0, 5.0, 8.0, 12.0):
                if config.shift_terminal is not None and n == 1:
                    continue
                default = make_schedule(config, n, shift, sampler=sampler)
                sigmas = default_sigmas(config, n, shift, sampler=sampler)
                assert len(sigmas) == n and all(isinstance(s, float) for s in sigmas)
                given = make_schedule(config, n, 7.0, sampler=sampler, sigmas=sigmas)  # the shift is unused
                assert given == default and given.kind == sampler, (config, n, shift)
                start = n // 2
                if start:
                    tail = make_schedule(config, n, shift, start, sampler=sampler, sigmas=sigmas)
                    assert tail == make_schedule(config, n, shift, start, sampler=sampler)


def test_given_lists_are_used_as_given() -> None:
    """sigmas: the DiT sees sigma * 1000 (UniPC: truncated); timesteps: as given, sigma = t / 1000.
    Neither is shifted again; a first sigma of 1 is nudged for UniPC only (as diffusers does)."""
    euler, unipc = (
        SchedulerConfig(kind="euler", flow_shift=5.0),
        SchedulerConfig(kind="unipc", flow_shift=5.0),
    )
    s = make_schedule(euler, 3, sampler="dmd", sigmas=[1.0, 0.6375, 0.25])
    np.testing.assert_array_equal(s.sigmas, np.float32([1.0, 0.6375, 0.25, 0.0]))
    np.testing.assert_array_equal(s.timesteps, np.float32([1.0, 0.6375, 0.25]) * np.float32(1000))
    t = make_schedule(euler, 4, sampler="lcm", timesteps=[1000, 937.5, 833.3, 625.5])
    np.testing.assert_array_equal(t.timesteps, np.float32([1000, 937.5, 833.3, 625.5]))
    np.testing.assert_array_equal(t.sigmas[:-1], np.float32([1000, 937.5, 833.3, 625.5]) / np.float32(1000))
    np.testing.assert_array_equal(t.step_coefficients[:, 0], t.sigmas[:-1])
    np.testing.assert_array_equal(t.step_coefficients[:, 1], np.float32(1) - t.sigmas[1:])
    np.testing.assert_array_equal(t.step_coefficients[:, 2], t.sigmas[1:])
    assert [t.needs_noise(i) for i in range(4)] == [True, True, True, False]
    u = make_schedule(unipc, 2, sampler="unipc", sigmas=[1.0, 0.7])
    assert u.sigmas[0] == np.float32(1.0 - 1e-6) and u.timesteps.tolist() == [999.0, 700.0]
    e = make_schedule(unipc, 2, sampler="euler", sigmas=[1.0, 0.7])
    assert e.timesteps.tolist() == [1000.0, np.float32(0.7) * np.float32(1000)] and not e.needs_noise(0)


def test_expert_boundary_follows_the_given_timesteps() -> None:
    """Wan 2.2 A14B: the high-noise expert runs while t >= boundary (0.875 * 1000), on the list's own
    timesteps; strength keeps the list's tail."""
    from wanpipe.stages.experts import Experts

    config = SchedulerConfig(kind="euler", flow_shift=5.0)
    s = make_schedule(config, 4, sampler="dmd", timesteps=[1000, 937.5, 833.3, 625])
    assert Experts.plan(s.timesteps, 875.0) == ["high", "high", "low", "low"]
    tail = make_schedule(config, 4, start_step=2, sampler="dmd", timesteps=[1000, 937.5, 833.3, 625])
    assert tail.timesteps.tolist() == [np.float32(833.3), 625.0] and Experts.plan(tail.timesteps, 875.0) == [
        "low",
        "low",
    ]


def test_bad_schedule_arguments_raise() -> None:
    config = SchedulerConfig(kind="euler")
    for kw, match in (
        (dict(sigmas=[0.5, 0.9]), "strictly decreasing"),
        (dict(sigmas=[0.9]), "2 values"),
        (dict(timesteps=[1200, 100]), r"in \(0, 1000\]"),
        (dict(sigmas=[0.9, 0.5], timesteps=[900, 500]), "not both"),
        (dict(sampler="ddim"), "sampler must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            make_schedule(config, 2, **kw)
    s = make_schedule(config, 2, sampler="lcm")
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="needs fresh noise"):
        step(s, new_state(), 0, x, x)
    e = make_schedule(config, 2, sampler="euler")
    with pytest.raises(ValueError, match="takes no noise"):
        step(e, new_state(), 0, x, x, x)
    with pytest.raises(ValueError, match="does not fit sampler"):
        Schedule(s.timesteps, s.sigmas, s.step_coefficients, sampler="euler")


def test_lcm_scheduler_config_parses_and_refuses_what_is_not_implemented() -> None:
    from diffusers import FlowMatchLCMScheduler

    def saved(**kw) -> dict:  # what save_pretrained writes to scheduler_config.json
        return json.loads(FlowMatchLCMScheduler(**kw).to_json_string())

    config = SchedulerConfig.from_dict(saved(shift=5.0, shift_terminal=0.05))
    assert config == SchedulerConfig(kind="lcm", flow_shift=5.0, shift_terminal=0.05)
    for key, value, match in (
        ("use_dynamic_shifting", True, "dynamic"),
        ("scale_factors", [1.0, 2.0], "scale-wise"),
        ("use_karras_sigmas", True, "Karras"),
        ("invert_sigmas", True, "inverted"),
    ):
        data = {**saved(shift=5.0), key: value}
        with pytest.raises(ValueError, match=f"FlowMatchLCMScheduler with {key}=.*{match}"):
            SchedulerConfig.from_dict(data)
