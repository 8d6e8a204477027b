"""Sequence and CFG parallelism (``wanpipe.parallel``) against single-process computation.

In-process: the mesh config and its errors, the attention building blocks, shards and RoPE slices,
and the whole parallel forward in a world of one. Then gloo worlds of 2 and 4 spawned processes run
every check of ``tests.parallel_workers.plan`` (Ulysses, ring, USP and CFG parallel; attention on
random q/k/v with sequence lengths that the degree divides and does not; a full tiny DiT forward) once
per world; each check below reads its result: max abs diff 1e-5 (attention) / 1e-4 (DiT) in fp32.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tests import parallel_workers as workers
from wanpipe.models import transformer as transformer_module
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.parallel import (
    ParallelConfig,
    ParallelMesh,
    SequenceShard,
    attention_with_lse,
    merge_attention,
    parallel_forward,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from wanpipe.parallel import attention as attention_module

ATTENTION_TOL = 1e-5
DIT_TOL = 1e-4


def _qkv(heads: int = 3, lq: int = 11, lk: int = 11, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, heads, lq, 8, generator=gen),
        torch.randn(2, heads, lk, 8, generator=gen),
        torch.randn(2, heads, lk, 8, generator=gen),
    )


# --------------------------------------------------------------------------------------------
# In one process
# --------------------------------------------------------------------------------------------


def test_config_validation_messages() -> None:
    ParallelConfig(ulysses=4, ring=2).validate(8, num_heads=40)
    ParallelConfig(ulysses=2, ring=2, cfg_parallel=True).validate(8, num_heads=12)
    with pytest.raises(ValueError, match=r"U x R \(x 2 with --cfg-parallel\) must equal the world size 8"):
        ParallelConfig(ulysses=2, ring=2).validate(8)
    with pytest.raises(ValueError, match=r"must equal the world size 4: --ulysses 4 x --ring 1 x 2"):
        ParallelConfig(ulysses=4, cfg_parallel=True).validate(4)
    with pytest.raises(ValueError, match=r"pure Ulysses needs heads % U == 0: 12 heads, U=8 -> use --ring"):
        ParallelConfig(ulysses=8).validate(8, num_heads=12)
    with pytest.raises(ValueError, match=r"--ulysses 4 --ring 2"):
        ParallelConfig(ulysses=8).validate(8, num_heads=12)
    with pytest.raises(ValueError, match=r"heads % U == 0: 12 heads, U=8"):
        ParallelConfig(ulysses=8, ring=2).validate(16, num_heads=12)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--ulysses must be a positive integer"):
            ParallelConfig(ulysses=bad)  # type: ignore[arg-type]
    assert ParallelConfig.for_world(8, 12) == ParallelConfig(ulysses=4, ring=2)
    assert ParallelConfig.for_world(8, 40, cfg_parallel=True) == ParallelConfig(4, 1, True)
    assert ParallelConfig(2, 3, True).mesh_shape == (2, 3, 2)


def test_single_process_mesh() -> None:
    mesh = ParallelMesh.build(ParallelConfig(), num_heads=12)
    assert mesh.device_mesh is None and mesh.ring_group is None and mesh.sequence_rank == 0 and mesh.is_first
    with pytest.raises(ValueError, match="must equal the world size 1"):
        ParallelMesh.build(ParallelConfig(ring=2))


def test_degree_one_is_plain_sdpa() -> None:
    q, k, v = _qkv()
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(ulysses_attention(q, k, v), expected)
    assert torch.equal(ring_attention(q, k, v), expected)
    assert torch.equal(usp_attention(q, k, v), expected)
    # seq_len drops padded keys.
    assert torch.equal(
        usp_attention(q, k, v, seq_len=7), F.scaled_dot_product_attention(q, k[:, :, :7], v[:, :, :7])
    )


@pytest.mark.parametrize("chunked", [False, True])
def test_lse_blocks_merge_to_full_attention(monkeypatch: pytest.MonkeyPatch, chunked: bool) -> None:
    if chunked:  # force several query chunks per block
        monkeypatch.setattr(attention_module, "MAX_SCORE_ELEMENTS", 64)
    q, k, v = _qkv(heads=3, lq=9, lk=13)
    out, lse = attention_with_lse(q, k, v)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() < ATTENTION_TOL
    assert (lse - (q @ k.transpose(-1, -2) / 8**0.5).logsumexp(-1, keepdim=True)).abs().max() < ATTENTION_TOL
    merged = None
    for ks, vs in zip(k.split(5, dim=2), v.split(5, dim=2)):
        block = attention_with_lse(q, ks, vs)
        merged = block if merged is None else merge_attention(*merged, *block)
    assert (merged[0] - F.scaled_dot_product_attention(q, k, v)).abs().max() < ATTENTION_TOL


@pytest.mark.parametrize("length, degree", [(12, 4), (45, 4), (3, 4), (5, 2), (7, 1)])
def test_shards_and_rope_slices(length: int, degree: int) -> None:
    model = WanTransformerModel(TransformerConfig.from_dict({**workers.DIT_T2V, "rope_max_seq_len": 64}))
    cos, sin = model.compute_rope(1, 1, length)
    x = torch.randn(2, length, 5)
    shards = [SequenceShard(length, degree, r) for r in range(degree)]
    assert all(s.local_length * degree == s.padded_length >= length for s in shards)
    assert sum(s.valid_length for s in shards) == length
    assert torch.equal(torch.cat([s.shard(x, 1) for s in shards], 1)[:, :length], x)
    for s in shards:
        rows = slice(s.start, s.start + s.valid_length)
        c, si = s.shard_rope((cos, sin))
        assert c.shape == (s.local_length, cos.shape[1])
        assert torch.equal(c[: s.valid_length], cos[rows]) and torch.equal(si[: s.valid_length], sin[rows])
        assert torch.equal(s.shard(x, -2)[:, : s.valid_length], x[:, rows])
    with pytest.raises(ValueError, match="expected"):
        shards[0].shard(x[:, 1:], 1)


def test_parallel_forward_in_one_process_equals_forward() -> None:
    """The hooks, the shard/gather path and the head's per-token unpatchify in a world of one."""
    mesh = ParallelMesh.build(ParallelConfig())
    for name in ("t2v", "i2v", "vace"):
        model, inputs, expected = workers._dit_case(name)
        with torch.inference_mode():
            out = parallel_forward(mesh, model, *inputs)
        assert (out - expected).abs().max() < DIT_TOL


def test_self_attention_hook_reaches_self_attention_only() -> None:
    """``WanBlock.forward(..., self_attention=fn)`` sends self-attention (and only it) to ``fn``."""
    model, inputs, expected = workers._dit_case("i2v")
    seen: list[int] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.append(q.shape[2])
        return transformer_module.attention(q, k, v)

    with torch.inference_mode():
        x = model.embed(*inputs)
        hidden = x.hidden
        for block in model.blocks:
            hidden = block(hidden, x.context, x.modulation, x.rope, x.num_image_tokens, self_attention=spy)
        out = model.head(hidden, x.temb, x.grid)
        # Only self-attention (16 tokens attend 16), never the text/image cross-attention.
        assert len(seen) == len(model.blocks) and set(seen) == {16}
        assert (out - expected).abs().max() < DIT_TOL
        # The default is plain attention: the model's own forward never calls the spy.
        seen.clear()
        model(*inputs)
        assert not seen


# --------------------------------------------------------------------------------------------
# gloo worlds of 2 and 4 processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worlds() -> dict[int, dict[str, object]]:
    return {}


def _result(worlds: dict[int, dict[str, object]], world: int, name: str) -> object:
    if world not in worlds:
        worlds[world] = workers.run_world(world)
    results = worlds[world]
    assert name in results, f"{name} did not run: {sorted(results)[:5]}..."
    return results[name]


CHECKS = [(world, check) for world in (2, 4) for check in workers.plan(world)]


@pytest.mark.parametrize("world, check", CHECKS, ids=[f"{w}proc-{c.name}" for w, c in CHECKS])
def test_multi_process(worlds: dict[int, dict[str, object]], world: int, check: workers.Check) -> None:
    result = _result(worlds, world, check.name)
    if check.kind == "error":
        expected = {
            "error/world-size": r"U x R \(x 2 with --cfg-parallel\) must equal the world size 2: --ulysses 4",
            "error/heads": r"pure Ulysses needs heads % U == 0: 3 heads, U=2 -> use --ring",
        }[check.name]
        assert isinstance(result, str)
        assert re.search(expected, result), result
        return
    assert isinstance(result, float)
    tol = DIT_TOL if check.kind == "dit" else ATTENTION_TOL
    assert result <= tol, f"{check.name}: max abs diff {result:.3g} > {tol}"
