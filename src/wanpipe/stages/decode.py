"""The decode stage: denoised latents -> frames in [0, 1], whole or split across the ranks by bands."""

from __future__ import annotations

import torch
from torch import Tensor

from wanpipe.models.vae import WanVAE
from wanpipe.stages.placement import Placement


def decode(
    vae: WanVAE,
    latents: Tensor,
    placement: Placement,
    *,
    vae_dtype: torch.dtype,
    chunk_frames: int = 1,
    halo: int | None = None,
) -> Tensor:
    """Denoised latents (B, z, f, h, w) -> frames (B, F, H, W, 3) float32 in [0, 1].

    ``chunk_frames``: latent frames per decoder chunk (the same frames, more memory); ``halo``: in a
    parallel run, each rank decodes a band of rows with this many latent rows borrowed from its
    neighbours and the bands are all-gathered (``--vae-parallel``, an approximation); None decodes
    the whole frame on every rank."""
    z = vae.denormalize_latents(latents.to(placement.device, vae_dtype))
    with placement.on_device(vae):
        if halo is not None and placement.rank0_encodes:
            from wanpipe.parallel.vae import parallel_decode

            video = parallel_decode(vae, z, halo, chunk_frames=chunk_frames)
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
