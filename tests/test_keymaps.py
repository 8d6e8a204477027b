"""Key maps are data: every diffusers name maps to ours and back."""

from __future__ import annotations

import pytest

from tests import tiny
from wanpipe.models.transformer import TransformerConfig, WanTransformerModel
from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.weights.keymap import remap_key, remap_state_dict
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_KEYS, TRANSFORMER_TO_DIFFUSERS_KEYS
from wanpipe.weights.vae_keys import VAE_DIFFUSERS_KEYS, VAE_TO_DIFFUSERS_KEYS, vae_to_diffusers_keys

# the Wan 2.2 residual VAE (TI2V-5B layout), tiny
VAE22_KW = dict(
    base_dim=4,
    decoder_base_dim=6,
    z_dim=48,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)


def test_transformer_keys_round_trip() -> None:
    from diffusers import WanTransformer3DModel

    kw = {**tiny.TRANSFORMER_KW, "image_dim": 8, "added_kv_proj_dim": 24, "pos_embed_seq_len": 6}
    theirs = set(WanTransformer3DModel(**kw).state_dict())
    ours = set(WanTransformerModel(TransformerConfig.from_dict(kw)).state_dict())
    forward = {k: remap_key(k, TRANSFORMER_DIFFUSERS_KEYS) for k in theirs}
    assert set(forward.values()) == ours
    assert {k: remap_key(v, TRANSFORMER_TO_DIFFUSERS_KEYS) for k, v in forward.items()} == {
        k: k for k in theirs
    }


def test_vae_keys_round_trip() -> None:
    from diffusers import AutoencoderKLWan

    theirs = set(AutoencoderKLWan(**tiny.VAE_KW).state_dict())
    ours = set(WanVAE(VAEConfig.from_dict(tiny.VAE_KW)).state_dict())
    forward = {k: remap_key(k, VAE_DIFFUSERS_KEYS) for k in theirs}
    assert set(forward.values()) == ours
    assert {k: remap_key(v, VAE_TO_DIFFUSERS_KEYS) for k, v in forward.items()} == {k: k for k in theirs}


@pytest.mark.parametrize("kw", [tiny.VAE_KW, VAE22_KW], ids=["wan21", "wan22"])
def test_vae_keys_round_trip_per_layout(kw: dict) -> None:
    from diffusers import AutoencoderKLWan

    theirs = set(AutoencoderKLWan(**kw).state_dict())
    config = VAEConfig.from_dict(kw)
    ours = set(WanVAE(config).state_dict())
    forward = {k: remap_key(k, VAE_DIFFUSERS_KEYS) for k in theirs}
    assert set(forward.values()) == ours
    back = vae_to_diffusers_keys(config.is_residual)
    assert {k: remap_key(v, back) for k, v in forward.items()} == {k: k for k in theirs}


def test_two_keys_onto_one_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="both map to"):
        remap_state_dict({"a.x": 1, "b.x": 2}, ((r"(a|b)\.x", "c.x"),))
