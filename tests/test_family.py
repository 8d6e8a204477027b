"""Parity with diffusers for the whole Wan family on tiny random checkpoints (fp32, CPU).

Wan 2.2 T2V/I2V A14B (two experts), TI2V-5B (text- and image-to-video), Wan 2.1 I2V (CLIP) and FLF2V,
video-to-video, text-to-image, and the refusals of requests a checkpoint cannot serve. The worst frame
difference of every comparison is collected in ``DIFFS`` and printed by the last test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import tiny, tiny_family
from wanpipe import InvalidRequestError, WanPipeline

FRAME_TOL = 1e-3
DIFFS: dict[str, float] = {}

PROMPT = "a cat walks on the grass"
NEGATIVE = "worst quality, static"


def reference_frames(ref, **kw) -> np.ndarray:
    seed = kw.pop("seed")
    out = ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).frames[0]
    return np.asarray(out, dtype=np.float32)


def compare(name: str, ours: np.ndarray, ref: np.ndarray) -> float:
    """Record and check the worst difference; also that the frames are not a constant picture."""
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    assert ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    DIFFS[name] = max(diff, DIFFS.get(name, 0.0))
    assert diff <= FRAME_TOL, (name, diff)
    assert float(ours.std()) > 1e-3, name
    return diff


def load(folder: Path, **kw) -> WanPipeline:
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32", **kw)


def timesteps_of(ref, steps: int) -> list[float]:
    sched = type(ref.scheduler).from_config(ref.scheduler.config)
    sched.set_timesteps(steps)
    return [float(t) for t in sched.timesteps]


def count_calls(module: torch.nn.Module, counter: dict[str, int], key: str):
    def hook(*_):
        counter[key] = counter.get(key, 0) + 1

    return module.register_forward_pre_hook(hook)


# -- checkpoints (built once per module) -------------------------------------------------------------
@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t2v-a14b") / "ckpt"
    return folder, tiny_family.t2v_a14b(folder)


@pytest.fixture(scope="module")
def a14b_ours(a14b):
    return load(a14b[0])


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti2v-5b") / "ckpt"
    return folder, tiny_family.ti2v_5b(folder)


@pytest.fixture(scope="module")
def ti2v_ours(ti2v):
    return load(ti2v[0])


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2v-14b") / "ckpt"
    return folder, tiny_family.i2v_14b(folder)


@pytest.fixture(scope="module")
def i2v_ours(i2v):
    return load(i2v[0])


@pytest.fixture(scope="module")
def flf2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flf2v-14b") / "ckpt"
    return folder, tiny_family.i2v_14b(folder, seed=400, flf2v=True)


@pytest.fixture(scope="module")
def i2v_a14b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2v-a14b") / "ckpt"
    return folder, tiny_family.i2v_a14b(folder)


@pytest.fixture(scope="module")
def v2v_ref(reference_pipe):
    return tiny_family.v2v_reference(reference_pipe)


# -- Wan 2.2 T2V A14B: two experts ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("guidance", "guidance_2"),
    [
        (4.0, 2.0),
        # diffusers decides classifier-free guidance on guidance_scale alone: no unconditional branch
        # in either stage here, guidance_scale_2 has no effect
        (1.0, 3.0),
    ],
)
def test_t2v_a14b_matches_diffusers(a14b, a14b_ours, guidance, guidance_2) -> None:
    _, ref = a14b
    assert a14b_ours.arch.variant.name == "wan2.2-t2v-a14b"
    steps = 4
    boundary = ref.config.boundary_ratio * ref.scheduler.config.num_train_timesteps
    ts = timesteps_of(ref, steps)
    assert any(t >= boundary for t in ts) and any(t < boundary for t in ts), (ts, boundary)
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=1,
    )
    calls: dict[str, int] = {}
    hooks = [count_calls(ref.transformer, calls, "high"), count_calls(ref.transformer_2, calls, "low")]
    try:
        theirs = reference_frames(ref, **kw, guidance_scale_2=guidance_2)
    finally:
        for h in hooks:
            h.remove()
    assert calls.get("high", 0) > 0 and calls.get("low", 0) > 0, calls  # both experts ran
    seen: list[float] = []
    ours = a14b_ours.generate(
        **kw, guidance_scale_2=guidance_2, callback=lambda i, n, t: seen.append(float(t)), progress=False
    ).frames
    assert len(seen) == steps
    compare(f"t2v-a14b gs={guidance} gs2={guidance_2}", ours, theirs)
    if guidance > 1.0:
        # the test can tell the two guidance scales apart: swapped, diffusers' frames move
        swapped = reference_frames(ref, **{**kw, "guidance_scale": guidance_2}, guidance_scale_2=guidance)
        assert float(np.abs(swapped - theirs).max()) > 2 * FRAME_TOL  # well past the parity tolerance


def test_t2v_a14b_swap_equals_resident(a14b, a14b_ours) -> None:
    swap = load(a14b[0], experts="swap")
    assert swap.arch.variant.name == "wan2.2-t2v-a14b"
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=5.0,
        guidance_scale_2=3.0,
        seed=3,
        progress=False,
    )
    a = swap.generate(**kw).frames
    b = a14b_ours.generate(**kw).frames
    diff = float(np.abs(a - b).max())
    DIFFS["t2v-a14b swap vs resident"] = diff
    assert diff <= 1e-6, diff


# -- Wan 2.2 TI2V-5B ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("height", "width", "num_frames", "seed"), [(32, 64, 5, 1), (64, 32, 1, 2)])
def test_ti2v_text_to_video_matches_diffusers(ti2v, ti2v_ours, height, width, num_frames, seed) -> None:
    _, ref = ti2v
    assert ti2v_ours.arch.variant.name == "wan2.2-ti2v-5b"
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=3,
        guidance_scale=5.0,
        seed=seed,
    )
    ours = ti2v_ours.generate(**kw, progress=False).frames
    compare(f"ti2v-5b t2v {height}x{width}x{num_frames}", ours, reference_frames(ref, **kw))


def test_ti2v_image_to_video_matches_diffusers(ti2v, ti2v_ours, tmp_path) -> None:
    _, t2v_ref = ti2v
    ref = tiny_family.ti2v_i2v_reference(t2v_ref)
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=64,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=5.0,
        seed=4,
    )
    pictures = [tiny_family.picture(32, 64, s) for s in (11, 12)]
    outs = []
    for i, pic in enumerate(pictures):
        from PIL import Image

        image = Image.fromarray(pic)
        ours = ti2v_ours.generate(**kw, image=image, progress=False).frames
        compare("ti2v-5b i2v", ours, reference_frames(ref, **kw, image=image))
        outs.append(ours)
        if i == 0:
            # the same picture as a uint8 array and as a PNG file
            path = tmp_path / "first.png"
            image.save(path)
            for same in (pic, path, str(path)):
                other = ti2v_ours.generate(**kw, image=same, progress=False).frames
                assert float(np.abs(other - ours).max()) <= 1e-6, type(same)
    assert float(np.abs(outs[0] - outs[1]).max()) > 10 * FRAME_TOL  # the image matters


# -- Wan 2.1 I2V (CLIP) and FLF2V ----------------------------------------------------------------
def test_i2v_14b_matches_diffusers(i2v, i2v_ours) -> None:
    _, ref = i2v
    assert i2v_ours.arch.variant.name == "wan2.1-i2v-14b"
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=4.0,
        seed=5,
    )
    outs = []
    for s in (21, 22):
        image = tiny_family.pil_picture(32, 48, s)
        ours = i2v_ours.generate(**kw, image=image, progress=False).frames
        compare("i2v-14b", ours, reference_frames(ref, **kw, image=image))
        outs.append(ours)
    assert float(np.abs(outs[0] - outs[1]).max()) > 5 * FRAME_TOL  # the image matters


def test_i2v_14b_resizes_the_image_like_diffusers(i2v, i2v_ours) -> None:
    """A picture of another size and aspect: diffusers resizes it for the VAE (to 32x48) and CLIP (crop)."""
    _, ref = i2v
    image = tiny_family.pil_picture(40, 56, 23)
    kw = dict(
        prompt=PROMPT,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=4.0,
        seed=6,
    )
    ours = i2v_ours.generate(**kw, image=image, progress=False).frames
    compare("i2v-14b resized image", ours, reference_frames(ref, **kw, image=image))


def test_flf2v_matches_diffusers(flf2v) -> None:
    folder, ref = flf2v
    ours_pipe = load(folder)
    assert ours_pipe.arch.variant.name == "wan2.1-flf2v-14b"
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=4.0,
        seed=8,
    )
    first, last = tiny_family.pil_picture(32, 48, 31), tiny_family.pil_picture(32, 48, 32)
    ours = ours_pipe.generate(**kw, image=first, last_image=last, progress=False).frames
    compare("flf2v-14b", ours, reference_frames(ref, **kw, image=first, last_image=last))


# -- Wan 2.2 I2V A14B -----------------------------------------------------------------------------
def test_i2v_a14b_matches_diffusers(i2v_a14b) -> None:
    folder, ref = i2v_a14b
    ours_pipe = load(folder)
    assert ours_pipe.arch.variant.name == "wan2.2-i2v-a14b"
    steps = 4
    boundary = ref.config.boundary_ratio * ref.scheduler.config.num_train_timesteps
    ts = timesteps_of(ref, steps)
    assert any(t >= boundary for t in ts) and any(t < boundary for t in ts), (ts, boundary)
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_scale_2=2.0,
        seed=9,
    )
    first, last = tiny_family.pil_picture(32, 48, 41), tiny_family.pil_picture(32, 48, 42)
    for name, extra in [("i2v-a14b", {}), ("i2v-a14b last_image", {"last_image": last})]:
        ours = ours_pipe.generate(**kw, image=first, **extra, progress=False).frames
        compare(name, ours, reference_frames(ref, **kw, image=first, **extra))


# -- video-to-video -------------------------------------------------------------------------------
V2V_KW = dict(
    prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_inference_steps=4, guidance_scale=4.0
)


@pytest.mark.parametrize("strength", [0.5, 0.8, 1.0])
def test_video_to_video_matches_diffusers(wan_pipe, v2v_ref, strength) -> None:
    frames = tiny_family.pil_video(5, 32, 48, seed=51)
    ours = wan_pipe.generate(
        **V2V_KW, video=frames, strength=strength, num_frames=len(frames), seed=10, progress=False
    ).frames
    theirs = reference_frames(v2v_ref, **V2V_KW, video=frames, strength=strength, seed=10)
    compare(f"v2v unipc strength={strength}", ours, theirs)


def test_video_to_video_inputs(wan_pipe, v2v_ref) -> None:
    """A uint8 array equals the PIL frames; without num_frames the largest 4k+1 the video holds is used."""
    frames = tiny_family.pil_video(7, 32, 48, seed=52)
    kw = dict(**V2V_KW, strength=0.7, seed=11, progress=False)
    from_pil = wan_pipe.generate(**kw, video=frames[:5], num_frames=5).frames
    array = np.stack([np.asarray(f) for f in frames])
    from_array = wan_pipe.generate(**kw, video=array).frames  # 7 frames -> the first 5
    assert from_array.shape == (5, 32, 48, 3)
    assert float(np.abs(from_array - from_pil).max()) <= 1e-6
    theirs = reference_frames(v2v_ref, **V2V_KW, video=frames[:5], strength=0.7, seed=11)
    compare("v2v unipc strength=0.7 (array input)", from_array, theirs)


def test_video_to_video_euler_matches_diffusers(tmp_path) -> None:
    folder = tiny.save_checkpoint(tmp_path / "euler", scheduler="euler", flow_shift=5.0, seed=3)
    ours_pipe = load(folder)
    ref = tiny_family.v2v_reference(tiny.load_reference(folder))
    frames = tiny_family.pil_video(5, 32, 48, seed=53)
    ours = ours_pipe.generate(
        **V2V_KW, video=frames, strength=0.6, num_frames=5, seed=12, progress=False
    ).frames
    compare(
        "v2v euler strength=0.6", ours, reference_frames(ref, **V2V_KW, video=frames, strength=0.6, seed=12)
    )


# -- text-to-image --------------------------------------------------------------------------------
def test_text_to_image_matches_diffusers_and_saves_png(wan_pipe, reference_pipe, tmp_path) -> None:
    from PIL import Image

    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=32,
        width=48,
        num_frames=1,
        num_inference_steps=3,
        guidance_scale=5.0,
        seed=13,
    )
    video = wan_pipe.generate(**kw, progress=False)
    compare("t2i (1 frame)", video.frames, reference_frames(reference_pipe, **kw))
    path = tmp_path / "x.png"
    video.save(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (48, 32)


# -- refusals -------------------------------------------------------------------------------------
def _pic(seed: int = 1):
    return tiny_family.pil_picture(32, 48, seed)


def _garbage(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return str(path)


BAD = [
    # id, checkpoint fixture, request (from tmp_path), param, message pattern
    ("image-for-t2v", "wan_pipe", lambda tmp: dict(image=_pic()), "image", r"(?i)image"),
    ("no-image-for-i2v", "i2v_ours", lambda tmp: dict(), "image", r"(?i)image"),
    (
        "gs2-single-expert",
        "wan_pipe",
        lambda tmp: dict(guidance_scale_2=3.0),
        "guidance_scale_2",
        "guidance_scale_2",
    ),
    ("ti2v-height", "ti2v_ours", lambda tmp: dict(height=48, width=64), "height", "multiple of 32"),
    ("ti2v-width", "ti2v_ours", lambda tmp: dict(height=32, width=80), "width", "multiple of 32"),
    ("corrupt-image", "i2v_ours", lambda tmp: dict(image=_garbage(tmp, "x.png")), "image", r"(?i)image"),
    ("corrupt-video", "wan_pipe", lambda tmp: dict(video=_garbage(tmp, "x.mp4")), "video", r"(?i)video"),
    (
        "short-video",
        "wan_pipe",
        lambda tmp: dict(video=tiny_family.pil_video(5, 32, 48, 1), num_frames=9),
        "video",
        r"(?i)frame",
    ),
    (
        "last-image-i2v21",
        "i2v_ours",
        lambda tmp: dict(image=_pic(), last_image=_pic(2)),
        "last_image",
        r"(?i)last.image",
    ),
    *[
        (
            f"strength-{s}",
            "wan_pipe",
            lambda tmp, s=s: dict(video=tiny_family.pil_video(5, 32, 48, 1), strength=s),
            "strength",
            r"(?i)strength",
        )
        for s in (0.0, -0.5, 1.5)
    ],
    (
        "video-and-image",
        "i2v_ours",
        lambda tmp: dict(image=_pic(), video=tiny_family.pil_video(5, 32, 48, 1)),
        "video",
        r"(?i)video",
    ),
]


@pytest.mark.parametrize(
    ("fixture", "make", "param", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_requests_are_refused(request, tmp_path, fixture, make, param, pattern) -> None:
    pipe = request.getfixturevalue(fixture)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=0)
    kw.update(make(tmp_path))
    with pytest.raises(InvalidRequestError, match=pattern) as info:
        pipe.generate(PROMPT, **kw, progress=False)
    assert info.value.param == param, (info.value.param, str(info.value))
    assert isinstance(info.value, ValueError)


def test_zz_report_worst_differences(capsys) -> None:
    """Print the worst frame difference of every comparison above (run with -s or see the report)."""
    with capsys.disabled():
        print("\nworst frame max-abs difference per variant (fp32, CPU):")
        for name, diff in DIFFS.items():
            print(f"  {name:42s} {diff:.3e}")
    assert all(d <= FRAME_TOL for d in DIFFS.values())
