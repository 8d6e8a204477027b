"""Memory-mapped safetensors reading: single files and shards, no pickle, no second copy.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the raw data. We map the whole file once with
``torch.UntypedStorage.from_file`` (a private, copy-on-write ``mmap``) and hand out tensors that are
views into that mapping, so loading a checkpoint costs page cache, not a copy in process memory.
Converting the dtype or moving to a GPU makes the one copy that is needed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used, with the reason and the path."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorRecord]:
    """Parse the header of a safetensors file; a damaged file is a :class:`CheckpointError`."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupted safetensors file (header length {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    base = 8 + header_len
    records: dict[str, TensorRecord] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: corrupted or unsupported entry for tensor {name!r} ({e!r})"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or base + end > size or begin < 0:
            raise CheckpointError(
                f"{path}: corrupted safetensors file: tensor {name!r} of shape {list(shape)} claims bytes "
                f"{begin}..{end} but the file has {size - base} data bytes"
            )
        records[name] = TensorRecord(path, dtype, shape, base + begin, base + end)
    return records


class SafetensorsIndex(Mapping[str, torch.Tensor]):
    """A read-only mapping from tensor names to memory-mapped CPU tensors, over one or more files.

    Tensors are created on access and share memory with the file mapping; nothing is read from disk
    until a tensor's data is touched.
    """

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self.records: dict[str, TensorRecord] = {}
        for f in self.files:
            for name, rec in read_header(f).items():
                if name in self.records:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self.records[name].path} and {f}"
                    )
                self.records[name] = rec
        self._storages: dict[Path, torch.UntypedStorage] = {}

    @classmethod
    def from_folder(cls, folder: Path, component: str = "") -> SafetensorsIndex:
        """Open the weights of one component folder: a ``*.safetensors.index.json`` with its shards,
        or the ``*.safetensors`` files that lie there."""
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            try:
                weight_map = json.loads(indexes[0].read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{indexes[0]}: unreadable shard index ({e!r})") from None
            shards = sorted({folder / name for name in weight_map.values()})
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"{component or folder}: shard files listed in {indexes[0].name} are missing: {missing}"
                )
            index = cls(shards)
            absent = sorted(set(weight_map) - set(index.records))
            if absent:
                raise CheckpointError(
                    f"{component or folder}: tensors listed in {indexes[0].name} are not in the shards: {absent[:5]}"
                )
            return index
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in folder.glob("*") if p.suffix in {".bin", ".pth", ".pt", ".ckpt"})
            hint = f" (found {others}: only safetensors weights are read)" if others else ""
            raise CheckpointError(f"{component or folder}: no .safetensors weights in {folder}{hint}")
        return cls(files)

    def _storage(self, path: Path) -> torch.UntypedStorage:
        storage = self._storages.get(path)
        if storage is None:
            nbytes = path.stat().st_size
            storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
            self._storages[path] = storage
        return storage

    def __getitem__(self, name: str) -> torch.Tensor:
        rec = self.records[name]
        itemsize = torch.empty((), dtype=rec.dtype).element_size()
        if rec.start % itemsize:
            # Unaligned data: fall back to a copy of just this tensor.
            with rec.path.open("rb") as f:
                f.seek(rec.start)
                buf = bytearray(f.read(rec.end - rec.start))
            return (
                torch.frombuffer(buf, dtype=rec.dtype).reshape(rec.shape)
                if buf
                else torch.empty(rec.shape, dtype=rec.dtype)
            )
        storage = self._storage(rec.path)
        t = torch.empty(0, dtype=rec.dtype)
        numel = (rec.end - rec.start) // itemsize
        t.set_(storage, rec.start // itemsize, (numel,), (1,))
        return t.view(rec.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.records[name].shape

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)
