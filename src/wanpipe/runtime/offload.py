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
    """Runs host-resident blocks on ``device`` through ``num_buffers`` device-resident copies."""

    def __init__(self, device: torch.device | str, num_buffers: int = 2) -> None:
        if num_buffers < 1:
            raise ValueError(f"num_buffers must be >= 1, got {num_buffers}")
        self.device = torch.device(device)
        self.num_buffers = num_buffers
        self.buffers: list[nn.Module] = []
        self._signature: tuple | None = None
        self.copy_stream = torch.cuda.Stream(self.device) if _is_cuda(self.device) else None
        self.copies = 0  # blocks copied to the device (for tests and reports)

    @staticmethod
    def _shape_signature(block: nn.Module) -> tuple:
        return tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())

    def _ensure_buffers(self, template: nn.Module) -> None:
        signature = self._shape_signature(template)
        if self.buffers and signature == self._signature:
            return
        self._signature = signature
        self.buffers = []
        for _ in range(self.num_buffers):
            buffer = copy.deepcopy(template).to(self.device)
            buffer.requires_grad_(False)
            self.buffers.append(buffer)

    def _load(self, buffer: nn.Module, block: nn.Module) -> None:
        with torch.no_grad():
            for dst, src in zip(buffer.parameters(), block.parameters()):
                dst.copy_(src, non_blocking=True)
        self.copies += 1

    def stream(self, blocks: Sequence[nn.Module]) -> Iterator[nn.Module]:
        """Yield, in order, a device buffer holding each block's weights; the caller runs the yielded
        block before asking for the next one (``run_blocks(streamer.stream(blocks), ...)``).

        On CUDA the weights of block ``i + k`` are copied on a side stream while block ``i`` computes:
        when the caller asks for block ``i + 1``, block ``i``'s work is queued, so the copy into its
        buffer waits on an event recorded then."""
        if not blocks:
            return
        self._ensure_buffers(blocks[0])
        k = min(self.num_buffers, len(blocks))
        stream = self.copy_stream
        if stream is None:  # synchronous: copy, then compute
            for i, block in enumerate(blocks):
                buffer = self.buffers[i % k]
                self._load(buffer, block)
                yield buffer
            return
        compute = torch.cuda.current_stream(self.device)
        ready: list[torch.cuda.Event] = []
        stream.wait_stream(compute)
        for j in range(k):
            with torch.cuda.stream(stream):
                self._load(self.buffers[j], blocks[j])
                event = torch.cuda.Event()
                event.record(stream)
            ready.append(event)
        for i in range(len(blocks)):
            slot = i % k
            compute.wait_event(ready[slot])
            yield self.buffers[slot]
            nxt = i + k
            if nxt < len(blocks):
                done = torch.cuda.Event()
                done.record(compute)
                with torch.cuda.stream(stream):
                    stream.wait_event(done)  # the buffer is free once block i has run
                    self._load(self.buffers[slot], blocks[nxt])
                    event = torch.cuda.Event()
                    event.record(stream)
                ready[slot] = event
