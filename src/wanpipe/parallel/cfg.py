"""CFG parallelism: the conditional and unconditional halves of the guidance batch on the two halves
of the "cfg" mesh dim, and one all-gather of the predictions per step.

The executor runs guidance as one batch ``cat([cond, uncond])`` of 2B rows; with ``--cfg-parallel``
cfg rank 0 runs rows [0, B) and cfg rank 1 rows [B, 2B), and the gather puts them back in that order,
so guidance is computed exactly as in one process. Any batch whose size the cfg degree divides is
split the same way; one it does not divide (a batch of one without guidance) runs whole on both
halves, which is correct, only redundant.
"""

from __future__ import annotations

from torch import Tensor

from wanpipe.parallel.mesh import ParallelMesh
from wanpipe.parallel.sequence import all_gather_along


def cfg_splits(batch: int, mesh: ParallelMesh) -> bool:
    """Whether a batch of ``batch`` rows is split across the cfg dim."""
    degree = mesh.config.cfg_degree
    return degree > 1 and batch % degree == 0


def split_cfg_batch(x: Tensor | None, mesh: ParallelMesh) -> Tensor | None:
    """(2B, ...) -> this cfg rank's rows (B, ...); unchanged without CFG parallelism or for None."""
    if x is None or not cfg_splits(x.shape[0], mesh):
        return x
    return x.chunk(mesh.config.cfg_degree)[mesh.cfg_rank]


def gather_cfg_batch(x: Tensor, mesh: ParallelMesh, batch: int) -> Tensor:
    """This cfg rank's rows (B, ...) -> all rows (2B, ...) on every rank: the inverse of
    :func:`split_cfg_batch` for a batch of ``batch`` rows (one all-gather)."""
    if not cfg_splits(batch, mesh):
        return x
    return all_gather_along(x, 0, mesh.cfg_group)
