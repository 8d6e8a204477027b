"""Opt-in step skipping for the DiT (approximations, off by default): the base :class:`StepCache`,
First-Block-Cache and TeaCache here; TaylorSeer (:mod:`~wanpipe.runtime.taylorseer`) and MagCache
(:mod:`~wanpipe.runtime.magcache`) beside them; one way to name and configure any of them
(:mod:`~wanpipe.runtime.cache_options`).

Every cache keeps its state per guidance stream ("cond", "uncond") and per expert: when Wan 2.2's
other expert takes over (:meth:`StepCache.bind`), every residual, indicator and Taylor factor is
dropped, so nothing computed by one expert is reused by the other. A row cancelled mid-batch is cut
from every per-row tensor (:meth:`StepCache.select`).

First-Block-Cache and TeaCache reuse a cached *residual* (what the blocks added to the hidden state at
the last fully computed step) instead of running the blocks, when an indicator says the step's input
barely changed:

- :class:`FirstBlockCache`: run the first block; if its residual changed less than ``threshold``
  (mean absolute change over mean absolute value) since the last full step, skip the other blocks and
  add the cached residual of the rest. Decided separately for the conditional and the unconditional
  stream: a stream that can skip skips, the other runs alone.
- :class:`TeaCache`: the relative change of the timestep embedding, rescaled by the published Wan
  polynomial (TeaCache4Wan2.1), is accumulated over steps; while the sum stays under ``threshold``
  the whole block stack is skipped (both streams: they share the timestep). The first and the last
  step always run.

A threshold of 0 never skips. Deciding reads one number per step back to the host (a sync): the cache
paths trade that for the skipped work. Quality on real weights was not measured in this repository.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from wanpipe.models.transformer_layers import TransformerConfig

logger = logging.getLogger(__name__)

# TeaCache4Wan2.1 (teacache_generate.py, the mode that rescales the timestep embedding's change),
# np.poly1d order (highest degree first).
TEACACHE_WAN_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "t2v-1.3B": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    "t2v-14B": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "i2v-14B-480P": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    "i2v-14B-720P": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


def teacache_variant(dit: TransformerConfig, *, two_experts: bool, per_token_timesteps: bool) -> str:
    """The published TeaCache4Wan2.1 set that fits a DiT: "t2v-1.3B", "t2v-14B" or "i2v-14B" (whose
    480P or 720P coefficients :func:`teacache_coefficients` picks by the latent size). ValueError for a
    model with none published (Wan 2.2 A14B, TI2V-5B, FLF2V, other widths such as tiny test models):
    give ``RuntimeOptions.teacache_coefficients`` (``--teacache-coefficients``) or use First-Block-Cache."""
    if two_experts or per_token_timesteps or dit.pos_embed_seq_len is not None or dit.dim not in (1536, 5120):
        model = (
            "Wan 2.2 A14B"
            if two_experts
            else "TI2V-5B"
            if per_token_timesteps
            else "FLF2V"
            if dit.pos_embed_seq_len is not None
            else f"a DiT of width {dit.dim}"
        )
        raise ValueError(
            f"TeaCache has no published coefficients for {model} (TeaCache4Wan2.1 covers Wan 2.1 T2V 1.3B/14B "
            "and I2V 14B 480P/720P): give --teacache-coefficients (highest degree first) or use --cache first-block"
        )
    if dit.dim == 1536:
        return "t2v-1.3B"
    return "i2v-14B" if dit.in_channels != dit.out_channels else "t2v-14B"


def teacache_coefficients(
    variant: str, latent_size: tuple[int, int], patch: tuple[int, int, int]
) -> tuple[float, ...]:
    """The coefficients of a :func:`teacache_variant` at a latent frame of ``latent_size`` (h, w): I2V
    takes the 480P set up to 480x832 pixels' worth of tokens, the 720P set above."""
    if variant != "i2v-14B":
        return TEACACHE_WAN_COEFFICIENTS[variant]
    area = (latent_size[0] // patch[1]) * (latent_size[1] // patch[2])
    return TEACACHE_WAN_COEFFICIENTS["i2v-14B-480P" if area <= 60 * 104 // 4 else "i2v-14B-720P"]


def _relative_l1(new: Tensor, old: Tensor) -> float:
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


@dataclass
class CacheStats:
    """How many (stream, step) DiT runs were skipped, of how many steps."""

    skipped: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    skipped_at: dict[str, list[int]] = field(default_factory=dict)
    """The steps (of the schedule) each stream skipped, in order."""
    step: int = 0
    """The step being run (set by the runner)."""

    @property
    def skipped_steps(self) -> int:
        """Steps where the conditional stream skipped its blocks."""
        return self.skipped.get("cond", 0)

    @property
    def computed_steps(self) -> int:
        """Steps where the conditional stream ran its blocks."""
        return self.steps - self.skipped_steps

    @property
    def skipped_uncond_steps(self) -> int:
        """Steps where the unconditional stream (guidance) skipped its blocks."""
        return self.skipped.get("uncond", 0)


class StepCache:
    """Base: per-stream cached residuals, reset when the model (the expert) changes.

    The denoising loop calls :meth:`start` with the expert of every step before the first, the runner
    :meth:`bind` at every forward, and the loop :meth:`finish` after the last step."""

    kind = "none"

    def __init__(self, threshold: float) -> None:
        if threshold < 0:
            raise ValueError(f"residual_threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.stats = CacheStats()
        self.residuals: dict[str, Tensor] = {}
        self.owner: object = None

    def start(self, experts: list[str]) -> None:
        """Before the first step: which expert runs each step (Wan 2.2: "high"..., then "low"...)."""

    def finish(self) -> None:
        """After the last step (MagCache's calibration writes its ratios here)."""

    def bind(self, owner: object) -> None:
        """Forget every cached tensor and indicator when another model takes over: ``owner`` is the
        expert's name and module (Wan 2.2's two experts may be one set of modules, weights swapped)."""
        if owner is not self.owner and owner != self.owner:
            self.owner = owner
            self.residuals.clear()
            self._reset_indicator()

    def _reset_indicator(self) -> None:
        pass

    def select(self, keep: list[int]) -> None:
        """Keep only the batch rows ``keep`` of every cached per-row tensor (a row cancelled mid-batch)."""
        for tensors in self._per_row():
            for stream, value in tensors.items():
                tensors[stream] = value[keep]

    def _per_row(self) -> list[dict[str, Tensor]]:
        return [self.residuals]

    def _count(self, stream: str) -> None:
        self.stats.skipped[stream] = self.stats.skipped.get(stream, 0) + 1
        self.stats.skipped_at.setdefault(stream, []).append(self.stats.step)


class FirstBlockCache(StepCache):
    kind = "first-block"

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.first_residuals: dict[str, Tensor] = {}

    def _reset_indicator(self) -> None:
        self.first_residuals.clear()

    def _per_row(self) -> list[dict[str, Tensor]]:
        return [self.residuals, self.first_residuals]

    def can_skip(self, stream: str, first_residual: Tensor) -> bool:
        """Whether ``stream`` may reuse its cached residual, given its first block's residual now."""
        prev = self.first_residuals.get(stream)
        if self.threshold <= 0 or prev is None or stream not in self.residuals:
            return False
        return _relative_l1(first_residual, prev) < self.threshold

    def store(self, stream: str, first_residual: Tensor, rest_residual: Tensor) -> None:
        self.first_residuals[stream] = first_residual
        self.residuals[stream] = rest_residual


class TeaCache(StepCache):
    kind = "teacache"

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        super().__init__(threshold)
        if not coefficients:
            raise ValueError("TeaCache needs at least one coefficient")
        self.coefficients = tuple(float(c) for c in coefficients)
        self.accumulated = 0.0
        self.previous: Tensor | None = None

    def _reset_indicator(self) -> None:
        self.accumulated = 0.0
        self.previous = None

    def select(self, keep: list[int]) -> None:
        super().select(keep)
        if self.previous is not None:
            self.previous = self.previous[keep]

    def should_compute(self, indicator: Tensor, step: int, num_steps: int) -> bool:
        """Update the accumulated rescaled change of ``indicator`` (the timestep embedding)."""
        previous, self.previous = self.previous, indicator
        if (
            self.threshold <= 0
            or previous is None
            or step == 0
            or step >= num_steps - 1
            or "cond" not in self.residuals
        ):
            self.accumulated = 0.0
            return True
        change = _relative_l1(indicator, previous)
        rescaled = 0.0
        for c in self.coefficients:  # Horner, highest degree first (np.poly1d)
            rescaled = rescaled * change + c
        self.accumulated += rescaled
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True


def make_step_cache(
    kind: str | None, threshold: float | None, coefficients: tuple[float, ...] | None = None
) -> StepCache | None:
    """``kind`` "first-block" or "teacache" -> a cache with ``threshold`` (0 never skips); None, "none"
    or "off" -> None. ``coefficients``: TeaCache's rescaling polynomial (highest degree first; see
    :func:`teacache_variant` and :func:`teacache_coefficients` for the published ones), required for it."""
    if kind in (None, "none", "off"):
        return None
    if kind == "first-block":
        return FirstBlockCache(threshold or 0.0)
    if kind == "teacache":
        if coefficients is None:
            raise ValueError("TeaCache needs its coefficients (see teacache_variant / teacache_coefficients)")
        return TeaCache(threshold or 0.0, coefficients)
    raise ValueError(f"cache must be 'first-block', 'teacache' or None, got {kind!r}")


def rows_of(streams: dict[str, slice], names: list[str]) -> Tensor | slice:
    """The batch rows of the named streams (a slice when they are contiguous)."""
    chosen = sorted((streams[n] for n in names), key=lambda s: s.start)
    if all(a.stop == b.start for a, b in zip(chosen, chosen[1:])):
        return slice(chosen[0].start, chosen[-1].stop)
    return torch.cat([torch.arange(s.start, s.stop) for s in chosen])
