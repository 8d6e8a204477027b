"""Which scaled-dot-product-attention kernel the DiT runs, chosen and reported.

PyTorch picks an SDPA backend per call from the inputs (device, dtype, head size, mask). Every backend
computes the same attention (exactly, up to float rounding: no dropout, no approximation); they differ
in speed and memory. ``RuntimeOptions.attention_backend`` either leaves the choice to PyTorch ("auto")
or restricts the DiT to one backend ("flash", "cudnn", "efficient", "math"); in both cases the kernel
actually used for the self- and cross-attention shapes of a request is reported in
``timings.attention`` (e.g. ``"self: flash, cross: efficient"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
_BY_NAME = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_NAMES = {int(v): k for k, v in _BY_NAME.items()}


class AttentionBackendError(ValueError):
    """The chosen attention backend cannot run a model's attention on its device and dtype (bad input:
    the command line answers it with exit code 2)."""


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Within the block, SDPA uses only backend ``name`` ("auto": PyTorch's own choice). A backend that
    cannot run an input then raises PyTorch's error, which names the reason."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "auto":
        yield
        return
    with sdpa_kernel([_BY_NAME[name]]):
        yield


def sdpa_choice(
    q_len: int,
    k_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    with_bias: bool = False,
) -> str:
    """The backend PyTorch's dispatcher picks, under the current backend settings, for attention of
    Lq queries over Lk keys of ``head_dim`` (with an additive (B, 1, 1, Lk) bias when ``with_bias``):
    "flash", "cudnn", "efficient", "math", or "none" when no enabled backend can run it. Probed with
    one-head tensors of the real lengths and dtype; no attention is computed."""
    q = torch.empty(1, 1, q_len, head_dim, dtype=dtype, device=device)
    k = torch.empty(1, 1, k_len, head_dim, dtype=dtype, device=device)
    mask = torch.zeros(1, 1, 1, k_len, dtype=dtype, device=device) if with_bias else None
    try:
        choice = int(torch._fused_sdp_choice(q, k, k, mask, 0.0, False))
    except RuntimeError:
        return "none"
    return _NAMES.get(choice, "none")


def cpu_attention_backends() -> tuple[str, ...]:
    """The ``--attention-backend`` values PyTorch can run on the CPU (probed; no attention computed)."""
    usable = []
    for name in ATTENTION_BACKENDS:
        with attention_backend(name):
            if sdpa_choice(16, 16, 64, torch.float32, torch.device("cpu")) != "none":
                usable.append(name)
    return tuple(usable)
