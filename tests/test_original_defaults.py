"""Original folders take the original scripts' request defaults; diffusers folders keep diffusers'.

The Wan 2.2 values are read from the original config modules (wan22's ``wan/configs``, test-only, see
``tests/wan_reference.py``), not from our tables. Wan 2.1's configs and ``generate.py`` are not in wan22:
its shared negative prompt is the same string as Wan 2.2's (Wan-Video/Wan2.1 9737cba,
``wan/configs/shared_config.py``), checked here through wan22's; its I2V / FLF2V prefixes and the
``generate.py`` rules (steps 40 for "i2v" tasks, shift 3.0 for I2V at 832*480) are stated in
``wanpipe.weights.original.ORIGINAL_DEFAULTS`` with their source.

Running the original pipelines themselves (``wan/text2video.py``...) is not practical here: they put
every module on ``cuda:<device_id>`` and call CUDA-only APIs.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests import wan_reference
from tests.test_formats import KW, base, original  # noqa: F401  (fixtures)
from wanpipe import WanPipeline
from wanpipe.config import VARIANTS
from wanpipe.context import WanRequest
from wanpipe.weights.original import (
    ORIGINAL_DEFAULTS,
    ORIGINAL_NEGATIVE_PROMPT,
    ORIGINAL_SAMPLING,
    original_sampling_defaults,
)

WAN22_CONFIGS = {
    "wan2.2-t2v-a14b": "t2v-A14B",
    "wan2.2-i2v-a14b": "i2v-A14B",
    "wan2.2-ti2v-5b": "ti2v-5B",
    "wan2.2-animate-14b": "animate-14B",
}


@pytest.fixture(scope="module")
def configs():
    try:
        return wan_reference.load_configs().WAN_CONFIGS
    except ModuleNotFoundError as e:
        pytest.skip(f"the original Wan code is not installed ({e})")


@pytest.mark.parametrize("variant", sorted(WAN22_CONFIGS))
def test_wan22_defaults_are_the_original_configs(configs, variant) -> None:
    cfg = configs[WAN22_CONFIGS[variant]]
    d = original_sampling_defaults(VARIANTS[variant])
    assert d.num_inference_steps == cfg.sample_steps
    if isinstance(cfg.sample_guide_scale, tuple):  # (low noise, high noise)
        assert (d.guidance_scale_2, d.guidance_scale) == tuple(cfg.sample_guide_scale)
    else:
        assert d.guidance_scale == cfg.sample_guide_scale and d.guidance_scale_2 is None
    assert d.num_frames == cfg.frame_num
    assert d.fps == cfg.sample_fps
    assert d.negative_prompt == cfg.sample_neg_prompt
    assert d.flow_shift_480p is None  # Wan 2.2's generate.py takes cfg.sample_shift at every size
    assert ORIGINAL_SAMPLING[variant]["flow_shift"] == cfg.sample_shift
    if "boundary" in cfg:
        assert ORIGINAL_SAMPLING[variant]["boundary_ratio"] == pytest.approx(cfg.boundary)


def test_wan21_negative_prompts(configs) -> None:
    shared = configs["t2v-A14B"].sample_neg_prompt  # wan/configs/shared_config.py, as in Wan 2.1
    assert shared == ORIGINAL_NEGATIVE_PROMPT
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-vace-1.3b", "wan2.1-vace-14b"):
        assert original_sampling_defaults(VARIANTS[name]).negative_prompt == shared
    assert original_sampling_defaults(VARIANTS["wan2.1-i2v-14b"]).negative_prompt == "镜头晃动，" + shared
    assert (
        original_sampling_defaults(VARIANTS["wan2.1-flf2v-14b"]).negative_prompt
        == "镜头切换，镜头晃动，" + shared
    )
    assert set(ORIGINAL_DEFAULTS) <= set(VARIANTS)


def test_wan21_i2v_shift_per_size(base) -> None:  # noqa: F811
    arch = replace(base[2].arch, variant=VARIANTS["wan2.1-i2v-14b"])
    orig = replace(arch, sampling=original_sampling_defaults(arch.variant))
    shift = arch.scheduler.flow_shift
    assert orig.default_flow_shift(480, 832) == orig.default_flow_shift(832, 480) == 3.0
    assert orig.default_flow_shift(720, 1280) == shift
    assert orig.defaults.num_inference_steps == 40
    assert arch.default_flow_shift(480, 832) == shift  # diffusers folders: the scheduler's at every size
    flf = replace(arch, variant=VARIANTS["wan2.1-flf2v-14b"])
    flf = replace(flf, sampling=original_sampling_defaults(flf.variant))
    assert flf.default_flow_shift(480, 832) == shift and flf.defaults.num_inference_steps == 50


def test_original_folder_takes_the_original_negative_prompt(base, original) -> None:  # noqa: F811
    folder, _, ours, _ = base
    assert ours.arch.defaults.negative_prompt == ""  # diffusers layout: diffusers' default
    pipe = WanPipeline.from_pretrained(original, device="cpu", dtype="float32", sigma_grid="diffusers")
    assert pipe.arch.defaults.negative_prompt == ORIGINAL_NEGATIVE_PROMPT
    kw = {k: v for k, v in KW.items() if k != "negative_prompt"}
    default = pipe.generate(**kw, progress=False).frames
    explicit = ours.generate(**kw, negative_prompt=ORIGINAL_NEGATIVE_PROMPT, progress=False).frames
    np.testing.assert_array_equal(default, explicit)
    empty = ours.generate(**kw, progress=False).frames
    diff = float(np.abs(default - empty).max())
    print(f"original folder's default negative prompt vs an empty one: worst |frame diff| {diff:.2e}")
    assert diff > 1e-3
    resolved = pipe.check(WanRequest(prompt="a cat"))  # generate.py's t2v-1.3B defaults
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.flow_shift) == (50, 5.0, 5.0)
