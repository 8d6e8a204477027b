"""Runtime options: how a loaded pipeline runs (speed and memory), not what it computes.

Exact by default: every option below gives the same frames as the plain path except the opt-in
approximations (``cache``: First-Block-Cache or TeaCache with a ``residual_threshold`` > 0, TaylorSeer,
MagCache; ``cfg_truncation`` < 1). ``vae_memory`` (the exact tiled VAE decode) gives the same frames
up to float rounding.
``compress_text`` (on by default) is exact in arithmetic and differs by float rounding only.

Wiring (for ``cli.py`` / ``pipeline.py``)::

    from wanpipe.runtime import add_runtime_arguments, options_from_args
    add_runtime_arguments(generate_parser)            # --compile --offload --cache ...
    pipe = WanPipeline.from_pretrained(..., runtime=options_from_args(args))
    pipe.set_runtime(other_options)                   # later, on a loaded pipeline

Per request, ``WanRequest.residual_threshold`` / ``cfg_truncation`` / ``cache`` + ``cache_options``
override the defaults here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from wanpipe import arguments as a
from wanpipe.context import CacheOptions, InvalidRequestError

OFFLOAD_MODES = ("none", "model", "block")
CACHE_MODES = ("none", "first-block", "teacache", "taylorseer", "magcache")


@dataclass(frozen=True)
class RuntimeOptions:
    compile: bool = False
    """torch.compile each DiT block (one artifact for all blocks) and the head."""
    compile_mode: str | None = None
    """torch.compile mode ("max-autotune-no-cudagraphs", ...); None: the default."""
    offload: Literal["none", "model", "block"] = "none"
    """"model": each component on the device only while it runs; "block": DiT blocks streamed."""
    offload_buffers: int = 2
    """block offload: how many DiT blocks are resident on the device at once."""
    cache: Literal["none", "first-block", "teacache", "taylorseer", "magcache"] | None = None
    """Step skipping (an approximation) for requests that name none: First-Block-Cache and TeaCache are
    off unless a residual_threshold > 0 is given too; TaylorSeer and MagCache take ``cache_options``."""
    residual_threshold: float = 0.0
    """The step cache's threshold (0: never skip); a request's own value wins."""
    teacache_coefficients: tuple[float, ...] | None = None
    """TeaCache's rescaling polynomial, highest degree first; None: the published TeaCache4Wan2.1 set for
    the model (Wan 2.1 T2V 1.3B/14B, I2V 14B 480P/720P; other models are refused without these)."""
    cfg_truncation: float | None = None
    """Guidance only for the first fraction of the steps (None / 1.0: all steps); a request's wins."""
    text_encoder_device: str | None = None
    """Where the text encoder runs ("cpu" keeps UMT5-XXL off the GPU); None: the pipeline's device."""
    vae_chunk_frames: int | None = None
    """Latent frames decoded per VAE chunk (more: faster, more memory; same frames); None: 1."""
    host_memory: Literal["cache", "lean", "system"] = "cache"
    """CPU (glibc): "cache" keeps freed host memory in the process for reuse (no page faults on the hot
    path: 10-15% of a warm generation on the benchmark machine, about the same peak RSS); "lean" returns
    every large allocation at free and trims the heap between stages (lowest RSS, ~2x slower);
    "system" leaves glibc's settings alone. Process-wide (see ``wanpipe.runtime.memory``)."""
    trim_host_memory: bool = False
    """CPU: ``malloc_trim`` between stages (text encode, denoise, decode), so freed host memory goes
    back to the system between requests, at the cost of faulting it in again (on with "lean")."""
    text_cache_size: int = 32
    """Prompt embeddings kept for reuse (by token ids, least recently used out): a repeated prompt, such
    as the usual negative one, is not encoded again; the same embeddings, so the same frames. 0: off."""
    attention_backend: str = "auto"
    """The DiT's SDPA kernel: "auto" (PyTorch's choice), or only "flash", "cudnn", "efficient" or "math";
    all exact. The kernels used are reported in ``timings.attention``."""
    compress_text: bool = True
    """Cross-attend to each prompt's tokens plus one stand-in for its zero padding (logit + log n)
    instead of all 512 text tokens: the same attention up to float rounding, ~30% fewer DiT FLOPs on
    small videos. False: the literal 512-token computation."""
    cache_options: Mapping[str, Any] | None = None
    """The options of ``cache`` (:data:`~wanpipe.runtime.cache_options.CACHE_OPTIONS`; text values
    allowed), resolved with every default filled in. First-Block-Cache's and TeaCache's ``threshold``
    and ``coefficients`` set ``residual_threshold`` and ``teacache_coefficients``."""
    vae_memory: int | str | None = None
    """Memory budget (bytes, or text such as "2GB") for the VAE decoder's upsampling levels: when the
    whole frame does not fit, they run tile by tile with an exact halo (the same frames up to float
    rounding, see ``wanpipe.models.vae_tiling``); on the CPU it also picks the fastest decode mode that
    fits (``wanpipe.stages.decode.plan_decode``). None: from a GPU's free memory, or the CPU's available
    memory (so the default decode unless the machine cannot hold it)."""
    preview_decoder: Literal["auto", "linear", "tiny"] = "auto"
    """Live previews' decoder (docs/previews.md): "linear" the latent-to-RGB factors, "tiny" the tiny VAE
    (TAEHV, loaded with ``tiny_vae=``), "auto" the tiny VAE when one is loaded and the device is a GPU."""

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.cache not in (None, *CACHE_MODES):
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        self._resolve_cache_options()
        if self.teacache_coefficients is not None:
            if not self.teacache_coefficients or not all(
                isinstance(c, int | float) and math.isfinite(c) for c in self.teacache_coefficients
            ):
                raise ValueError(
                    f"teacache_coefficients must be finite numbers, got {self.teacache_coefficients!r}"
                )
            object.__setattr__(
                self, "teacache_coefficients", tuple(float(c) for c in self.teacache_coefficients)
            )
        if self.residual_threshold < 0:
            raise ValueError(f"residual_threshold must be >= 0, got {self.residual_threshold}")
        if self.cfg_truncation is not None and not 0.0 <= self.cfg_truncation <= 1.0:
            raise ValueError(f"cfg_truncation must be in [0, 1], got {self.cfg_truncation}")
        if self.vae_chunk_frames is not None and self.vae_chunk_frames < 1:
            raise ValueError(f"vae_chunk_frames must be >= 1, got {self.vae_chunk_frames}")
        from wanpipe.runtime.memory import HOST_MEMORY_MODES

        if self.host_memory not in HOST_MEMORY_MODES:
            raise ValueError(f"host_memory must be one of {HOST_MEMORY_MODES}, got {self.host_memory!r}")
        from wanpipe.runtime.attention import ATTENTION_BACKENDS

        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {self.text_cache_size}")
        if self.offload_buffers < 1:
            raise ValueError(f"offload_buffers must be >= 1, got {self.offload_buffers}")
        if self.preview_decoder not in ("auto", "linear", "tiny"):
            raise ValueError(f"preview_decoder must be auto, linear or tiny, got {self.preview_decoder!r}")
        if self.vae_memory is not None:
            from wanpipe.runtime.memory import parse_memory

            try:
                object.__setattr__(self, "vae_memory", parse_memory(self.vae_memory))
            except ValueError as e:
                raise ValueError(f"vae_memory: {e}") from None

    def _resolve_cache_options(self) -> None:
        from wanpipe.runtime.cache_options import resolve_cache_options

        given = self.cache_options
        if self.cache in (None, "none"):
            if given:
                raise InvalidRequestError(
                    "cache_options needs cache (the step cache they configure)", "cache_options"
                )
            object.__setattr__(self, "cache_options", None)
            return
        resolved = resolve_cache_options(self.cache, given)
        if self.cache in ("first-block", "teacache"):
            given = dict(given or {})
            if "threshold" in given:
                object.__setattr__(self, "residual_threshold", resolved["threshold"])
            if given.get("coefficients") is not None:
                object.__setattr__(self, "teacache_coefficients", resolved["coefficients"])
            resolved = {}
        object.__setattr__(self, "cache_options", CacheOptions(resolved))

    def with_(self, **changes: Any) -> RuntimeOptions:
        return replace(self, **changes)


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the speed/memory options to a ``generate`` (or ``bench``/``serve``) parser."""
    g = parser.add_argument_group("speed and memory")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT per block (same frames)")
    g.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="none",
        help="model: each component on the GPU only while it runs; block: stream DiT blocks (same frames)",
    )
    g.add_argument(
        "--offload-buffers", type=a.integer(1), default=2, help="block offload: DiT blocks resident at once"
    )
    g.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="none",
        help="skip or predict DiT steps (approximate): first-block, teacache, taylorseer (Modular MAX's), "
        "magcache; see docs/fast-sampling.md",
    )
    g.add_argument(
        "--cache-option",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="an option of --cache, repeatable: e.g. cache_interval=4, max_order=2 (taylorseer); "
        "threshold=0.1, mag_ratios=FILE, calibrate=true, calibration_file=FILE (magcache)",
    )
    g.add_argument(
        "--residual-threshold",
        type=a.number(0),
        default=None,
        help="step cache threshold (first-block: ~0.05-0.1; teacache: 0.05-0.2; magcache: ~0.06; 0 never skips)",
    )
    g.add_argument(
        "--teacache-coefficients",
        type=_coefficients,
        default=None,
        metavar="C4,C3,C2,C1,C0",
        help="TeaCache's rescaling polynomial, highest degree first (default: the published TeaCache4Wan2.1 "
        "set for Wan 2.1 T2V/I2V; needed for other models)",
    )
    g.add_argument(
        "--cfg-truncation",
        type=a.number(0, 1),
        default=None,
        help="guidance for this fraction of the steps only, e.g. 0.8 (approximate; default all)",
    )
    g.add_argument(
        "--text-encoder-device", type=a.device, default=None, help="run the text encoder here, e.g. cpu"
    )
    g.add_argument(
        "--vae-chunk-frames",
        type=a.integer(1),
        default=None,
        help="latent frames per VAE decode chunk (default 1)",
    )
    g.add_argument(
        "--preview-decoder",
        choices=("auto", "linear", "tiny"),
        default="auto",
        help="live previews' decoder: linear (latent-to-RGB factors), tiny (needs --tiny-vae), auto (tiny "
        "when loaded on a GPU, else linear); docs/previews.md",
    )
    g.add_argument(
        "--vae-memory",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="memory budget for the VAE decode, e.g. 2GB: tiled (exact) when the frame does not fit; on the "
        "CPU also the fastest decode mode that fits (default: from free GPU memory or available RAM)",
    )
    g.add_argument(
        "--text-cache-size",
        type=a.integer(0),
        default=None,
        help="prompt embeddings kept for reuse, e.g. the usual negative prompt (default 32; 0: off)",
    )
    g.add_argument(
        "--attention-backend",
        choices=("auto", "flash", "cudnn", "efficient", "math"),
        default="auto",
        help="the DiT's attention kernel (all exact; default: PyTorch's choice, reported in the timings)",
    )
    g.add_argument(
        "--host-memory",
        choices=("cache", "lean", "system"),
        default="cache",
        help="CPU: keep freed host memory for reuse (cache, default: no page faults), give it back at "
        "once (lean: lowest RSS, slower), or leave glibc alone (system)",
    )
    g.add_argument(
        "--no-compress-text",
        dest="compress_text",
        action="store_false",
        help="cross-attend to all 512 (zero-padded) text tokens instead of prompt + one padding stand-in",
    )


def _coefficients(text: str) -> tuple[float, ...]:
    """``--teacache-coefficients 1.2,-3,0.5``: comma-separated finite numbers."""
    values = a.finite_numbers(text)
    if values is None:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, highest degree first (e.g. 2.4e3,-1.3e3,201,-8.3,0.14), got {text!r}"
        )
    return tuple(values)


def _memory(text: str) -> int:
    """``--vae-memory 2GB``: a memory size in bytes."""
    from wanpipe.runtime.memory import parse_memory

    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_value(text: str) -> str:
    """``--cache-option KEY=VALUE``: checked for the ``=`` here, the value against the cache later."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. max_order=2), got {text!r}")
    return text


def cache_arguments_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--cache`` / ``--cache-option`` / ``--residual-threshold`` together, in one
    line naming the flag (before any model is loaded); None when nothing is."""
    cache = getattr(args, "cache", "none") or "none"
    items = getattr(args, "cache_option", None)
    if items and cache == "none":
        return "--cache-option needs --cache (the step cache it configures)"
    if cache == "taylorseer" and getattr(args, "residual_threshold", None) is not None:
        return "--residual-threshold: TaylorSeer has no threshold; its options are --cache-option cache_interval=N ..."
    if cache == "none":
        return None
    from wanpipe.runtime.cache_options import option_pairs, resolve_cache_options

    try:
        resolve_cache_options(cache, option_pairs(items))
    except InvalidRequestError as e:
        return f"--cache-option: {str(e).removeprefix('cache_options: ')}"
    return None


def options_from_args(args: argparse.Namespace) -> RuntimeOptions:
    from wanpipe.runtime.cache_options import option_pairs

    cache = getattr(args, "cache", "none")
    threshold = getattr(args, "residual_threshold", None)
    cache_options = option_pairs(getattr(args, "cache_option", None))
    if cache in ("first-block", "teacache") and threshold is None and "threshold" not in cache_options:
        threshold = 0.05 if cache == "first-block" else 0.08
    return RuntimeOptions(
        compile=bool(getattr(args, "compile", False)),
        offload=getattr(args, "offload", "none") or "none",
        offload_buffers=2 if getattr(args, "offload_buffers", None) is None else args.offload_buffers,
        cache=None if cache in (None, "none") else cache,
        residual_threshold=float(threshold or 0.0),
        teacache_coefficients=getattr(args, "teacache_coefficients", None),
        cfg_truncation=getattr(args, "cfg_truncation", None),
        text_encoder_device=getattr(args, "text_encoder_device", None),
        vae_chunk_frames=getattr(args, "vae_chunk_frames", None),
        compress_text=bool(getattr(args, "compress_text", True)),
        attention_backend=getattr(args, "attention_backend", "auto") or "auto",
        text_cache_size=32 if getattr(args, "text_cache_size", None) is None else args.text_cache_size,
        host_memory=getattr(args, "host_memory", "cache") or "cache",
        cache_options=cache_options or None,
        vae_memory=getattr(args, "vae_memory", None),
        preview_decoder=getattr(args, "preview_decoder", "auto") or "auto",
    )


def apply_runtime_options(
    target: Any, options: RuntimeOptions, *, device: str | torch.device | None = None
) -> Any:
    """Run a ``WanPipeline`` or ``WanExecutor`` with ``options`` from now on; returns it. The same as
    ``target.set_runtime(options, device=device)`` (prefer that, or ``from_pretrained(runtime=...)``).

    ``device``: the compute device, when the pipeline was loaded elsewhere (e.g. loaded on the CPU and
    run on "cuda" with offload, so the full model never sits on the GPU).
    """
    getattr(target, "executor", target).set_runtime(options, device=device)
    return target
