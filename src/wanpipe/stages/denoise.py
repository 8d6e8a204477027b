"""The denoising loop. Everything mode-specific was prepared before it (:mod:`~wanpipe.stages.conditioning`,
:mod:`~wanpipe.stages.text`); the loop only steps: the expert known up front, one DiT forward through the
runner (compiled / streamed / cached / parallel, :class:`~wanpipe.runtime.runner.DiTRunner`), guidance
combined, the sampler's step, progress, cancellation."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from wanpipe.context import ContextWindows
from wanpipe.runtime.runner import DiTRunner
from wanpipe.runtime.step_cache import StepCache
from wanpipe.schedulers import Schedule, StepNoise, new_state, step
from wanpipe.stages.conditioning import Conditioning
from wanpipe.stages.experts import Experts
from wanpipe.stages.preview import StepPreview
from wanpipe.stages.text import TextContext
from wanpipe.stages.windows import windowed_forward

StepCallback = Callable[[int, int, float], None]
"""Called after each denoising step with (step index, number of steps, timestep)."""


class CancelledError(RuntimeError):
    """The caller's cancel check asked to stop the denoising loop."""


def guided_steps(num_steps: int, cfg_truncation: float | None) -> int:
    """How many leading steps use guidance: all, unless ``cfg_truncation`` < 1 (that fraction, rounded up)."""
    if cfg_truncation is None or cfg_truncation >= 1.0:
        return num_steps
    return max(0, min(num_steps, math.ceil(cfg_truncation * num_steps - 1e-9)))


@dataclass
class StepPlan:
    """The steps of a batch: the sampler's ``schedule``, its ``timesteps`` (N,) on the device, and which
    expert runs each step (:meth:`~wanpipe.stages.experts.Experts.plan`), all known before the loop."""

    schedule: Schedule
    timesteps: Tensor
    experts: list[str]


@dataclass
class Guidance:
    """Classifier-free guidance of a batch of B rows.

    do_cfg (B, 1, 1, 1, 1) bool: the rows that use it (the others keep their conditional prediction);
    scales: each expert's scale (B, 1, 1, 1, 1) ("high", and "low" for Wan 2.2 A14B's second expert);
    steps: how many leading steps run the unconditional rows (0: none)."""

    do_cfg: Tensor
    scales: dict[str, Tensor]
    steps: int

    def select(self, keep: Sequence[int]) -> Guidance:
        """Only the rows ``keep`` (a row cancelled mid-batch)."""
        return Guidance(self.do_cfg[keep], {k: v[keep] for k, v in self.scales.items()}, self.steps)

    def combine(self, pred: Tensor, batch: int, which: str) -> Tensor:
        """pred (2B, C, f, h, w): conditional rows then unconditional ones -> (B, C, f, h, w)."""
        pred_cond, pred_uncond = pred[:batch], pred[batch:]
        scale = self.scales.get(which, self.scales["high"]).to(pred.dtype)
        guided = pred_uncond + scale * (pred_cond - pred_uncond)
        return torch.where(self.do_cfg, guided, pred_cond)


def denoise(
    runner: DiTRunner,
    experts: Experts,
    plan: StepPlan,
    text: TextContext,
    conditioning: Conditioning,
    guidance: Guidance,
    latents: Tensor,
    *,
    dtype: torch.dtype,
    cache: StepCache | None = None,
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    cancelled_rows: Callable[[], Collection[int]] | None = None,
    noise: StepNoise | None = None,
    windows: ContextWindows | None = None,
    preview: StepPreview | None = None,
) -> tuple[Tensor, list[int]]:
    """Run every step of ``plan`` from the initial ``latents`` (B, C, f, h, w) float32 -> (the denoised
    latents (B', C, f, h, w) after ``conditioning.finish``, the batch rows they are). ``noise``: the
    rows' generators of fresh step noise (LCM, DMD: where ``schedule.needs_noise(i)``); ``windows``: the
    DiT runs per context window (:func:`~wanpipe.stages.windows.windowed_forward`), None: once.
    ``preview``: shown each step's x0 estimate (:mod:`~wanpipe.stages.preview`; it writes into nothing
    the loop holds).

    ``should_cancel()`` True stops the whole batch (CancelledError); ``cancelled_rows()`` names rows
    (indices as given) whose work stops at the next step: they are dropped from every per-row tensor,
    and B' < B. When every row is cancelled, CancelledError."""
    rows = list(range(latents.shape[0]))
    schedule = plan.schedule
    num_steps = schedule.num_inference_steps
    state = new_state()
    if cache is not None:
        cache.start(plan.experts)
    try:
        for i, which in enumerate(plan.experts):
            if should_cancel is not None and should_cancel():
                raise CancelledError("generation cancelled")
            if cancelled_rows is not None and (gone := set(cancelled_rows()).intersection(rows)):
                keep = [j for j, row in enumerate(rows) if row not in gone]
                if not keep:
                    raise CancelledError("every row of the batch was cancelled")
                rows = [rows[j] for j in keep]
                latents, state = latents[keep], state.select(keep)
                text, conditioning, guidance = (
                    text.select(keep),
                    conditioning.select(keep),
                    guidance.select(keep),
                )
                if cache is not None:
                    cache.select(keep)
                if noise is not None:
                    noise = noise.select(keep)
            batch = len(rows)
            # the step's fresh noise (LCM, DMD), drawn before the DiT runs: its copy overlaps the forward
            fresh = noise.draw(latents.shape[1:]) if noise is not None and schedule.needs_noise(i) else None
            guided = i < guidance.steps
            model_input = conditioning.model_input(latents).to(dtype)
            if guided:
                model_input = torch.cat([model_input, model_input])
            context, bias = text.rows(guided)
            streams = {"cond": slice(0, batch)}
            if guided:
                streams["uncond"] = slice(batch, 2 * batch)
            dit = partial(  # the step's one DiT call: on the whole input, or per context window
                runner.forward,
                experts.get(which),
                timestep=conditioning.timestep(plan.timesteps[i], model_input.shape[0]),
                context=context,
                text_bias=bias,
                cache=cache,
                streams=streams,
                step=i,
                num_steps=num_steps,
                expert=which,
                **conditioning.dit_kwargs(guided),
            )
            pred = windowed_forward(windows, i, model_input, dit, text.per_window(guided))
            noise_pred = guidance.combine(pred, batch, which) if guided else pred
            if preview is not None:
                preview(i, rows, latents, noise_pred, float(schedule.sigmas[i]), conditioning.finish)
            latents = step(schedule, state, i, noise_pred, latents, fresh)
            if callback is not None:
                callback(i, num_steps, float(schedule.timesteps[i]))
    finally:
        experts.release()
    if cache is not None:
        cache.finish()
    return conditioning.finish(latents), rows
