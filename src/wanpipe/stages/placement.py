"""Where the stages' modules run: the compute device and dtype, model offload, and rank 0 of a
parallel run (which alone runs the text and image encoders and broadcasts their outputs)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from wanpipe.runtime.offload import ModelOffload

if TYPE_CHECKING:
    from wanpipe.parallel.mesh import ParallelMesh


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""The dtype names ``--dtype`` and ``from_pretrained(dtype=)`` take."""


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, fp32 elsewhere; strings as in ``DTYPES``."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}") from None


@dataclass
class Placement:
    """``device``/``dtype``: where and in what the DiT runs (encoders hand their outputs over in it);
    ``offload``: model offload (``--offload model``), each module on the device only while it runs;
    ``mesh``: the parallel mesh, or None for one process."""

    device: torch.device
    dtype: torch.dtype
    offload: ModelOffload | None = None
    mesh: ParallelMesh | None = None

    @contextlib.contextmanager
    def on_device(self, module: nn.Module | None) -> Iterator[None]:
        """With model offload, ``module`` is on the device only inside this block."""
        if self.offload is None or module is None:
            yield
            return
        with self.offload.use(module):
            yield

    @property
    def rank0_encodes(self) -> bool:
        """True when a mesh is set in a world of more than one rank: rank 0 alone runs the encoders
        and broadcasts their outputs (:meth:`from_rank0`)."""
        if self.mesh is None:
            return False
        from wanpipe.parallel.mesh import world_size

        return world_size() > 1

    def from_rank0(self, compute: Callable[[], torch.Tensor], ndim: int) -> torch.Tensor:
        """``compute()``, run on rank 0 alone and broadcast to every rank when :attr:`rank0_encodes`
        (a collective: every rank calls it), else simply run. The result is on ``device`` in ``dtype``:
        its shape goes first, then its values, as device tensors (what NCCL needs)."""
        if not self.rank0_encodes:
            return compute()
        import torch.distributed as dist

        first = dist.get_rank() == 0
        tensor = compute() if first else None
        shape = torch.zeros(ndim, dtype=torch.int64, device=self.device)
        if first:
            assert tensor is not None and tensor.dim() == ndim
            shape.copy_(torch.tensor(tensor.shape, dtype=torch.int64))
        dist.broadcast(shape, src=0)
        if first:
            out = tensor.to(self.device, self.dtype).contiguous()  # type: ignore[union-attr]
        else:
            out = torch.empty(tuple(shape.tolist()), dtype=self.dtype, device=self.device)
        dist.broadcast(out, src=0)
        return out
