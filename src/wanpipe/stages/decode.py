"""The decode stage: denoised latents -> frames in [0, 1], whole or split across the ranks by bands; or
through the tiny autoencoder TAEHV (``decoder="tiny"``, :func:`decode_tiny`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from wanpipe.context import InvalidRequestError
from wanpipe.models.taehv import TAEHV
from wanpipe.models.vae import WanVAE
from wanpipe.models.vae_tiling import (
    TileGrid,
    decode_tiled,
    encode_tiled,
    plan_encode_tiles,
    plan_tiles,
    upper_bytes_per_pixel,
)
from wanpipe.runtime.memory import available_memory, lean_while
from wanpipe.stages.placement import Placement

AUTO_FRACTION = 0.8
"""With no ``vae_memory``: the budget is this fraction of the GPU's free memory (on the CPU, of the
system's available memory), less the output video and the head's outputs (which the tiled decode holds
whole)."""


@dataclass(frozen=True)
class CpuDecodeMode:
    """One way to run the CPU decode: the decoder's upper levels in ``piece_frames``-frame pieces, with
    glibc returning freed blocks during the decode (``lean``, :func:`~wanpipe.runtime.memory.lean_while`)
    or not; ``over_estimate``: its measured peak over :func:`~wanpipe.models.vae_tiling.upper_bytes_per_pixel`'s
    estimate (the oneDNN convolutions' own buffers and the allocator's slack, not in the estimate)."""

    piece_frames: int
    lean: bool
    over_estimate: float


CPU_DECODE_MODES = (
    CpuDecodeMode(4, False, 2.0),
    CpuDecodeMode(4, True, 1.45),
    CpuDecodeMode(2, True, 1.55),
    CpuDecodeMode(1, True, 1.55),
)
"""Fastest first. Measured on the mid-size bench checkpoint, 256 x 256 x 33, decode alone above the loaded
process (bench/results/vae-memory-vm-20261129-184438.json): 741 MB in 7.6 s, 529 MB in 12.4 s, 433 MB in
13.4 s, 369 MB in 23.1 s, against estimates of 370, 370, 286 and 244 MB. 1-frame pieces run the convolutions directly
instead of by time-Winograd; ``lean`` pays a page fault for every large block."""


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`decode` runs for one latent: ``tile`` (None: the whole frame), and on the CPU the
    :class:`CpuDecodeMode` (None: the decoder as it is)."""

    tile: TileGrid | None
    mode: CpuDecodeMode | None = None

    @contextlib.contextmanager
    def applied(self, vae: WanVAE) -> Iterator[None]:
        """Within the block, the decoder runs in :attr:`mode` (restored after)."""
        if self.mode is None:
            yield
            return
        old = vae.decoder.piece_frames
        vae.decoder.piece_frames = self.mode.piece_frames
        try:
            with lean_while(self.mode.lean):
                yield
        finally:
            vae.decoder.piece_frames = old


def vae_budget(z: Tensor, memory: int | None) -> int | None:
    """The tiled decode's (or encode's) budget in bytes for raw latents ``z`` (B, z, f, h, w) (or a video
    on the same device): ``memory`` when given, else :data:`AUTO_FRACTION` of a CUDA device's free
    memory or of the system's available memory for the CPU (:func:`~wanpipe.runtime.memory.available_memory`),
    else None (not known: no tiling)."""
    if memory is not None:
        return memory
    if z.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(z.device)
    elif z.device.type == "cpu" and (available := available_memory()) is not None:
        free = available
    else:
        return None
    return max(1, int(free * AUTO_FRACTION))


def plan_decode(vae: WanVAE, z: Tensor, memory: int | None) -> DecodePlan:
    """How to decode raw latents ``z`` (B, z, f, h, w) within ``memory`` bytes of working memory
    (``--vae-memory``; None: a share of the free memory, :func:`vae_budget`). On the CPU the fastest of
    :data:`CPU_DECODE_MODES` whose whole frame fits, else tiles in the leanest mode; on a GPU tiles when
    the whole frame does not fit. The same frames every way (up to float rounding)."""
    budget = vae_budget(z, memory)
    if budget is None:
        return DecodePlan(None)
    decoder, (h, w), itemsize = vae.decoder, z.shape[3:], z.element_size()
    if memory is None:  # automatic: the video and the head outputs come out of the free memory too
        b, _, f = z.shape[:3]
        cfg = vae.config
        held = (
            b * cfg.video_out_channels * (cfg.temporal_stride * (f - 1) + 1) * h * w * cfg.spatial_stride**2
        )
        held += b * decoder.conv_in.out_channels * f * h * w
        budget = max(1, budget - held * itemsize)
    if z.device.type != "cpu":
        return DecodePlan(plan_tiles(decoder, h, w, budget, itemsize, decoder.piece_frames or 4))
    for i, mode in enumerate(CPU_DECODE_MODES):
        if upper_bytes_per_pixel(decoder, itemsize, mode.piece_frames) * mode.over_estimate * h * w <= budget:
            return DecodePlan(None, None if i == 0 else mode)
    mode = CPU_DECODE_MODES[-1]
    return DecodePlan(
        plan_tiles(decoder, h, w, int(budget / mode.over_estimate), itemsize, mode.piece_frames), mode
    )


def encode_tile(vae: WanVAE, video: Tensor, memory: int | None) -> TileGrid | None:
    """The tiles (latent pixels) for encoding ``video`` (B, 3, F, H, W) within ``memory`` bytes
    (without ``memory``: :data:`AUTO_FRACTION` of the free memory, :func:`vae_budget`), or None when it fits."""
    budget = vae_budget(video, memory)
    if budget is None:
        return None
    s = vae.config.spatial_stride
    return plan_encode_tiles(
        vae.encoder, video.shape[3] // s, video.shape[4] // s, budget, video.element_size()
    )


def encode(vae: WanVAE, video: Tensor, memory: int | None = None) -> Tensor:
    """Video (B, 3, F, H, W) in [-1, 1], on the VAE's device and dtype -> raw latents (the posterior
    mode), tiled (exact, :func:`~wanpipe.models.vae_tiling.encode_tiled`) when ``memory`` bytes
    (``--vae-memory``) do not hold the whole frame's encode."""
    tile = encode_tile(vae, video, memory)
    return vae.encode_mean(video) if tile is None else encode_tiled(vae, video, tile).mean


def decode(
    vae: WanVAE,
    latents: Tensor,
    placement: Placement,
    *,
    vae_dtype: torch.dtype,
    chunk_frames: int = 1,
    halo: int | None = None,
    memory: int | None = None,
) -> Tensor:
    """Denoised latents (B, z, f, h, w) -> frames (B, F, H, W, 3) float32 in [0, 1].

    ``chunk_frames``: latent frames per decoder chunk (the same frames, more memory); ``halo``: in a
    parallel run, each rank decodes a band of rows with this many latent rows borrowed from its
    neighbours and the bands are all-gathered (``--vae-halo``, an approximation), or -1: exact bands
    (``--vae-parallel``, :func:`wanpipe.parallel.vae.exact_parallel_decode`); None decodes
    the whole frame on every rank. ``memory``: the VAE budget in bytes (``--vae-memory``): tiled, exact,
    when the whole frame does not fit, and on the CPU the decode mode that fits (:func:`plan_decode`)."""
    z = vae.denormalize_latents(latents.to(placement.device, vae_dtype))
    plan = plan_decode(vae, z, memory)
    with placement.on_device(vae), plan.applied(vae):
        if halo is not None and placement.rank0_encodes:
            from wanpipe.parallel.vae import EXACT_HALO, exact_parallel_decode, parallel_decode

            if halo == EXACT_HALO:
                video = exact_parallel_decode(vae, z, chunk_frames=chunk_frames)
            else:
                video = parallel_decode(vae, z, halo, chunk_frames=chunk_frames)
        elif plan.tile is not None:
            video = decode_tiled(vae, z, plan.tile, chunk_frames=chunk_frames)
        else:
            # No trim between chunks: the next chunk would fault the same pages back in (measured
            # 25-30% of the CPU decode time for ~15 MB less peak RSS); stages still trim.
            video = vae.decode(z, chunk_frames=chunk_frames)
    del z
    if video.dtype == torch.float32:  # in place: no second copy of the video
        frames = video.div_(2).add_(0.5).clamp_(0, 1)
    else:
        frames = (video.float() / 2 + 0.5).clamp(0, 1)
    del video
    return frames.permute(0, 2, 3, 4, 1).contiguous()


def check_decoder(decoder: str, taehv: TAEHV | None) -> None:
    """InvalidRequestError (param ``decoder``) for ``decoder="tiny"`` without a loaded TAEHV."""
    if decoder == "tiny" and taehv is None:
        raise InvalidRequestError(
            "decoder 'tiny' needs the tiny VAE loaded: pass --tiny-vae PATH (a taew2_1 / taew2_2 file), "
            "from_pretrained(..., tiny_vae=) or pipe.load_tiny_vae(path); or use decoder 'vae'",
            param="decoder",
        )


def decode_tiny(
    taehv: TAEHV | None, latents: Tensor, placement: Placement, chunk_frames: int | None = None
) -> Tensor:
    """Denoised latents (B, z, f, h, w) -> frames (B, 4(f - 1) + 1, H, W, 3) float32 in [0, 1] through
    TAEHV: the latents as the DiT made them (TAEHV is trained on the normalized latents; no
    ``denormalize_latents``), the same frame count and size as :func:`decode`. Every rank decodes whole.

    ``chunk_frames``: latent frames per piece (``--vae-chunk-frames``; the same frames, less memory, slower:
    1 takes about twice the time and a quarter of the memory of all at once on the CPU); None: all at once."""
    check_decoder("tiny", taehv)
    assert taehv is not None
    weight = next(taehv.parameters())
    if weight.device != placement.device:
        taehv.to(placement.device)
    with torch.inference_mode():
        video = taehv.decode_video(latents.to(placement.device, weight.dtype), chunk_frames=chunk_frames)
    return video.float().permute(0, 2, 3, 4, 1).contiguous()
