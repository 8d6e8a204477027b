"""Flow-matching LCM (diffusers' FlowMatchLCMScheduler without scale-wise generation).

Each step predicts the clean sample from the velocity, d_i = x_i - sigma_i * v_i, and noises it again
to the next sigma with fresh Gaussian noise: x_{i+1} = (1 - sigma_{i+1}) * d_i + sigma_{i+1} * noise_i.
The default schedule is flow-matching Euler's (the same ``set_timesteps`` grid, shift applied twice);
the coefficients are :func:`~wanpipe.schedulers.common.renoise_coefficients`. The noise comes from the
request's seeded generator (:class:`~wanpipe.schedulers.noise.StepNoise`), drawn in float32.
"""

from __future__ import annotations

from torch import Tensor

from wanpipe.schedulers.common import Schedule, SolverState, renoise


def lcm_step(
    schedule: Schedule, state: SolverState, i: int, model_output: Tensor, sample: Tensor, noise: Tensor | None
) -> Tensor:
    """One LCM step: model_output, sample, noise (B, ...) -> the next sample (B, ...).

    As the reference: the sample is taken in float32 (sigma * v in the model output's dtype) and the
    result is returned in model_output's dtype. ``noise`` may be None only for the last step."""
    return renoise(schedule, i, model_output, sample, noise).to(model_output.dtype)
