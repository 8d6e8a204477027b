"""The exact tiled VAE decode: the same frames as the untiled decode for every tile size (CPU, fp32).

Tiny random Wan 2.1 and Wan 2.2 VAEs made with diffusers' ``AutoencoderKLWan`` (three levels, so
that the halo is a few latent pixels and the tiles are small), loaded into ours.
"""

from __future__ import annotations

import pytest
import torch

from wanpipe.models.vae import VAEConfig, WanVAE
from wanpipe.models.vae_tiling import (
    TileGrid,
    balanced_sizes,
    decode_tiled,
    decoder_halo,
    encode_tiled,
    encoder_halo,
    iter_decode_tiled,
    plan_tiles,
    split_tiles,
    upper_bytes_per_pixel,
    upper_reach,
    upper_scale,
)
from wanpipe.runtime.memory import parse_memory
from wanpipe.weights.vae_keys import prepare_vae_state

diffusers = pytest.importorskip("diffusers")

TILE_TOL = 1e-5  # tiled vs untiled: the same math, convolutions of other shapes


def _vae(seed: int, **kw) -> WanVAE:
    g = torch.Generator().manual_seed(seed)
    z_dim = kw.setdefault("z_dim", 16)
    kw["latents_mean"] = torch.randn(z_dim, generator=g).tolist()
    kw["latents_std"] = (0.5 + torch.rand(z_dim, generator=g)).tolist()
    ref = diffusers.AutoencoderKLWan(**kw).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.7 / p[0].numel() ** 0.5)
    ours = WanVAE(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(prepare_vae_state(ref.state_dict()), strict=True)
    return ours


@pytest.fixture(scope="module")
def wan21() -> WanVAE:
    return _vae(
        0,
        base_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
    )


@pytest.fixture(scope="module")
def wan22() -> WanVAE:
    """Residual (DupUp3d shortcuts), 2x2 patches, a wider decoder."""
    return _vae(
        1,
        base_dim=4,
        decoder_base_dim=6,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        z_dim=8,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=8,
    )


def _latents(vae: WanVAE, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, vae.config.z_dim, f, h, w, generator=g)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_halo_comes_from_the_layers(wan21: WanVAE, wan22: WanVAE) -> None:
    # Wan 2.1 tiny: level 0 (two resnets, 4 convs) 4 -> x2 + upsampler conv 9 -> 4 convs 13 -> 27 -> 31,
    # conv_out 32 output pixels; 4x upscale -> 8 latent pixels.
    assert (upper_reach(wan21.decoder), upper_scale(wan21.decoder), decoder_halo(wan21.decoder)) == (32, 4, 8)
    assert (upper_reach(wan22.decoder), upper_scale(wan22.decoder), decoder_halo(wan22.decoder)) == (32, 4, 8)
    # The real Wan 2.1 decoder: 98 output pixels, 8x -> 13 latent pixels.
    full = WanVAE(VAEConfig()).decoder
    assert (upper_reach(full), upper_scale(full), decoder_halo(full)) == (98, 8, 13)


def test_split_tiles_cover_the_latent_once() -> None:
    tiles = split_tiles(7, 5, (3, 2), halo=2)
    seen = torch.zeros(7, 5, dtype=torch.int64)
    for t in tiles:
        seen[t.rows[0] : t.rows[1], t.cols[0] : t.cols[1]] += 1
        assert t.region_rows[0] == max(0, t.rows[0] - 2) and t.region_rows[1] == min(7, t.rows[1] + 2)
    assert len(tiles) == 9 and bool((seen == 1).all())
    with pytest.raises(ValueError, match="at least 1x1"):
        split_tiles(7, 5, (0, 2), halo=2)


def _uniform_regions(length: int, n: int, halo: int) -> list[int]:
    size = -(-length // n)
    return [min(length, a + size + halo) - max(0, a - halo) for a in range(0, length, size)]


def test_balanced_sizes_even_out_the_regions() -> None:
    """Edge tiles one halo wider than inner ones: every region within a pixel of the others, never
    larger than a uniform split's, a halo smaller with three tiles or more."""
    for length in range(1, 70):
        for halo in (0, 1, 5, 13):
            for n in range(1, 9):
                sizes = balanced_sizes(length, n, halo)
                if sizes is None:
                    assert n > min(2, length), (length, n, halo)  # too many tiles for the halo
                    continue
                assert len(sizes) == n and sum(sizes) == length and min(sizes) >= 1
                tiles = split_tiles(1, length, TileGrid((1,), sizes), halo)
                regions = [t.region_cols[1] - t.region_cols[0] for t in tiles]
                assert max(regions) - min(regions) <= 1, (length, n, halo, sizes)
                if len(_uniform_regions(length, n, halo)) == n:
                    assert max(regions) <= max(_uniform_regions(length, n, halo))
    # The mid-size checkpoint at 512 x 512 (64 latent pixels, halo 13), three tiles a side: regions of
    # 39 instead of a uniform split's 22 + 2 x 13 = 48.
    assert balanced_sizes(64, 3, 13) == (26, 12, 26)
    assert max(_uniform_regions(64, 3, 13)) == 48


def test_tile_grid_must_cover_the_side() -> None:
    with pytest.raises(ValueError, match="add up to 7"):
        split_tiles(7, 5, TileGrid((3, 3), (5,)), halo=2)
    with pytest.raises(ValueError, match="must be positive"):
        split_tiles(7, 5, TileGrid((7,), (6, -1)), halo=2)


@pytest.mark.parametrize("which", ["wan21", "wan22"])
@pytest.mark.parametrize(("frames", "chunk_frames"), [(1, 1), (4, 1), (4, 2)])
def test_tiled_decode_equals_untiled(request, which: str, frames: int, chunk_frames: int) -> None:
    vae = request.getfixturevalue(which)
    z = _latents(vae, frames, 23, 21)  # odd sizes, more than a tile plus two halos (8) each way
    tiles = [(5, 7), (11, 10), (23, 6), (8, 21), (23, 21), TileGrid((10, 3, 10), (9, 3, 9))]
    with torch.inference_mode():
        full = vae.decode(z, chunk_frames=chunk_frames)
        worst = 0.0
        for tile in tiles:
            tiled = decode_tiled(vae, z, tile, chunk_frames=chunk_frames)
            worst = max(worst, _maxdiff(tiled, full))
    print(f"{which} frames={frames} chunk={chunk_frames}: worst tiled-vs-untiled diff {worst:.3e}")
    assert worst <= TILE_TOL


@pytest.mark.parametrize("which", ["wan21", "wan22"])
def test_streamed_tiles_equal_untiled(request, which: str) -> None:
    vae = request.getfixturevalue(which)
    z = _latents(vae, 4, 19, 20, seed=3)
    with torch.inference_mode():
        full = vae.decode(z, chunk_frames=2)
        chunks = list(iter_decode_tiled(vae, z, (7, 6), chunk_frames=2))
    assert [c.shape[2] for c in chunks] == [1, 8, 4]
    diff = _maxdiff(torch.cat(chunks, dim=2), full)
    print(f"{which} streamed tiles: worst diff {diff:.3e}")
    assert diff <= TILE_TOL


def test_a_halo_one_short_is_not_exact(wan21: WanVAE, monkeypatch) -> None:
    """The computed halo is needed: one latent pixel less changes pixels near the seams."""
    import wanpipe.models.vae_tiling as tiling

    z = _latents(wan21, 1, 21, 20)
    halo = decoder_halo(wan21.decoder)
    monkeypatch.setattr(tiling, "decoder_halo", lambda decoder: halo - 1)
    with torch.inference_mode():
        diff = _maxdiff(decode_tiled(wan21, z, (7, 7)), wan21.decode(z))
    print(f"halo {halo - 1} instead of {halo}: diff {diff:.3e}")
    assert diff > 10 * TILE_TOL


def test_plan_tiles_from_a_budget(wan21: WanVAE) -> None:
    decoder = wan21.decoder
    per_pixel = upper_bytes_per_pixel(decoder, 4)
    assert plan_tiles(decoder, 30, 40, per_pixel * 30 * 40, 4) is None  # the whole frame fits: off
    tile = plan_tiles(decoder, 30, 40, per_pixel * 30 * 40 // 3, 4)
    assert tile is not None
    halo = decoder_halo(decoder)
    for t in split_tiles(30, 40, tile, halo):
        area = (t.region_rows[1] - t.region_rows[0]) * (t.region_cols[1] - t.region_cols[0])
        assert per_pixel * area <= per_pixel * 30 * 40 // 3
    # Nothing fits: the smallest sensible tiles (inner tiles about one halo wide).
    smallest = plan_tiles(decoder, 30, 40, 1, 4)
    assert smallest is not None and smallest.count > 1
    for t in split_tiles(30, 40, smallest, halo):
        assert max(t.region_rows[1] - t.region_rows[0], t.region_cols[1] - t.region_cols[0]) <= 3 * halo


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2 * 10**9), ("512MB", 512 * 10**6), ("1.5G", 15 * 10**8), ("2GiB", 2 * 2**30), ("4096", 4096)],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "0GB", "-1GB", "2XB", "GB", "two GB", "nan", "inf"])
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="memory size such as 2GB"):
        parse_memory(text)


def test_runtime_option_parses_the_budget() -> None:
    from wanpipe.runtime import RuntimeOptions

    assert RuntimeOptions(vae_memory="2GB").vae_memory == 2 * 10**9
    assert RuntimeOptions(vae_memory=4096).vae_memory == 4096
    with pytest.raises(ValueError, match="vae_memory: expected a memory size such as 2GB"):
        RuntimeOptions(vae_memory="lots")


def test_generate_with_a_small_vae_budget_gives_the_same_frames(tiny_ckpt, monkeypatch) -> None:
    """End to end: a budget far below the frame's tiles the decode, and the frames stay the same."""
    import numpy as np

    import wanpipe.stages.decode as stage
    from wanpipe import WanPipeline, WanRequest
    from wanpipe.runtime import RuntimeOptions

    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    request = WanRequest(prompt="a cat", height=160, width=160, num_frames=5, num_inference_steps=2, seed=1)
    plain = pipe.generate_batch([request], progress=False)[0].frames
    tiles: list[TileGrid] = []

    def spy(vae, z, tile, **kw):
        tiles.append(tile)
        return decode_tiled(vae, z, tile, **kw)

    monkeypatch.setattr(stage, "decode_tiled", spy)
    pipe.set_runtime(RuntimeOptions(vae_memory="1KB"))
    tiled = pipe.generate_batch([request], progress=False)[0].frames
    # nothing fits 1 KB: the smallest sensible tiles, several of them
    assert len(tiles) == 1 and isinstance(tiles[0], TileGrid) and tiles[0].count > 1, tiles
    diff = float(np.abs(tiled.astype(np.float64) - plain.astype(np.float64)).max())
    print(f"generate, vae_memory=1KB vs untiled: worst frame diff {diff:.3e}")
    assert diff <= TILE_TOL


def test_encoder_halo_comes_from_the_layers(wan21: WanVAE, wan22: WanVAE) -> None:
    # The real Wan 2.1 encoder: conv_in 1, 2 convs 3 -> stride 2: 2, ... -> 9 latent pixels.
    assert encoder_halo(WanVAE(VAEConfig()).encoder) == 9
    assert encoder_halo(wan21.encoder) == 5 and encoder_halo(wan22.encoder) == 5


@pytest.mark.parametrize("which", ["wan21", "wan22"])
@pytest.mark.parametrize(("frames", "chunk_latents"), [(1, 1), (9, 2)])
def test_tiled_encode_equals_untiled(request, which: str, frames: int, chunk_latents: int) -> None:
    vae = request.getfixturevalue(which)
    s = vae.config.spatial_stride
    g = torch.Generator().manual_seed(5)
    video = torch.rand(1, 3, frames, 15 * s, 13 * s, generator=g) * 2 - 1  # odd latent sizes
    with torch.inference_mode():
        full = vae.encode(video, chunk_latents=chunk_latents)
        worst = 0.0
        for tile in [(4, 6), (15, 3)]:
            tiled = encode_tiled(vae, video, tile, chunk_latents=chunk_latents)
            worst = max(worst, _maxdiff(tiled.mean, full.mean), _maxdiff(tiled.logvar, full.logvar))
    print(f"{which} encode frames={frames} chunk={chunk_latents}: worst tiled-vs-untiled diff {worst:.3e}")
    assert worst <= TILE_TOL


WAN21_KW = dict(
    base_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True], scale_factor_spatial=4
)


def _parallel_vae_worker(rank: int, world: int, port: int, outdir: str) -> None:
    """One rank: the exact parallel decode of a seeded latent, against this process's own decode."""
    import json
    from pathlib import Path

    from tests.parallel_workers import join_world
    from wanpipe.parallel.vae import exact_parallel_decode

    join_world(rank, world, port)
    vae = _vae(0, **WAN21_KW)
    results = {}
    with torch.inference_mode():
        for frames, h, w, tile_cols in [(1, 21, 9, None), (4, 20, 13, 5), (4, 1, 6, None)]:
            z = _latents(vae, frames, h, w, seed=7)
            parallel = exact_parallel_decode(vae, z, chunk_frames=2, tile_cols=tile_cols)
            results[f"{frames}x{h}x{w}/{tile_cols}"] = _maxdiff(parallel, vae.decode(z, chunk_frames=2))
    torch.distributed.destroy_process_group()
    Path(outdir, f"{rank}.json").write_text(json.dumps(results))


def test_exact_parallel_decode_under_gloo(tmp_path) -> None:
    """Two gloo ranks (torchrun's environment): every rank's gathered video equals one process's."""
    import json

    from tests.parallel_workers import spawn_world

    spawn_world(_parallel_vae_worker, 2, (str(tmp_path),), timeout_s=600)
    for rank in range(2):
        results = json.loads((tmp_path / f"{rank}.json").read_text())
        assert len(results) == 3
        for case, diff in results.items():
            print(f"rank {rank} {case}: parallel vs one process, worst diff {diff:.3e}")
            assert diff <= TILE_TOL, case


def _mode_budgets(vae: WanVAE, z: torch.Tensor) -> list[int]:
    """A budget for each CPU decode mode (the whole frame just fits it), then one that fits none."""
    from wanpipe.stages.decode import CPU_DECODE_MODES

    area = z.shape[3] * z.shape[4]
    needs = [
        int(upper_bytes_per_pixel(vae.decoder, 4, m.piece_frames) * m.over_estimate * area) + 1
        for m in CPU_DECODE_MODES
    ]
    return [*needs, min(needs) // 3]


def test_cpu_decode_modes_same_frames(wan21: WanVAE) -> None:
    """``--vae-memory`` on the CPU picks the fastest decode mode whose whole frame fits the budget (fewer
    frames per piece, glibc lean during the decode only), and tiles in the leanest mode when none fits:
    the frames of the default decode every way (<= TILE_TOL); the decoder's piece setting and the
    process's host memory mode are restored after it."""
    from wanpipe.runtime.memory import configure_host_memory, host_memory_mode
    from wanpipe.stages.decode import CPU_DECODE_MODES, decode, plan_decode
    from wanpipe.stages.placement import Placement

    configure_host_memory("cache")
    z = torch.randn(1, 16, 4, 9, 11, generator=torch.Generator().manual_seed(3))
    raw = wan21.denormalize_latents(z)
    placement = Placement(torch.device("cpu"), torch.float32)
    budgets = _mode_budgets(wan21, raw)
    plans = [plan_decode(wan21, raw, b) for b in budgets]
    assert [p.mode for p in plans] == [None, *CPU_DECODE_MODES[1:], CPU_DECODE_MODES[-1]]
    assert [p.tile is None for p in plans] == [True] * len(CPU_DECODE_MODES) + [False]
    with torch.inference_mode():
        ref = decode(wan21, z, placement, vae_dtype=torch.float32)
        for budget, plan in zip(budgets, plans):
            out = decode(wan21, z, placement, vae_dtype=torch.float32, memory=budget)
            diff = (out - ref).abs().max().item()
            print(f"CPU decode {plan} vs default: worst diff {diff:.3e}")
            assert out.shape == ref.shape == (1, 13, 36, 44, 3)
            assert diff <= TILE_TOL
            assert wan21.decoder.piece_frames == 4
            assert host_memory_mode() in ("cache", None)


def test_cpu_tiles_by_itself_when_available_memory_is_short(wan21: WanVAE, monkeypatch) -> None:
    """No ``--vae-memory`` on the CPU: the budget is a fraction of the system's available memory. When
    plenty is available the decode is the plain one; when little is, it is tiled and low-memory by
    itself, with the same frames; where the available memory is not known, nothing changes."""
    import wanpipe.stages.decode as stage
    from wanpipe.stages.placement import Placement

    z = torch.randn(1, 16, 4, 9, 11, generator=torch.Generator().manual_seed(4))
    raw = wan21.denormalize_latents(z)
    placement = Placement(torch.device("cpu"), torch.float32)
    grids: list[TileGrid] = []

    def spy(vae, latents, tile, **kw):
        grids.append(tile)
        return decode_tiled(vae, latents, tile, **kw)

    monkeypatch.setattr(stage, "decode_tiled", spy)
    with torch.inference_mode():
        ref = stage.decode(wan21, z, placement, vae_dtype=torch.float32)
        assert grids == [] and stage.plan_decode(wan21, raw, None) == stage.DecodePlan(None)  # it fits
        monkeypatch.setattr(stage, "available_memory", lambda: 1_000_000)
        plan = stage.plan_decode(wan21, raw, None)
        assert plan.tile is not None and plan.mode == stage.CPU_DECODE_MODES[-1]
        out = stage.decode(wan21, z, placement, vae_dtype=torch.float32)
        monkeypatch.setattr(stage, "available_memory", lambda: None)
        assert stage.plan_decode(wan21, raw, None) == stage.DecodePlan(None)
    diff = (out - ref).abs().max().item()
    print(f"automatic CPU tiling ({grids[0]}) vs plain: worst diff {diff:.3e}")
    assert grids == [plan.tile] and plan.tile.count > 1
    assert diff <= TILE_TOL and wan21.decoder.piece_frames == 4
