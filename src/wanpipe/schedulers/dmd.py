"""The DMD "denoising step list" sampler of distilled Wan checkpoints (LightX2V's step-distill
scheduler, FastVideo's and SGLang's DMD denoising stage).

A distilled model is run at a short list of timesteps (e.g. 1000, 750, 500, 250 before the shift).
Each step predicts the clean sample, d_i = x_i - sigma_i * v_i, and, except at the last step, noises
it again to the next listed sigma with fresh Gaussian noise: x_{i+1} = (1 - sigma_{i+1}) * d_i +
sigma_{i+1} * noise_i. The arithmetic is LCM's; as in LightX2V the velocity is taken in float32 and
the result keeps the sample's dtype. The schedule comes from the request's ``sigmas`` or ``timesteps``
(the default is flow-matching Euler's grid); the noise from the request's seeded generator
(:class:`~wanpipe.schedulers.noise.StepNoise`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wanpipe.schedulers.common import Schedule, SolverState, renoise


def dmd_step(
    schedule: Schedule, state: SolverState, i: int, model_output: Tensor, sample: Tensor, noise: Tensor | None
) -> Tensor:
    """One DMD step: model_output, sample, noise (B, ...) -> the next sample (B, ...) in sample's dtype.
    ``noise`` may be None only for the last step."""
    return renoise(schedule, i, model_output.to(torch.float32), sample, noise).to(sample.dtype)
