"""Compressed text padding: the cross-attention over (prompt + one padding stand-in with logit + log n)
equals the one over all zero-padded text tokens, at the model, runner and whole-generation level."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from wanpipe import WanPipeline, WanRequest
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig, compress_text_padding
from wanpipe.runtime import RuntimeOptions, apply_runtime_options
from wanpipe.runtime.compile import CompiledDiT
from wanpipe.runtime.runner import DiTRunner
from wanpipe.runtime.step_cache import FirstBlockCache

TOL = 1e-5
TEXT_LEN = 64
T2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
I2V = {**T2V, "in_channels": 6, "image_dim": 12, "added_kv_proj_dim": 24}


def padded_text(lengths: list[int], text_len: int = TEXT_LEN, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, text_len, dim) random rows up to each length, zero after (as the text encoder pads)."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(len(lengths), text_len, dim, generator=gen)
    for row, n in enumerate(lengths):
        text[row, n:] = 0
    return text


def tiny_model(cfg: dict, seed: int = 0) -> WanTransformerModel:
    torch.manual_seed(seed)
    model = WanTransformerModel(TransformerConfig.from_dict(cfg)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(1 + noise if re.search(r"norm[^.]*\.weight$", name) else noise)
    return model


def dit_inputs(cfg: dict, batch: int, image_len: int = 0):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, cfg["in_channels"], 2, 4, 4, generator=gen)
    timestep = torch.tensor([900.0, 310.0, 45.0][:batch])
    image = torch.randn(batch, image_len, cfg["image_dim"], generator=gen) if image_len else None
    return latents, timestep, image


# -- the compression itself ------------------------------------------------------------------------
def test_compress_keeps_prompts_and_one_weighted_pad_row() -> None:
    text = padded_text([3, 5, 10], text_len=10)
    text[1, 1] = 0  # a zero row inside a prompt is kept: only trailing rows are dropped
    # Row 2 has no padding: the others are padded with -inf up to the longest kept row.
    assert compress_text_padding(text)[1] is None
    kept, bias = compress_text_padding(text[:2])
    assert kept.shape == (2, 6, 16) and bias is not None and bias.shape == (2, 6)
    assert bias.dtype == torch.float32
    assert torch.equal(kept, text[:2, :6])
    inf = float("-inf")
    expected = torch.tensor([[0, 0, 0, math.log(7), inf, inf], [0, 0, 0, 0, 0, math.log(5)]])
    assert torch.equal(bias, expected.float())
    # A row with one trailing zero row keeps it (log 1 = 0); rounding up to an aligned key length.
    kept, bias = compress_text_padding(padded_text([9, 2], text_len=32), multiple_of=8)
    assert kept.shape == (2, 16, 16) and bias is not None
    assert bias[0, 9] == math.log(23) and torch.isinf(bias[0, 10:]).all()
    assert bias[1, 2] == math.log(30) and torch.isinf(bias[1, 3:]).all()
    # An empty prompt: one stand-in key for all rows.
    kept, bias = compress_text_padding(torch.zeros(1, 8, 4))
    assert kept.shape == (1, 1, 4) and torch.allclose(bias, torch.tensor([[math.log(8)]]))
    # Nothing to drop: the input back, no bias.
    for text in (padded_text([7], text_len=8), padded_text([8, 2], text_len=8)):
        same, none = compress_text_padding(text)
        assert same is text and none is None
    # Aligning past the text length gives nothing either.
    assert compress_text_padding(padded_text([10], text_len=12), multiple_of=16)[1] is None


# -- the model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [T2V, I2V], ids=["t2v", "i2v"])
@torch.no_grad()
def test_compressed_text_gives_the_same_prediction(cfg: dict) -> None:
    model = tiny_model(cfg, seed=3)
    latents, timestep, image = dit_inputs(cfg, 3, image_len=5 if "image_dim" in cfg else 0)
    text = padded_text([5, 17, 40])
    full = model(latents, timestep, text, image)
    kept, bias = compress_text_padding(text)
    assert kept.shape[1] == 41 and bias is not None
    got = model(latents, timestep, kept, image, bias)
    assert full.abs().max() > 0.1
    assert (got - full).abs().max() < TOL
    # Two rows of different lengths: 18 keys instead of 64.
    kept, bias = compress_text_padding(text[:2])
    assert kept.shape[1] == 18
    got = model(latents[:2], timestep[:2], kept, None if image is None else image[:2], bias)
    assert (got - full[:2]).abs().max() < TOL
    x = model.embed(latents[:2], timestep[:2], kept, None if image is None else image[:2], bias)
    assert x.context_bias is not None and x.context_bias.shape == (2, 1, 1, 18)
    # The bias matters: without it the padding stand-in counts once, not 47 or 59 times.
    wrong = model(latents[:2], timestep[:2], kept, None if image is None else image[:2])
    assert (wrong - full[:2]).abs().max() > 1e-3


def test_text_bias_shape_is_checked() -> None:
    model = tiny_model(T2V)
    latents, timestep, _ = dit_inputs(T2V, 2)
    with pytest.raises(ValueError, match="text_bias"):
        model.embed(latents, timestep, padded_text([3, 4]), text_bias=torch.zeros(2, 5))


@torch.no_grad()
def test_runner_paths_with_compressed_text() -> None:
    """Compiled blocks (eager backend: the graph, not inductor) and a first-block cache that skips
    one stream (the rows path of ``DiTRunner._block_fn``) give the uncompressed results."""
    model = tiny_model(T2V, seed=5)
    latents, timestep, _ = dit_inputs(T2V, 2)
    text = padded_text([6, 11], seed=2)
    kept, bias = compress_text_padding(text)
    full = model(latents, timestep, text)
    compiled = DiTRunner(compiled=CompiledDiT(backend="eager"))
    assert (compiled.forward(model, latents, timestep, kept, text_bias=bias) - full).abs().max() < TOL

    class SkipUncond(FirstBlockCache):
        def can_skip(self, stream: str, first_residual: torch.Tensor) -> bool:
            return stream == "uncond" and stream in self.residuals

    streams = {"cond": slice(0, 1), "uncond": slice(1, 2)}
    outs = []
    for context, text_bias in ((text, None), (kept, bias)):
        cache = SkipUncond(0.1)
        runner = DiTRunner()
        for step in range(2):
            out = runner.forward(
                model,
                latents,
                timestep,
                context,
                text_bias=text_bias,
                cache=cache,
                streams=streams,
                step=step,
            )
        assert cache.stats.skipped == {"uncond": 1}
        outs.append(out)
    assert (outs[1] - outs[0]).abs().max() < TOL


# -- whole generations --------------------------------------------------------------------------------
REQUEST = dict(
    prompt="a dog runs in the park under the sun",
    negative_prompt="worst quality",
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=4,
    guidance_scale=5.0,
    seed=4,
)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> WanPipeline:
    """A pipeline of its own: the tests change its runtime options."""
    return WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


def generate(pipe: WanPipeline, requests: list[WanRequest], **options) -> list[np.ndarray]:
    apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False, **options))
    try:
        return [v.frames for v in pipe.generate_batch(requests, progress=False)]
    finally:
        apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False))


def test_compression_is_on_by_default() -> None:
    assert RuntimeOptions().compress_text


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cache": "first-block", "residual_threshold": 1e6},
        {"cache": "teacache", "residual_threshold": 1e6, "teacache_coefficients": (1.0, 0.0)},
    ],
    ids=["plain", "first-block", "teacache"],
)
def test_generation_with_and_without_compression(pipe, options) -> None:
    requests = [
        WanRequest(**REQUEST),
        WanRequest(**{**REQUEST, "prompt": "a cat", "negative_prompt": None, "seed": 5}),
        WanRequest(**{**REQUEST, "prompt": "the lazy dog", "guidance_scale": 1.0}),  # no guidance
    ]
    on = generate(pipe, requests, compress_text=True, **options)
    off = generate(pipe, requests, compress_text=False, **options)
    for a, b in zip(on, off):
        assert float(np.abs(a - b).max()) < TOL
    assert float(np.abs(on[0] - on[1]).max()) > 1e-3


def test_compression_shrinks_the_text_keys(pipe) -> None:
    """The cross-attention sees the longest prompt (conditional or negative) + 1 keys, not 512."""
    request = WanRequest(**REQUEST)
    context = pipe.tokenizer.make_context(request)
    assert context.negative_mask is not None
    longest = max(int(context.mask.sum()), int(context.negative_mask.sum()))
    text_len = context.mask.shape[-1]
    assert longest + 1 < text_len
    seen: list[int] = []

    def spy(module, args):
        seen.append(args[1].shape[1])  # CrossAttention.forward(x, context, ...)

    handle = pipe.executor.transformer.blocks[0].cross_attn.register_forward_pre_hook(spy)
    try:
        generate(pipe, [request])
        assert seen and set(seen) == {longest + 1}
        seen.clear()
        generate(pipe, [request], compress_text=False)
        assert seen and set(seen) == {text_len}
    finally:
        handle.remove()
