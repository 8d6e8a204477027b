"""The decode stage: denoised latents -> frames in [0, 1], whole or split across the ranks by bands; or
through the tiny autoencoder TAEHV (``decoder="tiny"``, :func:`decode_tiny`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from wanpipe.context import InvalidRequestError
from wanpipe.models.taehv import TAEHV
from wanpipe.models.vae import WanVAE
from wanpipe.models.vae_tiling import decode_tiled, encode_tiled, plan_encode_tiles, plan_tiles
from wanpipe.runtime.memory import lean_while
from wanpipe.stages.placement import Placement

AUTO_FRACTION = 0.8
"""With no ``vae_memory`` on a GPU: the budget is this fraction of the device's free memory, less the
output video and the head's outputs (which the tiled decode holds whole)."""


LOW_MEMORY_PIECE_FRAMES = 1
"""Frames per piece of the decoder's upper levels in a low-memory CPU decode (4 otherwise): 1-frame
pieces run the last levels' convolutions directly instead of by time-Winograd (~1.5x their time)."""

CPU_MEASURED_OVER_ESTIMATE = 1.6
"""The CPU decode's measured peak over :func:`~wanpipe.models.vae_tiling.upper_bytes_per_pixel`'s
estimate (bench/bench_vae_memory.py, mid-size checkpoint, 256 x 256 x 17: 386 MB measured against 244 MB
estimated with 1-frame pieces, 555 against 370 with 4): the oneDNN convolutions' own buffers and the
allocator's slack, not in the estimate. The tile plan on the CPU divides the budget by it."""


def low_memory(z: Tensor, memory: int | None) -> bool:
    """Whether the decode of ``z`` runs in the low-memory way (:func:`low_memory_decode`): on the CPU
    when a VAE budget (``--vae-memory``) is given."""
    return memory is not None and z.device.type == "cpu"


@contextlib.contextmanager
def low_memory_decode(vae: WanVAE, active: bool) -> Iterator[None]:
    """When ``active``: the decoder's upper levels in :data:`LOW_MEMORY_PIECE_FRAMES`-frame pieces and
    glibc returning freed blocks during the block (:func:`~wanpipe.runtime.memory.lean_while`): half the
    CPU decode's peak (mid-size checkpoint at 256 x 256: 790 -> 386 MB above the loaded process) for
    ~2x its time (page faults, direct convolutions). The same frames up to rounding (<= 1e-6)."""
    if not active:
        yield
        return
    old = vae.decoder.piece_frames
    vae.decoder.piece_frames = LOW_MEMORY_PIECE_FRAMES
    try:
        with lean_while():
            yield
    finally:
        vae.decoder.piece_frames = old


def vae_budget(z: Tensor, memory: int | None) -> int | None:
    """The tiled decode's (or encode's) budget in bytes for raw latents ``z`` (B, z, f, h, w) (or a video
    on the same device): ``memory`` when given,
    else on a CUDA device :data:`AUTO_FRACTION` of its free memory (less what the decode holds whole),
    else None (no tiling)."""
    if memory is not None:
        return memory
    if z.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(z.device)
    return max(1, int(free * AUTO_FRACTION))


def vae_tile(vae: WanVAE, z: Tensor, memory: int | None) -> tuple[int, int] | None:
    """The tile (latent rows, cols) for decoding raw latents ``z`` (B, z, f, h, w) within ``memory``
    bytes (see :func:`vae_budget`), or None when the whole frame fits."""
    budget = vae_budget(z, memory)
    if budget is None:
        return None
    if memory is None:  # automatic: the video and the head outputs come out of the free memory too
        b, _, f, h, w = z.shape
        cfg = vae.config
        frames = cfg.temporal_stride * (f - 1) + 1
        held = b * cfg.video_out_channels * frames * h * w * cfg.spatial_stride**2
        held += b * vae.decoder.conv_in.out_channels * f * h * w
        budget = max(1, budget - held * z.element_size())
    piece = vae.decoder.piece_frames or 4
    if z.device.type == "cpu":
        budget = max(1, int(budget / CPU_MEASURED_OVER_ESTIMATE))
        piece = LOW_MEMORY_PIECE_FRAMES if low_memory(z, memory) else piece
    return plan_tiles(vae.decoder, z.shape[3], z.shape[4], budget, z.element_size(), piece)


def encode_tile(vae: WanVAE, video: Tensor, memory: int | None) -> tuple[int, int] | None:
    """The tile (latent rows, cols) for encoding ``video`` (B, 3, F, H, W) within ``memory`` bytes
    (on a GPU without ``memory``: :data:`AUTO_FRACTION` of the free memory), or None when it fits."""
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
    when the whole frame does not fit (:func:`vae_tile`); on the CPU also :func:`low_memory_decode`."""
    z = vae.denormalize_latents(latents.to(placement.device, vae_dtype))
    with placement.on_device(vae), low_memory_decode(vae, low_memory(z, memory)):
        if halo is not None and placement.rank0_encodes:
            from wanpipe.parallel.vae import EXACT_HALO, exact_parallel_decode, parallel_decode

            if halo == EXACT_HALO:
                video = exact_parallel_decode(vae, z, chunk_frames=chunk_frames)
            else:
                video = parallel_decode(vae, z, halo, chunk_frames=chunk_frames)
        elif (tile := vae_tile(vae, z, memory)) is not None:
            video = decode_tiled(vae, z, tile, chunk_frames=chunk_frames)
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
