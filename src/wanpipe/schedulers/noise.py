"""StepNoise: the fresh noise of stochastic samplers (LCM, DMD), one seeded generator per batch row.

A request's noise is one stream: ``torch.Generator("cpu").manual_seed(seed)`` draws the initial
latents (as diffusers does for ``generator=torch.Generator("cpu").manual_seed(seed)``), then each
step's noise in order, each draw (C, f, h, w) float32. So a seed gives one video whatever the batch it
runs in. The tokenizer records the generator's state after the initial draw (``WanContext.noise_state``);
this object resumes from those states.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def seeded_generator(seed: int) -> torch.Generator:
    """The request's CPU generator, seeded as diffusers' ``torch.Generator("cpu").manual_seed(seed)``."""
    return torch.Generator("cpu").manual_seed(seed)


def generator_state(generator: torch.Generator) -> np.ndarray:
    """A CPU generator's state as a uint8 array (to resume it later with :class:`StepNoise`)."""
    return generator.get_state().numpy().copy()


class StepNoise:
    """Per-row generators resumed from recorded states; :meth:`draw` gives one step's noise."""

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device | str = "cpu"):
        self.generators = list(generators)
        self.device = torch.device(device)

    @classmethod
    def from_states(cls, states: Sequence[np.ndarray], device: torch.device | str = "cpu") -> StepNoise:
        """Generators resumed from the uint8 states of :func:`generator_state`, one per batch row."""
        generators = []
        for state in states:
            g = torch.Generator("cpu")
            g.set_state(torch.from_numpy(np.ascontiguousarray(state, dtype=np.uint8)))
            generators.append(g)
        return cls(generators, device)

    def draw(self, shape: Sequence[int]) -> Tensor:
        """The next noise of every row: (B, *shape) float32 on the device, row b from generator b.

        Drawn on the host (as diffusers does with a CPU generator); to a CUDA device it goes from pinned
        memory without waiting for the device (no host sync in the loop)."""
        noise = torch.stack(
            [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        )
        if self.device.type == "cuda":
            return noise.pin_memory().to(self.device, non_blocking=True)
        return noise.to(self.device)

    def select(self, keep: Sequence[int]) -> StepNoise:
        """Only the rows ``keep`` (a row cancelled mid-batch); the kept generators go on where they were."""
        return StepNoise([self.generators[j] for j in keep], self.device)
