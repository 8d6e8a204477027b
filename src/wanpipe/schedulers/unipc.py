"""Multistep UniPC on the flow-matching grid (diffusers' UniPCMultistepScheduler, flow_prediction).

With flow prediction the data prediction is linear in the sample: d_i = x_i - sigma_i * v_i. UniPC's
predictor (UniP) and corrector (UniC) are linear combinations of the previous corrected sample and of
x0 predictions, with weights that depend only on the sigmas. ``unipc_schedule`` works those weights
out once per request (in float64, from the float32 sigmas the reference itself steps with), so that
``unipc_step`` is two weighted sums. The layout of ``step_coefficients`` is documented on ``Schedule``.
They are stored as float32 (the reference computes the same weights in float32 at every step);
trajectories then match the reference to about 1e-6 of the sample's magnitude.

Notation (flow sigmas): alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_t - lambda_s.
"""

from __future__ import annotations

import math

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

# The reference nudges a first sigma of 1 down by this much, keeping log(1 - sigma) finite.
_FIRST_SIGMA_EPS = 1e-6


def unipc_grid(config: SchedulerConfig, num_inference_steps: int, flow_shift: float) -> np.ndarray:
    """The default sigmas (N,) float64 of UniPC: the shifted (and stretched) flow grid."""
    n, t_train = num_inference_steps, config.num_train_timesteps
    if config.sigma_grid == "original":
        grid = original_grid(n, t_train)
    else:
        grid = np.linspace(1.0, 1.0 / t_train, n + 1)[:-1]
    sigmas = shift_sigmas(grid, flow_shift)
    if config.shift_terminal is not None:
        sigmas = stretch_to_terminal(sigmas, config.shift_terminal)
    return sigmas


def unipc_from_sigmas(
    config: SchedulerConfig, sigmas: np.ndarray, timesteps: np.ndarray | None = None
) -> Schedule:
    """UniPC's schedule on the sigmas (N,) float64 as diffusers' ``set_timesteps`` treats its sigmas
    after the shift: a first sigma within 1e-6 of 1 is nudged down by 1e-6, the timesteps are
    sigma * T truncated to integers (unless given), the final sigma appended (0, or the last one with
    ``final_sigmas_type="sigma_min"``), the step coefficients worked out from the float32 sigmas."""
    sigmas = np.array(sigmas, dtype=np.float64)
    if abs(sigmas[0] - 1.0) < _FIRST_SIGMA_EPS:
        sigmas[0] -= _FIRST_SIGMA_EPS
    if timesteps is None:  # the reference stores timesteps as int64: sigma * T truncated toward zero
        timesteps = (sigmas * config.num_train_timesteps).astype(np.int64).astype(np.float32)
    final = 0.0 if config.final_sigmas_type == "zero" else sigmas[-1]
    sigmas32 = np.append(sigmas, final).astype(np.float32)
    coefficients = unipc_coefficients(sigmas32.astype(np.float64), config)
    return Schedule(
        timesteps=timesteps,
        sigmas=sigmas32,
        step_coefficients=coefficients.astype(np.float32),
        sampler="unipc",
    )


def unipc_schedule(config: SchedulerConfig, num_inference_steps: int, flow_shift: float) -> Schedule:
    """Sigmas, timesteps and step coefficients of UniPC for ``num_inference_steps`` steps."""
    return unipc_from_sigmas(config, unipc_grid(config, num_inference_steps, flow_shift))


def step_orders(config: SchedulerConfig, n: int) -> list[int]:
    """The predictor's order at each step: warm-up from 1, lower orders at the end if configured."""
    orders = []
    for i in range(n):
        order = min(config.solver_order, n - i) if config.lower_order_final else config.solver_order
        orders.append(min(order, min(i, config.solver_order) + 1))
    return orders


def unipc_coefficients(sigmas: np.ndarray, config: SchedulerConfig) -> np.ndarray:
    """(N, 5 + 2S) float64 weights; see ``Schedule`` for the column layout."""
    s_max, n = config.solver_order, len(sigmas) - 1
    orders = step_orders(config, n)
    with np.errstate(divide="ignore"):
        lambdas = np.log1p(-sigmas) - np.log(sigmas)  # +inf at sigma = 0
    out = np.zeros((n, 5 + 2 * s_max))
    for i in range(n):
        out[i, 0] = sigmas[i]
        if i > 0 and i - 1 not in config.disable_corrector:
            x, history, this = _update_weights(
                sigmas, lambdas, i - 1, i, orders[i - 1], config, corrector=True
            )
            out[i, 2], out[i, 3] = x, this
            out[i, 4 : 4 + len(history)] = history
        else:
            out[i, 1] = 1.0
        x, history, _ = _update_weights(sigmas, lambdas, i, i + 1, orders[i], config, corrector=False)
        out[i, 4 + s_max] = x
        out[i, 5 + s_max : 5 + s_max + len(history)] = history
    return out


def _update_weights(
    sigmas: np.ndarray,
    lambdas: np.ndarray,
    s: int,
    t: int,
    order: int,
    config: SchedulerConfig,
    *,
    corrector: bool,
) -> tuple[float, np.ndarray, float]:
    """Weights of one B(h) update from sigmas[s] to sigmas[t] in data-prediction form:

    x_t = w_x * x_s + sum_k w_d[k] * d_{s-k} (+ w_this * d_t for the corrector), k = 0 .. order-1.

    The UniPC update is x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) d_s - alpha_t B(h) R, with R
    a combination of the divided differences D_k = (d_{s-k} - d_s) / r_k, r_k = (lambda_{s-k} -
    lambda_s) / h, and for the corrector also (d_t - d_s); its weights rho solve the order conditions.
    """
    sigma_s, sigma_t = sigmas[s], sigmas[t]
    w_d = np.zeros(order)
    if sigma_t == sigma_s:  # a zero-length step (final_sigmas_type="sigma_min"): the sample is kept
        return 1.0, w_d, 0.0
    alpha_t = 1.0 - sigma_t
    hh = lambdas[s] - lambdas[t]  # -h; -inf when sigma_t = 0
    phi_1 = math.expm1(hh)  # h * phi_1(h) in the reference's sign convention
    b_h = hh if config.solver_type == "bh1" else phi_1
    w_d[0] = -alpha_t * phi_1
    rks = [(lambdas[s - k] - lambdas[s]) / -hh for k in range(1, order)]
    rhos = _rhos(rks, hh, b_h, order, corrector)
    w_this = 0.0
    for k, (rk, rho) in enumerate(zip(rks, rhos), start=1):
        w_d[k] = -alpha_t * b_h * rho / rk
        w_d[0] += alpha_t * b_h * rho / rk
    if corrector:
        w_this = -alpha_t * b_h * rhos[-1]
        w_d[0] += alpha_t * b_h * rhos[-1]
    return sigma_t / sigma_s, w_d, w_this


def _rhos(rks: list[float], hh: float, b_h: float, order: int, corrector: bool) -> np.ndarray:
    """UniPC's rho weights: 1/2 at the lowest order, else the solution of the order conditions R rho = b."""
    if order == 1:
        return np.array([0.5] if corrector else [])
    if order == 2 and not corrector:
        return np.array([0.5])
    nodes = np.array([*rks, 1.0])
    vander = np.stack([nodes**j for j in range(order)])  # R[j, k] = r_k ** j
    b = np.empty(order)
    # g_j = (e^hh - sum_{m <= j} hh^m / m!) / hh^j, for j = 1 .. order
    g, factorial = math.expm1(hh) / hh - 1.0, 1.0
    for j in range(order):
        b[j] = g * factorial / b_h
        factorial *= j + 2
        g = g / hh - 1.0 / factorial
    if corrector:
        return np.linalg.solve(vander, b)
    return np.linalg.solve(vander[:-1, :-1], b[:-1])


def unipc_step(
    schedule: Schedule, state: SolverState, i: int, model_output: Tensor, sample: Tensor
) -> Tensor:
    """UniC-correct the sample with the new model output, then UniP-predict the next one.

    model_output, sample: (B, ...) with the same shape; returns the next sample in ``sample``'s dtype.
    The x0 prediction follows the reference's type promotion (with a bf16 model output, sigma * v is
    rounded to bf16 as in diffusers); the weighted sums run in at least float32. Updates ``state``.
    """
    c = coefficient_row(schedule, i)
    s_max = schedule.solver_order
    x0 = sample - c[0] * model_output
    if state.last_sample is None:  # no history yet: its weights are 0, any finite tensor will do
        state.last_sample, state.x0_history = sample, (x0,) * s_max
    x0s = (x0, *state.x0_history)
    corrected = _weighted_sum(c[1 : 4 + s_max], (sample, state.last_sample, *x0s)).to(sample.dtype)
    next_sample = _weighted_sum(c[4 + s_max :], (corrected, *x0s[:s_max]))
    state.last_sample, state.x0_history = corrected, x0s[:s_max]
    return next_sample.to(sample.dtype)


def _weighted_sum(weights: tuple[Tensor, ...], tensors: tuple[Tensor, ...]) -> Tensor:
    """sum_k w_k * x_k, accumulated in at least float32.

    The reference forms differences of x0 predictions before scaling them; the expanded weights here
    scale each prediction separately, which in bf16/fp16 would round away part of those differences.
    """
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    out = weights[0] * tensors[0].to(dtype)
    for w, x in zip(weights[1:], tensors[1:]):
        out = out + w * x.to(dtype)
    return out
