"""Prompt embeddings kept by token ids, so a repeated prompt is not encoded again.

Servers see the same negative prompt in almost every request, and UMT5-XXL is the slowest stage when it
runs on the CPU to spare GPU memory (``--text-encoder-device cpu``): several seconds per prompt. The
cache holds each prompt's embedding rows up to its length (the rest are zeros by construction) and hands
back the same tensors the encoder made, so cached and fresh requests get the same frames.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor


class TextEmbeddingCache:
    """Least-recently-used prompt embeddings, at most ``capacity`` prompts (0: keep none)."""

    def __init__(self, capacity: int = 32) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[bytes, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def encode(self, ids: Tensor, mask: Tensor, encoder: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """ids (B, L) int, mask (B, L) bool -> embeddings (B, L, D) zero past each length, as
        ``encoder(ids, mask)`` makes them; only the rows not cached (each distinct prompt once) are
        encoded, as one batch."""
        if self.capacity == 0 or ids.shape[0] == 0:
            return encoder(ids, mask)
        ids_host, mask_host = ids.cpu(), mask.cpu().bool()
        lengths = mask_host.sum(1).tolist()
        keys = [ids_host[i, : lengths[i]].numpy().tobytes() for i in range(ids.shape[0])]
        todo = list(dict.fromkeys(k for k in keys if k not in self._rows))
        self.hits += len(keys) - len(todo)  # rows not encoded: cached, or a repeat within the batch
        self.misses += len(todo)
        fresh: dict[bytes, Tensor] = {}
        if todo:
            rows = [keys.index(k) for k in todo]
            out = encoder(ids[rows], mask[rows])
            for j, (k, i) in enumerate(zip(todo, rows)):
                fresh[k] = out[j, : lengths[i]].clone()
        embeds = None
        for i, k in enumerate(keys):
            row = fresh[k] if k in fresh else self._rows[k]
            if embeds is None:
                embeds = torch.zeros(
                    ids.shape[0], ids.shape[1], row.shape[-1], dtype=row.dtype, device=row.device
                )
            embeds[i, : row.shape[0]] = row
        for k, row in fresh.items():
            self._rows[k] = row
        for k in keys:
            self._rows.move_to_end(k)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        assert embeds is not None
        return embeds
