"""``wanpipe generate`` with sequence and CFG parallelism in a gloo world of 2 spawned processes.

One world (``tests.parallel_workers.run_generate_world``) runs the CLI with ``--ulysses 2`` and with
``--cfg-parallel`` (seed 7, PNG folders, rank 0 writes), the CLI with a bad mesh (``--ulysses 3``),
and ``WanPipeline.generate`` without a seed under Ulysses, ring and CFG-parallel meshes (rank 0's seed
is broadcast). The frames are compared with a single-process run: the float frames within 1e-4, the
8-bit PNGs within one level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import parallel_workers as workers
from wanpipe.cli import main

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


def test_parallel_refuses_compile_offload_block_and_step_cache(wan_pipe) -> None:
    """In one process (a mesh of one): refused combinations fail before any work, with the flags named."""
    from wanpipe.parallel import ParallelConfig, ParallelMesh
    from wanpipe.runtime.runner import DiTRunner

    executor = wan_pipe.executor
    runner, runtime = executor.runner, executor.runtime
    try:
        executor.parallel = ParallelMesh.build(ParallelConfig())
        executor.check_parallel()
        video = wan_pipe.generate(**workers.GENERATE_KW, seed=3, progress=False)
        executor.parallel = None
        plain = wan_pipe.generate(**workers.GENERATE_KW, seed=3, progress=False)
        assert np.abs(video.frames - plain.frames).max() <= FRAMES_TOL
        executor.parallel = ParallelMesh.build(ParallelConfig())
        executor.runner = DiTRunner(streamer=object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"does not combine with --offload block yet"):
            executor.check_parallel()
        executor.runner = runner
        with pytest.raises(ValueError, match=r"does not combine with a step cache"):
            wan_pipe.generate(**workers.GENERATE_KW, seed=3, residual_threshold=0.1, progress=False)
    finally:
        executor.parallel, executor.runner, executor.runtime = None, runner, runtime
