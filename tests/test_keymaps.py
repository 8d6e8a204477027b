"""Key maps are data: every diffusers name maps to ours and back."""

from __future__ import annotations

import re

import pytest
import torch

from tests import tiny
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.weights.keymap import KeyMap, KeyTable, remap_key, remap_state_dict
from wanpipe.weights.original import (
    T5_ORIGINAL_KEYS,
    T5_TO_ORIGINAL_KEYS,
    VAE21_INNER_KEYS,
    vae21_original_tables,
    vae21_to_original_tables,
)
from wanpipe.weights.single_file import naming_of
from wanpipe.weights.text_encoder_keys import TEXT_ENCODER_ALIASES
from wanpipe.weights.transformer_keys import (
    TRANSFORMER_DIFFUSERS_KEYS,
    TRANSFORMER_KEYS,
    TRANSFORMER_TO_DIFFUSERS_KEYS,
)
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


# -- each table is written once: the derived inverse is the exact inverse on real key sets ---------------


def _meta_keys(build) -> set[str]:
    with torch.device("meta"):
        return set(build().state_dict())


def _apply(keys: set[str], *passes: KeyMap) -> dict[str, str]:
    """Each key's new name through the passes in order; the renaming must be one to one."""
    out = {}
    for key in keys:
        new = key
        for rules in passes:
            new = remap_key(new, rules)
        out[key] = new
    assert len(set(out.values())) == len(keys), "two keys map to one name"
    return out


def _used(keys: set[str], rules: KeyMap) -> set[str]:
    return {p for p, _ in rules for k in keys if re.fullmatch(p, k)}


TRANSFORMER_I2V_KW = {**tiny.TRANSFORMER_KW, "image_dim": 8, "added_kv_proj_dim": 24, "pos_embed_seq_len": 6}


TRANSFORMER_VACE_KW = {**tiny.TRANSFORMER_KW, "num_layers": 3, "vace_layers": [0, 2], "vace_in_channels": 8}


def test_transformer_table_both_ways() -> None:
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    runtime = set()
    for kw in (tiny.TRANSFORMER_KW, TRANSFORMER_I2V_KW, TRANSFORMER_VACE_KW):
        cls = WanVACETransformer3DModel if "vace_layers" in kw else WanTransformer3DModel
        ours = _meta_keys(lambda kw=kw: WanTransformerModel(TransformerConfig.from_dict(kw)))
        theirs = _meta_keys(lambda kw=kw, cls=cls: cls(**kw))
        written = _apply(ours, TRANSFORMER_KEYS.to_checkpoint())
        assert set(written.values()) == theirs  # diffusers' own class names
        read = _apply(theirs, TRANSFORMER_KEYS.to_runtime())
        assert {k: read[v] for k, v in written.items()} == {k: k for k in ours}
        runtime |= ours
    assert _used(runtime, TRANSFORMER_KEYS.to_checkpoint()) == {
        p for p, _ in TRANSFORMER_KEYS.to_checkpoint()
    }


@pytest.mark.parametrize("kw", [tiny.VAE_KW, VAE22_KW], ids=["wan21", "wan22"])
def test_vae_table_both_ways_per_layout(kw: dict) -> None:
    from diffusers import AutoencoderKLWan

    config = VAEConfig.from_dict(kw)
    ours = _meta_keys(lambda: WanVAE(config))
    theirs = _meta_keys(lambda: AutoencoderKLWan(**kw))
    written = _apply(ours, vae_to_diffusers_keys(config.is_residual))
    assert set(written.values()) == theirs
    read = _apply(theirs, VAE_DIFFUSERS_KEYS)
    assert {k: read[v] for k, v in written.items()} == {k: k for k in ours}
    # The way back of each layout uses every one of its rules.
    back = vae_to_diffusers_keys(config.is_residual)
    assert _used(ours, back) == {p for p, _ in back}


@pytest.mark.parametrize(
    "kw",
    [tiny.VAE_KW, {**tiny.VAE_KW, "base_dim": 4, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}],
    ids=["tiny", "wider"],
)
def test_vae21_original_tables_both_ways(kw: dict) -> None:
    from diffusers import AutoencoderKLWan

    config = VAEConfig.from_dict(kw)
    shape = (config.num_res_blocks, len(config.dim_mult))
    ours = _meta_keys(lambda: WanVAE(config))
    inner_back, outer_back = vae21_to_original_tables(*shape)
    written = _apply(ours, inner_back, outer_back)
    original = set(written.values())
    assert naming_of(original, "vae") == "original"
    assert {k.split(".")[0] for k in original} == {"encoder", "decoder", "conv1", "conv2"}
    assert not any(".up_blocks." in k or ".down_blocks." in k or ".mid_block." in k for k in original)
    outer, inner = vae21_original_tables(*shape)
    read = _apply(original, outer, inner)
    assert {k: read[v] for k, v in written.items()} == {k: k for k in ours}
    # diffusers' names -> wanpipe -> original -> wanpipe -> diffusers' names.
    theirs = _meta_keys(lambda: AutoencoderKLWan(**kw))
    there_and_back = _apply(
        theirs, VAE_DIFFUSERS_KEYS, inner_back, outer_back, outer, inner, VAE_TO_DIFFUSERS_KEYS
    )
    assert there_and_back == {k: k for k in theirs}
    assert _used(ours, VAE21_INNER_KEYS.to_checkpoint()) == {p for p, _ in VAE21_INNER_KEYS.to_checkpoint()}


def test_t5_table_both_ways() -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    from wanpipe.models.umt5 import UMT5Encoder

    cfg = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    ours = _meta_keys(lambda: UMT5Encoder.from_config_dict(cfg))
    assert ours == _meta_keys(lambda: UMT5EncoderModel(UMT5Config(**cfg)))
    # The tied embedding has no rule: it is the one key the table leaves alone, and writers drop it.
    tied = set(TEXT_ENCODER_ALIASES)
    assert {k for k in ours if remap_key(k, T5_TO_ORIGINAL_KEYS) == k} == tied
    written = _apply(ours - tied, T5_TO_ORIGINAL_KEYS)
    assert naming_of(written.values(), "text_encoder") == "original"
    read = _apply(set(written.values()), T5_ORIGINAL_KEYS)
    assert {k: read[v] for k, v in written.items()} == {k: k for k in ours - tied}
    assert _used(ours, T5_TO_ORIGINAL_KEYS) == {p for p, _ in T5_TO_ORIGINAL_KEYS}


def test_key_table_derives_both_directions() -> None:
    table = KeyTable(
        (("blocks.{n}.attn1.to_{qkv}.{param}", "blocks.{n}.self_attn.{qkv}.{param}"), ("a.b", "c")),
        fields={"qkv": "q|k|v"},
    )
    assert remap_key("blocks.12.attn1.to_k.bias", table.to_runtime()) == "blocks.12.self_attn.k.bias"
    assert remap_key("blocks.12.self_attn.k.bias", table.to_checkpoint()) == "blocks.12.attn1.to_k.bias"
    assert remap_key("blocks.x.attn1.to_k.bias", table.to_runtime()) == "blocks.x.attn1.to_k.bias"
    assert remap_key("blocks.1.attn1.to_o.bias", table.to_runtime()) == "blocks.1.attn1.to_o.bias"
    assert remap_key("a.b", table.to_runtime()) == "c" and remap_key("axb", table.to_runtime()) == "axb"
    assert remap_key("c", table.to_checkpoint()) == "a.b"


@pytest.mark.parametrize(
    "rule",
    [("blocks.{n}.x", "blocks.y"), ("{rest}.{rest}", "{rest}"), ("a.{nope}", "b.{nope}")],
    ids=["dropped", "twice", "unknown"],
)
def test_key_table_rejects_rules_that_cannot_be_read_both_ways(rule: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        KeyTable((rule,))
