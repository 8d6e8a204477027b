"""The prompt embedding cache: repeated prompts are not encoded again, and give the same frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wanpipe import WanPipeline, WanRequest
from wanpipe.runtime import RuntimeOptions, apply_runtime_options
from wanpipe.runtime.text_cache import TextEmbeddingCache


class Encoder:
    """A stand-in encoder that counts the rows it encodes: row i -> its ids as features, zero past each length."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.rows += ids.shape[0]
        return ids.float().unsqueeze(-1).repeat(1, 1, 3) * mask.unsqueeze(-1)


def _batch(*prompts: list[int], length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = True
    return ids, mask


def test_cache_encodes_each_distinct_prompt_once() -> None:
    enc, cache = Encoder(), TextEmbeddingCache(capacity=8)
    ids, mask = _batch([5, 6, 1], [7, 1], [5, 6, 1])
    first = cache.encode(ids, mask, enc)
    assert enc.rows == 2 and cache.misses == 2 and cache.hits == 1  # the repeated row encoded once
    assert torch.equal(first, enc(ids, mask))
    again = cache.encode(*_batch([7, 1], [9, 9, 1]), enc)
    assert enc.rows == 2 + 3 + 1  # (the check above ran the encoder on 3 rows) + the one new prompt
    assert torch.equal(again, Encoder()(*_batch([7, 1], [9, 9, 1])))
    assert len(cache) == 3


def test_cache_evicts_the_least_recently_used_and_can_be_off() -> None:
    enc, cache = Encoder(), TextEmbeddingCache(capacity=2)
    for prompt in ([1], [2], [1], [3]):  # [2] is the least recently used when [3] arrives
        cache.encode(*_batch(prompt), enc)
    assert enc.rows == 3 and len(cache) == 2
    cache.encode(*_batch([2]), enc)
    assert enc.rows == 4
    off = TextEmbeddingCache(capacity=0)
    off.encode(*_batch([1]), enc)
    off.encode(*_batch([1]), enc)
    assert enc.rows == 6 and len(off) == 0
    with pytest.raises(ValueError, match="capacity"):
        TextEmbeddingCache(capacity=-1)


def test_pipeline_reuses_prompt_embeddings(tiny_ckpt: Path) -> None:
    pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
    calls = []
    pipe.executor.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    request = dict(prompt="a cat", negative_prompt="blurry", height=32, width=32, num_frames=5,
                   num_inference_steps=2, guidance_scale=5.0, seed=1)  # fmt: skip
    first = pipe.generate_batch([WanRequest(**request)], progress=False)[0]
    second = pipe.generate_batch([WanRequest(**request)], progress=False)[0]
    third = pipe.generate_batch([WanRequest(**{**request, "prompt": "a dog"})], progress=False)[0]
    assert calls == [2, 1]  # cond + uncond, nothing, then only the new prompt
    assert np.array_equal(first.frames, second.frames)
    apply_runtime_options(pipe, RuntimeOptions(trim_host_memory=False, text_cache_size=0))
    fresh = pipe.generate_batch([WanRequest(**{**request, "prompt": "a dog"})], progress=False)[0]
    assert calls == [2, 1, 2]
    assert np.abs(fresh.frames - third.frames).max() < 1e-5


def test_text_cache_size_flag() -> None:
    import argparse

    from wanpipe.runtime import add_runtime_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    assert options_from_args(parser.parse_args([])).text_cache_size == 32
    assert options_from_args(parser.parse_args(["--text-cache-size", "0"])).text_cache_size == 0
    with pytest.raises(SystemExit):  # refused while parsing (tests/test_cli_errors.py checks the message)
        parser.parse_args(["--text-cache-size", "-1"])
    from wanpipe.runtime import RuntimeOptions

    with pytest.raises(ValueError, match="text_cache_size"):
        RuntimeOptions(text_cache_size=-1)
