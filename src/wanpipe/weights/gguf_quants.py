"""GGUF quantized weights in torch: the block formats of ggml, dequantized on any device, and the linear
layer that keeps its weight quantized and dequantizes it each time it runs (as fp8 "upcast" does).

A quantized tensor is held as its raw ggml blocks: a uint8 tensor ``(..., K / block * type_size)`` for
a logical ``(..., K)`` tensor (each row a whole number of blocks). In a state dict it travels with a
marker ``<name>_gguf_type`` (an int64 scalar: the ``GGMLQuantizationType`` number); the DiT blocks'
linears (the same set fp8 keeps: :data:`~wanpipe.weights.fp8.DIT_FP8_LINEARS`) become
:class:`GGUFLinear` and stay quantized, every other quantized tensor is dequantized once at load.

The formats (ggml's ``ggml-quants.c`` / gguf-py's ``gguf.quants``): 32-value blocks Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0 (an fp16 scale, an fp16 minimum for the ``_1`` kinds, packed integers) and 256-value
"K" super-blocks Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (sub-block scales packed in 4, 6 or 8 bits). F32, F16 and
BF16 tensors are plain tensors and never reach this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanpipe.weights.fp8 import replace_linears

QK_K = 256

GGUF_TYPES: dict[int, tuple[str, int, int]] = {
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84),
    11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144),
    13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
}
"""The quantized types read: ``GGMLQuantizationType`` number -> (name, values per block, bytes per block)."""

PLAIN_TYPES: dict[int, str] = {0: "F32", 1: "F16", 30: "BF16"}
"""The unquantized types read (as plain tensors, memory-mapped)."""

TYPE_SUFFIX = "_gguf_type"
"""``<name>_gguf_type``: the marker that says ``<name>`` holds raw blocks of that GGML type."""


def type_name(qtype: int) -> str:
    return GGUF_TYPES[qtype][0] if qtype in GGUF_TYPES else PLAIN_TYPES.get(qtype, f"type {qtype}")


# -- the block formats ------------------------------------------------------------------------------


def _f16(b: Tensor) -> Tensor:
    """(n, 2) uint8 little-endian fp16 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: Tensor, shifts: list[int], mask: int, groups: int) -> Tensor:
    """(n, B) uint8 -> (n, groups * len(shifts), B / groups): each group's bytes shifted by each shift
    and masked (ggml's packing: shift s of group g is the values ``(g * len(shifts) + s_index) * width``)."""
    n = b.shape[0]
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).reshape(1, 1, -1, 1)
    return ((b.reshape(n, groups, 1, -1) >> s) & mask).reshape(n, groups * len(shifts), -1)


def _nibbles(qs: Tensor) -> Tensor:
    """(n, 16) packed 4-bit -> (n, 32): the low nibbles, then the high ones."""
    return _bits(qs, [0, 4], 0x0F, 1).reshape(qs.shape[0], -1)


def _high_bits32(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) its bits 0..31."""
    return _bits(qh, list(range(8)), 1, 4).reshape(qh.shape[0], -1)


def _q4_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, [0, 2, 4, 6], 3, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(scales[:, :8], [0, 4], 0x0F, 1).reshape(n, 16)
    high = _bits(scales[:, 8:12], [0, 2, 4, 6], 3, 1).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs, [0, 2, 4, 6], 3, 2).reshape(n, 16, 16)
    qh = _bits(hmask, list(range(8)), 1, 1).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = ql.float() - (qh << 2).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: (n, 12) bytes -> the 8 sub-block scales and minima (6 bits each), (n, 8) each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _bits(b[:, 16:], [0, 4], 0x0F, 4).float()  # (n, 8, 32)
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    ql = _bits(b[:, 48:], [0, 4], 0x0F, 4)  # (n, 8, 32)
    qh = _bits(b[:, 16:48], list(range(8)), 1, 1)  # (n, 8, 32)
    q = (ql | (qh << 4)).float()
    return ((d * sc).reshape(n, 8, 1) * q - (dmin * mn).reshape(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = _bits(b[:, :128], [0, 4], 0x0F, 2).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192], [0, 2, 4, 6], 3, 2).reshape(n, 8, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    q = ((ql | (qh << 4)).float() - 32).reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


DEQUANTIZE_BLOCKS: dict[int, Callable[[Tensor], Tensor]] = {
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}
"""Per type: (n, bytes per block) uint8 -> (n, values per block) float32."""


def logical_shape(raw_shape: tuple[int, ...] | torch.Size, qtype: int) -> tuple[int, ...]:
    """Raw blocks ``(..., B)`` -> the tensor's shape ``(..., B / type_size * block)``."""
    _, block, size = GGUF_TYPES[qtype]
    return (*raw_shape[:-1], raw_shape[-1] // size * block)


def raw_shape(shape: tuple[int, ...] | torch.Size, qtype: int) -> tuple[int, ...]:
    """A tensor's shape ``(..., K)`` -> its raw blocks' ``(..., K / block * type_size)``."""
    _, block, size = GGUF_TYPES[qtype]
    if shape[-1] % block:
        raise ValueError(
            f"{type_name(qtype)} rows hold whole blocks of {block}; a row of {shape[-1]} does not"
        )
    return (*shape[:-1], shape[-1] // block * size)


def dequantize(raw: Tensor, qtype: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Raw blocks (..., B) uint8 of ``qtype`` -> (..., B / type_size * block) in ``dtype``, on raw's device."""
    if qtype not in DEQUANTIZE_BLOCKS:
        raise ValueError(f"unsupported GGUF type {type_name(qtype)}")
    size = GGUF_TYPES[qtype][2]
    out = DEQUANTIZE_BLOCKS[qtype](raw.reshape(-1, size))
    return out.reshape(logical_shape(raw.shape, qtype)).to(dtype)


# -- the layer ----------------------------------------------------------------------------------------


class GGUFLinear(nn.Linear):
    """A linear layer whose weight stays in GGUF blocks: (..., in) -> (..., out).

    ``weight`` is uint8 ``(out, in / block * type_size)``; each call dequantizes it to the input's
    dtype on the input's device. A floating weight (e.g. a merged LoRA) runs as a plain linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, qtype: int) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.qtype = qtype
        raw = raw_shape((out_features, in_features), qtype)
        self.weight = nn.Parameter(torch.empty(raw, dtype=torch.uint8), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.is_floating_point():
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.qtype, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={type_name(self.qtype)}"


def use_gguf_linears(model: nn.Module, layers: Mapping[str, int]) -> None:
    """Replace the ``nn.Linear`` modules named in ``layers`` (built on the meta device) by :class:`GGUFLinear`
    of the given types."""
    replace_linears(
        model,
        layers,
        lambda name, old: GGUFLinear(
            old.in_features, old.out_features, bias=old.bias is not None, qtype=layers[name]
        ),
    )


# -- state dicts --------------------------------------------------------------------------------------


def has_gguf(state: Mapping[str, Tensor]) -> bool:
    return any(k.endswith(TYPE_SUFFIX) for k in state)


def resolve_gguf_state(
    state: Mapping[str, Tensor], keep: Callable[[str], bool] | None = None
) -> dict[str, Tensor]:
    """Quantized tensors whose layer ``keep(layer)`` accepts (``<layer>.weight``) stay raw with their
    marker; every other one is dequantized to float32 (its marker dropped)."""
    if not has_gguf(state):
        return dict(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(TYPE_SUFFIX):
            continue
        marker = state.get(key + TYPE_SUFFIX)
        if marker is None:
            out[key] = value
            continue
        layer = key.removesuffix(".weight") if key.endswith(".weight") else None
        if layer is not None and keep is not None and keep(layer) and value.ndim == 2:
            out[key], out[key + TYPE_SUFFIX] = value, marker
        else:
            out[key] = dequantize(value, int(marker))
    return out


def split_gguf_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """-> (the state without markers, {layer: GGML type} of the weights that stay quantized)."""
    if not has_gguf(state):
        return dict(state), {}
    layers = {
        k.removesuffix(".weight" + TYPE_SUFFIX): int(v) for k, v in state.items() if k.endswith(TYPE_SUFFIX)
    }
    return {k: v for k, v in state.items() if not k.endswith(TYPE_SUFFIX)}, layers


def dit_gguf_keep(layer: str) -> bool:
    from wanpipe.weights.fp8 import DIT_FP8_LINEARS

    return re.fullmatch(DIT_FP8_LINEARS, layer) is not None
