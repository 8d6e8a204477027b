"""Key map of the Wan VAE: diffusers ``AutoencoderKLWan`` names -> :class:`wanpipe.models.vae.WanVAE`.

Most names are diffusers' own. Two renames drop container indices that carry no meaning:

- a resample's spatial conv is ``<resample>.conv`` (diffusers: ``<resample>.resample.1``, the slot
  after a parameterless pad/upsample in an ``nn.Sequential``);
- a decoder up block's upsampler is ``up_blocks.i.upsampler`` (diffusers' Wan 2.1 layout:
  ``up_blocks.i.upsamplers.0``; its Wan 2.2 residual layout already says ``upsampler``).
"""

from __future__ import annotations

from wanpipe.weights.keymap import KeyMap

VAE_DIFFUSERS_KEYS: KeyMap = (
    (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.resample\.1\.(weight|bias)", r"\1.upsampler.conv.\2"),
    (r"(decoder\.up_blocks\.\d+)\.upsamplers\.0\.(.+)", r"\1.upsampler.\2"),
    (r"(.+)\.resample\.1\.(weight|bias)", r"\1.conv.\2"),
)

VAE_TO_DIFFUSERS_KEYS: KeyMap = (
    (r"(decoder\.up_blocks\.\d+)\.upsampler\.conv\.(weight|bias)", r"\1.upsamplers.0.resample.1.\2"),
    (r"(decoder\.up_blocks\.\d+)\.upsampler\.(.+)", r"\1.upsamplers.0.\2"),
    (r"(.+)\.conv\.(weight|bias)", r"\1.resample.1.\2"),
)
"""The inverse table: wanpipe names -> diffusers names (to write checkpoints diffusers can read)."""
