"""Flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler with a fixed shift)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from wanpipe.schedulers.common import (
    Schedule,
    SolverState,
    coefficient_row,
    original_grid,
    shift_sigmas,
    stretch_to_terminal,
)
from wanpipe.schedulers.config import SchedulerConfig


def euler_grid(config: SchedulerConfig, num_inference_steps: int, flow_shift: float) -> np.ndarray:
    """The default sigmas (N,) float32 of flow-matching Euler (and LCM, DMD) on the reference's grid.

    The reference spaces the steps linearly between the *shifted* ends of its float32 training grid
    (sigma 1 and 1/T) and then shifts the grid again, so the shift is applied twice to every point
    but the first; reproduced as is.
    """
    t_train = config.num_train_timesteps
    if config.sigma_grid == "original":
        return shift_sigmas(original_grid(num_inference_steps, t_train), flow_shift).astype(np.float32)
    train_ends = shift_sigmas(np.array([t_train, 1], dtype=np.float32) / t_train, flow_shift)
    sigma_max, sigma_min = (float(s) for s in train_ends)
    sigmas = np.linspace(sigma_max * t_train, sigma_min * t_train, num_inference_steps) / t_train
    sigmas = shift_sigmas(sigmas, flow_shift)
    if config.shift_terminal is not None:
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    return sigmas.astype(np.float32)


def euler_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """Euler's step sizes (N, 1) float32 from the sigmas (N+1,) float32: sigma_{i+1} - sigma_i."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    return (sigmas[1:] - sigmas[:-1])[:, None]


def euler_schedule(config: SchedulerConfig, num_inference_steps: int, flow_shift: float) -> Schedule:
    """Sigmas, timesteps (sigma * T) and step sizes of flow-matching Euler on the reference's grid."""
    sigmas = euler_grid(config, num_inference_steps, flow_shift)
    timesteps = sigmas * np.float32(config.num_train_timesteps)
    sigmas = np.append(sigmas, np.float32(0.0))
    return Schedule(timesteps=timesteps, sigmas=sigmas, step_coefficients=euler_coefficients(sigmas))


def euler_step(
    schedule: Schedule, state: SolverState, i: int, model_output: Tensor, sample: Tensor
) -> Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i.

    As the reference: the sample is taken in float32 and the result is returned in model_output's dtype.
    """
    (step_size,) = coefficient_row(schedule, i)
    return (sample.to(torch.float32) + step_size * model_output).to(model_output.dtype)
