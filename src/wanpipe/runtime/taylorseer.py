"""TaylorSeer: predict the DiT's output at a skipped step from a Taylor series in the step index
(Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers", 2025).

This is the form Modular MAX ships and diffusers calls *lite mode* (``TaylorSeerCacheConfig(
use_lite_mode=True)``): the whole transformer output is predicted, so a skipped step runs nothing of
the DiT (no embedding, no block, no head). diffusers' lite mode predicts the output of ``proj_out``
(the head's last layer, before the patches are folded back into a video: the same numbers) and makes
the blocks return zeros.

At every fully computed step the output becomes factor 0 and the divided differences against the
previous update's factors the higher ones, up to ``max_order``::

    F0 = y(s),  F(k+1) = (Fk(s) - Fk(s_prev)) / (s - s_prev)
    y(s + d) ~ sum_k Fk * d**k / k!

Which steps run (diffusers' rule, per guidance stream, counting this expert's steps from 0): the first
``disable_cache_before_step`` steps, then every ``cache_interval``-th step (steps with
``(s - disable_cache_before_step - 1) % cache_interval == 0``), and every step from
``disable_cache_after_step`` on. A step with nothing to predict from runs (diffusers raises there).
The decision reads nothing from the device. Factors are kept in float32 (diffusers' default is
bfloat16; the tensor is one output-sized tensor per order, small next to the DiT).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from wanpipe.runtime.step_cache import StepCache


class TaylorSeerCache(StepCache):
    """Per stream: the step counter of the current expert, the step of the last update, the Taylor
    factors (each shaped like the stream's output rows, float32) and the output dtype."""

    kind = "taylorseer"

    def __init__(
        self,
        cache_interval: int = 5,
        disable_cache_before_step: int = 3,
        disable_cache_after_step: int | None = None,
        max_order: int = 1,
    ) -> None:
        super().__init__(0.0)
        if cache_interval < 1 or disable_cache_before_step < 1 or max_order < 0:
            raise ValueError(
                "TaylorSeer needs cache_interval >= 1, disable_cache_before_step >= 1 and max_order >= 0, "
                f"got {cache_interval}, {disable_cache_before_step}, {max_order}"
            )
        if disable_cache_after_step is not None and disable_cache_after_step < 0:
            raise ValueError(f"disable_cache_after_step must be >= 0, got {disable_cache_after_step}")
        self.cache_interval = cache_interval
        self.disable_cache_before_step = disable_cache_before_step
        self.disable_cache_after_step = disable_cache_after_step
        self.max_order = max_order
        self.counters: dict[str, int] = {}
        self.last_update: dict[str, int] = {}
        self.factors: dict[str, list[Tensor]] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def _reset_indicator(self) -> None:
        self.counters.clear()
        self.last_update.clear()
        self.factors.clear()
        self.dtypes.clear()

    def select(self, keep: list[int]) -> None:
        super().select(keep)
        for stream, factors in self.factors.items():
            self.factors[stream] = [f[keep] for f in factors]

    def should_compute(self, stream: str) -> bool:
        """Advance ``stream``'s step counter; whether this step runs the DiT (else :meth:`predict`)."""
        step = self.counters.get(stream, -1) + 1
        self.counters[stream] = step
        before, after = self.disable_cache_before_step, self.disable_cache_after_step
        return (
            step < before
            or (step - before - 1) % self.cache_interval == 0
            or (after is not None and step >= after)
            or stream not in self.factors
        )

    def update(self, stream: str, output: Tensor) -> None:
        """A computed step's output (rows of ``stream``, any shape) -> the new factors."""
        step = self.counters[stream]
        new = [output.float()]
        previous = self.factors.get(stream)
        if previous is not None:
            delta = step - self.last_update[stream]
            for order in range(self.max_order):
                if order >= len(previous) or previous[order].shape != new[order].shape:
                    break
                new.append((new[order] - previous[order]) / delta)
        self.factors[stream] = new
        self.last_update[stream] = step
        self.dtypes[stream] = output.dtype

    def predict(self, stream: str) -> Tensor:
        """The Taylor prediction of ``stream``'s output at its current step, in the output's dtype."""
        factors = self.factors[stream]
        offset = self.counters[stream] - self.last_update[stream]
        out = torch.zeros_like(factors[0])
        for order, factor in enumerate(factors):
            out = out + factor * (offset**order / math.factorial(order))
        self._count(stream)
        return out.to(self.dtypes[stream])
