"""Whole-pipeline parity with diffusers' WanPipeline on tiny random checkpoints, and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import tiny
from wanpipe import WanPipeline, WanRequest
from wanpipe.text_tokenizer import clean_prompt

FRAME_TOL = 1e-3


def reference_frames(ref, **kw) -> np.ndarray:
    seed = kw.pop("seed")
    out = ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).frames[0]
    return np.asarray(out, dtype=np.float32)


PROMPTS = [
    "a cat walks on the grass",
    "  the quick   brown fox &amp;amp; the lazy dog  ",
    "video of a red car " * 200,  # longer than 512 tokens: truncated by both
]


def test_prompt_embeddings_match_diffusers(wan_pipe: WanPipeline, reference_pipe) -> None:
    tokens = wan_pipe.tokenizer.text_tokenizer(PROMPTS)
    ref_tok = reference_pipe.tokenizer(
        [clean_prompt(p) for p in PROMPTS],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    np.testing.assert_array_equal(tokens.ids, ref_tok.input_ids.numpy())
    np.testing.assert_array_equal(tokens.mask, ref_tok.attention_mask.numpy().astype(bool))
    assert tokens.truncated == [False, False, True]
    ours = wan_pipe.executor.text_encoder(torch.from_numpy(tokens.ids), torch.from_numpy(tokens.mask))
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = reference_pipe._get_t5_prompt_embeds(prompt, max_sequence_length=512, device="cpu")[0]
        assert ours.shape[1:] == ref.shape
        diff = (ours[i] - ref).abs().max().item()
        assert diff < 1e-4, (i, diff)
        # cut to the true length and zero-padded to 512
        length = int(tokens.mask[i].sum())
        assert torch.count_nonzero(ours[i, length:]) == 0
        assert ours[i, :length].abs().min(dim=-1).values.gt(0).all()


CASES = [
    # height, width, num_frames, steps, guidance, seed
    (32, 32, 5, 2, 5.0, 0),
    (32, 48, 9, 3, 3.5, 1),  # non-square
    (48, 32, 1, 4, 6.0, 2),  # a single frame
    (32, 32, 9, 1, 1.0, 3),  # no guidance: no unconditional branch
    (64, 32, 5, 5, 0.5, 4),
]


@pytest.mark.parametrize(("height", "width", "num_frames", "steps", "guidance", "seed"), CASES)
def test_generation_matches_diffusers(
    wan_pipe, reference_pipe, height, width, num_frames, steps, guidance, seed
):
    kw = dict(
        prompt="a dog runs in the park",
        negative_prompt="worst quality" if seed % 2 else None,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )
    video = wan_pipe.generate(**kw, progress=False)
    ref = reference_frames(reference_pipe, **kw)
    assert video.frames.shape == (num_frames, height, width, 3) == ref.shape
    assert video.frames.dtype == np.float32
    assert video.fps == 16 and video.seed == seed
    diff = float(np.abs(video.frames - ref).max())
    assert diff <= FRAME_TOL, diff
    assert float(video.frames.std()) > 1e-3  # not a constant picture


def test_flow_shift_override_matches_diffusers(wan_pipe, tiny_ckpt) -> None:
    from diffusers import UniPCMultistepScheduler

    ref = tiny.load_reference(tiny_ckpt)
    ref.scheduler = UniPCMultistepScheduler.from_config(ref.scheduler.config, flow_shift=7.0)
    kw = dict(
        prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0, seed=5
    )
    ours = wan_pipe.generate(**kw, flow_shift=7.0, progress=False).frames
    default = wan_pipe.generate(**kw, progress=False).frames
    theirs = reference_frames(ref, **kw)
    assert float(np.abs(ours - theirs).max()) <= FRAME_TOL
    assert float(np.abs(ours - default).max()) > 1e-3  # the override changed something


def test_euler_checkpoint_matches_diffusers(tmp_path) -> None:
    folder = tiny.save_checkpoint(tmp_path / "euler", scheduler="euler", flow_shift=5.0, seed=3)
    ours = WanPipeline.from_pretrained(folder, device="cpu")
    ref = tiny.load_reference(folder)
    kw = dict(
        prompt="a red car",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=5.0,
        seed=9,
    )
    diff = float(np.abs(ours.generate(**kw, progress=False).frames - reference_frames(ref, **kw)).max())
    assert diff <= FRAME_TOL, diff


def test_given_latents_are_used(wan_pipe, reference_pipe) -> None:
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    kw = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
    ours = wan_pipe.generate(**kw, latents=latents, progress=False).frames
    ref = reference_pipe(latents=latents.clone(), output_type="np", **kw).frames[0]
    assert float(np.abs(ours - ref).max()) <= FRAME_TOL


def test_batch_of_contexts_equals_single_runs(wan_pipe) -> None:
    common = dict(height=32, width=32, num_frames=5, num_inference_steps=3)
    requests = [
        WanRequest(prompt="a cat walks", guidance_scale=5.0, seed=1, **common),
        WanRequest(
            prompt="a dog runs in the park", negative_prompt="static", guidance_scale=2.0, seed=2, **common
        ),
        WanRequest(
            prompt="the lazy dog", guidance_scale=1.0, seed=3, **common
        ),  # no guidance in a guided batch
    ]
    batch = wan_pipe.generate_batch(requests, progress=False)
    for req, video in zip(requests, batch):
        single = wan_pipe.generate_batch([req], progress=False)[0]
        assert float(np.abs(video.frames - single.frames).max()) <= 1e-4
    assert float(np.abs(batch[0].frames - batch[1].frames).max()) > 1e-3


def test_a_row_cancelled_mid_batch_stops_its_work(wan_pipe, dit_rows) -> None:
    """cancelled_rows: the row's work stops at the next step (the DiT then runs the others alone), its
    frames are not made, and the others' frames are those of the whole batch (UniPC's memory, the text
    rows, the guidance of the rows that stay are cut along)."""
    from wanpipe.context import GenerationStatus
    from wanpipe.executor import CancelledError

    common = dict(height=32, width=32, num_frames=5, num_inference_steps=5)
    requests = [
        WanRequest(prompt="a cat walks", guidance_scale=5.0, seed=1, **common),
        WanRequest(prompt="a dog runs", negative_prompt="static", guidance_scale=2.0, seed=2, **common),
        WanRequest(prompt="the lazy dog", guidance_scale=1.0, seed=3, **common),
    ]
    whole, _ = wan_pipe.run_contexts([wan_pipe.tokenizer.make_context(r) for r in requests], progress=False)
    dit_rows.clear()
    steps_done: list[int] = []
    contexts = [wan_pipe.tokenizer.make_context(r) for r in requests]
    frames, _ = wan_pipe.run_contexts(
        contexts,
        lambda i, n, t: steps_done.append(i),
        progress=False,
        cancelled_rows=lambda: {1} if len(steps_done) >= 2 else set(),
    )
    assert dit_rows == [6, 6, 4, 4, 4]  # guided rows (cond + uncond): 3 + 3, then 2 + 2
    assert frames[1] is None and contexts[1].status == GenerationStatus.CANCELLED
    for i in (0, 2):
        assert contexts[i].status == GenerationStatus.FINISHED
        assert float(np.abs(frames[i] - whole[i]).max()) <= 1e-4
    with pytest.raises(CancelledError):
        wan_pipe.run_contexts(contexts[:2], progress=False, cancelled_rows=lambda: {0, 1})
    assert all(c.status == GenerationStatus.CANCELLED for c in contexts[:2])


def test_batch_refuses_mixed_shapes(wan_pipe) -> None:
    a = wan_pipe.tokenizer.make_context(
        WanRequest(prompt="a", height=32, width=32, num_frames=5, num_inference_steps=2)
    )
    b = wan_pipe.tokenizer.make_context(
        WanRequest(prompt="b", height=32, width=48, num_frames=5, num_inference_steps=2)
    )
    with pytest.raises(ValueError, match="share size"):
        wan_pipe.executor.prepare_inputs([a, b])


def test_context_carries_the_schedule(wan_pipe) -> None:
    import asyncio

    ctx = asyncio.run(
        wan_pipe.tokenizer.new_context(
            WanRequest(prompt="a cat", height=32, width=32, num_frames=9, num_inference_steps=4, seed=7)
        )
    )
    assert ctx.latents.shape == (16, 3, 4, 4)
    assert ctx.timesteps.shape == (4,) and ctx.sigmas.shape == (5,)
    assert ctx.step_coefficients.shape[0] == 4
    assert ctx.tokens.shape == (512,) and ctx.negative_tokens is not None
    assert ctx.seed == 7 and not ctx.explicit_negative_prompt
    expected = torch.randn((1, 16, 3, 4, 4), generator=torch.Generator("cpu").manual_seed(7))[0].numpy()
    np.testing.assert_array_equal(ctx.latents, expected)


def test_callback_sees_every_step(wan_pipe) -> None:
    seen = []
    wan_pipe.generate(
        "a cat",
        height=32,
        width=32,
        num_frames=1,
        num_inference_steps=3,
        seed=0,
        callback=lambda i, n, t: seen.append((i, n)),
        progress=False,
    )
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_bf16_loading_keeps_fp32_islands(tiny_ckpt, wan_pipe) -> None:
    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="bfloat16")
    dit = pipe.executor.transformer
    dtypes = {name: p.dtype for name, p in dit.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.modulation"] == torch.float32
    assert dtypes["time_embedding.0.weight"] == torch.float32
    assert all(p.dtype == torch.float32 for p in pipe.executor.vae.parameters())
    kw = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=2, seed=1)
    low = pipe.generate(**kw, progress=False).frames
    full = wan_pipe.generate(**kw, progress=False).frames
    assert np.isfinite(low).all()
    err = np.abs(low - full)
    # measured: mean 0.0014, max 0.028 (frames in [0, 1]); bounds about 2.5x the max
    assert float(err.mean()) < 0.05
    assert float(err.max()) < 0.07
