"""The CPU convolution paths of the VAE (wanpipe.models.fastconv) against plain PyTorch convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wanpipe.models.vae_layers as vae_module
from wanpipe.models.fastconv import (
    _TRANSFORMS,
    ConvWeightCache,
    PhaseKernels,
    Scratch,
    _input_transform,
    _output_transform,
    causal_conv3x3x3,
    fast_conv_applies,
    upsample2x_conv3x3,
)
from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.models.vae_layers import CausalCache

REL = 5e-6  # Winograd in fp32: rounding only (about 1e-6 relative seen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize(
    "batch, past, frames, zeros",
    [
        (1, 0, 1, 2),  # a video's first frame: one tap on a real frame
        (1, 0, 5, 2),  # a first chunk of several frames: F(4, 3) after the padded ones
        (1, 1, 4, 1),  # the second chunk after a one-frame first chunk: F(4, 3) with a zero frame
        (1, 1, 2, 1),  # the same, two frames: F(2, 3) with a zero frame
        (1, 0, 3, 2),  # one real tap, then F(2, 3) with a zero frame
        (2, 2, 4, 0),  # steady state, F(4, 3), a batch of two
        (1, 2, 2, 0),  # F(2, 3)
        (1, 2, 1, 0),  # one frame directly
        (2, 2, 9, 0),  # two F(4, 3) groups and a single frame
        (1, 0, 7, 0),  # no past, 5 outputs: F(4, 3) + direct
    ],
)
def test_causal_conv_matches_conv3d(batch: int, past: int, frames: int, zeros: int) -> None:
    g = torch.Generator().manual_seed(batch * 100 + past * 10 + frames)
    x = torch.randn(batch, 6, frames, 7, 9, generator=g)
    before = torch.randn(batch, 6, past, 7, 9, generator=g)
    weight = torch.randn(5, 6, 3, 3, 3, generator=g)
    bias = torch.randn(5, generator=g)
    full = F.pad(torch.cat([before, x], dim=2), (0, 0, 0, 0, zeros, 0))
    expected = F.conv3d(full, weight, bias, padding=(0, 1, 1))
    got = causal_conv3x3x3(x, weight, bias, ConvWeightCache(), before if past else None, zeros, Scratch())
    assert _rel(got, expected) < REL
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


@torch.no_grad()
def test_causal_conv_refuses_too_few_frames() -> None:
    with pytest.raises(ValueError, match="too few"):
        causal_conv3x3x3(torch.randn(1, 2, 1, 4, 4), torch.randn(3, 2, 3, 3, 3), None, ConvWeightCache())
    with pytest.raises(ValueError, match="leading_zeros"):
        causal_conv3x3x3(
            torch.randn(1, 2, 3, 4, 4), torch.randn(3, 2, 3, 3, 3), None, ConvWeightCache(), None, 3
        )


@pytest.mark.parametrize("m", [4, 2])
def test_written_out_transforms_equal_the_tables(m: int) -> None:
    """The frame-wide additions are B^T and A^T of Lavin & Gray's F(m, 3) (the tables G comes from)."""
    bt, _, at = (torch.tensor(rows, dtype=torch.float64) for rows in _TRANSFORMS[m])
    x = torch.randn(m + 2, 37, dtype=torch.float64)
    mixed = torch.empty_like(x)
    _input_transform(list(x), mixed)
    assert torch.allclose(mixed, bt @ x, rtol=0, atol=1e-12)
    y = torch.randn(m + 2, 37, dtype=torch.float64)
    expected = at @ y
    out = torch.empty(m, 37, dtype=torch.float64)
    _output_transform(list(y.clone()), out)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


@torch.no_grad()
def test_weight_cache_follows_in_place_changes() -> None:
    x = torch.randn(1, 4, 6, 5, 5)
    weight = torch.randn(3, 4, 3, 3, 3)
    cache = ConvWeightCache()
    first = causal_conv3x3x3(x, weight, None, cache)
    assert 4 in cache.kernels  # F(4, 3) kernels were made and kept
    weight.mul_(2.0)  # an in-place reload bumps the version: the kernels are remade
    second = causal_conv3x3x3(x, weight, None, cache)
    assert _rel(second, 2 * first) < REL


@torch.no_grad()
def test_scratch_buffers_are_reused() -> None:
    scratch = Scratch()
    x = torch.randn(1, 4, 6, 8, 8)
    weight = torch.randn(4, 4, 3, 3, 3)
    causal_conv3x3x3(x, weight, None, ConvWeightCache(), scratch=scratch)
    pointers = {name: buf.data_ptr() for name, buf in scratch.buffers.items()}
    assert set(pointers) == {"mixed"}
    causal_conv3x3x3(x[:, :, :4], weight, None, ConvWeightCache(), scratch=scratch)  # smaller: same buffers
    assert {name: buf.data_ptr() for name, buf in scratch.buffers.items()} == pointers


def test_fast_path_only_for_cpu_fp32_inference() -> None:
    x, w = torch.randn(1, 2, 3, 4, 4), torch.randn(3, 2, 3, 3, 3)
    with torch.no_grad():
        assert fast_conv_applies(x, w, (1, 1, 1), (0, 1, 1))
        assert not fast_conv_applies(x.double(), w.double(), (1, 1, 1), (0, 1, 1))
        assert not fast_conv_applies(x, w, (2, 1, 1), (0, 1, 1))
        assert not fast_conv_applies(x, w[:, :, :1], (1, 1, 1), (0, 1, 1))
    assert not fast_conv_applies(x, w, (1, 1, 1), (0, 1, 1))  # autograd on: the plain convolution


@torch.no_grad()
@pytest.mark.parametrize("n, c, k, h, w", [(1, 4, 3, 5, 7), (3, 8, 6, 8, 8)])
def test_upsample_conv_matches_interpolate_then_conv(n: int, c: int, k: int, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(n + h)
    x = torch.randn(n, c, h, w, generator=g)
    weight, bias = torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g)
    for mode in ("nearest-exact", "nearest"):
        expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode=mode), weight, bias, padding=1)
        assert _rel(upsample2x_conv3x3(x, weight, bias, PhaseKernels()), expected) < REL


@torch.no_grad()
def test_vae_decode_and_encode_fast_paths_match_plain_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)).eval()
    z = torch.randn(1, 16, 3, 4, 6)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    fast_decode = vae.decode(z, chunk_frames=1)
    fast_decode_2 = vae.decode(z, chunk_frames=2)
    fast_encode = vae.encode(video).mean
    # the fast paths ran: transformed kernels were made for a full-resolution convolution and an upsampler
    assert vae.decoder.up_blocks[-1].resnets[0].conv1.fast_cache.kernels
    assert vae.decoder.up_blocks[0].upsampler.phase_kernels.kernels
    monkeypatch.setattr(vae_module, "fast_conv_applies", lambda *a: False)
    monkeypatch.setattr(vae_module, "upsample_conv_applies", lambda *a: False)
    plain_decode = vae.decode(z, chunk_frames=1)
    assert _rel(fast_decode, plain_decode) < 1e-5
    assert _rel(fast_decode_2, plain_decode) < 1e-5
    assert _rel(fast_encode, vae.encode(video).mean) < 1e-5
    assert not fast_decode.equal(plain_decode)  # different arithmetic: the comparison is not vacuous


@torch.no_grad()
def test_causal_cache_holds_scratch_per_video() -> None:
    a, b = CausalCache(), CausalCache()
    assert a.scratch is not b.scratch


def test_weights_made_under_inference_mode_work() -> None:
    with torch.inference_mode():
        weight, x = torch.randn(3, 4, 3, 3, 3), torch.randn(1, 4, 6, 5, 5)
        expected = F.conv3d(x, weight, padding=(0, 1, 1))
        assert _rel(causal_conv3x3x3(x, weight, None, ConvWeightCache()), expected) < REL
        w2 = torch.randn(3, 4, 3, 3)
        up = F.conv2d(F.interpolate(x[:, :, 0], scale_factor=2.0), w2, padding=1)
        assert _rel(upsample2x_conv3x3(x[:, :, 0], w2, None, PhaseKernels()), up) < REL
