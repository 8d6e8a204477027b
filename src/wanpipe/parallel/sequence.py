"""Cutting the token sequence into per-rank shards and putting it back together.

A sequence of L tokens is zero-padded at its end to ``padded_length``, the next multiple of the
sequence degree N = U x R, and cut into N equal shards; shard ``i`` lives on sequence rank ``i``.
Padding never changes a real token's result: everything in a DiT block but self-attention works
token by token, and the sequence-parallel attentions (``parallel.attention``) are told the true
length and drop the padded keys (no mask: the key blocks are cut short). The padded rows are
removed when the shards are gathered. Wan's usual sizes need no padding (480p x 81 frames:
21 x 30 x 52 = 32,760 tokens = 8 x 4,095; 720p: 21 x 45 x 80 = 75,600 = 8 x 9,450).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from wanpipe.parallel.mesh import ParallelMesh, group_size


@dataclass(frozen=True)
class SequenceShard:
    """Shard ``rank`` of ``degree`` of a ``length``-token sequence."""

    length: int
    degree: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.length < 1 or self.degree < 1 or not 0 <= self.rank < self.degree:
            raise ValueError(f"bad sequence shard {self}")

    @classmethod
    def of(cls, mesh: ParallelMesh, length: int) -> SequenceShard:
        """This rank's shard of a ``length``-token sequence under ``mesh``."""
        return cls(length, mesh.sequence_degree, mesh.sequence_rank)

    @property
    def local_length(self) -> int:
        """Tokens per shard (padding included): ceil(L / N)."""
        return -(-self.length // self.degree)

    @property
    def padded_length(self) -> int:
        return self.local_length * self.degree

    @property
    def start(self) -> int:
        """Position of this shard's first token in the (padded) sequence."""
        return self.rank * self.local_length

    @property
    def valid_length(self) -> int:
        """Real (non-padding) tokens in this shard."""
        return max(0, min(self.local_length, self.length - self.start))

    def pad(self, x: Tensor, dim: int = 1) -> Tensor:
        """Zero-pad ``x`` (length L on ``dim``) to ``padded_length``."""
        if x.shape[dim] != self.length:
            raise ValueError(f"expected {self.length} tokens on dim {dim}, got shape {tuple(x.shape)}")
        extra = self.padded_length - self.length
        if not extra:
            return x
        dim = dim % x.ndim
        return F.pad(x, (0, 0) * (x.ndim - 1 - dim) + (0, extra))

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's ``local_length`` tokens of ``x`` (length L on ``dim``), zero-padded."""
        return self.pad(x, dim).narrow(dim, self.start, self.local_length)

    def shard_rope(self, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """RoPE tables cos, sin (L, head_dim/2) -> this shard's rows (local_length, head_dim/2)."""
        cos, sin = rope
        return self.shard(cos, 0).contiguous(), self.shard(sin, 0).contiguous()


def all_gather_along(x: Tensor, dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate equal-shaped ``x`` of every rank of ``group`` along ``dim``, in group-rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def gather_sequence(x: Tensor, mesh: ParallelMesh, length: int, dim: int = 1) -> Tensor:
    """Every rank's shard (``local_length`` on ``dim``) -> the whole sequence of ``length`` tokens,
    padding removed, on every rank of the sequence group (Ulysses gather, then ring gather)."""
    x = all_gather_along(x, dim, mesh.ulysses_group)
    x = all_gather_along(x, dim, mesh.ring_group)
    if x.shape[dim] < length:
        raise ValueError(f"gathered {x.shape[dim]} tokens on dim {dim}, expected at least {length}")
    return x.narrow(dim, 0, length)
