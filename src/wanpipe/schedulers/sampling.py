"""The sampler front door: build a request's Schedule, then run it step by step.

schedule = make_schedule(config, num_inference_steps, flow_shift)
state = new_state()
for i, t in enumerate(schedule.timesteps):
    sample = step(schedule, state, i, model(sample, t), sample)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import Tensor

from wanpipe.schedulers.common import Schedule, SolverState
from wanpipe.schedulers.config import SchedulerConfig, check_flow_shift
from wanpipe.schedulers.euler import euler_schedule, euler_step
from wanpipe.schedulers.unipc import unipc_coefficients, unipc_schedule, unipc_step

_SCHEDULES: dict[str, Callable[[SchedulerConfig, int, float], Schedule]] = {
    "unipc": unipc_schedule,
    "euler": euler_schedule,
}
_STEPS: dict[str, Callable[[Schedule, SolverState, int, Tensor, Tensor], Tensor]] = {
    "unipc": unipc_step,
    "euler": euler_step,
}


def make_schedule(
    config: SchedulerConfig, num_inference_steps: int, flow_shift: float | None = None, start_step: int = 0
) -> Schedule:
    """The schedule of ``num_inference_steps`` steps; ``flow_shift`` overrides the config's shift.

    ``start_step`` > 0 keeps only the steps from that index on (video-to-video: the sample starts
    partly noised at ``sigmas[0]`` of the result). As in the reference, a multistep solver's warm-up
    starts again at the first step that runs, so its coefficients are worked out for the tail.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not 0 <= start_step < num_inference_steps:
        raise ValueError(f"start_step must be in [0, {num_inference_steps}), got {start_step}")
    shift = check_flow_shift(config.flow_shift if flow_shift is None else flow_shift)
    full = _SCHEDULES[config.kind](config, num_inference_steps, shift)
    if start_step == 0:
        return full
    sigmas = full.sigmas[start_step:]
    if config.kind == "unipc":
        coefficients = unipc_coefficients(sigmas.astype(np.float64), config).astype(np.float32)
    else:
        coefficients = full.step_coefficients[start_step:]
    return Schedule(timesteps=full.timesteps[start_step:], sigmas=sigmas, step_coefficients=coefficients)


def new_state() -> SolverState:
    """A fresh solver state for one trajectory (one batch of samples sharing a schedule)."""
    return SolverState()


def step(schedule: Schedule, state: SolverState, i: int, model_output: Tensor, sample: Tensor) -> Tensor:
    """Run step i: model_output (the velocity at ``schedule.timesteps[i]``) and sample, both (B, ...),
    -> the next sample, same shape. Steps must run in order 0, 1, ..., N-1 on one state.

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
    out = _STEPS[schedule.kind](schedule, state, i, model_output, sample)
    state.step_index += 1
    return out
