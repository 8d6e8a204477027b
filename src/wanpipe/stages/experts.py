"""Which DiT runs a step: one model, or Wan 2.2's high- and low-noise experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from wanpipe.models.transformer import WanTransformerModel
from wanpipe.runtime.offload import ModelOffload


class Experts:
    """One model; or Wan 2.2's high- and low-noise experts, either both resident or one set of
    modules whose weights are swapped in place (``reload_model_weights``) while the other expert's
    weights wait memory-mapped or in host memory.

    With model offload (``offload``, set by the executor) the expert in use is on the device and the
    other in host memory; :meth:`release` sends the last one back after the loop."""

    def __init__(
        self,
        high: WanTransformerModel,
        low: WanTransformerModel | None = None,
        *,
        swap_states: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        if low is not None and swap_states is not None:
            raise ValueError("experts are either both resident or swapped, not both")
        if swap_states is not None and set(swap_states) != {"high", "low"}:
            raise ValueError("swap_states needs the 'high' and 'low' state dicts")
        self.high = high
        self.low = low
        self.swap_states = swap_states
        self.active = "high"
        self.swaps = 0
        self.offload: ModelOffload | None = None
        self._on_device: WanTransformerModel | None = None

    @property
    def two(self) -> bool:
        return self.low is not None or self.swap_states is not None

    @property
    def mode(self) -> str:
        return "single" if not self.two else ("swap" if self.swap_states is not None else "resident")

    @property
    def models(self) -> list[WanTransformerModel]:
        """The resident DiT modules (one, or both experts when resident)."""
        return [m for m in (self.high, self.low) if m is not None]

    @staticmethod
    def plan(timesteps: Sequence[float] | np.ndarray, boundary: float | None) -> list[str]:
        """Which expert runs each step, known up front (no device-to-host read in the loop): the
        high-noise one while t >= ``boundary``, then the low-noise one; "high" throughout without one."""
        return ["high" if boundary is None or float(t) >= boundary else "low" for t in np.asarray(timesteps)]

    def get(self, which: str) -> WanTransformerModel:
        """The DiT for ``which`` ("high"/"low"; a single model answers both), weights swapped in and,
        with model offload, on the device."""
        if which == "high" or not self.two:
            which = "high"
        if self.swap_states is None:
            dit = self.high if which == "high" else self.low
            assert dit is not None
        else:
            if which != self.active:
                self.high.reload_model_weights(self.swap_states[which])
                self.active = which
                self.swaps += 1
            dit = self.high
        if self.offload is not None and dit is not self._on_device:
            self.release()
            dit.to(self.offload.device)
            self._on_device = dit
        return dit

    def release(self) -> None:
        """Model offload: the DiT on the device goes back to host memory."""
        if self.offload is not None and self._on_device is not None:
            self._on_device.to(self.offload.storage)
        self._on_device = None
