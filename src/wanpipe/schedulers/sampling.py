"""The sampler front door: build a request's Schedule, then run it step by step.

schedule = make_schedule(config, num_inference_steps, flow_shift, sampler="dmd", timesteps=[...])
state = new_state()
for i, t in enumerate(schedule.timesteps):
    noise = step_noise.draw(sample.shape[1:]) if schedule.needs_noise(i) else None
    sample = step(schedule, state, i, model(sample, t), sample, noise)

A schedule is data: the default one comes from ``num_inference_steps`` and the shift; a request may
give its own ``sigmas`` (one per step, in (0, 1], strictly decreasing, the trailing 0 implied) or
``timesteps`` (the same on the 0-1000 scale, sigma = t / 1000), used as given: not shifted again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from wanpipe.schedulers.common import Schedule, SolverState, renoise_coefficients
from wanpipe.schedulers.config import SAMPLERS, TIMESTEP_SCALE, SchedulerConfig, check_flow_shift
from wanpipe.schedulers.dmd import dmd_step
from wanpipe.schedulers.euler import euler_coefficients, euler_grid, euler_step
from wanpipe.schedulers.lcm import lcm_step
from wanpipe.schedulers.unipc import unipc_coefficients, unipc_from_sigmas, unipc_grid, unipc_step

_COEFFICIENTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "euler": euler_coefficients,
    "lcm": renoise_coefficients,
    "dmd": renoise_coefficients,
}


def _euler_step(schedule: Schedule, state: SolverState, i: int, v: Tensor, x: Tensor, noise: Tensor | None):
    return euler_step(schedule, state, i, v, x)


def _unipc_step(schedule: Schedule, state: SolverState, i: int, v: Tensor, x: Tensor, noise: Tensor | None):
    return unipc_step(schedule, state, i, v, x)


_STEPS: dict[str, Callable[[Schedule, SolverState, int, Tensor, Tensor, Tensor | None], Tensor]] = {
    "unipc": _unipc_step,
    "euler": _euler_step,
    "lcm": lcm_step,
    "dmd": dmd_step,
}


def default_sigmas(
    config: SchedulerConfig,
    num_inference_steps: int,
    flow_shift: float | None = None,
    sampler: str | None = None,
) -> list[float]:
    """The sigmas (N,) the default schedule of ``sampler`` (the config's kind when None) steps from,
    before the final 0: given back as ``make_schedule(..., sigmas=...)`` they give the default schedule
    exactly (UniPC's are float64, its timesteps truncate sigma * T; the others' are float32)."""
    kind = _kind(config, sampler)
    shift = check_flow_shift(config.flow_shift if flow_shift is None else flow_shift)
    _check_steps(num_inference_steps)
    grid = unipc_grid if kind == "unipc" else euler_grid
    return [float(s) for s in grid(config, num_inference_steps, shift)]


def make_schedule(
    config: SchedulerConfig,
    num_inference_steps: int,
    flow_shift: float | None = None,
    start_step: int = 0,
    *,
    sampler: str | None = None,
    sigmas: Sequence[float] | None = None,
    timesteps: Sequence[float] | None = None,
) -> Schedule:
    """The schedule of ``num_inference_steps`` steps of ``sampler`` (the config's kind when None).

    Default: the sampler's grid with ``flow_shift`` (the config's shift when None): UniPC's flow grid
    for "unipc", flow-matching Euler's ``set_timesteps`` grid for "euler", "lcm" and "dmd". ``sigmas``
    or ``timesteps`` (at most one; length ``num_inference_steps``) replace the grid and are used as
    given, not shifted or stretched: the DiT sees ``timesteps`` as given, or sigma * T (UniPC: truncated
    to integers as diffusers does) for ``sigmas``; a timesteps list's sigmas are t / 1000.

    ``start_step`` > 0 keeps only the steps from that index on (video-to-video: the sample starts
    partly noised at ``sigmas[0]`` of the result). As in the reference, a multistep solver's warm-up
    starts again at the first step that runs, so its coefficients are worked out for the tail.
    """
    kind = _kind(config, sampler)
    _check_steps(num_inference_steps)
    if not 0 <= start_step < num_inference_steps:
        raise ValueError(f"start_step must be in [0, {num_inference_steps}), got {start_step}")
    shift = check_flow_shift(config.flow_shift if flow_shift is None else flow_shift)
    if sigmas is not None and timesteps is not None:
        raise ValueError("give either sigmas or timesteps, not both")
    given_timesteps = None
    if timesteps is not None:
        given_timesteps = _step_list(timesteps, "timesteps", TIMESTEP_SCALE, num_inference_steps)
        given = given_timesteps / np.float32(TIMESTEP_SCALE)
    elif sigmas is not None:
        given = _step_list(sigmas, "sigmas", 1.0, num_inference_steps, dtype=np.float64)
    else:
        given = None
    full = _full_schedule(kind, config, num_inference_steps, shift, given, given_timesteps)
    if start_step == 0:
        return full
    tail = full.sigmas[start_step:]
    if kind == "unipc":
        coefficients = unipc_coefficients(tail.astype(np.float64), config).astype(np.float32)
    else:
        coefficients = full.step_coefficients[start_step:]
    return Schedule(
        timesteps=full.timesteps[start_step:], sigmas=tail, step_coefficients=coefficients, sampler=kind
    )


def _full_schedule(
    kind: str,
    config: SchedulerConfig,
    n: int,
    shift: float,
    given: np.ndarray | None,
    given_timesteps: np.ndarray | None,
) -> Schedule:
    if kind == "unipc":
        sigmas = unipc_grid(config, n, shift) if given is None else given.astype(np.float64)
        return unipc_from_sigmas(config, sigmas, given_timesteps)
    sigmas32 = euler_grid(config, n, shift) if given is None else given.astype(np.float32)
    timesteps = (
        sigmas32 * np.float32(config.num_train_timesteps) if given_timesteps is None else given_timesteps
    )
    sigmas32 = np.append(sigmas32, np.float32(0.0))
    return Schedule(
        timesteps=timesteps, sigmas=sigmas32, step_coefficients=_COEFFICIENTS[kind](sigmas32), sampler=kind
    )


def _kind(config: SchedulerConfig, sampler: str | None) -> str:
    kind = config.kind if sampler is None else sampler
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")
    return kind


def _check_steps(num_inference_steps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")


def _step_list(
    values: Sequence[float], name: str, upper: float, n: int, dtype: type[np.floating] = np.float32
) -> np.ndarray:
    """A sigmas / timesteps list as an array: n finite values in (0, upper], strictly decreasing."""
    array = np.asarray(values, dtype=dtype)
    if array.shape != (n,):
        raise ValueError(f"{name} must be {n} values (one per step), got shape {array.shape}")
    if not np.isfinite(array).all() or (array <= 0).any() or (array > upper).any():
        raise ValueError(f"{name} must each be in (0, {upper:g}], got {array.tolist()}")
    if (np.diff(array) >= 0).any():
        raise ValueError(f"{name} must be strictly decreasing, got {array.tolist()}")
    return array


def new_state() -> SolverState:
    """A fresh solver state for one trajectory (one batch of samples sharing a schedule)."""
    return SolverState()


def step(
    schedule: Schedule,
    state: SolverState,
    i: int,
    model_output: Tensor,
    sample: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """Run step i: model_output (the velocity at ``schedule.timesteps[i]``) and sample, both (B, ...),
    -> the next sample, same shape. Steps must run in order 0, 1, ..., N-1 on one state. ``noise``
    (B, ...) float32: the step's fresh noise where ``schedule.needs_noise(i)`` (LCM, DMD), else None.

    No host syncs: the step's coefficients are CPU scalars read from the schedule.
    """
    if i != state.step_index:
        raise ValueError(f"steps must run in order: this state expects step {state.step_index}, got {i}")
    if not 0 <= i < schedule.num_inference_steps:
        raise ValueError(f"step index {i} out of range for a {schedule.num_inference_steps}-step schedule")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}"
        )
    if noise is not None and not schedule.needs_noise(i):
        raise ValueError(f"step {i} of a {schedule.kind} schedule takes no noise")
    out = _STEPS[schedule.kind](schedule, state, i, model_output, sample, noise)
    state.step_index += 1
    return out
