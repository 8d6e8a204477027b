"""The parallel layout of a multi-process run: ``ParallelConfig`` (what the user asked for),
``init_distributed`` (join the torchrun job) and ``ParallelMesh`` (the DeviceMesh and its groups).

The ranks form a 3-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dims
``("cfg", "ring", "ulysses")`` of shape ``(2 if cfg_parallel else 1, ring, ulysses)``, row-major::

    global rank = cfg_rank * ring * ulysses + ring_rank * ulysses + ulysses_rank

Ulysses groups are the innermost (neighbouring ranks: the all-to-alls stay inside a node), ring
groups stride over them and the two CFG halves are the outermost. Within one CFG half the sequence is
cut into ``ring * ulysses`` shards and ``sequence_rank = ring_rank * ulysses + ulysses_rank`` holds
shard number ``sequence_rank``: a Ulysses all-to-all then gathers one contiguous ring block.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism: ``--ulysses U --ring R [--cfg-parallel]``; U x R (x 2) = world size."""

    ulysses: int = 1
    ring: int = 1
    cfg_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def sequence_degree(self) -> int:
        """How many shards the token sequence is cut into: U x R."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * self.cfg_degree

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        """(cfg, ring, ulysses)."""
        return self.cfg_degree, self.ring, self.ulysses

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """Raise ValueError unless this layout fits ``world_size`` ranks and a model of ``num_heads``."""
        if self.world_size != world_size:
            cfg = " x 2 (--cfg-parallel)" if self.cfg_parallel else ""
            raise ValueError(
                f"U x R (x 2 with --cfg-parallel) must equal the world size {world_size}: "
                f"--ulysses {self.ulysses} x --ring {self.ring}{cfg} = {self.world_size}"
            )
        if num_heads is not None and num_heads % self.ulysses:
            g = math.gcd(num_heads, self.ulysses)
            what = "pure Ulysses" if self.ring == 1 else "Ulysses (inside USP)"
            raise ValueError(
                f"{what} needs heads % U == 0: {num_heads} heads, U={self.ulysses} -> use --ring "
                f"(e.g. --ulysses {g} --ring {self.ring * self.ulysses // g})"
            )

    @classmethod
    def for_world(cls, world_size: int, num_heads: int, cfg_parallel: bool = False) -> ParallelConfig:
        """The default layout: as much Ulysses as the heads allow, the rest ring."""
        degree, rest = divmod(world_size, 2 if cfg_parallel else 1)
        if rest or degree < 1:
            raise ValueError(f"--cfg-parallel needs an even world size, got {world_size}")
        ulysses = math.gcd(degree, num_heads)
        return cls(ulysses=ulysses, ring=degree // ulysses, cfg_parallel=cfg_parallel)


def init_distributed(backend: str | None = None, timeout: timedelta | None = None) -> torch.device:
    """Join the job that torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and return this rank's device.

    NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU. Without WORLD_SIZE (or
    with 1) no process group is made: a plain single-process run. Idempotent.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
    return device


def world_size() -> int:
    """Ranks in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in ``group``; ``None`` stands for a group of one (single process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class ParallelMesh:
    """The DeviceMesh of a run and its process groups; ``device_mesh`` is None in a single process,
    where every group accessor returns None (a group of one)."""

    config: ParallelConfig
    device_mesh: DeviceMesh | None = None

    @classmethod
    def build(
        cls, config: ParallelConfig, num_heads: int | None = None, device_type: str | None = None
    ) -> ParallelMesh:
        """Validate ``config`` against the world size and the model's heads, then build the mesh.

        Collective: every rank calls it with the same config. ``device_type`` defaults to "cuda"
        under NCCL, else "cpu".
        """
        size = world_size()
        config.validate(size, num_heads)
        if size == 1:
            return cls(config)
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return cls(config, init_device_mesh(device_type, config.mesh_shape, mesh_dim_names=MESH_DIMS))

    # -- groups and ranks ----------------------------------------------------------------------
    def group(self, dim: str) -> ProcessGroup | None:
        """The process group along mesh dim ``dim`` ("cfg", "ring" or "ulysses") that holds this rank."""
        if dim not in MESH_DIMS:
            raise KeyError(f"mesh dims are {MESH_DIMS}, got {dim!r}")
        return None if self.device_mesh is None else self.device_mesh.get_group(dim)

    def rank(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        if dim not in MESH_DIMS:
            raise KeyError(f"mesh dims are {MESH_DIMS}, got {dim!r}")
        return 0 if self.device_mesh is None else self.device_mesh.get_local_rank(dim)

    @property
    def cfg_group(self) -> ProcessGroup | None:
        return self.group("cfg")

    @property
    def ring_group(self) -> ProcessGroup | None:
        return self.group("ring")

    @property
    def ulysses_group(self) -> ProcessGroup | None:
        return self.group("ulysses")

    @property
    def cfg_rank(self) -> int:
        return self.rank("cfg")

    @property
    def ring_rank(self) -> int:
        return self.rank("ring")

    @property
    def ulysses_rank(self) -> int:
        return self.rank("ulysses")

    @property
    def sequence_degree(self) -> int:
        return self.config.sequence_degree

    @property
    def sequence_rank(self) -> int:
        """Which of the ``sequence_degree`` token shards this rank holds."""
        return self.ring_rank * self.config.ulysses + self.ulysses_rank

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if self.device_mesh is not None else 0

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that writes files and owns HTTP in ``wanpipe serve``."""
        return self.global_rank == 0


def shared_seed(seed: int | None) -> int | None:
    """The seed every rank of a torch.distributed job uses: ``seed`` when given; else, when a
    process group of more than one rank is initialised, one drawn by rank 0 and broadcast (a
    collective: every rank calls it), so that all ranks draw the same noise. Otherwise None (the
    tokenizer draws one)."""
    if seed is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    drawn = secrets.randbelow(2**31) if dist.get_rank() == 0 else 0
    value = torch.tensor([drawn], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())
