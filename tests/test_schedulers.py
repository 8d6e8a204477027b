"""Parity of wanpipe.schedulers with diffusers' UniPCMultistepScheduler and FlowMatchEulerDiscreteScheduler.

diffusers is the reference here only: schedules (timesteps exactly, sigmas), whole trajectories driven
by a deterministic nonlinear "model" side by side, dtype behaviour, and the validation errors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wanpipe.schedulers import (
    Schedule,
    SchedulerConfig,
    SolverState,
    add_noise,
    make_schedule,
    new_state,
    step,
)

# scheduler/scheduler_config.json of the Wan 2.1 diffusers checkpoints.
WAN_UNIPC: dict[str, Any] = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
EULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.33.0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
CONFIGS = {"unipc": WAN_UNIPC, "euler": EULER}
CONFIG_SHIFT_KEY = {"unipc": "flow_shift", "euler": "shift"}

STEP_COUNTS = [1, 2, 3, 4, 5, 10, 20, 50]
TRAJECTORY_STEPS = [1, 2, 3, 5, 10, 50]
SHIFTS = [1.0, 3.0, 5.0, 12.0]
TOL = 1e-5  # max abs difference relative to max(1, |sample|)


def reference(config: dict[str, Any], n: int, shift: float | None = None) -> Any:
    """diffusers' scheduler built from the same json (with ``shift`` as its shift), set to n steps."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if shift is not None:
        kwargs["flow_shift" if "flow_shift" in kwargs else "shift"] = shift
    cls = (
        UniPCMultistepScheduler
        if config["_class_name"] == "UniPCMultistepScheduler"
        else FlowMatchEulerDiscreteScheduler
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = cls(**kwargs)
    scheduler.set_timesteps(n)
    scheduler.set_begin_index(0)  # as diffusers' Wan pipelines do
    return scheduler


def velocity(sample: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A deterministic nonlinear stand-in for the DiT: f(sample, t) plus fixed noise."""
    x = sample.double()
    v = torch.tanh(x) * (1 + t.double() / 1000) - 0.3 * x * torch.sin(x) + 0.5 * noise.double()
    return v.to(dtype)


def trajectories(
    config: dict[str, Any],
    n: int,
    shift: float | None = None,
    sample_dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
    open_loop: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run diffusers and wanpipe side by side (batch of 2), each on its own samples; all intermediates.

    open_loop: feed both the model output computed from diffusers' sample, isolating the step's
    arithmetic from a low-precision model's amplification of 1-ulp differences in its input.
    """
    ref = reference(config, n, shift)
    schedule = make_schedule(SchedulerConfig.from_dict(config), n, flow_shift=shift)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, 3, 6, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ours, theirs = [x.to(sample_dtype)], [x.to(sample_dtype)]
    state = new_state()
    for i, t in enumerate(ref.timesteps):
        v_ref = velocity(theirs[-1], t, noise, model_dtype or sample_dtype)
        t_ours = torch.tensor(float(schedule.timesteps[i]))
        v_ours = v_ref if open_loop else velocity(ours[-1], t_ours, noise, model_dtype or sample_dtype)
        theirs.append(ref.step(v_ref, t, theirs[-1]).prev_sample)
        ours.append(step(schedule, state, i, v_ours, ours[-1]))
    return ours, theirs


def worst_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, b.double().abs().max().item())
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_matches_diffusers(kind: str, shift: float) -> None:
    config = SchedulerConfig.from_dict(CONFIGS[kind])
    for n in STEP_COUNTS:
        ref = reference(CONFIGS[kind], n, shift)  # diffusers built with this shift
        schedule = make_schedule(config, n, flow_shift=shift)  # ours: the config's 3.0, overridden
        ref_timesteps = ref.timesteps.numpy()
        assert ref_timesteps.dtype == (np.int64 if kind == "unipc" else np.float32)
        assert schedule.timesteps.dtype == np.float32 and schedule.timesteps.shape == (n,)
        np.testing.assert_array_equal(schedule.timesteps, ref_timesteps.astype(np.float32))
        assert schedule.sigmas.dtype == np.float32 and schedule.sigmas.shape == (n + 1,)
        np.testing.assert_allclose(schedule.sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
        assert schedule.kind == kind and schedule.num_inference_steps == n


def test_config_shift_is_the_default_and_override_wins() -> None:
    for kind, data in CONFIGS.items():
        config = SchedulerConfig.from_dict(data)
        assert config.flow_shift == 3.0
        assert make_schedule(config, 10) == make_schedule(config, 10, flow_shift=3.0)
        five = make_schedule(config, 10, flow_shift=5.0)
        assert five != make_schedule(config, 10)
        assert five == make_schedule(SchedulerConfig.from_dict({**data, CONFIG_SHIFT_KEY[kind]: 5.0}), 10)


def test_unipc_step_coefficients_layout() -> None:
    s = make_schedule(SchedulerConfig.from_dict(WAN_UNIPC), 5)
    c = s.step_coefficients
    assert c.shape == (5, 9) and c.dtype == np.float32 and s.solver_order == 2
    np.testing.assert_array_equal(c[:, 0], s.sigmas[:-1])  # d_i = x_i - sigma_i * v_i
    assert c[0, 1] == 1 and not c[0, 2:6].any()  # no corrector at the first step
    assert not c[1:, 1].any() and c[1:, 2].all() and c[1:, 3].all()
    assert c[0, 8] == 0 and c[1:4, 8].all()  # first-order warm-up, then second order
    assert c[4, 6] == 0 and c[4, 7] == 1 and c[4, 8] == 0  # last step into sigma 0: x_N = d_{N-1}


def test_euler_step_coefficients() -> None:
    s = make_schedule(SchedulerConfig.from_dict(EULER), 7)
    assert s.step_coefficients.shape == (7, 1)
    np.testing.assert_array_equal(s.step_coefficients[:, 0], s.sigmas[1:] - s.sigmas[:-1])


# --- trajectories ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_trajectories_match_diffusers(kind: str, shift: float) -> None:
    for n in TRAJECTORY_STEPS:
        ours, theirs = trajectories(CONFIGS[kind], n, shift)
        assert worst_diff(ours, theirs) <= TOL, (n, worst_diff(ours, theirs))


@pytest.mark.parametrize(
    "extra",
    [
        {"solver_order": 1},
        {"solver_order": 3},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        {"solver_type": "midpoint"},
        {"disable_corrector": [0, 2, 3]},
        {"solver_order": 3, "disable_corrector": [1]},
        {"shift_terminal": 0.1},
        {"flow_shift": 5.0, "num_train_timesteps": 500},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
def test_unipc_variants_match_diffusers(extra: dict[str, Any]) -> None:
    for n in [2, 3, 5, 12]:
        ours, theirs = trajectories({**WAN_UNIPC, **extra}, n)
        assert worst_diff(ours, theirs) <= TOL, (n, worst_diff(ours, theirs))


def test_unipc_bh1_final_step_is_finite() -> None:
    """diffusers' bh1 update into sigma 0 multiplies -inf by 0 (NaN); ours returns the x0 prediction."""
    ours, theirs = trajectories({**WAN_UNIPC, "solver_type": "bh1"}, 6)
    assert worst_diff(ours[:-1], theirs[:-1]) <= TOL
    assert torch.isnan(theirs[-1]).all() and torch.isfinite(ours[-1]).all()


def test_euler_shift_terminal_matches_diffusers() -> None:
    for n in [2, 5, 20]:
        ours, theirs = trajectories({**EULER, "shift_terminal": 0.05}, n)
        assert worst_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize(
    ("sample_dtype", "model_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.bfloat16),  # fp32 latents, bf16 DiT: diffusers' Wan pipeline
    ],
)
def test_dtype_behaviour_matches_diffusers(
    kind: str, sample_dtype: torch.dtype, model_dtype: torch.dtype
) -> None:
    """Output dtypes follow the reference (UniPC: the sample's; Euler: the model output's, computed in
    float32), and so does the arithmetic: sigma * v is rounded to the model output's dtype as in diffusers.

    Open loop (both fed diffusers' model outputs): a bf16 model turns 1e-7 input differences into
    occasional 1-ulp bf16 output flips, which is not what this test is about.
    """
    for n in TRAJECTORY_STEPS:
        ours, theirs = trajectories(CONFIGS[kind], n, 5.0, sample_dtype, model_dtype, open_loop=True)
        assert worst_diff(ours, theirs) <= TOL, (n, worst_diff(ours, theirs))
    expected = sample_dtype if kind == "unipc" else model_dtype
    assert ours[-1].dtype == expected


def test_bf16_samples() -> None:
    """bf16 samples stay bf16. Euler rounds exactly as the reference (bit-identical). UniPC's expanded
    linear form accumulates in float32, so it is judged by its distance to a float64 run, which must
    be no worse than the reference's own (in practice it is smaller)."""
    for n in [1, 5, 20]:
        ours, theirs = trajectories(EULER, n, sample_dtype=torch.bfloat16)
        assert ours[-1].dtype == torch.bfloat16 and worst_diff(ours, theirs) == 0.0
    for n in [3, 10, 50]:
        ours, theirs = trajectories(WAN_UNIPC, n, sample_dtype=torch.bfloat16)
        exact, _ = trajectories(WAN_UNIPC, n, sample_dtype=torch.float64)
        assert ours[-1].dtype == torch.bfloat16

        def error(run: list[torch.Tensor], exact: torch.Tensor = exact[-1]) -> float:
            return ((run[-1].double() - exact).norm() / exact.norm()).item()

        assert error(ours) <= 1.25 * error(theirs) + 1e-3, (n, error(ours), error(theirs))


def test_states_are_independent_and_schedules_reusable() -> None:
    schedule = make_schedule(SchedulerConfig.from_dict(WAN_UNIPC), 4)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    state_a, state_b = new_state(), new_state()
    xa, xb, solo = a, b, b
    state_solo = new_state()
    for i in range(4):
        xa = step(schedule, state_a, i, torch.sin(xa), xa)
        xb = step(schedule, state_b, i, torch.sin(xb), xb)
        solo = step(schedule, state_solo, i, torch.sin(solo), solo)
    torch.testing.assert_close(xb, solo, rtol=0, atol=0)
    batched, state = torch.stack([a, b]), new_state()
    for i in range(4):
        batched = step(schedule, state, i, torch.sin(batched), batched)
    torch.testing.assert_close(batched, torch.stack([xa, xb]), rtol=0, atol=0)


def test_add_noise_matches_diffusers() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    for data in (WAN_UNIPC, EULER):
        ref = reference(data, 10)
        schedule = make_schedule(SchedulerConfig.from_dict(data), 10)
        i = 4
        t = ref.timesteps[i : i + 1].repeat(2)
        ref.set_begin_index(i)
        expected = ref.add_noise(x0, noise, t) if hasattr(ref, "add_noise") else ref.scale_noise(x0, t, noise)
        torch.testing.assert_close(
            add_noise(x0, noise, float(schedule.sigmas[i])), expected, rtol=0, atol=1e-6
        )


# --- the Schedule object -----------------------------------------------------------------------


def test_schedule_roundtrip_equality_and_readonly() -> None:
    schedule = make_schedule(SchedulerConfig.from_dict(WAN_UNIPC), 6)
    rebuilt = Schedule(  # as the executor rebuilds it from batched tensors
        timesteps=torch.from_numpy(schedule.timesteps.copy()).numpy(),
        sigmas=schedule.sigmas.copy(),
        step_coefficients=schedule.step_coefficients.copy(),
    )
    assert rebuilt == schedule and hash(rebuilt) == hash(schedule) and rebuilt.kind == "unipc"
    assert len({schedule, rebuilt, make_schedule(SchedulerConfig.from_dict(EULER), 6)}) == 2
    with pytest.raises(ValueError):
        schedule.sigmas[0] = 0.5
    with pytest.raises(ValueError, match="inconsistent Schedule shapes"):
        Schedule(
            timesteps=schedule.timesteps[:3],
            sigmas=schedule.sigmas,
            step_coefficients=schedule.step_coefficients,
        )
    with pytest.raises(ValueError, match="width"):
        Schedule(timesteps=schedule.timesteps, sigmas=schedule.sigmas, step_coefficients=np.zeros((6, 4)))


# --- errors ------------------------------------------------------------------------------------


def test_wan_config_parses_and_ignores_unknown_keys() -> None:
    config = SchedulerConfig.from_dict({**WAN_UNIPC, "some_future_key": 1, "timestep_spacing": "trailing"})
    assert config == SchedulerConfig(kind="unipc", flow_shift=3.0)
    assert SchedulerConfig.from_dict(EULER) == SchedulerConfig(kind="euler", flow_shift=3.0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"flow_shift": 3.0}, "_class_name"),
        ({**WAN_UNIPC, "_class_name": "DDIMScheduler"}, "unsupported scheduler class 'DDIMScheduler'"),
        ({**WAN_UNIPC, "prediction_type": "epsilon"}, "only 'flow_prediction'"),
        ({**WAN_UNIPC, "use_flow_sigmas": False}, "use_flow_sigmas=True"),
        ({k: v for k, v in WAN_UNIPC.items() if k != "use_flow_sigmas"}, "use_flow_sigmas=True"),
        ({**WAN_UNIPC, "predict_x0": False}, "predict_x0"),
        ({**WAN_UNIPC, "solver_order": 4}, "solver_order=4 is not supported: UniPC orders 1 to 3"),
        ({**WAN_UNIPC, "solver_order": 0}, "solver_order=0"),
        ({**WAN_UNIPC, "solver_type": "bh3"}, "solver_type 'bh3'"),
        ({**WAN_UNIPC, "use_dynamic_shifting": True}, "dynamic"),
        ({**WAN_UNIPC, "use_karras_sigmas": True}, "Karras"),
        ({**WAN_UNIPC, "use_exponential_sigmas": True}, "exponential"),
        ({**WAN_UNIPC, "use_beta_sigmas": True}, "beta sigmas"),
        ({**WAN_UNIPC, "thresholding": True}, "thresholding"),
        ({**WAN_UNIPC, "final_sigmas_type": "one"}, "final_sigmas_type"),
        ({**WAN_UNIPC, "lower_order_final": False}, "lower_order_final=False"),
        ({**WAN_UNIPC, "flow_shift": 0.0}, "flow_shift must be a finite number > 0"),
        ({**WAN_UNIPC, "num_train_timesteps": 0}, "num_train_timesteps"),
        ({**WAN_UNIPC, "shift_terminal": 1.5}, "shift_terminal"),
        ({**EULER, "use_dynamic_shifting": True}, "dynamic"),
        ({**EULER, "invert_sigmas": True}, "inverted"),
        ({**EULER, "stochastic_sampling": True}, "stochastic"),
        ({**EULER, "use_karras_sigmas": True}, "Karras"),
        ({**EULER, "shift": -1.0}, "flow_shift must be a finite number > 0"),
    ],
)
def test_bad_configs_raise(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig.from_dict(data)


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_bad_arguments_raise(kind: str) -> None:
    config = SchedulerConfig.from_dict(CONFIGS[kind])
    for n in (0, -3):
        with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
            make_schedule(config, n)
    with pytest.raises(ValueError, match="num_inference_steps must be an int"):
        make_schedule(config, 2.5)  # type: ignore[arg-type]
    for shift in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="flow_shift must be a finite number > 0"):
            make_schedule(config, 10, flow_shift=shift)
    terminal = SchedulerConfig.from_dict({**CONFIGS[kind], "shift_terminal": 0.1})
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        make_schedule(terminal, 1)

    schedule, x = make_schedule(config, 2), torch.zeros(1, 3)
    state = new_state()
    with pytest.raises(ValueError, match="expects step 0, got 1"):
        step(schedule, state, 1, x, x)
    with pytest.raises(ValueError, match="shape"):
        step(schedule, state, 0, torch.zeros(1, 4), x)
    step(schedule, state, 0, x, x)
    step(schedule, state, 1, x, x)
    with pytest.raises(ValueError, match="out of range"):
        step(schedule, state, 2, x, x)


# --- device ------------------------------------------------------------------------------------


def run_loop(
    schedule: Schedule, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, SolverState]:
    state = new_state()
    for i in range(schedule.num_inference_steps):
        x = step(schedule, state, i, model(x), x)
    return x, state


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_cuda_matches_cpu_without_host_syncs(kind: str) -> None:
    schedule = make_schedule(SchedulerConfig.from_dict(CONFIGS[kind]), 12)
    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(y: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(y.float()) - 0.5 * y.float()).to(torch.bfloat16)

    expected, _ = run_loop(schedule, x, model)
    x_cuda = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = run_loop(schedule, x_cuda, model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.dtype == expected.dtype
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=0, atol=2e-2)
