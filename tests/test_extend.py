"""Extension (``WanPipeline.extend``, ``wanpipe.extend``): continuing a video on tiny checkpoints.

What is exactly testable: the request each clip gets (the image / video / mask it is conditioned on,
bit for bit), the context the tokenizer makes of it, the joined video (the given frames unchanged, then
exactly ``num_frames`` new ones), the first clip against diffusers' own image-to-video pipeline on the
same weights, seed and image, and the colour matching's statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_family
from tests.tiny_vace import save_vace_checkpoint
from wanpipe import InvalidRequestError, WanPipeline
from wanpipe.extend import lab_statistics, lab_to_rgb, match_colors, plan_extension, rgb_to_lab
from wanpipe.media import Video

PROMPT = "a cat walks on the grass"
H, W = 32, 48


def _video(num_frames: int, seed: int, width: int = W) -> np.ndarray:
    """uint8 (F, H, width, 3): a picture sliding right by one pixel per frame."""
    wide = tiny_family.picture(H, width + num_frames, seed)
    return np.stack([wide[:, i : i + width] for i in range(num_frames)])


def _load(folder: Path) -> WanPipeline:
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")


class Spy:
    """Records the request of every clip and the context the tokenizer makes of it."""

    def __init__(self, pipe: WanPipeline, monkeypatch: pytest.MonkeyPatch):
        self.requests, self.contexts, self.clips = [], [], []
        generate_batch, make_context = pipe.generate_batch, pipe.tokenizer.make_context

        def spy_generate(requests, *args, **kwargs):
            self.requests += requests
            videos = generate_batch(requests, *args, **kwargs)
            self.clips += [v.to_uint8() for v in videos]
            return videos

        def spy_context(request):
            ctx = make_context(request)
            self.contexts.append(ctx)
            return ctx

        monkeypatch.setattr(pipe, "generate_batch", spy_generate)
        monkeypatch.setattr(pipe.tokenizer, "make_context", spy_context)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    folder = tmp_path_factory.mktemp("i2v-14b") / "ckpt"
    return folder, tiny_family.i2v_14b(folder)


@pytest.fixture(scope="module")
def i2v_ours(i2v) -> WanPipeline:
    return _load(i2v[0])


KW = dict(num_inference_steps=2, guidance_scale=4.0, negative_prompt="static")


# -- planning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("new", "clip", "overlap", "clips"),
    [
        (6, 5, 1, (5, 5)),  # 4 + 2 (the last clip 5 frames, 2 of its new ones cut)
        (80, 81, 1, (81,)),
        (81, 81, 1, (81, 5)),
        (200, 81, 1, (81, 81, 41)),
        (6, 9, 3, (9,)),  # VACE: 3 kept + 6 new
        (20, 9, 5, (9, 9, 9, 9, 9)),
        (1, 81, 5, (9,)),
    ],
)
def test_plan_chains_clips_until_exactly_num_frames(i2v_ours, new, clip, overlap, clips) -> None:
    arch = i2v_ours.arch
    if overlap > 1:  # VACE: only the counts matter here, the checkpoint's kind is faked
        from dataclasses import replace

        arch = replace(arch, transformer=replace(arch.transformer, vace_layers=(0,), vace_in_channels=96))
    plan = plan_extension(arch, new, given_frames=10, clip_frames=clip, overlap_frames=overlap)
    assert plan.clips == clips
    assert all((n - 1) % 4 == 0 and n <= clip for n in plan.clips)
    made = sum(n - overlap for n in plan.clips)
    assert made >= new and made - new < 4  # at most one latent frame's surplus, cut
    assert plan.new_frames == new


def test_plan_refuses_more_overlap_than_the_video_has(i2v_ours) -> None:
    from dataclasses import replace

    arch = i2v_ours.arch
    arch = replace(arch, transformer=replace(arch.transformer, vace_layers=(0,), vace_in_channels=96))
    with pytest.raises(InvalidRequestError) as e:
        plan_extension(arch, 4, given_frames=2, overlap_frames=3)
    assert e.value.param == "overlap_frames"
    with pytest.raises(InvalidRequestError) as e:
        plan_extension(arch, 4, given_frames=9, overlap_frames=9, clip_frames=9)
    assert e.value.param == "clip_frames"
    assert plan_extension(arch, None, given_frames=9).clips == (81,)  # one clip's worth: 76 new frames


# -- image-to-video -----------------------------------------------------------------------------------
def test_i2v_extension_conditions_on_the_last_frame_and_joins(i2v_ours, monkeypatch) -> None:
    given = _video(5, seed=1)
    spy = Spy(i2v_ours, monkeypatch)
    out = i2v_ours.extend(given, PROMPT, 6, clip_frames=5, color_match=False, seed=7, progress=False, **KW)
    assert isinstance(out, Video) and out.num_frames == 5 + 6 and (out.height, out.width) == (H, W)
    joined = out.to_uint8()
    np.testing.assert_array_equal(joined[:5], given)  # the given frames unchanged
    assert [r.num_frames for r in spy.requests] == [5, 5]
    assert [r.seed for r in spy.requests] == [7, 8]
    # clip 1 continues from the given last frame, clip 2 from clip 1's last frame, bit for bit
    np.testing.assert_array_equal(spy.requests[0].image, given[-1])
    np.testing.assert_array_equal(spy.requests[1].image, spy.clips[0][-1])
    for ctx, image in zip(spy.contexts, (given[-1], spy.clips[0][-1])):
        pixels = ctx.conditioning.condition_pixels[0]  # (3, H, W) in [-1, 1], the I2V condition
        expected = (2.0 * (image.astype(np.float32) / 255.0) - 1.0).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels, expected)
    # each clip's first frame (the model's copy of the frame it continues) is dropped when joining
    np.testing.assert_array_equal(joined[5:9], spy.clips[0][1:])
    np.testing.assert_array_equal(joined[9:], spy.clips[1][1:3])


def test_i2v_extension_first_clip_matches_diffusers(i2v, i2v_ours) -> None:
    """The continuation is diffusers' WanImageToVideoPipeline run on the given last frame."""
    _, ref = i2v
    given = _video(3, seed=2)
    ours = i2v_ours.extend(
        given, PROMPT, 4, color_match=False, seed=5, progress=False, height=H, width=W, **KW
    )
    out = ref(
        prompt=PROMPT,
        image=Image.fromarray(given[-1]),
        height=H,
        width=W,
        num_frames=5,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
        **KW,
    ).frames[0]
    reference = (np.clip(np.asarray(out, np.float32), 0, 1) * 255).round()
    diff = np.abs(ours.to_uint8()[3:].astype(np.float32) - reference[1:]).max()
    print(f"extend i2v vs diffusers: worst diff {diff:g} (uint8 levels)")
    assert diff <= 1  # float parity <= 1e-3 (test_family); here after rounding to uint8
    assert ours.to_uint8()[3:].std() > 1


def test_color_match_moves_each_clip_to_the_frames_it_continues(i2v_ours, monkeypatch) -> None:
    given = _video(5, seed=3)
    spy = Spy(i2v_ours, monkeypatch)
    out = i2v_ours.extend(given, PROMPT, 4, color_match=True, seed=7, progress=False, **KW).to_uint8()
    assert out.shape[0] == 9
    np.testing.assert_array_equal(out[:5], given)
    np.testing.assert_array_equal(out[5:], match_colors(spy.clips[0][1:], given[-1:]))
    before = np.abs(np.subtract(*[lab_statistics(x)[0] for x in (spy.clips[0][1:], given[-1:])]))
    after = np.abs(np.subtract(*[lab_statistics(x)[0] for x in (out[5:], given[-1:])]))
    print(f"colour match: mean LAB distance {before.round(2)} -> {after.round(2)}")
    # not exact here: the tiny random model's saturated frames are clipped back into the sRGB gamut
    assert after.max() < 0.25 * before.max()


def test_ti2v_extension_uses_the_image_mode(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ti2v"
    tiny_family.ti2v_5b(folder)
    pipe = _load(folder)
    given = _video(3, seed=8, width=64)
    spy = Spy(pipe, monkeypatch)
    out = pipe.extend(given, PROMPT, 4, color_match=False, seed=1, progress=False, **KW)  # clips <= 121
    assert out.num_frames == 3 + 4 and out.fps == 24
    (request,) = spy.requests
    assert request.num_frames == 5  # the shortest clip that covers the 4 new frames
    np.testing.assert_array_equal(request.image, given[-1])
    np.testing.assert_array_equal(out.to_uint8()[:3], given)
    np.testing.assert_array_equal(out.to_uint8()[3:], spy.clips[0][1:])


def test_i2v_a14b_extends_from_the_last_frame_or_towards_last_image(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "i2v-a14b"
    tiny_family.i2v_a14b(folder)
    pipe = _load(folder)
    given, end = _video(3, seed=9), tiny_family.picture(H, W, 10)
    spy = Spy(pipe, monkeypatch)
    plain = pipe.extend(given, PROMPT, 4, color_match=False, seed=1, progress=False, **KW)
    towards = pipe.extend(given, PROMPT, 4, last_image=end, color_match=False, seed=1, progress=False, **KW)
    assert plain.num_frames == towards.num_frames == 7
    assert spy.requests[0].last_image is None
    np.testing.assert_array_equal(spy.requests[1].last_image, end)
    for request in spy.requests:
        np.testing.assert_array_equal(request.image, given[-1])
    assert (
        np.abs(plain.to_uint8()[-1].astype(int) - towards.to_uint8()[-1]).max() > 0
    )  # the end frame matters


# -- first-last-frame ---------------------------------------------------------------------------------
def test_flf2v_extension_goes_towards_last_image(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "flf2v"
    tiny_family.i2v_14b(folder, seed=400, flf2v=True)
    pipe = _load(folder)
    given, end = _video(3, seed=4), tiny_family.picture(H, W, 9)
    spy = Spy(pipe, monkeypatch)
    out = pipe.extend(given, PROMPT, 4, last_image=end, color_match=False, seed=3, progress=False, **KW)
    assert out.num_frames == 3 + 4
    (request,) = spy.requests
    np.testing.assert_array_equal(request.image, given[-1])
    np.testing.assert_array_equal(request.last_image, end)
    assert request.num_frames == 5
    np.testing.assert_array_equal(out.to_uint8()[3:], spy.clips[0][1:])  # the last frame kept: the end
    with pytest.raises(InvalidRequestError) as e:
        pipe.extend(given, PROMPT, 4, progress=False)
    assert e.value.param == "last_image"
    with pytest.raises(InvalidRequestError) as e:
        pipe.extend(given, PROMPT, 6, last_image=end, progress=False)
    assert e.value.param == "num_frames" and "multiple of 4" in str(e.value)


# -- VACE ---------------------------------------------------------------------------------------------
def test_vace_extension_keeps_the_last_frames_in_its_mask(tmp_path, monkeypatch) -> None:
    pipe = _load(save_vace_checkpoint(tmp_path / "vace"))
    given = _video(6, seed=5)
    spy = Spy(pipe, monkeypatch)
    out = pipe.extend(
        given, PROMPT, 6, overlap_frames=3, clip_frames=9, color_match=False, seed=2, progress=False, **KW
    )
    assert out.num_frames == 6 + 6
    (request,) = spy.requests
    assert request.num_frames == 9
    np.testing.assert_array_equal(request.video[:3], given[-3:])
    assert (request.video[3:] == 128).all()
    assert (request.mask[:3] == 0).all() and (request.mask[3:] == 255).all()
    control = spy.contexts[0].conditioning
    assert (control.control_mask[0, :3] == 0).all() and (control.control_mask[0, 3:] == 1).all()
    kept = 2.0 * (given[-3:].astype(np.float32) / 255.0) - 1.0  # as the VACE request turns uint8 to [-1, 1]
    np.testing.assert_array_equal(control.control_pixels[:, :3], kept.transpose(3, 0, 1, 2))
    joined = out.to_uint8()
    np.testing.assert_array_equal(joined[:6], given)  # the kept frames are not repeated
    np.testing.assert_array_equal(joined[6:], spy.clips[0][3:])


# -- colour matching ----------------------------------------------------------------------------------
def test_lab_conversion_known_values_and_round_trip() -> None:
    lab = rgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)
    np.testing.assert_allclose(lab[2], [0, 0, 0], atol=0.01)
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3)).astype(np.uint8)
    back = (lab_to_rgb(rgb_to_lab(rgb)) * 255).round()
    assert np.abs(back - rgb).max() == 0


def test_match_colors_gives_the_reference_statistics() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal((120, 110, 90), 25, (2, 16, 16, 3)).clip(30, 220).astype(np.uint8)
    frames = rng.normal((150, 100, 130), 15, (4, 16, 16, 3)).clip(30, 220).astype(np.uint8)
    out = match_colors(frames, reference)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    (m0, s0), (m1, s1), (mr, sr) = lab_statistics(frames), lab_statistics(out), lab_statistics(reference)
    print(
        f"match_colors: mean {m0.round(2)} -> {m1.round(2)} (ref {mr.round(2)}); std {s0.round(2)} -> {s1.round(2)} (ref {sr.round(2)})"
    )
    np.testing.assert_allclose(m1, mr, atol=0.5)
    np.testing.assert_allclose(s1, sr, rtol=0.03, atol=0.3)
    assert np.abs(m0 - mr).max() > 5  # they differed before
    np.testing.assert_array_equal(match_colors(reference, reference), reference)  # a no-op on itself


# -- refusals -----------------------------------------------------------------------------------------
def test_t2v_checkpoint_cannot_extend(wan_pipe) -> None:
    with pytest.raises(InvalidRequestError) as e:
        wan_pipe.extend(_video(5, 0), PROMPT, 4)
    assert e.value.param == "video"
    assert "cannot extend" in str(e.value) and "I2V" in str(e.value) and "VACE" in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"video": "missing.mp4"}, "video"),
        ({"video": np.zeros((2, 3), np.uint8)}, "video"),
        ({"video": np.zeros((2, 30, 48, 3), np.uint8)}, "video"),  # 30 rows: not a multiple of 16
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"overlap_frames": 2}, "overlap_frames"),
        ({"clip_frames": 6}, "clip_frames"),
        ({"image": "x.png"}, "image"),
        ({"mask": "x.png"}, "mask"),
        ({"last_image": "end.png"}, "last_image"),  # Wan 2.1 I2V: no end frame
        ({"seed": -1}, "seed"),
        ({"height": 24}, "height"),
    ],
)
def test_bad_input_names_the_parameter(i2v_ours, kwargs, param) -> None:
    kw = {"video": _video(3, 0), "num_frames": 4, **kwargs}
    with pytest.raises(InvalidRequestError) as e:
        i2v_ours.extend(kw.pop("video"), PROMPT, kw.pop("num_frames"), progress=False, **KW, **kw)
    assert e.value.param == param, str(e.value)


# -- the command line ---------------------------------------------------------------------------------
def _cli(model: Path, *extra: str) -> list[str]:
    steps = ["--steps", "2", "--seed", "3", "--no-progress"]
    return ["generate", "--model", str(model), "--prompt", PROMPT, *steps, *extra]


def test_cli_extend_writes_the_joined_video_atomically(i2v, tmp_path, capsys) -> None:
    from wanpipe.cli import main
    from wanpipe.media import read_video

    source = tmp_path / "in.mp4"
    Video.from_uint8(_video(5, seed=6), 16).save(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "joined.mp4"
    code = main(
        _cli(i2v[0], "--extend", str(source), "--num-frames", "6", "--clip-frames", "5", "--output", str(out))
    )
    assert code == 0, capsys.readouterr().err
    frames, fps = read_video(out)
    assert frames.shape == (5 + 6, H, W, 3) and fps == pytest.approx(16)
    given, _ = read_video(source)
    assert (
        np.abs(frames[:5].astype(int) - given.astype(int)).mean() < 3
    )  # the given frames first (mp4: lossy)
    assert sorted(p.name for p in out_dir.iterdir()) == ["joined.mp4"]  # no temporary file left
    assert "11 frames" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--overlap-frames", "3"), "--overlap-frames must be 1"),
        (("--num-frames", "0"), "--num-frames"),
        (("--image", "IMAGE"), "--image does not go with --extend"),
        (("--last-image", "IMAGE"), "--last-image needs a first-last-frame checkpoint"),
        (("--num-frames", "1", "--output", "OUT.png"), "--output: png holds a single image"),
    ],
)
def test_cli_extend_bad_input_exits_2_naming_the_flag(i2v, tmp_path, capsys, extra, message) -> None:
    from wanpipe.cli import main

    source, image = tmp_path / "in.mp4", tmp_path / "end.png"
    Video.from_uint8(_video(5, seed=6), 16).save(source)
    Video.from_uint8(_video(1, seed=6), 16).save(image)
    out = tmp_path / "out.mp4"
    extra = tuple({"IMAGE": str(image), "OUT.png": str(tmp_path / "out.png")}.get(x, x) for x in extra)
    code = main(_cli(i2v[0], "--extend", str(source), "--output", str(out), *extra))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists() and len(err.strip().splitlines()) == 1


def test_cli_extend_on_a_text_to_video_checkpoint_says_which_can(tiny_ckpt, tmp_path, capsys) -> None:
    from wanpipe.cli import main

    source = tmp_path / "in.mp4"
    Video.from_uint8(_video(5, seed=6), 16).save(source)
    code = main(_cli(tiny_ckpt, "--extend", str(source), "--output", str(tmp_path / "out.mp4")))
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("wanpipe: error: --extend: this ")
        and "cannot extend" in err
        and "VACE" in err
    ), err


def test_cli_extend_unreadable_video(i2v, tmp_path, capsys) -> None:
    from wanpipe.cli import main

    source = tmp_path / "broken.mp4"
    source.write_bytes(b"not a video")
    code = main(_cli(i2v[0], "--extend", str(source), "--output", str(tmp_path / "out.mp4")))
    err = capsys.readouterr().err
    assert code == 2 and "--extend: cannot read the video to extend" in err, err
