"""What the samplers share: the Schedule, the SolverState, the flow shift and the noising formula."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow-matching schedule shift, sigma -> s*sigma / (1 + (s-1)*sigma), in the array's own dtype.

    The one place this formula lives; s > 1 spends more steps at high noise.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def original_grid(num_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The original Wan repositories' unshifted sigma grid (``FlowUniPCMultistepScheduler.set_timesteps``):
    ``linspace(sigma_max, sigma_min, N + 1)[:-1]`` in float64 between the ends of its float32 training
    grid, sigma_max = float32(1 - 1/T) and sigma_min = 0."""
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, num_inference_steps + 1)[:-1].copy()


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch the schedule's distance from 1 so that its last sigma becomes ``terminal``."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        raise ValueError("shift_terminal needs a schedule that ends below sigma 1 (num_inference_steps >= 2)")
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The flow-matching forward process at noise level sigma: (1 - sigma) * x0 + sigma * noise.

    sigma: a float or a tensor broadcastable to x0 (e.g. (B, 1, 1, 1, 1) for one level per sample);
    take it from ``Schedule.sigmas[i]`` to start denoising at step i (video-to-video).
    """
    return (1 - sigma) * x0 + sigma * noise


def _readonly(array: np.ndarray, dtype: type[np.floating], name: str, ndim: int) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    if out.ndim != ndim:
        raise ValueError(f"Schedule.{name} must be {ndim}-D, got shape {out.shape}")
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Schedule:
    """One request's sampling schedule: everything the denoising loop needs, computed up front.

    timesteps: (N,) float32, the values the DiT is conditioned on, exactly diffusers'
        ``scheduler.timesteps`` (UniPC: integers, diffusers truncates sigma*T to int64; Euler: sigma*T;
        a request's own ``timesteps`` as given).
    sigmas: (N+1,) float32, the noise level before each step plus the final one.
    step_coefficients: (N, K) float32, per step the weights of a fixed update, so that step i is
        only tensor arithmetic with these numbers. Their layout depends on the sampler (``sampler``,
        inferred from the width when not given: 1 Euler, 5 + 2S UniPC):

        * Euler, K = 1: ``x_{i+1} = x_i + c[0] * v_i`` with c[0] = sigma_{i+1} - sigma_i.
        * LCM and DMD, K = 3: ``d_i = x_i - c[0] * v_i`` (c[0] = sigma_i), then
          ``x_{i+1} = c[1] * d_i + c[2] * noise_i`` (c[1] = 1 - sigma_{i+1}, c[2] = sigma_{i+1}) with
          fresh Gaussian noise; the last step (sigma_N = 0) returns d_i and draws none.
        * UniPC of order S, K = 5 + 2S (K = 9 for the Wan configs, S = 2). With v_i the model output,
          x_i the sample passed to step i, xc_i the corrected sample, d_j the x0 predictions:

          - ``c[0]`` = sigma_i: ``d_i = x_i - c[0] * v_i``
          - corrector (UniC; uses v_i to correct the predictor's output of step i-1), columns 1 .. 3+S:
            ``xc_i = c[1]*x_i + c[2]*xc_{i-1} + c[3]*d_i + c[4]*d_{i-1} + ... + c[3+S]*d_{i-S}``
            (c[1] = 1 and the rest 0 where no corrector runs: the first step, disable_corrector)
          - predictor (UniP), columns 4+S .. 4+2S:
            ``x_{i+1} = c[4+S]*xc_i + c[5+S]*d_i + c[6+S]*d_{i-1} + ... + c[4+2S]*d_{i-S+1}``

          Weights of history that does not exist yet (the warm-up steps) are 0.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    step_coefficients: np.ndarray
    sampler: str | None = None

    def __post_init__(self) -> None:
        timesteps = _readonly(self.timesteps, np.float32, "timesteps", 1)
        sigmas = _readonly(self.sigmas, np.float32, "sigmas", 1)
        coefficients = _readonly(self.step_coefficients, np.float32, "step_coefficients", 2)
        n, k = coefficients.shape
        if n < 1 or timesteps.shape != (n,) or sigmas.shape != (n + 1,):
            raise ValueError(
                f"inconsistent Schedule shapes: timesteps {timesteps.shape}, sigmas {sigmas.shape}, "
                f"step_coefficients {coefficients.shape} (expected (N,), (N+1,), (N, K) with N >= 1)"
            )
        unipc_width = 7 <= k <= 11 and k % 2 == 1
        sampler = self.sampler
        if sampler is None:
            if k != 1 and not unipc_width:
                raise ValueError(
                    f"step_coefficients width {k} is neither Euler (1) nor UniPC (5 + 2*order, order 1..3)"
                )
            sampler = "euler" if k == 1 else "unipc"
        widths = {"euler": k == 1, "unipc": unipc_width, "lcm": k == 3, "dmd": k == 3}
        if sampler not in widths:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(widths)}")
        if not widths[sampler]:
            raise ValueError(
                f"step_coefficients width {k} does not fit sampler {sampler!r} "
                "(euler: 1, unipc: 5 + 2*order, lcm/dmd: 3)"
            )
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "step_coefficients", coefficients)

    @property
    def kind(self) -> str:
        """The sampler these coefficients are for: "euler", "unipc", "lcm" or "dmd"."""
        assert self.sampler is not None
        return self.sampler

    @property
    def stochastic(self) -> bool:
        """Whether steps draw fresh noise (LCM, DMD)."""
        return self.kind in ("lcm", "dmd")

    def needs_noise(self, i: int) -> bool:
        """Whether step i takes fresh noise: a stochastic sampler's step to a sigma above 0."""
        return self.stochastic and bool(self.sigmas[i + 1] > 0)

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def solver_order(self) -> int:
        """UniPC's order S (1 for Euler)."""
        return max(1, (self.step_coefficients.shape[1] - 5) // 2)

    def _key(self) -> tuple[str | None, bytes, bytes, bytes, tuple[int, ...]]:
        return (
            self.sampler,
            self.timesteps.tobytes(),
            self.sigmas.tobytes(),
            self.step_coefficients.tobytes(),
            self.step_coefficients.shape,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


@dataclass
class SolverState:
    """One trajectory's solver memory, advanced by ``step``.

    step_index: the step to run next.
    last_sample: UniPC's corrected sample xc_{i-1}, which the next corrector starts from.
    x0_history: UniPC's x0 predictions (d_{i-1}, d_{i-2}, ...), newest first, at most ``solver_order``.
    """

    step_index: int = 0
    last_sample: Tensor | None = None
    x0_history: tuple[Tensor, ...] = ()

    def select(self, keep: list[int]) -> SolverState:
        """The memory of the batch rows ``keep`` only (a sample dropped mid-trajectory)."""
        return SolverState(
            step_index=self.step_index,
            last_sample=None if self.last_sample is None else self.last_sample[keep],
            x0_history=tuple(x[keep] for x in self.x0_history),
        )


def renoise_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """LCM / DMD step weights (N, 3) float32 from the sigmas (N+1,) float32: per step
    [sigma_i, 1 - sigma_{i+1}, sigma_{i+1}], each worked out in float32 as the references do."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    return np.stack([sigmas[:-1], np.float32(1.0) - sigmas[1:], sigmas[1:]], axis=1)


def renoise(schedule: Schedule, i: int, model_output: Tensor, sample: Tensor, noise: Tensor | None) -> Tensor:
    """Predict x0 from the velocity and noise it again to the next sigma, in float32:
    ``d = x - sigma_i * v``; ``(1 - sigma_{i+1}) * d + sigma_{i+1} * noise``, or ``d`` at the last step.

    model_output, sample, noise: (B, ...) alike; returns float32 (B, ...)."""
    sigma, keep, add = coefficient_row(schedule, i)
    x0 = sample.to(torch.float32) - sigma * model_output
    if noise is None:
        if schedule.needs_noise(i):
            raise ValueError(f"step {i} of a {schedule.kind} schedule needs fresh noise (sigma_next > 0)")
        return x0
    if noise.shape != sample.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(sample.shape)}")
    return keep * x0 + add * noise.to(torch.float32)


def coefficient_row(schedule: Schedule, i: int) -> tuple[Tensor, ...]:
    """Step i's coefficients as 0-dim float32 CPU tensors.

    CPU scalars, like the reference's sigmas: they enter CUDA kernels as scalars (no copy, no sync)
    and follow the same type promotion as diffusers (a bf16 tensor times one of them stays bf16).
    """
    return torch.from_numpy(schedule.step_coefficients[i].copy()).unbind()
