"""Key map of the Wan VAE: diffusers ``AutoencoderKLWan`` names -> :class:`wanpipe.models.vae.WanVAE`.

Most names are diffusers' own. Two renames drop container indices that carry no meaning:

- a resample's spatial conv is ``<resample>.conv`` (diffusers: ``<resample>.resample.1``, the slot
  after a parameterless pad/upsample in an ``nn.Sequential``);
- a decoder up block's upsampler is ``up_blocks.i.upsampler`` (diffusers' Wan 2.1 layout:
  ``up_blocks.i.upsamplers.0``; its Wan 2.2 residual layout already says ``upsampler``).

One forward table reads both layouts. The way back depends on the layout, because both layouts end
at the same wanpipe name ``decoder.up_blocks.i.upsampler``: :func:`vae_to_diffusers_keys` picks the
table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from wanpipe.weights.keymap import KeyMap, remap_state_dict

T = TypeVar("T")

VAE_DIFFUSERS_KEYS: KeyMap = (
    (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.resample\.1\.(weight|bias)", r"\1.upsampler.conv.\2"),
    (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.(.+)", r"\1.upsampler.\2"),
    (r"(.+)\.resample\.1\.(weight|bias)", r"\1.conv.\2"),
)
"""diffusers names (Wan 2.1 or Wan 2.2 residual layout) -> wanpipe names."""

VAE_TO_DIFFUSERS_KEYS: KeyMap = (
    (r"(decoder\.up_blocks\.\d+)\.upsampler\.conv\.(weight|bias)", r"\1.upsamplers.0.resample.1.\2"),
    (r"(decoder\.up_blocks\.\d+)\.upsampler\.(.+)", r"\1.upsamplers.0.\2"),
    (r"(.+)\.conv\.(weight|bias)", r"\1.resample.1.\2"),
)
"""The inverse table for the Wan 2.1 layout: wanpipe names -> diffusers names (to write checkpoints
diffusers can read)."""

VAE_RESIDUAL_TO_DIFFUSERS_KEYS: KeyMap = ((r"(.+)\.conv\.(weight|bias)", r"\1.resample.1.\2"),)
"""The inverse table for the Wan 2.2 residual layout (``is_residual=True``): its up blocks keep
diffusers' ``upsampler`` name, and its down blocks' ``downsampler`` too."""


def vae_to_diffusers_keys(is_residual: bool) -> KeyMap:
    """The inverse table for a VAE config's layout (``VAEConfig.is_residual``)."""
    return VAE_RESIDUAL_TO_DIFFUSERS_KEYS if is_residual else VAE_TO_DIFFUSERS_KEYS


def prepare_vae_state(checkpoint_state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict (either layout) to :class:`WanVAE`'s names."""
    return remap_state_dict(checkpoint_state_dict, VAE_DIFFUSERS_KEYS)
