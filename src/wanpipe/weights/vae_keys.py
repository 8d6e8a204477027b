"""Key maps of the Wan VAE: diffusers ``AutoencoderKLWan`` names <-> :class:`wanpipe.models.vae.WanVAE`.

Most names are diffusers' own. Two renames drop container indices that carry no meaning:

- a resample's spatial conv is ``<resample>.conv`` (diffusers: ``<resample>.resample.1``, the slot
  after a parameterless pad/upsample in an ``nn.Sequential``);
- a decoder up block's upsampler is ``up_blocks.i.upsampler`` (diffusers' Wan 2.1 layout:
  ``up_blocks.i.upsamplers.0``; its Wan 2.2 residual layout already says ``upsampler``).

The tables are written once, as ``(diffusers, wanpipe)`` templates. Reading takes both layouts with one
key map. The way back depends on the layout, because both layouts end at the same wanpipe name
``decoder.up_blocks.i.upsampler``: the Wan 2.1 layout is written back with the upsampler rules and the
resample rule, the Wan 2.2 residual layout with the resample rule alone (:func:`vae_to_diffusers_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from wanpipe.weights.keymap import KeyMap, KeyRule, KeyTable, remap_state_dict

T = TypeVar("T")

RESAMPLE_CONV: KeyRule = ("{rest}.resample.1.{wb}", "{rest}.conv.{wb}")
"""A resample's spatial conv (diffusers and the original repositories both say ``resample.1``)."""

VAE21_UPSAMPLER_KEYS = KeyTable(
    (
        ("decoder.up_blocks.{n}.upsamplers.0.resample.1.{wb}", "decoder.up_blocks.{n}.upsampler.conv.{wb}"),
        ("decoder.up_blocks.{n}.upsamplers.0.{rest}", "decoder.up_blocks.{n}.upsampler.{rest}"),
    )
)
"""diffusers' Wan 2.1 layout only: the decoder's ``upsamplers.0``."""

VAE_RESAMPLE_KEYS = KeyTable((RESAMPLE_CONV,))
"""Both layouts."""

VAE_DIFFUSERS_KEYS: KeyMap = (VAE21_UPSAMPLER_KEYS + VAE_RESAMPLE_KEYS).to_runtime()
"""diffusers names (Wan 2.1 or Wan 2.2 residual layout) -> wanpipe names."""

VAE_TO_DIFFUSERS_KEYS: KeyMap = (VAE21_UPSAMPLER_KEYS + VAE_RESAMPLE_KEYS).to_checkpoint()
"""wanpipe names -> diffusers names of the Wan 2.1 layout (to write checkpoints diffusers can read)."""

VAE_RESIDUAL_TO_DIFFUSERS_KEYS: KeyMap = VAE_RESAMPLE_KEYS.to_checkpoint()
"""wanpipe names -> diffusers names of the Wan 2.2 residual layout (``is_residual=True``): its up
blocks keep diffusers' ``upsampler`` name, and its down blocks' ``downsampler`` too."""


def vae_to_diffusers_keys(is_residual: bool) -> KeyMap:
    """The inverse table for a VAE config's layout (``VAEConfig.is_residual``)."""
    return VAE_RESIDUAL_TO_DIFFUSERS_KEYS if is_residual else VAE_TO_DIFFUSERS_KEYS


def prepare_vae_state(checkpoint_state_dict: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict (either layout) to :class:`WanVAE`'s names."""
    return remap_state_dict(checkpoint_state_dict, VAE_DIFFUSERS_KEYS)
