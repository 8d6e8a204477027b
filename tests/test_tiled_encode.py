"""The exact tiled VAE encode wired into conditioning: with ``--vae-memory`` below what one frame's
encode needs, the encoder inputs (video-to-video, I2V / FLF2V images, VACE control videos and
reference images) go through :func:`~wanpipe.models.vae_tiling.encode_tiled`, and the prepared
conditioning equals the untiled one (fp32, <= 1e-5) on tiny checkpoints, through the real
``prepare_conditioning`` path and end to end.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import wanpipe.stages.decode as stage
from tests import tiny_family
from wanpipe import WanPipeline, WanRequest
from wanpipe.batch import collate
from wanpipe.models.vae_tiling import TileGrid, encoder_halo, plan_encode_tiles, split_tiles
from wanpipe.runtime import RuntimeOptions
from wanpipe.stages.conditioning import prepare_conditioning
from wanpipe.tokenizer import WanTokenizer

TOL = 1e-5
SIZE = dict(height=160, width=160)  # 20 x 20 latent pixels: 16 tiles of 5 x 5 (the halo) at 1 KB


@pytest.fixture
def tiles(monkeypatch) -> list[TileGrid]:
    """The tiles of every tiled encode."""
    seen: list[tuple[int, int]] = []
    encode_tiled = stage.encode_tiled

    def spy(vae, video, tile, **kw):
        seen.append(tile)
        return encode_tiled(vae, video, tile, **kw)

    monkeypatch.setattr(stage, "encode_tiled", spy)
    return seen


def _compare(tokenizer: WanTokenizer, encoders, request: WanRequest, tiles: list) -> float:
    """Prepare ``request``'s conditioning untiled and with a 1 KB VAE budget -> the worst diff of every
    tensor it holds (and the initial latents)."""
    ctx = tokenizer.make_context(request)
    inputs = collate([ctx])
    plain, plain_latents = prepare_conditioning(inputs, replace(encoders, vae_memory=None))
    assert tiles == []
    tiled, tiled_latents = prepare_conditioning(inputs, replace(encoders, vae_memory=1000))
    assert tiles and all(isinstance(t, TileGrid) and t.count > 1 for t in tiles), tiles
    # the encodes are in the initial latents (video-to-video) or in the mode's tensors (the rest)
    worst = float((plain_latents - tiled_latents).abs().max())
    for name, value in vars(plain).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            worst = max(worst, float((value - getattr(tiled, name)).abs().max()))
    return worst


def test_encode_budget_plans_tiles(wan_pipe) -> None:
    encoder = wan_pipe.executor.vae.encoder
    halo = encoder_halo(encoder)
    assert plan_encode_tiles(encoder, 20, 20, 10**12, 4) is None  # it fits: no tiling
    smallest = plan_encode_tiles(encoder, 20, 20, 1000, 4)  # nothing fits: the smallest sensible tiles
    assert smallest is not None and smallest.count > 1
    for t in split_tiles(20, 20, smallest, halo):
        assert (
            t.region_rows[1] - t.region_rows[0] <= 3 * halo
            and t.region_cols[1] - t.region_cols[0] <= 3 * halo
        )
    grid = plan_encode_tiles(encoder, 64, 64, 4 * 10**7, 4)
    assert grid is not None and sum(grid.rows) == 64 and sum(grid.cols) == 64 and grid.count > 1


def test_video_to_video_tiled_encode_is_exact(wan_pipe, tiles) -> None:
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, size=(9, 160, 160, 3), dtype=np.uint8)
    request = WanRequest(prompt="a cat", num_frames=9, video=video, strength=0.7, seed=2, **SIZE)
    diff = _compare(wan_pipe.tokenizer, wan_pipe.executor.encoders, wan_pipe.check(request), tiles)
    print(f"video-to-video conditioning, tiled encode vs untiled: worst diff {diff:.2e}")
    assert diff <= TOL


def test_vace_tiled_encode_is_exact(wan_pipe, tiles) -> None:
    arch = wan_pipe.arch
    dit = replace(arch.transformer, vace_layers=(0, 1), vace_in_channels=96)
    tokenizer = WanTokenizer(replace(arch, transformer=dit), wan_pipe.tokenizer.text_tokenizer)
    encoders = replace(wan_pipe.executor.encoders, vace_layers=(0, 1))
    rng = np.random.default_rng(3)
    video = rng.integers(0, 256, size=(9, 160, 160, 3), dtype=np.uint8)
    mask = np.zeros((160, 160), dtype=np.uint8)
    mask[40:120, 30:100] = 255
    refs = [rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8)]
    request = WanRequest(
        prompt="a cat", num_frames=9, video=video, mask=mask, reference_images=refs, seed=4, **SIZE
    )
    diff = _compare(tokenizer, encoders, tokenizer.resolve(request), tiles)
    print(f"VACE control (video, mask, reference image), tiled encode vs untiled: worst diff {diff:.2e}")
    assert diff <= TOL


@pytest.fixture(scope="module")
def flf2v_pipe(tmp_path_factory) -> WanPipeline:
    folder = tmp_path_factory.mktemp("flf2v") / "flf2v-tiny"
    tiny_family.i2v_14b(folder, flf2v=True)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")


def test_first_last_frame_tiled_encode_is_exact(flf2v_pipe, tiles) -> None:
    """I2V / FLF2V (one conditioning class): the first and last images encoded with the zero frames."""
    images = dict(image=tiny_family.picture(160, 160, 5), last_image=tiny_family.picture(160, 160, 6))
    request = WanRequest(prompt="a cat", num_frames=9, seed=6, **images, **SIZE)
    pipe = flf2v_pipe
    diff = _compare(pipe.tokenizer, pipe.executor.encoders, pipe.check(request), tiles)
    print(f"FLF2V conditioning, tiled encode vs untiled: worst diff {diff:.2e}")
    assert diff <= TOL


def test_vae_memory_runtime_tiles_the_encode_end_to_end(wan_pipe, tiles) -> None:
    """``set_runtime(vae_memory=)`` reaches the encoder: the same frames from a video-to-video run."""
    rng = np.random.default_rng(8)
    video = rng.integers(0, 256, size=(5, 160, 160, 3), dtype=np.uint8)
    request = dict(
        prompt="a dog", num_frames=5, video=video, strength=0.8, seed=9, num_inference_steps=2, **SIZE
    )
    before = wan_pipe.executor.runtime
    try:
        plain = wan_pipe.generate(**request, progress=False).frames
        assert tiles == []
        wan_pipe.set_runtime(RuntimeOptions(vae_memory="1KB"))
        tiled = wan_pipe.generate(**request, progress=False).frames
    finally:
        wan_pipe.set_runtime(before)
    assert tiles  # the encode was tiled (and the decode too)
    diff = float(np.abs(plain - tiled).max())
    print(f"video-to-video end to end, vae_memory=1KB vs untiled: worst frame diff {diff:.2e}")
    assert diff <= 1e-4
