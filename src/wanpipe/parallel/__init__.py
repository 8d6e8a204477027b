"""Multi-GPU inference on torch.distributed: sequence parallelism (Ulysses, ring, USP) and CFG
parallelism over a DeviceMesh ("cfg", "ring", "ulysses"), launched by torchrun. See docs/parallel.md."""

from wanpipe.parallel.attention import (
    attention_with_lse,
    merge_attention,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from wanpipe.parallel.cfg import gather_cfg_batch, split_cfg_batch
from wanpipe.parallel.dit import (
    gather_dit_output,
    parallel_forward,
    shard_attention,
    shard_dit_inputs,
)
from wanpipe.parallel.mesh import ParallelConfig, ParallelMesh, init_distributed
from wanpipe.parallel.sequence import SequenceShard, gather_sequence
from wanpipe.parallel.vae import band_bounds, decode_band, parallel_decode

__all__ = [
    "ParallelConfig",
    "ParallelMesh",
    "SequenceShard",
    "attention_with_lse",
    "band_bounds",
    "decode_band",
    "gather_cfg_batch",
    "gather_dit_output",
    "gather_sequence",
    "init_distributed",
    "merge_attention",
    "parallel_decode",
    "parallel_forward",
    "ring_attention",
    "shard_attention",
    "shard_dit_inputs",
    "split_cfg_batch",
    "ulysses_attention",
    "usp_attention",
]
