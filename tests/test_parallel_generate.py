"""``wanpipe generate`` with sequence and CFG parallelism in a gloo world of 2 spawned processes.

One world (``tests.parallel_workers.run_generate_world``) runs the CLI with ``--ulysses 2`` and with
``--cfg-parallel`` (seed 7, PNG folders, rank 0 writes), the CLI with a bad mesh (``--ulysses 3``),
and ``WanPipeline.generate`` without a seed under Ulysses, ring and CFG-parallel meshes (rank 0's seed
is broadcast), then with rank 1 loaded without a text encoder (rank 0 broadcasts the embeddings) and
with the VAE decode split by bands (``vae_halo``). The frames are compared with a single-process run:
the float frames within 1e-4, the 8-bit PNGs within one level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import parallel_workers as workers
from wanpipe.cli import main
from wanpipe.context import WanRequest

FRAMES_TOL = 1e-4


@pytest.fixture(scope="module")
def world(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    outdir = tmp_path_factory.mktemp("parallel-generate")
    return outdir, workers.run_generate_world(str(tiny_ckpt), str(outdir))


def _pngs(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.int16)


@pytest.mark.parametrize("layout", sorted(workers.CLI_FLAGS))
def test_cli_frames_equal_single_process(
    world, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    outdir, results = world
    assert [r[f"cli/{layout}"] for r in results] == [0, 0]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(workers.generate_argv(str(tiny_ckpt), str(tmp_path / "single"), "--seed", "7")) == 0
    single, parallel = _pngs(tmp_path / "single"), _pngs(outdir / f"cli-{layout}")
    assert single.shape == parallel.shape == (5, 32, 32, 3)
    # 8-bit rounding of frames equal within 1e-4: at most one level apart, and almost never.
    assert np.abs(single - parallel).max() <= 1
    assert (single != parallel).mean() < 0.01


def test_bad_mesh_exits_2_with_the_message(world) -> None:
    _, results = world
    for code, stderr in (r["bad"] for r in results):
        assert code == 2
        assert "must equal the world size 2: --ulysses 3 x --ring 1 = 3" in stderr


@pytest.mark.parametrize("layout", sorted(workers.GENERATE_LAYOUTS))
def test_pipeline_frames_equal_single_process(world, wan_pipe, layout: str) -> None:
    outdir, results = world
    seeds = {r[f"seed/{layout}"] for r in results}
    assert len(seeds) == 1, f"the ranks drew different seeds: {seeds}"  # rank 0's was broadcast
    expected = wan_pipe.generate(**workers.GENERATE_KW, seed=seeds.pop(), progress=False).frames
    for rank in range(len(results)):
        frames = np.load(outdir / f"{layout}-{rank}.npy")
        assert frames.shape == expected.shape
        diff = float(np.abs(frames - expected).max())
        assert diff <= FRAMES_TOL, f"{layout} rank {rank}: max abs diff {diff:.3g}"


def test_rank_without_text_encoder_gets_rank0_embeddings(world, wan_pipe) -> None:
    """Rank 1 loaded without UMT5 (``load_text_encoder=False``) under ``--ulysses 2``: rank 0
    broadcasts the embeddings and both ranks end with the single-process frames."""
    outdir, results = world
    assert [r["lean/text_encoder"] for r in results] == [True, False]
    text_params = sum(t.numel() for t in wan_pipe.executor.text_encoder.parameters())
    text_params += sum(t.numel() for t in wan_pipe.executor.text_encoder.buffers())
    full, lean0 = results[0]["lean/params"]
    _, lean1 = results[1]["lean/params"]
    assert lean0 == full  # rank 0 holds everything
    assert lean1 == full - text_params  # rank 1 holds nothing of the text encoder
    seeds = {r["seed/lean"] for r in results}
    assert len(seeds) == 1
    expected = wan_pipe.generate(**workers.GENERATE_KW, seed=seeds.pop(), progress=False).frames
    for rank in range(len(results)):
        frames = np.load(outdir / f"lean-{rank}.npy")
        diff = float(np.abs(frames - expected).max())
        assert diff <= FRAMES_TOL, f"rank {rank} without a text encoder: max abs diff {diff:.3g}"


def test_pipeline_without_text_encoder_refuses_alone(tiny_ckpt: Path) -> None:
    from wanpipe.pipeline import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32", load_text_encoder=False)
    assert pipe.executor.text_encoder is None
    with pytest.raises(RuntimeError, match=r"loaded without its text encoder"):
        pipe.generate(**workers.GENERATE_KW, seed=1, progress=False)


def test_vae_parallel_bands_across_the_world(world, wan_pipe) -> None:
    """``executor.vae_halo`` under ``--ulysses 2``: each rank decodes 2 of the 4 latent rows of a
    32x32 video. A halo of 4 rows reaches the whole picture (the single-process frames); a halo of 0
    does not (the bands differ near their edge), and both ranks hold the same gathered frames."""
    outdir, _ = world
    expected = wan_pipe.generate(**workers.GENERATE_KW, seed=11, progress=False).frames
    diffs = {}
    for halo in workers.VAE_HALOS:
        ranks = [np.load(outdir / f"vae-halo{halo}-{rank}.npy") for rank in range(2)]
        assert np.array_equal(ranks[0], ranks[1])
        assert ranks[0].shape == expected.shape
        diffs[halo] = float(np.abs(ranks[0] - expected).max())
    assert diffs[4] <= FRAMES_TOL, diffs
    assert diffs[-1] <= FRAMES_TOL, diffs  # the exact bands (mid block once, full halo)
    assert diffs[0] > 1e-3, diffs  # 0.58 seen: 2 rows per band and no halo is far off


# Worst max abs diff of the band decode against the whole decode, in the VAE's [-1, 1] output (frames
# in [0, 1]: half of it), on random latents (1, 16, 3, 16, 16) of the tiny checkpoint (random weights),
# 2 and 4 bands, seeds 0 / 1 / 2: halo 0: 1.04 / 0.98 / 0.94; 1: 0.33 / 0.35 / 0.31; 2: 0.15 / 0.12 /
# 0.12; 4: 0.069 / 0.065 / 0.048; 8: 0.069 / 0.031 / 0.048 (the mid-block attention is global: a wider
# halo stops helping). A halo that reaches the picture's edges is exact. The test uses seed 0.
VAE_BAND_BOUNDS = {0: 1.2, 1: 0.45, 2: 0.2, 4: 0.1, 8: 0.1}


def test_vae_band_decode_error_bound(wan_pipe) -> None:
    import torch

    from wanpipe.parallel.vae import band_bounds, decode_band

    vae = wan_pipe.executor.vae
    z = torch.randn(1, vae.config.z_dim, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert band_bounds(16, 3) == [(0, 6), (6, 11), (11, 16)]
    with torch.no_grad():
        full = vae.decode(z)
        for halo, bound in VAE_BAND_BOUNDS.items():
            for world in (2, 4):
                bands = torch.cat([decode_band(vae, z, r, world, halo) for r in range(world)], dim=3)
                diff = float((bands - full).abs().max())
                assert diff <= bound, f"halo {halo}, {world} bands: {diff:.3g} > {bound}"
        whole = torch.cat([decode_band(vae, z, r, 2, 8) for r in range(2)], dim=3)
        assert float((whole - full).abs().max()) <= 1e-5  # 8 + 8 rows: every band sees the picture


def test_bad_vae_halo_exits_2(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = workers.generate_argv(str(tiny_ckpt), str(tmp_path / "out"), "--vae-parallel", "--vae-halo", "-1")
    assert main(argv) == 2
    assert "argument --vae-halo: expected a whole number, at least 0 (latent rows), got '-1'" in (
        capsys.readouterr().err
    )


def test_parallel_refuses_compile_offload_block_and_step_cache(wan_pipe) -> None:
    """In one process (a mesh of one): refused combinations fail before any work, with the flags named."""
    from wanpipe.parallel import ParallelConfig
    from wanpipe.runtime import RuntimeOptions

    executor = wan_pipe.executor
    runtime = executor.runtime
    try:
        wan_pipe.enable_parallel(ParallelConfig())
        video = wan_pipe.generate(**workers.GENERATE_KW, seed=3, progress=False)
        wan_pipe.enable_parallel(None)
        plain = wan_pipe.generate(**workers.GENERATE_KW, seed=3, progress=False)
        assert np.abs(video.frames - plain.frames).max() <= FRAMES_TOL
        wan_pipe.set_runtime(RuntimeOptions(offload="block"))
        with pytest.raises(ValueError, match=r"does not combine with --offload block yet"):
            wan_pipe.enable_parallel(ParallelConfig())
        assert executor.parallel is None and executor.runner.mesh is None  # a refusal changes nothing
        wan_pipe.set_runtime(RuntimeOptions(compile=True))
        with pytest.raises(ValueError, match=r"does not combine with --compile yet"):
            wan_pipe.enable_parallel(ParallelConfig())
        wan_pipe.set_runtime(runtime)
        wan_pipe.enable_parallel(ParallelConfig())
        with pytest.raises(ValueError, match=r"does not combine with a step cache"):
            wan_pipe.generate(**workers.GENERATE_KW, seed=3, residual_threshold=0.1, progress=False)
        with pytest.raises(ValueError, match=r"does not combine with a step cache"):
            wan_pipe.check(WanRequest(prompt="a cat", residual_threshold=0.1))
    finally:
        wan_pipe.enable_parallel(None)
        wan_pipe.set_runtime(runtime)
