"""TaylorSeer and MagCache beside First-Block-Cache and TeaCache, behind one interface.

Parity with diffusers' own hooks (``apply_taylorseer_cache`` / ``apply_mag_cache`` through
``enable_cache``) on its ``WanTransformer3DModel`` in a ``diffusers.WanPipeline``, with the same
configuration, on tiny random checkpoints: the same steps skipped (each guidance stream) and the same
frames (fp32, max abs diff 1e-3). Wan 2.2's two experts: diffusers hooks each transformer apart, so the
parity shows that no state crosses the switch, and one set of swapped modules gives what two resident
ones give. MagCache's calibration: the same ratios as diffusers', written to a file that ``mag_ratios``
takes back. Bad names and options: InvalidRequestError naming the field, one CLI line, HTTP 400.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests import tiny, tiny_family
from tests.serving_helpers import ThreadServer, assert_error, wait_until
from wanpipe import InvalidRequestError, WanPipeline, WanRequest
from wanpipe.runtime import RuntimeOptions
from wanpipe.stages.experts import Experts

FRAME_TOL = 1e-3
DIFFS: dict[str, float] = {}
KW = dict(
    prompt="a dog runs in the park",
    negative_prompt="worst quality",
    height=32,
    width=32,
    num_frames=9,
    num_inference_steps=10,
    guidance_scale=5.0,
    seed=3,
)
# Per-step ratios for the tiny model: some steps skip at threshold 0.06, some do not.
RATIOS = [1.0, 1.0, 0.99, 0.995, 0.97, 0.99, 0.98, 1.01, 0.95, 0.9]


def compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = float(np.abs(ours - theirs).max())
    DIFFS[name] = max(diff, DIFFS.get(name, 0.0))
    assert diff <= FRAME_TOL, (name, diff)
    return diff


def run_reference(ref, configs: dict[str, object], **kw) -> tuple[np.ndarray, dict[str, list[int]]]:
    """diffusers' frames with each named transformer's cache enabled, and the steps each stream
    skipped: a step whose first block's self-attention did not run (cond and uncond alternate)."""
    calls: list[bool] = []
    hooks = []
    for name, config in configs.items():
        model = getattr(ref, name)
        model.enable_cache(config)
        hooks.append(model.register_forward_pre_hook(lambda *_: calls.append(False)))
        hooks.append(model.blocks[0].attn1.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, True)))
    try:
        seed = kw.pop("seed")
        out = ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).frames[0]
    finally:
        for h in hooks:
            h.remove()
        for name in configs:
            getattr(ref, name).disable_cache()
    skipped = {
        s: [i for i, ran in enumerate(calls[k::2]) if not ran] for k, s in enumerate(("cond", "uncond"))
    }
    return np.asarray(out, np.float32), skipped


def run_ours(pipe: WanPipeline, **kw) -> tuple[np.ndarray, dict[str, list[int]], dict]:
    video = pipe.generate(**kw, progress=False)
    stats = pipe.executor.last_cache_stats
    skipped = {s: list(stats.skipped_at.get(s, [])) for s in ("cond", "uncond")}
    return video.frames, skipped, video.timings


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path):
    """A diffusers pipeline of this module's own (its transformer gets cache hooks)."""
    return tiny.load_reference(tiny_ckpt)


@pytest.fixture(scope="module")
def plain(wan_pipe) -> np.ndarray:
    return wan_pipe.generate(**KW, progress=False).frames


# -- TaylorSeer --------------------------------------------------------------------------------------------
def test_diffusers_default_taylorseer_hooks_nothing_on_wan() -> None:
    """Why the parity below runs diffusers' lite mode: its default module patterns ("^blocks.*attn")
    match no module of a Wan transformer (attn1, attn2), so the default config caches nothing; lite mode
    predicts proj_out (the whole output) and skips the blocks."""
    from diffusers import WanTransformer3DModel
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig, apply_taylorseer_cache

    def hooked(config) -> list[str]:
        model = WanTransformer3DModel(**tiny.TRANSFORMER_KW)
        apply_taylorseer_cache(model, config)
        return [
            n
            for n, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None
            and m._diffusers_hook.get_hook("taylorseer_cache") is not None
        ]

    assert hooked(TaylorSeerCacheConfig()) == []
    assert hooked(TaylorSeerCacheConfig(use_lite_mode=True)) == ["blocks.0", "blocks.1", "proj_out"]


TAYLOR_CONFIGS = [
    dict(cache_interval=3, disable_cache_before_step=2, max_order=2),
    dict(cache_interval=2, disable_cache_before_step=1, max_order=1, disable_cache_after_step=8),
    dict(),  # the defaults: interval 5, 3 warm-up steps, order 1
]


@pytest.mark.parametrize("options", TAYLOR_CONFIGS, ids=["i3-b2-o2", "i2-b1-o1-a8", "defaults"])
def test_taylorseer_matches_diffusers(wan_pipe, reference, plain, options) -> None:
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig

    config = TaylorSeerCacheConfig(**options, use_lite_mode=True, taylor_factors_dtype=torch.float32)
    theirs, their_skips = run_reference(reference, {"transformer": config}, **KW)
    ours, our_skips, timings = run_ours(wan_pipe, **KW, cache="taylorseer", cache_options=options)
    assert our_skips == their_skips and their_skips["cond"], (our_skips, their_skips)
    compare(f"taylorseer {options}", ours, theirs)
    assert float(np.abs(ours - plain).max()) > 10 * FRAME_TOL  # the skipped steps changed the frames
    assert timings["cache"] == "taylorseer"
    assert timings["skipped_steps"] == len(our_skips["cond"])
    assert timings["skipped_uncond_steps"] == len(our_skips["uncond"])
    assert timings["computed_steps"] + timings["skipped_steps"] == KW["num_inference_steps"]


# -- MagCache ----------------------------------------------------------------------------------------------
MAG_CONFIGS = [
    dict(threshold=0.06, max_skip_steps=2, retention_ratio=0.2),
    dict(threshold=0.2, max_skip_steps=3, retention_ratio=0.1),
    dict(threshold=0.03, max_skip_steps=1, retention_ratio=0.3),
]


@pytest.mark.parametrize("options", MAG_CONFIGS, ids=["t006-k2-r02", "t02-k3-r01", "t003-k1-r03"])
def test_magcache_matches_diffusers(wan_pipe, reference, plain, options) -> None:
    from diffusers.hooks.mag_cache import MagCacheConfig

    config = MagCacheConfig(**options, mag_ratios=RATIOS, num_inference_steps=KW["num_inference_steps"])
    theirs, their_skips = run_reference(reference, {"transformer": config}, **KW)
    ours, our_skips, timings = run_ours(
        wan_pipe, **KW, cache="magcache", cache_options={**options, "mag_ratios": RATIOS}
    )
    assert our_skips == their_skips and their_skips["cond"], (our_skips, their_skips)
    compare(f"magcache {options}", ours, theirs)
    assert float(np.abs(ours - plain).max()) > FRAME_TOL
    assert timings["cache"] == "magcache" and timings["skipped_steps"] == len(our_skips["cond"])


def test_magcache_resamples_ratios_like_diffusers(wan_pipe, reference) -> None:
    """Ratios of another length are resampled to the steps (nearest), as diffusers does."""
    from diffusers.hooks.mag_cache import MagCacheConfig

    ratios = [1.0, 0.995, 0.99, 0.97, 0.96, 0.93]
    options = dict(threshold=0.1, max_skip_steps=2, retention_ratio=0.2)
    config = MagCacheConfig(**options, mag_ratios=ratios, num_inference_steps=KW["num_inference_steps"])
    theirs, their_skips = run_reference(reference, {"transformer": config}, **KW)
    ours, our_skips, _ = run_ours(
        wan_pipe, **KW, cache="magcache", cache_options={**options, "mag_ratios": ratios}
    )
    assert our_skips == their_skips and their_skips["cond"], (our_skips, their_skips)
    compare("magcache resampled ratios", ours, theirs)


def _printed_ratios(text: str) -> list[list[float]]:
    """diffusers prints each stream's calibrated ratios after '[MagCache] Calibration Complete...'."""
    lines = text.splitlines()
    return [
        json.loads(lines[i + 1])
        for i, line in enumerate(lines)
        if line.startswith("[MagCache] Calibration Complete")
    ]


def test_magcache_calibration_matches_diffusers_and_loads_back(
    wan_pipe, reference, plain, tmp_path, capsys
) -> None:
    from diffusers.hooks.mag_cache import MagCacheConfig

    config = MagCacheConfig(calibrate=True, num_inference_steps=KW["num_inference_steps"])
    capsys.readouterr()
    theirs, their_skips = run_reference(reference, {"transformer": config}, **KW)
    printed = _printed_ratios(capsys.readouterr().out)
    assert len(printed) == 2 and their_skips == {"cond": [], "uncond": []}

    path = tmp_path / "ratios.json"
    options = {"calibrate": True, "calibration_file": str(path)}
    ours, skips, timings = run_ours(wan_pipe, **KW, cache="magcache", cache_options=options)
    assert skips == {"cond": [], "uncond": []}
    np.testing.assert_array_equal(ours, plain)  # calibration skips nothing
    written = json.loads(path.read_text())
    assert written["num_inference_steps"] == KW["num_inference_steps"]
    for stream, theirs_ratios in zip(("cond", "uncond"), printed):
        np.testing.assert_allclose(written["mag_ratios"][stream], theirs_ratios, rtol=1e-4)
        assert timings["cache_calibration"][stream] == written["mag_ratios"][stream]

    # The file, given back as mag_ratios, loads and runs: the same as its ratios given inline.
    given = {"threshold": 0.3, "max_skip_steps": 3}
    from_file, file_skips, _ = run_ours(
        wan_pipe, **KW, cache="magcache", cache_options={**given, "mag_ratios": str(path)}
    )
    inline, inline_skips, _ = run_ours(
        wan_pipe, **KW, cache="magcache", cache_options={**given, "mag_ratios": written["mag_ratios"]}
    )
    assert file_skips == inline_skips and file_skips["cond"], file_skips
    np.testing.assert_array_equal(from_file, inline)


def test_magcache_published_ratios() -> None:
    """The MagCache authors' Wan sets: one per model, picked by the DiT's shape (and size, image)."""
    from wanpipe.models.transformer_layers import TransformerConfig
    from wanpipe.runtime.magcache import magcache_variant, published_mag_ratios, published_sets

    sets = published_sets()
    assert len(sets) == 8 and all(len(s["cond"]) == len(s["uncond"]) == s["steps"] for s in sets.values())
    assert sets["wan2.1-t2v-1.3B"]["cond"][:3] == [1.0, 1.0124, 1.00166]  # magcache_generate.py, T2V-1.3B
    assert sets["wan2.1-t2v-1.3B"]["uncond"][:3] == [1.0, 1.02213, 1.0041]

    def dit(dim: int, **kw) -> TransformerConfig:
        return TransformerConfig(**{"num_attention_heads": dim // 128, "attention_head_dim": 128, **kw})

    plain = dict(two_experts=False, per_token_timesteps=False)
    assert magcache_variant(dit(1536), **plain) == "wan2.1-t2v-1.3B"
    assert magcache_variant(dit(5120), **plain) == "wan2.1-t2v-14B"
    assert magcache_variant(dit(5120, in_channels=36), **plain) == "wan2.1-i2v-14B"
    assert magcache_variant(dit(5120), two_experts=True, per_token_timesteps=False) == "wan2.2-t2v-A14B"
    assert magcache_variant(dit(5120, in_channels=36), two_experts=True, per_token_timesteps=False) == (
        "wan2.2-i2v-A14B"
    )
    ti2v = dit(3072, in_channels=48, out_channels=48)
    assert magcache_variant(ti2v, two_experts=False, per_token_timesteps=True) == "wan2.2-ti2v-5B-t2v"
    assert (
        magcache_variant(ti2v, two_experts=False, per_token_timesteps=True, image=True)
        == "wan2.2-ti2v-5B-i2v"
    )
    patch = (1, 2, 2)
    small, large = (
        published_mag_ratios("wan2.1-i2v-14B", (60, 104), patch),
        published_mag_ratios("wan2.1-i2v-14B", (90, 160), patch),
    )
    assert list(small["cond"]) == sets["wan2.1-i2v-14B-480P"]["cond"]
    assert list(large["cond"]) == sets["wan2.1-i2v-14B-720P"]["cond"]
    with pytest.raises(ValueError, match=r"no published mag_ratios for a DiT of width 24.*calibrate"):
        magcache_variant(dit(24, num_attention_heads=2, attention_head_dim=12), **plain)


# -- Wan 2.2: two experts ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("a14b") / "ckpt"
    return folder, tiny_family.t2v_a14b(folder)


A14B_KW = dict(KW, num_inference_steps=12, height=32, width=48, num_frames=5, guidance_scale_2=3.0)


def _high_steps(pipe: WanPipeline) -> int:
    ctx = pipe.tokenizer.make_context(WanRequest(**A14B_KW))
    return Experts.plan(ctx.timesteps, ctx.boundary_timestep).count("high")


@pytest.mark.parametrize("cache", ["taylorseer", "magcache"])
def test_two_experts_keep_their_own_state(a14b, cache) -> None:
    """diffusers hooks each expert's transformer apart (its own counters, factors and residuals): the
    same steps skipped and frames show that nothing crosses the switch; the low-noise expert's first
    step runs in both streams. One set of modules with swapped weights gives the same."""
    from diffusers.hooks.mag_cache import MagCacheConfig
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheConfig

    folder, ref = a14b
    ours = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    steps, high = A14B_KW["num_inference_steps"], _high_steps(ours)
    assert 3 <= high <= steps - 3, high
    if cache == "taylorseer":
        options = dict(cache_interval=2, disable_cache_before_step=1, max_order=1)
        config = TaylorSeerCacheConfig(**options, use_lite_mode=True, taylor_factors_dtype=torch.float32)
        configs = {"transformer": config, "transformer_2": config}
    else:
        ratios = [1.0, 0.99, 0.99, 0.98, 0.99, 0.97, 1.0, 0.99, 0.99, 0.98, 0.96, 0.9]
        options = dict(threshold=0.05, max_skip_steps=2, retention_ratio=0.25, mag_ratios=ratios)
        given = {k: v for k, v in options.items() if k != "mag_ratios"}
        configs = {
            "transformer": MagCacheConfig(**given, mag_ratios=ratios[:high], num_inference_steps=high),
            "transformer_2": MagCacheConfig(
                **given, mag_ratios=ratios[high:], num_inference_steps=steps - high
            ),
        }
    theirs, their_skips = run_reference(ref, configs, **A14B_KW)
    # diffusers counts each transformer's calls from 0: its skips are per expert, ours per schedule step
    our_frames, our_skips, _ = run_ours(ours, **A14B_KW, cache=cache, cache_options=options)
    assert our_skips == their_skips, (our_skips, their_skips)
    assert any(s < high for s in our_skips["cond"]) and any(s > high for s in our_skips["cond"]), our_skips
    assert high not in our_skips["cond"] and high not in our_skips["uncond"]  # the new expert runs
    compare(f"{cache} two experts", our_frames, theirs)
    swap = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32", experts="swap")
    swapped, swap_skips, _ = run_ours(swap, **A14B_KW, cache=cache, cache_options=options)
    assert swap_skips == our_skips
    assert float(np.abs(swapped - our_frames).max()) <= 1e-6


def test_first_block_cache_drops_its_residual_at_the_switch_with_swapped_experts(a14b) -> None:
    """The expert is named, not found by its module: with one set of modules whose weights are swapped,
    First-Block-Cache does not reuse the high-noise expert's residual for the low-noise one."""
    folder, _ = a14b
    kw = dict(A14B_KW, cache="first-block", cache_options={"threshold": 1e6})
    resident = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    swap = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32", experts="swap")
    a, a_skips, _ = run_ours(resident, **kw)
    b, b_skips, _ = run_ours(swap, **kw)
    high = _high_steps(resident)
    assert 0 not in a_skips["cond"] and high not in a_skips["cond"] and len(a_skips["cond"]) == 10
    assert a_skips == b_skips
    assert float(np.abs(a - b).max()) <= 1e-6


# -- batches -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cache", "options"),
    [
        ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 1}),
        ("magcache", {"mag_ratios": RATIOS}),
    ],
)
def test_a_row_cancelled_mid_batch_keeps_the_others_cache(wan_pipe, cache, options) -> None:
    """The cancelled row is cut from every cached tensor: the others' frames are the whole batch's."""
    common = dict(
        height=32, width=32, num_frames=5, num_inference_steps=8, cache=cache, cache_options=options
    )
    requests = [
        WanRequest(prompt="a cat walks", guidance_scale=5.0, seed=1, **common),
        WanRequest(prompt="a dog runs", negative_prompt="static", guidance_scale=2.0, seed=2, **common),
        WanRequest(prompt="the lazy dog", guidance_scale=4.0, seed=3, **common),
    ]
    whole, _ = wan_pipe.run_contexts([wan_pipe.tokenizer.make_context(r) for r in requests], progress=False)
    done: list[int] = []
    frames, timings = wan_pipe.run_contexts(
        [wan_pipe.tokenizer.make_context(r) for r in requests],
        lambda i, n, t: done.append(i),
        progress=False,
        cancelled_rows=lambda: {1} if len(done) >= 3 else set(),
    )
    assert frames[1] is None and timings.skipped_steps > 0
    for i in (0, 2):
        assert float(np.abs(frames[i] - whole[i]).max()) <= 1e-5


def test_runtime_default_cache_and_request_override(wan_pipe, plain) -> None:
    """RuntimeOptions(cache=..., cache_options=...) is the default of requests that name none; a
    request's own cache (or "none") wins."""
    options = {"cache_interval": 3, "disable_cache_before_step": 2}
    by_request = wan_pipe.generate(**KW, cache="taylorseer", cache_options=options, progress=False).frames
    runtime = wan_pipe.executor.runtime
    try:
        wan_pipe.set_runtime(
            RuntimeOptions(
                cache="taylorseer", cache_options={"cache_interval": "3", "disable_cache_before_step": 2}
            )
        )
        by_default = wan_pipe.generate(**KW, progress=False)
        off = wan_pipe.generate(**KW, cache="none", progress=False)
    finally:
        wan_pipe.set_runtime(runtime)
    np.testing.assert_array_equal(by_default.frames, by_request)
    assert by_default.timings["skipped_steps"] > 0 and by_default.timings["cache"] == "taylorseer"
    np.testing.assert_array_equal(off.frames, plain)
    assert off.timings["cache"] == "" and off.timings["computed_steps"] == KW["num_inference_steps"]


def test_caches_are_part_of_the_batch_key(wan_pipe) -> None:
    """Requests with another cache or other options do not share a batch; equal ones do."""
    tok = wan_pipe.tokenizer
    small = dict(prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, seed=1)
    a = dict(small, cache="taylorseer", cache_options={"max_order": 2})
    b = dict(
        small, cache="taylorseer", cache_options={"max_order": "2", "cache_interval": 5}
    )  # the same, as text
    c = dict(small, cache="taylorseer", cache_options={"max_order": 1})
    d = dict(small, cache="magcache", cache_options={"mag_ratios": RATIOS})
    keys = [tok.batch_key(tok.resolve(WanRequest(**kw))) for kw in (a, b, c, d, small)]
    assert keys[0] == keys[1] and len(set(keys)) == 4
    contexts = [tok.make_context(WanRequest(**kw)) for kw in (a, b, c)]
    assert contexts[0].batch_key == contexts[1].batch_key != contexts[2].batch_key
    assert contexts[0].approximations.cache == "taylorseer"
    assert contexts[0].approximations.cache_options["max_order"] == 2
    with pytest.raises(ValueError, match="must share"):
        wan_pipe.executor.prepare_inputs([contexts[0], contexts[2]])


# -- bad input -----------------------------------------------------------------------------------------------
BAD = [
    (
        dict(cache="fast"),
        "cache",
        r"cache must be one of first-block, teacache, taylorseer, magcache or none",
    ),
    (dict(cache="TaylorSeer"), "cache", r"got 'TaylorSeer'"),
    (dict(cache_options={"max_order": 2}), "cache_options", r"cache_options needs cache"),
    (
        dict(cache="taylorseer", cache_options={"order": 2}),
        "cache_options",
        r"taylorseer has no option 'order'; taylorseer options: cache_interval \(default 5\), "
        r"disable_cache_before_step \(default 3\), disable_cache_after_step \(default none\), max_order",
    ),
    (
        dict(cache="taylorseer", cache_options={"max_order": -1}),
        "cache_options",
        r"max_order must be at least 0",
    ),
    (dict(cache="taylorseer", cache_options={"cache_interval": 1.5}), "cache_options", r"whole number"),
    (dict(cache="taylorseer", cache_options={"cache_interval": True}), "cache_options", r"whole number"),
    (dict(cache="taylorseer", cache_options={"use_lite_mode": False}), "cache_options", r"match no module"),
    (dict(cache="taylorseer", residual_threshold=0.1), "residual_threshold", r"TaylorSeer has no threshold"),
    (dict(cache="magcache"), "cache_options", r"no published mag_ratios for a DiT of width 24.*calibrate"),
    (
        dict(cache="magcache", cache_options={"mag_ratios": [1.0, -0.5]}),
        "cache_options",
        r"mag_ratios must be a non-empty list of positive numbers",
    ),
    (
        dict(cache="magcache", cache_options={"mag_ratios": "/no/such/file.json"}),
        "cache_options",
        r"cannot read",
    ),
    (
        dict(cache="magcache", cache_options={"mag_ratios": {"cnd": [1.0]}}),
        "cache_options",
        r"needs the key 'cond'",
    ),
    (
        dict(cache="magcache", cache_options={"retention_ratio": 2, "mag_ratios": [1.0]}),
        "cache_options",
        r"retention_ratio must be at least 0 and at most 1",
    ),
    (
        dict(cache="magcache", cache_options={"calibrate": True, "calibration_file": "/no/such/dir/r.json"}),
        "cache_options",
        r"a file in an existing folder",
    ),
    (dict(cache="teacache"), "cache_options", r"TeaCache has no published coefficients"),
    (dict(cache="first-block", cache_options={"threshold": -1}), "cache_options", r"at least 0"),
    (dict(cache="none", cache_options={"threshold": 1}), "cache_options", r"needs cache"),
]


@pytest.mark.parametrize(
    ("kw", "param", "pattern"), BAD, ids=[re.sub(r"\W+", "-", str(b[0]))[:60] for b in BAD]
)
def test_bad_cache_requests_name_the_field(wan_pipe, kw, param, pattern) -> None:
    with pytest.raises(InvalidRequestError, match=pattern) as info:
        wan_pipe.check(WanRequest(prompt="a cat", **kw))
    assert info.value.param == param, (info.value.param, str(info.value))


def test_a_cache_on_a_parallel_run_is_refused(wan_pipe) -> None:
    from wanpipe.parallel import ParallelConfig

    wan_pipe.enable_parallel(ParallelConfig())
    try:
        for cache in ("taylorseer", "first-block"):
            with pytest.raises(InvalidRequestError, match=r"does not combine with a step cache") as info:
                wan_pipe.check(WanRequest(prompt="a cat", cache=cache))
            assert info.value.param == "cache"
        wan_pipe.check(WanRequest(prompt="a cat", cache="none"))  # no cache: fine
    finally:
        wan_pipe.enable_parallel(None)


def test_cli_calibrates_to_a_file_and_takes_it_back(tiny_ckpt, tmp_path, capsys) -> None:
    from wanpipe.cli import main

    base = [
        "generate",
        "--model",
        str(tiny_ckpt),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        "5",
        "--steps",
        "6",
        "--seed",
        "1",
        "--no-progress",
        "--cache",
        "magcache",
    ]
    ratios = tmp_path / "ratios.json"
    argv = ["--output", str(tmp_path / "a.mp4"), "--cache-option", "calibrate=true"]
    assert main([*base, *argv, "--cache-option", f"calibration_file={ratios}"]) == 0
    assert f"mag_ratios written to {ratios}" in capsys.readouterr().out
    written = json.loads(ratios.read_text())
    assert len(written["mag_ratios"]["cond"]) == 6 and written["format"] == "wanpipe-magcache-ratios-v1"
    argv = ["--output", str(tmp_path / "b.mp4"), "--cache-option", f"mag_ratios={ratios}"]
    assert main([*base, *argv, "--cache-option", "threshold=10"]) == 0
    assert "steps skipped by the step cache" in capsys.readouterr().out


# -- the server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(wan_pipe, tmp_path_factory):
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.store import JobStore

    store = JobStore(tmp_path_factory.mktemp("serve") / "out")
    limits = ServeLimits(max_queue=10, max_batch=4, max_pixels=64 * 64, max_frames=17, max_steps=50)
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield client


SMALL = {"prompt": "a cat", "size": "32x32", "num_frames": 5, "num_inference_steps": 4, "seed": 2}


def test_http_runs_a_cache_and_reports_it(http, wan_pipe) -> None:
    options = {"cache_interval": 2, "disable_cache_before_step": 1}
    created = http.post("/v1/videos", json={**SMALL, "cache": "taylorseer", "cache_options": options})
    assert created.status_code == 200, created.text
    assert created.json()["parameters"]["cache"] == "taylorseer"
    assert created.json()["parameters"]["cache_options"] == options
    form = {
        **{k: str(v) for k, v in SMALL.items()},
        "cache": "magcache",
        "cache_options[mag_ratios]": "1,0.99,0.98,0.9",
    }
    as_form = http.post("/v1/videos", data=form)
    assert as_form.status_code == 200, as_form.text
    responses = http.post(
        "/v1/responses",
        json={
            "input": "a cat",
            "provider_options": {
                "video": {
                    "steps": 3,
                    "height": 32,
                    "width": 32,
                    "num_frames": 5,
                    "cache": "first-block",
                    "cache_options": {"threshold": 0.2},
                }
            },
        },
    )
    assert responses.status_code == 200, responses.text
    for video_id in (created.json()["id"], as_form.json()["id"]):

        def done(video_id=video_id):
            body = http.get(f"/v1/videos/{video_id}").json()
            return body if body["status"] in ("completed", "failed") else None

        assert wait_until(done, 60, "the job")["status"] == "completed"


HTTP_BAD = [
    ({"cache": "fast"}, "cache"),
    ({"cache": 3}, "cache"),
    ({"cache": "taylorseer", "cache_options": {"max_order": "x"}}, "cache_options"),
    ({"cache": "taylorseer", "cache_options": 5}, "cache_options"),
    ({"cache": "magcache"}, "cache_options"),  # the tiny model has no published ratios
    ({"cache": "magcache", "cache_options": {"calibrate": True}}, "cache_options"),
    ({"cache": "magcache", "cache_options": {"mag_ratios": "/etc/passwd"}}, "cache_options"),
    ({"cache_options": {"threshold": 1}}, "cache_options"),
]


@pytest.mark.parametrize(("fields", "param"), HTTP_BAD)
def test_http_refuses_bad_caches_with_400(http, fields, param) -> None:
    error = assert_error(http.post("/v1/videos", json={**SMALL, **fields}), 400, param, "invalid_value")
    assert param in error["message"]


def test_http_refuses_a_cache_on_a_parallel_run(http, wan_pipe) -> None:
    from wanpipe.parallel import ParallelConfig

    wan_pipe.enable_parallel(ParallelConfig())
    try:
        assert_error(
            http.post("/v1/videos", json={**SMALL, "cache": "taylorseer"}), 400, "cache", "invalid_value"
        )
        video = {"height": 32, "width": 32, "num_frames": 5, "steps": 2, "cache": "first-block"}
        bad = {"input": "a cat", "provider_options": {"video": video}}
        assert_error(http.post("/v1/responses", json=bad), 400, "provider_options.video.cache")
    finally:
        wan_pipe.enable_parallel(None)


def test_zz_report_worst_differences(capsys) -> None:
    """Print the worst frame difference of every parity comparison above."""
    with capsys.disabled():
        print("\nworst frame max-abs difference vs diffusers' cache hooks (fp32, CPU):")
        for name, diff in DIFFS.items():
            print(f"  {name:70s} {diff:.3e}")
    assert DIFFS and all(d <= FRAME_TOL for d in DIFFS.values())
