"""Parity of wanpipe's Wan 2.1 VAE with diffusers' AutoencoderKLWan on tiny random configs (CPU, fp32)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from wanpipe.models.vae import LatentDistribution, VAEConfig, WanVAE
from wanpipe.models.vae_layers import CausalCache
from wanpipe.weights.vae_keys import VAE_DIFFUSERS_KEYS, prepare_vae_state

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

TOL = 1e-4  # fp32 parity with the reference
CHUNK_TOL = 1e-5  # chunked vs unchunked decode: same math, conv shapes differ


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so that no layer is close to identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise * 0.7 / fan_in**0.5)


def _pair(seed: int, **kw) -> tuple[torch.nn.Module, WanVAE]:
    g = torch.Generator().manual_seed(seed)
    z_dim = kw.setdefault("z_dim", 16)
    kw["latents_mean"] = torch.randn(z_dim, generator=g).tolist()
    kw["latents_std"] = (0.5 + torch.rand(z_dim, generator=g)).tolist()
    ref = AutoencoderKLWan(**kw).eval()
    _randomize(ref, seed)
    ours = WanVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(prepare_vae_state(ref.state_dict()), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, WanVAE]:
    return _pair(
        0, base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


@pytest.fixture(scope="module")
def wide() -> tuple[torch.nn.Module, WanVAE]:
    """More channels, two residual blocks per level, a wider decoder, temporal sampling elsewhere."""
    return _pair(
        1,
        base_dim=4,
        decoder_base_dim=6,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=2,
        temperal_downsample=[True, True, False],
    )


def _video(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def _latents(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 16, f, h, w, generator=torch.Generator().manual_seed(seed))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_defaults_match_diffusers() -> None:
    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    ours = VAEConfig()
    for name, p in params.items():
        if name == "self":
            continue
        value = getattr(ours, name)
        expected = p.default
        assert (list(value) if isinstance(value, tuple) else value) == expected, name
    assert ours.temporal_stride == 4 and ours.spatial_stride == 8


def test_config_from_dict_ignores_private_and_unknown_keys() -> None:
    d = {
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": "0.33.0",
        "some_future_key": 1,
        "base_dim": 96,
        "dim_mult": [1, 2, 4, 4],
        "temperal_downsample": [False, True, True],
    }
    cfg = VAEConfig.from_dict(json.loads(json.dumps(d)))
    assert cfg.dim_mult == (1, 2, 4, 4) and cfg.temperal_downsample == (False, True, True)
    assert cfg == VAEConfig()


def test_config_wan22_parses() -> None:
    cfg = VAEConfig.from_dict(
        {
            "base_dim": 160,
            "decoder_base_dim": 256,
            "z_dim": 48,
            "is_residual": True,
            "in_channels": 12,
            "out_channels": 12,
            "patch_size": 2,
            "scale_factor_spatial": 16,
            "latents_mean": [0.0] * 48,
            "latents_std": [1.0] * 48,
            "clip_output": False,
        }
    )
    assert cfg.spatial_stride == 16 and cfg.temporal_stride == 4 and not cfg.clip_output
    assert cfg.video_in_channels == 3 and cfg.video_out_channels == 3
    with torch.device("meta"):  # built (parity with diffusers: tests/test_vae22.py)
        assert WanVAE(cfg).config is cfg


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"latents_mean": [0.0] * 15}, "latents_mean"),
        ({"z_dim": 8}, "z_dim"),
        ({"temperal_downsample": [True, True]}, "temperal_downsample"),
        ({"scale_factor_temporal": 8}, "scale_factor_temporal"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial"),
        ({"base_dim": 0}, "base_dim"),
        ({"latents_std": [1.0] * 15 + [0.0]}, "latents_std"),
    ],
)
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def test_key_map_renames_only_container_indices(small) -> None:
    ref, ours = small
    renamed = prepare_vae_state(ref.state_dict())
    assert set(renamed) == set(ours.state_dict())
    assert VAE_DIFFUSERS_KEYS  # the two renames, as data
    assert "decoder.up_blocks.0.upsampler.conv.weight" in renamed
    assert "decoder.up_blocks.1.upsampler.time_conv.weight" in renamed
    assert "encoder.down_blocks.1.conv.weight" in renamed
    assert "encoder.down_blocks.3.time_conv.weight" in renamed


def test_meta_device_load_through_loader(small) -> None:
    from wanpipe.weights.loader import load_weights

    ref, ours = small
    with torch.device("meta"):
        meta = WanVAE(ours.config)
    load_weights(meta, ref.state_dict(), component="vae", dtype=torch.float32, prepare=prepare_vae_state)
    for (name, a), b in zip(meta.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# Encode
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_encode_matches_reference(small, frames: int) -> None:
    ref, ours = small
    x = _video(2, frames, 32, 48, seed=frames)
    expected = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert isinstance(got, LatentDistribution)
    assert got.mean.shape == (2, 16, (frames - 1) // 4 + 1, 4, 6)
    assert _maxdiff(got.mean, expected.mean) <= TOL
    assert _maxdiff(got.logvar, expected.logvar) <= TOL
    assert _maxdiff(got.std, expected.std) <= TOL
    assert torch.equal(ours.encode_mean(x), got.mean)
    # bigger encode chunks (8 or 12 frames at a time) give the same latents
    assert _maxdiff(ours.encode(x, chunk_latents=2).mean, got.mean) <= CHUNK_TOL
    assert _maxdiff(ours.encode(x, chunk_latents=3).mean, got.mean) <= CHUNK_TOL


@torch.no_grad()
def test_encode_matches_reference_wide(wide) -> None:
    ref, ours = wide
    x = _video(1, 9, 16, 24, seed=3)
    expected = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert _maxdiff(got.mean, expected.mean) <= TOL
    assert _maxdiff(got.logvar, expected.logvar) <= TOL


def test_latent_distribution_sample() -> None:
    moments = torch.randn(1, 32, 2, 3, 3)
    dist = LatentDistribution.from_moments(moments)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    sample = dist.sample(torch.Generator().manual_seed(5))
    assert torch.allclose(sample, dist.mean + torch.exp(0.5 * moments[:, 16:]) * noise)
    assert torch.equal(dist.mode(), moments[:, :16])


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("latent_frames", [1, 2, 3, 4])
def test_decode_matches_reference(small, latent_frames: int) -> None:
    ref, ours = small
    z = _latents(2, latent_frames, 4, 6, seed=latent_frames)
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert (expected.abs() < 1).float().mean() > 0.9  # the clamp does not hide the comparison
    assert _maxdiff(got, expected) <= TOL
    for chunk in (2, 3, 4):
        assert _maxdiff(ours.decode(z, chunk_frames=chunk), got) <= CHUNK_TOL


@torch.no_grad()
def test_decode_matches_reference_wide(wide) -> None:
    ref, ours = wide
    z = _latents(1, 3, 2, 3, seed=7)
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (1, 3, 9, 16, 24)
    assert (expected.abs() < 1).float().mean() > 0.9
    assert _maxdiff(got, expected) <= TOL
    for chunk in (2, 3):
        assert _maxdiff(ours.decode(z, chunk_frames=chunk), got) <= CHUNK_TOL


@torch.no_grad()
def test_iter_decode_concatenates_to_decode(small) -> None:
    _, ours = small
    z = _latents(1, 5, 4, 6, seed=11)
    full = ours.decode(z, chunk_frames=2)
    chunks = list(ours.iter_decode(z, chunk_frames=2))
    assert [c.shape[2] for c in chunks] == [1, 8, 8]
    assert torch.equal(torch.cat(chunks, dim=2), full)


@torch.no_grad()
def test_cache_carries_the_state(small) -> None:
    _, ours = small
    z = _latents(1, 4, 4, 6, seed=13)
    cache = CausalCache()
    pieces, sizes = [], []
    for i in range(4):
        pieces.append(ours.decode_chunk(z[:, :, i : i + 1], cache))
        sizes.append(cache.nbytes())
    assert torch.equal(torch.cat(pieces, dim=2), ours.decode(z))
    assert cache.seen == 4
    assert "up_blocks.0.resnets.0.conv1" in cache.frames and "conv_out" in cache.frames
    assert sizes[2] == sizes[3]  # bounded: the cache stops growing with the video
    # the same chunk without the history decodes as a first chunk: other frames, other values
    fresh = ours.decode_chunk(z[:, :, 3:4], CausalCache())
    assert fresh.shape[2] == 1 and pieces[3].shape[2] == 4
    assert not torch.allclose(fresh[:, :, 0], pieces[3][:, :, 0], atol=1e-3)


@torch.no_grad()
def test_roundtrip_shapes_and_dtype(small) -> None:
    _, ours = small
    model = WanVAE(ours.config).to(torch.bfloat16).eval()
    model.load_state_dict(ours.state_dict())
    x = _video(1, 5, 16, 24).to(torch.bfloat16)
    z = model.encode_mean(x)
    assert z.dtype == torch.bfloat16 and z.shape == (1, 16, 2, 2, 3)
    y = model.decode(z, chunk_frames=2)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert y.abs().max() <= 1.0
    fp32 = ours.decode(z.float(), chunk_frames=2)
    err = (y.float() - fp32).abs()
    # measured: mean 0.0079, max 0.106 (pixels in [-1, 1]); bounds about 2.5x the max
    assert err.mean() < 0.02
    assert err.max() < 0.25


# ----------------------------------------------------------------------------------------------
# Latent normalisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_denormalize_match_pipeline(small, dtype: torch.dtype) -> None:
    _, ours = small
    cfg = ours.config
    raw = (torch.randn(2, 16, 3, 4, 6) * 2 + 0.5).to(dtype)
    # diffusers' WanPipeline (decode side) and WanImageToVideoPipeline (encode side)
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1).to(raw.device, raw.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1).to(raw.device, raw.dtype)
    assert torch.equal(ours.normalize_latents(raw), (raw - mean) * inv_std)
    assert torch.equal(ours.denormalize_latents(raw), raw / inv_std + mean)
    normalized = ours.normalize_latents(raw)
    assert normalized.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(ours.denormalize_latents(normalized), raw, atol=tol * 4, rtol=tol)
    std = torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(
        ours.denormalize_latents(raw).float(), raw.float() * std + mean.float(), rtol=tol, atol=tol
    )


# ----------------------------------------------------------------------------------------------
# Invalid input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 4, 16, 16), "4k \\+ 1"),
        ((1, 3, 6, 16, 16), "4k \\+ 1"),
        ((1, 3, 5, 12, 16), "multiples of 8"),
        ((1, 3, 5, 16, 20), "multiples of 8"),
        ((1, 4, 5, 16, 16), r"\(B, 3, F, H, W\)"),
        ((3, 5, 16, 16), r"\(B, 3, F, H, W\)"),
    ],
)
def test_encode_rejects_bad_shapes(small, shape: tuple[int, ...], match: str) -> None:
    _, ours = small
    with pytest.raises(ValueError, match=match):
        ours.encode(torch.zeros(shape))


def test_decode_rejects_bad_input(small) -> None:
    _, ours = small
    with pytest.raises(ValueError, match="z_dim|16"):
        ours.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="chunk_frames"):
        ours.decode(torch.zeros(1, 16, 2, 2, 2), chunk_frames=0)
    with pytest.raises(ValueError, match="chunk_frames"):
        ours.iter_decode(torch.zeros(1, 16, 2, 2, 2), chunk_frames=0)  # eager, before any next()
    with pytest.raises(ValueError, match="chunk_latents"):
        ours.encode(torch.zeros(1, 3, 5, 16, 16), chunk_latents=0)
    with pytest.raises(ValueError, match="16"):
        ours.normalize_latents(torch.zeros(1, 4, 1, 2, 2))
