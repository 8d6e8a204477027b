"""Block-level ``torch.compile`` of the DiT (``--compile``).

One compiled function runs every block (:func:`~wanpipe.models.transformer.call_block`: the block
module is an input of the graph, so the 30 or 40 blocks of a Wan DiT share one artifact); the head is
compiled apart. Shapes are static per request (``dynamic=False``): a new size or frame count compiles
once more. The compiled path computes the same operations as the eager one (tested on tiny
checkpoints). Compile time is reported apart: the runner runs one warm-up forward per new shape and
times it (``Timings.compile_s``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from wanpipe.models.transformer import call_block
from wanpipe.models.transformer_layers import WanHead


def _head_forward(head: WanHead, hidden: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
    return head(hidden, temb, grid)


class CompiledDiT:
    """The compiled block and head functions, shared by every DiT of a pipeline (and both experts)."""

    def __init__(self, mode: str | None = None, backend: str = "inductor", **options: Any) -> None:
        import torch._dynamo

        # Every block is the same code on different weights: allow one entry per block shape and size.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        kw: dict[str, Any] = dict(dynamic=False, backend=backend, **options)
        if mode is not None:
            kw["mode"] = mode
        self.block = torch.compile(call_block, **kw)
        self.head = torch.compile(_head_forward, **kw)
        self.warmed: set[tuple] = set()
