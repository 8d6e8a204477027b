"""Checks that need a CUDA device (skipped on the CPU-only machines, run where a GPU is lent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanpipe import WanPipeline

pytestmark = pytest.mark.gpu

KW = dict(
    prompt="a cat walks", height=32, width=48, num_frames=9, num_inference_steps=3, guidance_scale=5.0, seed=4
)


def test_cuda_fp32_matches_cpu(tiny_ckpt, wan_pipe) -> None:
    gpu = WanPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    diff = float(
        np.abs(
            gpu.generate(**KW, progress=False).frames - wan_pipe.generate(**KW, progress=False).frames
        ).max()
    )
    assert diff <= 1e-3, diff


def test_cuda_bf16_matches_diffusers_bf16(tiny_ckpt) -> None:
    from tests import tiny

    ours = WanPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bfloat16")
    ref = tiny.load_reference(tiny_ckpt, dtype=torch.bfloat16)
    ref.vae.to(torch.float32)
    ref.to("cuda")
    kw = {k: v for k, v in KW.items() if k != "seed"}
    theirs = ref(generator=torch.Generator("cpu").manual_seed(KW["seed"]), output_type="np", **kw).frames[0]
    frames = ours.generate(**KW, progress=False).frames
    assert np.isfinite(frames).all()
    diff = np.abs(frames - theirs)
    # Max bound: not yet measured on a GPU (no device run so far); the CPU bf16 paths of the same tiny
    # checkpoints reach 0.03-0.11 max (tests/test_pipeline.py, test_vae.py), so 0.25 leaves room for
    # other bf16 kernels while still catching a wrong frame (values are in [0, 1]).
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.25, (diff.mean(), diff.max())


def test_cuda_bf16_attention_kernels_and_text_compression(tiny_ckpt) -> None:
    from wanpipe.runtime import RuntimeOptions

    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cuda", dtype="bfloat16")
    video = pipe.generate(**KW, negative_prompt="blurry", progress=False)
    kernels = dict(part.split(": ") for part in video.timings["attention"].split(", "))
    assert set(kernels) == {"self", "cross"} and "none" not in kernels.values()
    print("attention kernels on", torch.cuda.get_device_name(), kernels)
    for options in (
        RuntimeOptions(attention_backend="math"),  # the reference kernel
        RuntimeOptions(compress_text=False),  # all 512 text tokens
    ):
        pipe.set_runtime(options)
        other = pipe.generate(**KW, negative_prompt="blurry", progress=False)
        diff = np.abs(other.frames - video.frames)
        assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.25, (options, diff.mean(), diff.max())
