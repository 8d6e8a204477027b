"""Parity of wanpipe's Wan 2.2 residual VAE (TI2V-5B layout) with diffusers' AutoencoderKLWan.

Tiny random configs with the 2.2 structure (``is_residual``, ``patch_size=2``, 12 channels after
patchifying, ``z_dim`` 48, a decoder wider than the encoder), on the CPU in fp32.
"""

from __future__ import annotations

import pytest
import torch

from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.models.vae_layers import AvgDown3d, CausalCache, DupUp3d, patchify, unpatchify
from wanpipe.weights.vae_keys import prepare_vae_state

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan
reference = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")

TOL = 1e-4  # fp32 parity with the reference
CHUNK_TOL = 1e-5  # chunked vs unchunked: same math, conv shapes differ

# diffusers' vae/config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers, less the 48 latent statistics
TI2V_5B_VAE: dict = {
    "_class_name": "AutoencoderKLWan",
    "attn_scales": [],
    "base_dim": 160,
    "decoder_base_dim": 256,
    "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0,
    "in_channels": 12,
    "is_residual": True,
    "num_res_blocks": 2,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "temperal_downsample": [False, True, True],
    "z_dim": 48,
}

WAN22_KW: dict = dict(
    z_dim=48,
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so that no layer is close to identity or zero (norm gammas around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.7 / p[0].numel() ** 0.5)


def _pair(seed: int, **kw) -> tuple[torch.nn.Module, WanVAE]:
    g = torch.Generator().manual_seed(seed)
    kw = {**WAN22_KW, **kw}
    kw["latents_mean"] = torch.randn(kw["z_dim"], generator=g).tolist()
    kw["latents_std"] = (0.5 + torch.rand(kw["z_dim"], generator=g)).tolist()
    ref = AutoencoderKLWan(**kw).eval()
    _randomize(ref, seed)
    ours = WanVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(prepare_vae_state(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, WanVAE]:
    """The TI2V-5B structure, scaled down: encoder 8..16 channels, decoder 12..24."""
    return _pair(
        0,
        base_dim=8,
        decoder_base_dim=12,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


@pytest.fixture(scope="module")
def wide() -> tuple[torch.nn.Module, WanVAE]:
    """Two residual blocks per level, temporal sampling at other levels (a temporal shortcut first)."""
    return _pair(
        1,
        base_dim=4,
        decoder_base_dim=8,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        temperal_downsample=[True, False, True],
    )


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, f, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 48, f, h, w, generator=torch.Generator().manual_seed(seed))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Config and structure
# ----------------------------------------------------------------------------------------------


def test_ti2v_5b_config_builds_the_reference_structure() -> None:
    kw = {**TI2V_5B_VAE, "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48}
    cfg = VAEConfig.from_dict(kw)
    assert cfg.spatial_stride == 16 and cfg.temporal_stride == 4
    assert cfg.video_in_channels == 3 and cfg.video_out_channels == 3
    with torch.device("meta"):
        ref = AutoencoderKLWan(**{k: v for k, v in kw.items() if not k.startswith("_")})
        ours = WanVAE(cfg)
    expected = {k: tuple(v.shape) for k, v in prepare_vae_state(ref.state_dict()).items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


@pytest.mark.parametrize(
    "kw, match",
    [
        # the last encoder level cannot average 8 channels into 24
        (dict(base_dim=8, dim_mult=[1, 1, 1, 3]), "encoder level 3"),
        # the encoder is fine; decoder level 2 cannot spread 64 channels over 8 channels x 4 pixels
        (dict(base_dim=8, dim_mult=[1, 1, 8, 1]), "decoder level 2"),
        (dict(base_dim=8, dim_mult=[1, 1, 1, 1], in_channels=6), "in_channels"),
        (dict(base_dim=8, dim_mult=[1, 1, 1, 1], out_channels=3), "out_channels"),
    ],
)
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VAEConfig(**{**WAN22_KW, "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48, **kw})


# ----------------------------------------------------------------------------------------------
# Parameter-free pieces
# ----------------------------------------------------------------------------------------------


def test_patchify_matches_reference_and_inverts() -> None:
    x = torch.randn(2, 3, 3, 8, 12)
    p = patchify(x, 2)
    assert torch.equal(p, reference.patchify(x, 2)) and p.shape == (2, 12, 3, 4, 6)
    assert torch.equal(unpatchify(p, 2), x)
    assert torch.equal(unpatchify(p, 2), reference.unpatchify(p, 2))
    assert patchify(x, 1) is x and unpatchify(x, 1) is x


@pytest.mark.parametrize(
    "in_dim, out_dim, factor_t, factor_s, frames",
    [(4, 4, 1, 2, 3), (4, 8, 2, 2, 4), (4, 8, 2, 2, 1), (6, 6, 2, 2, 5), (8, 8, 1, 1, 2)],
)
def test_avg_down_matches_reference(
    in_dim: int, out_dim: int, factor_t: int, factor_s: int, frames: int
) -> None:
    x = torch.randn(2, in_dim, frames, 4, 6)
    expected = reference.AvgDown3D(in_dim, out_dim, factor_t, factor_s)(x)
    assert torch.equal(AvgDown3d(in_dim, out_dim, factor_t, factor_s)(x), expected)


@pytest.mark.parametrize("in_dim, out_dim, factor_t", [(8, 8, 2), (8, 4, 1), (6, 12, 2), (8, 8, 1)])
@pytest.mark.parametrize("first_chunk", [False, True])
def test_dup_up_matches_reference(in_dim: int, out_dim: int, factor_t: int, first_chunk: bool) -> None:
    x = torch.randn(2, in_dim, 3, 2, 3)
    expected = reference.DupUp3D(in_dim, out_dim, factor_t, 2)(x, first_chunk=first_chunk)
    assert torch.equal(DupUp3d(in_dim, out_dim, factor_t, 2)(x, first_chunk), expected)


def test_shortcuts_reject_channel_counts_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="AvgDown3d"):
        AvgDown3d(8, 24, 1, 1)
    with pytest.raises(ValueError, match="DupUp3d"):
        DupUp3d(24, 5, 1, 2)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def test_key_map_keeps_residual_names(small) -> None:
    ref, ours = small
    renamed = prepare_vae_state(ref.state_dict())
    assert set(renamed) == set(ours.state_dict())
    assert "encoder.down_blocks.1.downsampler.conv.weight" in renamed
    assert "encoder.down_blocks.1.downsampler.time_conv.weight" in renamed
    assert "decoder.up_blocks.0.upsampler.conv.weight" in renamed
    assert "decoder.up_blocks.0.upsampler.time_conv.weight" in renamed


def test_meta_device_load_through_loader(small) -> None:
    from wanpipe.weights.loader import load_weights

    ref, ours = small
    with torch.device("meta"):
        meta = WanVAE(ours.config)
    load_weights(meta, ref.state_dict(), component="vae", dtype=torch.float32, prepare=prepare_vae_state)
    assert meta.state_dict().keys() == ours.state_dict().keys()
    for (name, a), b in zip(meta.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    z = _latents(1, 2, 1, 2, seed=2)
    with torch.no_grad():
        assert torch.equal(meta.decode(z), ours.decode(z))


# ----------------------------------------------------------------------------------------------
# Encode
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_reference(small, frames: int) -> None:
    ref, ours = small
    x = _video(2, frames, 32, 48, seed=frames)
    expected = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert got.mean.shape == (2, 48, (frames - 1) // 4 + 1, 2, 3)
    assert _maxdiff(got.mean, expected.mean) <= TOL
    assert _maxdiff(got.logvar, expected.logvar) <= TOL
    assert torch.equal(ours.encode_mean(x), got.mean)
    assert _maxdiff(ours.encode(x, chunk_latents=2).mean, got.mean) <= CHUNK_TOL


@torch.no_grad()
def test_encode_matches_reference_wide(wide) -> None:
    ref, ours = wide
    x = _video(1, 9, 48, 16, seed=3)
    expected = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert got.mean.shape == (1, 48, 3, 3, 1)
    assert _maxdiff(got.mean, expected.mean) <= TOL
    assert _maxdiff(got.logvar, expected.logvar) <= TOL
    assert _maxdiff(ours.encode(x, chunk_latents=2).mean, got.mean) <= CHUNK_TOL


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_reference(small, latent_frames: int) -> None:
    ref, ours = small
    z = _latents(2, latent_frames, 2, 3, seed=latent_frames)
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert (expected.abs() < 1).float().mean() > 0.9  # the clamp does not hide the comparison
    assert _maxdiff(got, expected) <= TOL
    for chunk in (2, 3):
        assert _maxdiff(ours.decode(z, chunk_frames=chunk), got) <= CHUNK_TOL


@torch.no_grad()
def test_decode_matches_reference_wide(wide) -> None:
    ref, ours = wide
    z = _latents(2, 3, 3, 1, seed=7)
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 9, 48, 16)
    assert (expected.abs() < 1).float().mean() > 0.9
    assert _maxdiff(got, expected) <= TOL
    assert _maxdiff(ours.decode(z, chunk_frames=2), got) <= CHUNK_TOL


@torch.no_grad()
def test_decode_without_clip(small) -> None:
    ref, ours = small
    raw = WanVAE(VAEConfig.from_dict({**dict(ref.config), "clip_output": False})).eval()
    raw.load_state_dict(ours.state_dict())
    z = _latents(1, 2, 2, 3, seed=5) * 3
    got = raw.decode(z)
    assert got.abs().max() > 1.0  # something to clip
    assert torch.equal(got.clamp(-1.0, 1.0), ours.decode(z))
    assert _maxdiff(got.clamp(-1.0, 1.0), ref.decode(z).sample) <= TOL


@torch.no_grad()
def test_iter_decode_and_cache(small) -> None:
    _, ours = small
    z = _latents(1, 5, 2, 3, seed=11)
    full = ours.decode(z)
    chunks = list(ours.iter_decode(z, chunk_frames=2))
    assert [c.shape[2] for c in chunks] == [1, 8, 8]
    assert _maxdiff(torch.cat(chunks, dim=2), full) <= CHUNK_TOL
    cache, pieces, sizes = CausalCache(), [], []
    for i in range(z.shape[2]):
        pieces.append(ours.decode_chunk(z[:, :, i : i + 1], cache))
        sizes.append(cache.nbytes())
    assert torch.equal(torch.cat(pieces, dim=2), full)
    assert sizes[3] == sizes[4]  # bounded: the cache stops growing with the video


@torch.no_grad()
def test_roundtrip_bfloat16(small) -> None:
    _, ours = small
    model = WanVAE(ours.config).to(torch.bfloat16).eval()
    model.load_state_dict(ours.state_dict())
    x = _video(1, 5, 16, 32).to(torch.bfloat16)
    z = model.encode_mean(x)
    assert z.dtype == torch.bfloat16 and z.shape == (1, 48, 2, 1, 2)
    y = model.decode(z, chunk_frames=2)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    err = (y.float() - ours.decode(z.float(), chunk_frames=2)).abs()
    # measured: mean 0.0032, max 0.024 (pixels in [-1, 1]); bounds about 2.5x the max
    assert err.mean() < 0.02
    assert err.max() < 0.06


# ----------------------------------------------------------------------------------------------
# Latent normalisation and invalid input
# ----------------------------------------------------------------------------------------------


def test_normalize_denormalize_48_channels(small) -> None:
    _, ours = small
    cfg = ours.config
    raw = torch.randn(2, 48, 3, 2, 3) * 2 + 0.5
    mean = torch.tensor(cfg.latents_mean).view(1, 48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 48, 1, 1, 1)
    assert torch.equal(ours.normalize_latents(raw), (raw - mean) * inv_std)
    assert torch.equal(ours.denormalize_latents(raw), raw / inv_std + mean)
    assert torch.allclose(ours.denormalize_latents(ours.normalize_latents(raw)), raw, atol=1e-5)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 12, 5, 16, 16), r"\(B, 3, F, H, W\)"),  # the model patchifies: pass RGB
        ((1, 3, 5, 8, 16), "multiples of 16"),
        ((1, 3, 5, 32, 24), "multiples of 16"),
        ((1, 3, 4, 16, 16), "4k \\+ 1"),
    ],
)
def test_encode_rejects_bad_shapes(small, shape: tuple[int, ...], match: str) -> None:
    _, ours = small
    with pytest.raises(ValueError, match=match):
        ours.encode(torch.zeros(shape))


def test_decode_rejects_wan21_latents(small) -> None:
    _, ours = small
    with pytest.raises(ValueError, match="48"):
        ours.decode(torch.zeros(1, 16, 2, 2, 2))
