"""Low-memory placement: components on the device only while they run, DiT blocks streamed.

- :class:`ModelOffload` (``offload="model"``): the text encoder, the DiT and the VAE wait in host
  memory and move to the device for their stage only.
- :class:`BlockStreamer` (``offload="block"``): the DiT's blocks stay in (pinned) host memory; a few
  block-shaped buffers live on the device and the weights of block ``i + k`` are copied into a buffer
  on a side stream while block ``i`` computes. Every model with the same block shape (both Wan 2.2
  experts) shares the one set of buffers. With a CPU "device" the same code runs, synchronously: the
  tests use that to check the streamed path gives the same frames.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


class ModelOffload:
    """Move a module to ``device`` for the duration of a ``with`` block, then back to ``storage``."""

    def __init__(self, device: torch.device | str, storage: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.storage = torch.device(storage)

    @contextmanager
    def use(self, module: nn.Module | None) -> Iterator[None]:
        if module is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to(self.storage)
            if _is_cuda(self.device):
                torch.cuda.empty_cache()


def pin_module(module: nn.Module) -> None:
    """Page-lock a host module's tensors so host-to-device copies can run asynchronously (CUDA only)."""
    if not torch.cuda.is_available():
        return
    for p in [*module.parameters(), *module.buffers()]:
        if p.device.type == "cpu" and not p.is_pinned():
            p.data = p.data.pin_memory()


class BlockStreamer:
    """Runs host-resident blocks on ``device`` through up to ``num_buffers`` device-resident copies per
    kind of block (blocks of one parameter layout share a ring of buffers: the main DiT blocks; VACE's
    blocks and its first block, which has an input projection, have rings of their own)."""

    def __init__(self, device: torch.device | str, num_buffers: int = 2) -> None:
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        self.device = torch.device(device)
        self.num_buffers = num_buffers
        self.rings: dict[tuple, list[nn.Module]] = {}
        self.copy_stream = torch.cuda.Stream(self.device) if _is_cuda(self.device) else None
        self.copies = 0  # blocks copied to the device (for tests and reports)

    @property
    def buffers(self) -> list[nn.Module]:
        """Every device-resident buffer, of every ring."""
        return [b for ring in self.rings.values() for b in ring]

    @staticmethod
    def _shape_signature(block: nn.Module) -> tuple:
        return (type(block),) + tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())

    def _ensure_rings(self, blocks: Sequence[nn.Module], kinds: list[tuple]) -> None:
        """A ring of ``min(num_buffers, count)`` buffers per kind of block in ``blocks``; rings of kinds
        not in ``blocks`` are dropped. Every model with the same block shapes (both Wan 2.2 experts)
        shares them."""
        wanted: dict[tuple, nn.Module] = {}
        counts: dict[tuple, int] = {}
        for block, kind in zip(blocks, kinds):
            wanted.setdefault(kind, block)
            counts[kind] = counts.get(kind, 0) + 1
        rings = {}
        for kind, template in wanted.items():
            size = min(self.num_buffers, counts[kind])
            ring = self.rings.get(kind, [])[:size]
            while len(ring) < size:
                buffer = copy.deepcopy(template).to(self.device)
                buffer.requires_grad_(False)
                ring.append(buffer)
            rings[kind] = ring
        self.rings = rings

    def _load(self, buffer: nn.Module, block: nn.Module) -> None:
        with torch.no_grad():
            for dst, src in zip(buffer.parameters(), block.parameters()):
                dst.copy_(src, non_blocking=True)
        self.copies += 1

    def stream(self, blocks: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """Yield, in order, a device buffer holding each block's weights; the caller runs the yielded
        block before asking for the next one (``run_blocks(streamer.stream(blocks), ...)``).

        Block ``i`` goes into buffer ``n % k`` of its kind's ring (``n``: how many blocks of its kind came
        before it; ``k``: the ring's size). On CUDA each buffer's next block is copied on a side stream as
        soon as the block before it in that buffer has run: when the caller asks for block ``i + 1``,
        block ``i``'s work is queued, so the copy waits on an event recorded then."""
        if not blocks:
            return
        kinds = [self._shape_signature(b) for b in blocks]
        self._ensure_rings(blocks, kinds)
        slots: list[nn.Module] = []
        following: list[int | None] = []  # the next block that goes into the same buffer
        seen: dict[tuple, list[int]] = {}
        for i, kind in enumerate(kinds):
            ring = self.rings[kind]
            earlier = seen.setdefault(kind, [])
            slots.append(ring[len(earlier) % len(ring)])
            if len(earlier) >= len(ring):
                following[earlier[-len(ring)]] = i
            earlier.append(i)
            following.append(None)
        stream = self.copy_stream
        if stream is None:  # synchronous: copy, then compute
            for block, buffer in zip(blocks, slots):
                self._load(buffer, block)
                yield buffer
            return
        compute = torch.cuda.current_stream(self.device)
        ready: dict[int, torch.cuda.Event] = {}  # block index -> its weights are in its buffer
        stream.wait_stream(compute)
        for kind, ring in self.rings.items():
            for i in [j for j, k in enumerate(kinds) if k == kind][: len(ring)]:
                with torch.cuda.stream(stream):
                    self._load(slots[i], blocks[i])
                    event = torch.cuda.Event()
                    event.record(stream)
                ready[i] = event
        for i in range(len(blocks)):
            compute.wait_event(ready.pop(i))
            yield slots[i]
            nxt = following[i]
            if nxt is not None:
                done = torch.cuda.Event()
                done.record(compute)
                with torch.cuda.stream(stream):
                    stream.wait_event(done)  # the buffer is free once block i has run
                    self._load(slots[nxt], blocks[nxt])
                    event = torch.cuda.Event()
                    event.record(stream)
                ready[nxt] = event
