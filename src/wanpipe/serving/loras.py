"""LoRA per request: ``wanpipe serve --lora-dir DIR`` serves the adapter files of one folder by name.

A request's ``loras`` (``[{"name", "scale"}]``) names files of that folder by their stem, never a path:
clients reach no other file. The set, sorted by name, is part of the job's spec (so a restart runs the
job with it) and of its batch key (jobs with the same set run together). Before each batch the worker
switches the DiT to the batch's set (:meth:`LoraLibrary.activate`, :meth:`LoraManager.switch`): the
layers the previous set touched go back to their base tensors (the very tensors kept aside: bit for bit)
and the new set is merged from the base. A small cache of read adapters (their low-rank factors on the
model's device, not full deltas) makes a switch a few small matmuls, not a file read.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wanpipe.context import InvalidRequestError
from wanpipe.weights.lora import ParsedLora, lora_targets, read_lora, unmatched_message

if TYPE_CHECKING:
    from wanpipe.pipeline import WanPipeline

logger = logging.getLogger("wanpipe.serving")

LORA_SUFFIXES = (".safetensors",)
"""The files a LoRA folder serves: safetensors alone (no pickles from a folder clients choose from)."""
GROUP = "request"
"""The :meth:`LoraManager.switch` group of the per-request adapters."""

LoraSet = tuple[tuple[str, float], ...]
"""A job's adapters: (name, scale) pairs sorted by name; () is none."""


@dataclass(frozen=True)
class LoraInfo:
    """One served adapter, as ``GET /v1/loras`` lists it."""

    name: str
    file: str
    size_bytes: int
    layers: int | None = None  # DiT layers it changes (once read)
    unmatched_keys: int | None = None  # keys that match no layer (once read)
    experts: str = "both"


class LoraLibrary:
    """The adapter files of one folder, by stem; each read once against the model and cached.

    ``expert``: which expert of a Wan 2.2 A14B checkpoint the adapters go to ("high", "low" or "both";
    one DiT: always that one). ``cache_size``: read adapters kept (least recently used goes first).
    """

    def __init__(self, folder: str | Path, *, expert: str = "both", cache_size: int = 8):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--lora-dir {self.folder} is not a folder")
        self.expert = expert
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[str, ParsedLora] = OrderedDict()
        self._read: dict[str, tuple[int, int]] = {}  # name -> (layers, unmatched keys) once read
        self._lock = threading.Lock()

    def files(self) -> dict[str, Path]:
        """The folder's adapters now, by name (a file added later is served; one removed is not)."""
        found = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix in LORA_SUFFIXES and not path.name.startswith("."):
                found[path.stem] = path
        return found

    def list(self) -> list[LoraInfo]:
        out = []
        for name, path in self.files().items():
            layers, unmatched = self._read.get(name, (None, None))
            out.append(LoraInfo(name, path.name, path.stat().st_size, layers, unmatched, self.expert))
        return out

    def check(self, loras: Sequence[tuple[str, float]], param: str = "loras") -> None:
        """InvalidRequestError (``param``) for a name that is not a file of the folder."""
        if not loras:
            return
        files = self.files()
        for name, _ in loras:
            if name not in files:
                shown = ", ".join(sorted(files)[:20]) or "none"
                raise InvalidRequestError(
                    f"{param}: no LoRA named {name!r} on this server (GET /v1/loras lists them: {shown})",
                    param,
                )

    def read(self, name: str, pipe: WanPipeline) -> ParsedLora:
        """The adapter read against ``pipe``'s DiT (from the cache, or the file), its tensors on the
        model's device. InvalidRequestError when the file is gone or does not fit the model."""
        with self._lock:
            parsed = self._cache.get(name)
            if parsed is not None:
                self._cache.move_to_end(name)
                return parsed
        path = self.files().get(name)
        if path is None:
            raise InvalidRequestError(f"loras: the LoRA file {name!r} is no longer on this server", "loras")
        dit = pipe.executor.experts.high
        try:
            parsed = read_lora(path, lora_targets(dit), name=name)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            raise InvalidRequestError(
                f"loras: the LoRA {name!r} does not fit this model: {e}", "loras"
            ) from e
        if parsed.unmatched:
            logger.warning(unmatched_message(name, parsed.unmatched, parsed.num_keys))
        device = next(dit.parameters()).device
        parsed = parsed.to(device)
        with self._lock:
            self._read[name] = (len(parsed.updates), len(parsed.unmatched))
            self._cache[name] = parsed
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return parsed

    def activate(self, pipe: WanPipeline, loras: LoraSet) -> None:
        """Make ``loras`` (() for none) the per-request adapters merged into ``pipe``'s DiT: the
        previous set's layers back to their base, the new set merged. Run by the worker between batches."""
        expert = self.expert if pipe.executor.experts.two else "both"  # one DiT: that one
        parsed = [(self.read(name, pipe), scale, expert) for name, scale in loras]
        pipe.lora_manager.switch(GROUP, parsed)
