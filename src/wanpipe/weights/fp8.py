"""fp8 weights: float8_e4m3fn / float8_e5m2 tensors, ComfyUI's "scaled" fp8 (per-tensor weight scales).

Three ways to run them, chosen at load (``fp8=`` of the pipeline constructors):

- ``"upcast"`` (the default for fp8 checkpoints): the DiT blocks' linear weights stay fp8 in memory
  and each layer upcasts its weight (``fp8 -> float32 * scale -> compute dtype``) when it runs, on any
  device. Every other fp8 tensor is dequantized once at load.
- ``"dequantize"``: every fp8 tensor is dequantized at load (plain modules, the most memory).
- ``"scaled_mm"``: the DiT blocks' linears run as fp8 matmuls (``torch._scaled_mm``, per-tensor
  dynamic input scale) on GPUs with fp8 tensor cores (CUDA capability >= 8.9: Ada, Hopper); weights
  that are not fp8 yet are quantized to e4m3fn at load.
- ``"quantize"``: like ``"upcast"``, but bf16/fp16/fp32 checkpoints are quantized to e4m3fn at load.

A checkpoint's scale tensors are named ``<layer>.scale_weight`` (ComfyUI) or ``<layer>.weight_scale``;
at run time each :class:`Fp8Linear` holds ``weight`` (fp8) and ``weight_scale`` (float32 scalar). Both
are parameters, so swapping Wan 2.2 experts in place copies the scales too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MODES: tuple[str, ...] = ("upcast", "dequantize", "quantize", "scaled_mm")

SCALE_SUFFIXES: tuple[str, ...] = (".scale_weight", ".weight_scale")
"""Per-tensor weight scales: ``<layer><suffix>`` scales ``<layer>.weight``."""
DROPPED_SUFFIXES: tuple[str, ...] = (".scale_input", ".input_scale")
"""Static input scales of some fp8 files; not used (inputs are scaled dynamically)."""

DIT_FP8_LINEARS = r"(?:vace_)?blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.(?:[qkvo]|k_img|v_img)|ffn\.[02])"
"""The DiT linears that may stay fp8 at run time (the main and VACE blocks' attention and feed-forward
weights)."""


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def dequantize(weight: Tensor, scale: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """fp8 (or any) weight -> ``weight.float() * scale`` in ``dtype`` (the one upcast formula)."""
    w = weight.to(torch.float32)
    if scale is not None:
        w = w * scale.to(device=w.device, dtype=torch.float32)
    return w.to(dtype)


def quantize(weight: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """Per-tensor symmetric quantization: -> (fp8 weight, float32 scale) with weight ~ q * scale."""
    w = weight.to(torch.float32)
    fmax = torch.finfo(dtype).max
    scale = (w.abs().amax() / fmax).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-fmax, fmax).to(dtype), scale


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """fp8 tensor-core matmuls: CUDA with compute capability >= 8.9 (Ada, Hopper) and ``torch._scaled_mm``."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype) -> Tensor:
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out[0] if isinstance(out, tuple) else out


def scaled_mm_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (weight * weight_scale).T + bias`` as one fp8 matmul: x (..., K) is quantized to e4m3fn with a
    dynamic per-tensor scale; weight (N, K) e4m3fn -> (..., N) in x's dtype."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = (x2.abs().amax().float() / fmax).clamp(min=torch.finfo(torch.float32).tiny)
    xq = (x2.float() / x_scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = _scaled_mm(xq, weight.t(), x_scale, weight_scale.float(), out_dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """A linear layer whose weight may be fp8 with a per-tensor scale: (..., in) -> (..., out).

    ``mode`` "upcast" dequantizes the weight to the input's dtype per call; "scaled_mm" runs one fp8
    matmul. A weight that is not fp8 (e.g. a merged LoRA) runs as a plain linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "upcast") -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight_scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if not is_fp8(self.weight):
            return F.linear(x, self.weight, self.bias)
        if self.mode == "scaled_mm" and self.weight.dtype == torch.float8_e4m3fn and x.is_cuda:
            k, n = self.in_features, self.out_features
            if k % 16 == 0 and n % 16 == 0:
                return scaled_mm_linear(x, self.weight, self.weight_scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), bias)


def replace_linears(
    model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Linear], nn.Module]
) -> None:
    """Replace the ``nn.Linear`` modules ``names`` of ``model`` (built on the meta device) by ``make(name,
    old)``, built on the old layer's device (the fp8 and GGUF layers)."""
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is {type(old).__name__}, not a Linear layer")
        with torch.device(old.weight.device):
            setattr(parent, child, make(name, old))


def use_fp8_linears(model: nn.Module, names: set[str], mode: str) -> None:
    """Replace the ``nn.Linear`` modules ``names`` of ``model`` (built on the meta device) by :class:`Fp8Linear`."""
    replace_linears(
        model,
        names,
        lambda _, old: Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None, mode=mode),
    )


def split_scales(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """-> (tensors without scales, {weight name: its scale}); input scales and markers are dropped."""
    tensors: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, value in state.items():
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            scales[key[: -len(suffix)] + ".weight"] = value
        elif key.endswith(DROPPED_SUFFIXES) or key == "scaled_fp8":
            continue
        else:
            tensors[key] = value
    return tensors, scales


def has_fp8(state: Mapping[str, Tensor]) -> bool:
    return any(is_fp8(state[k]) for k in state)


def prepare_fp8_state(
    state: Mapping[str, Tensor],
    *,
    keep: Callable[[str], bool] | None = None,
    quantize_others: bool = False,
) -> tuple[dict[str, Tensor], set[str]]:
    """Resolve fp8 tensors and scales of a state dict in runtime names.

    Layers for which ``keep(layer)`` is true keep (or, with ``quantize_others``, get) an fp8 weight and
    a ``<layer>.weight_scale``; every other fp8 tensor is dequantized to float32. Returns the new state
    dict and the names of the layers that stay fp8.
    """
    tensors, scales = split_scales(state)
    out: dict[str, Tensor] = {}
    kept: set[str] = set()
    for key, value in tensors.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = scales.pop(key, None)
        want = layer is not None and keep is not None and keep(layer)
        if want and (is_fp8(value) or quantize_others):
            if is_fp8(value):
                out[key] = value
                out[layer + ".weight_scale"] = (
                    scale.to(torch.float32).reshape(())
                    if scale is not None
                    else torch.ones((), dtype=torch.float32)
                )
            else:
                q, s = quantize(value)
                out[key], out[layer + ".weight_scale"] = q, s.reshape(())
            kept.add(layer)
        elif is_fp8(value) or scale is not None:
            out[key] = dequantize(value, scale)
        else:
            out[key] = value
    if scales:
        raise ValueError(f"weight scales without a weight: {sorted(scales)[:5]}")
    return out, kept


def dit_fp8_keep(layer: str) -> bool:
    return re.fullmatch(DIT_FP8_LINEARS, layer) is not None


def dequantize_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every fp8 tensor (and scaled weight) dequantized to float32; other tensors as they are."""
    if not has_fp8(state) and not any(k.endswith(SCALE_SUFFIXES) for k in state):
        return dict(state)
    return prepare_fp8_state(state)[0]


def check_fp8_mode(mode: str | None, device: torch.device | str) -> None:
    """Refuse an unknown mode, and ``"scaled_mm"`` where fp8 matmuls are not available."""
    if mode is None:
        return
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)} (or None), got {mode!r}")
    if mode == "scaled_mm" and not fp8_matmul_supported(device):
        raise ValueError(
            f"fp8='scaled_mm' needs a CUDA GPU with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper) "
            f"and torch._scaled_mm; {torch.device(device)} has none: use fp8='upcast'"
        )


def dit_fp8_state(state: Mapping[str, Tensor], mode: str | None) -> tuple[dict[str, Tensor], set[str]]:
    """A DiT state dict in runtime names -> (state with fp8 resolved, layers that stay fp8) for ``mode``."""
    if mode == "dequantize":
        return dequantize_state(state), set()
    quantize_others = mode in ("quantize", "scaled_mm")
    if not quantize_others and not has_fp8(state) and not any(k.endswith(SCALE_SUFFIXES) for k in state):
        return dict(state), set()
    return prepare_fp8_state(state, keep=dit_fp8_keep, quantize_others=quantize_others)
