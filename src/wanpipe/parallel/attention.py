"""Sequence-parallel self-attention on token shards.

Every function takes this rank's shards q, k, v of shape (B, H, L_local, D) (the ranks' shards, in
group-rank order, make the padded sequence) and returns this rank's rows of the attention output,
(B, H, L_local, D), as ``F.scaled_dot_product_attention`` on the whole sequence would give them.
``seq_len`` is the true length when the sequence was zero-padded to a multiple of the degree (see
``parallel.sequence``): keys past it are dropped. With a group of one (or ``None``) each function is
plain SDPA.

- :func:`ulysses_attention` (DeepSpeed-Ulysses): one all-to-all turns "all heads, L/U tokens" into
  "H/U heads, all tokens", SDPA runs on whole sequences, a second all-to-all turns it back. Needs
  H % U == 0.
- :func:`ring_attention`: each rank keeps its queries and passes its key/value block around the ring
  (P2P send/recv, overlapped with the block's compute); the partial results are merged with their
  log-sum-exp in float32. Any head count.
- :func:`usp_attention` (USP, as in xDiT and the Wan repositories): Ulysses inside each ring
  rank's group, ring across them.

The ring's block attention is computed explicitly (matmul, softmax statistics, matmul) in float32,
query-chunked so the score matrix stays under ``MAX_SCORE_ELEMENTS``: SDPA does not return the
log-sum-exp on the CPU. A fused kernel that returns it (flash attention on CUDA) can replace
:func:`attention_with_lse` later; the tests pin the result to SDPA's within 1e-5 in float32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from wanpipe.parallel.mesh import group_rank, group_size

MAX_SCORE_ELEMENTS = 1 << 26
"""Upper bound on the float32 score matrix of one ring block (B * H * Lq_chunk * Lk): 256 MiB."""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention and its log-sum-exp, in float32.

    q (B, H, Lq, D), k/v (B, H, Lk, D) with Lk >= 1 -> out (B, H, Lq, D) float32, lse (B, H, Lq, 1) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kt = k.float().transpose(-1, -2)
    v = v.float()
    per_row = max(1, q.shape[0] * q.shape[1] * k.shape[2])
    chunk = max(1, MAX_SCORE_ELEMENTS // per_row)
    outs, lses = [], []
    for qc in q.float().split(chunk, dim=2):
        scores = torch.matmul(qc, kt).mul_(scale)
        peak = scores.amax(dim=-1, keepdim=True)
        probs = scores.sub_(peak).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(probs, v).div_(total))
        lses.append(total.log_().add_(peak))
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps (float32):
    (B, H, L, D), (B, H, L, 1) twice -> the attention over the union, and its log-sum-exp."""
    merged = torch.logaddexp(lse, block_lse)
    return out * (lse - merged).exp() + block_out * (block_lse - merged).exp(), merged


def _valid_keys(seq_len: int | None, block: int, block_len: int) -> int:
    """Real keys in block ``block`` (of ``block_len`` tokens) of a sequence of ``seq_len`` tokens."""
    if seq_len is None:
        return block_len
    return max(0, min(block_len, seq_len - block * block_len))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, seq_len: int | None) -> Tensor:
    """SDPA over whole sequences, dropping the padded keys past ``seq_len``."""
    if seq_len is not None and seq_len < k.shape[2]:
        k, v = k[:, :, :seq_len], v[:, :, :seq_len]
    return F.scaled_dot_product_attention(q, k, v)


def _all_to_all(send: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-to-all: (B, H, L_local, D) on each of U ranks -> (B, H/U, U * L_local, D): the whole
    sequence for this rank's group of H/U heads."""
    size = group_size(group)
    if size == 1:
        return x
    batch, heads, length, dim = x.shape
    if heads % size:
        raise ValueError(f"Ulysses needs heads % U == 0: {heads} heads, U={size} -> use ring attention")
    send = x.reshape(batch, size, heads // size, length, dim).transpose(0, 1).contiguous()
    recv = _all_to_all(send, group)  # (U, B, H/U, L_local, D): recv[j] = rank j's tokens
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, heads // size, size * length, dim)


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The inverse all-to-all: (B, H/U, U * L_local, D) -> (B, H, L_local, D)."""
    size = group_size(group)
    if size == 1:
        return x
    batch, heads, length, dim = x.shape
    send = x.reshape(batch, heads, size, length // size, dim).permute(2, 0, 1, 3, 4).contiguous()
    recv = _all_to_all(send, group)  # (U, B, H/U, L_local, D): recv[j] = head group j
    return recv.transpose(0, 1).reshape(batch, size * heads, length // size, dim)


# --------------------------------------------------------------------------------------------
# The three strategies
# --------------------------------------------------------------------------------------------


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, seq_len: int | None = None
) -> Tensor:
    """Ulysses attention: q, k, v (B, H, L_local, D) shards -> (B, H, L_local, D); H % U == 0."""
    if group_size(group) == 1:
        return _sdpa(q, k, v, seq_len)
    batch = q.shape[0]
    # One all-to-all for q, k and v together (stacked on the batch dim), one for the output.
    qkv = sequence_to_heads(torch.cat([q, k, v]), group)
    q, k, v = qkv.split(batch)
    return heads_to_sequence(_sdpa(q, k, v, seq_len), group)


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, *, seq_len: int | None = None
) -> Tensor:
    """Ring attention: q, k, v (B, H, L_local, D) shards -> (B, H, L_local, D), any head count."""
    size = group_size(group)
    if size == 1:
        return _sdpa(q, k, v, seq_len)
    rank = group_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    block_len = k.shape[2]
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(size):
        pending = []
        if step < size - 1:  # start passing this block on before computing with it
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, kv, send_to, group),
                    dist.P2POp(dist.irecv, incoming, recv_from, group),
                ]
            )
        valid = _valid_keys(seq_len, (rank - step) % size, block_len)
        if valid:
            block_out, block_lse = attention_with_lse(q, kv[0, :, :, :valid], kv[1, :, :, :valid])
            if out is None:
                out, lse = block_out, block_lse
            else:
                out, lse = merge_attention(out, lse, block_out, block_lse)
        for work in pending:
            work.wait()
        if pending:
            kv = incoming
    assert out is not None  # block 0 always holds a real key
    return out.to(q.dtype)


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group: dist.ProcessGroup | None = None,
    ring_group: dist.ProcessGroup | None = None,
    *,
    seq_len: int | None = None,
) -> Tensor:
    """Unified sequence parallelism: Ulysses all-to-all inside ``ulysses_group``, ring attention
    across ``ring_group`` on the gathered blocks. q, k, v (B, H, L_local, D) -> (B, H, L_local, D).

    Sequence rank ``ring_rank * U + ulysses_rank`` must hold shard number ``ring_rank * U +
    ulysses_rank`` (the layout of :class:`~wanpipe.parallel.mesh.ParallelMesh`)."""
    if group_size(ring_group) == 1:
        return ulysses_attention(q, k, v, ulysses_group, seq_len=seq_len)
    if group_size(ulysses_group) == 1:
        return ring_attention(q, k, v, ring_group, seq_len=seq_len)
    batch = q.shape[0]
    qkv = sequence_to_heads(torch.cat([q, k, v]), ulysses_group)
    q, k, v = qkv.split(batch)
    return heads_to_sequence(ring_attention(q, k, v, ring_group, seq_len=seq_len), ulysses_group)
