"""Reading ``.gguf`` files (city96's Wan GGUFs, ComfyUI-GGUF's ``convert.py`` output) with the ``gguf``
package: memory-mapped (copy-on-write, nothing is read until used), tensor names as written (the
original Wan names, possibly behind a ``model.diffusion_model.`` prefix that the single-file code
strips).

F32 / F16 / BF16 tensors become plain tensors of their shape; quantized ones their raw blocks plus a
``<name>_gguf_type`` marker (:mod:`wanpipe.weights.gguf_quants`). A tensor that ComfyUI-GGUF stored
reshaped (``comfy.gguf.orig_shape.<name>``) whose rows are no longer whole blocks is dequantized here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from wanpipe.weights.gguf_quants import GGUF_TYPES, PLAIN_TYPES, TYPE_SUFFIX, dequantize, type_name
from wanpipe.weights.safetensors_io import CheckpointError

ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
"""ComfyUI-GGUF's metadata: the shape a tensor had before it was reshaped for quantization."""


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE_FIELD + name)
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.gguf`` file -> {name: tensor} (quantized tensors raw, each with its ``_gguf_type`` marker)."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .gguf files needs the gguf package (pip install gguf, or wanpipe[gguf])"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path), "c")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        shape = _orig_shape(reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)
        if qtype in (0, 1):
            state[t.name] = data.reshape(shape)
        elif qtype == 30:
            state[t.name] = data.view(torch.bfloat16).reshape(shape)
        elif qtype in GGUF_TYPES:
            _, block, size = GGUF_TYPES[qtype]
            if shape[-1] % block:
                state[t.name] = dequantize(data.reshape(-1, size), qtype).reshape(shape)
            else:
                state[t.name] = data.reshape(*shape[:-1], shape[-1] // block * size)
                state[t.name + TYPE_SUFFIX] = torch.tensor(qtype, dtype=torch.int64)
        else:
            known = ", ".join([*PLAIN_TYPES.values(), *(v[0] for v in GGUF_TYPES.values())])
            raise CheckpointError(
                f"{path}: tensor {t.name!r} has the GGUF type {type_name(qtype)} "
                f"({getattr(t.tensor_type, 'name', qtype)}), which is not read (read: {known})"
            )
    if not state:
        raise CheckpointError(f"{path}: the GGUF file holds no tensors")
    return state
