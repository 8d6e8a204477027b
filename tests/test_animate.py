"""Wan2.2-Animate's request side: validation (each error names its field), the preprocessing of the
character, pose / face / background / mask videos and the segments' conditioning against diffusers' own
``WanAnimatePipeline`` functions (``pad_video_frames``, its image and video processors,
``prepare_reference_image_latents``, ``prepare_pose_latents``, ``prepare_prev_segment_cond_latents``)
on the same tiny VAE; the CLI's ``--preprocessed`` folder."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_animate import FACE_SIZE
from wanpipe.animate_request import preprocessed_inputs, reflect_indices, segment_plan
from wanpipe.batch import collate
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.stages.conditioning import AnimateSegments, conditioning_class
from wanpipe.tokenizer import WanTokenizer

HEIGHT, WIDTH, FACE = 32, 48, FACE_SIZE


def _frames(rng: np.random.Generator, count: int, height: int, width: int) -> list[Image.Image]:
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def _masks(count: int, height: int, width: int) -> list[Image.Image]:
    """White (the person) on a moving band with soft edges, as RGB frames (what load_video gives)."""
    out = []
    for i in range(count):
        x = np.linspace(-2.0, 2.0, width)[None, :] + 0.4 * i - 0.6
        grey = (np.clip(1.0 - np.abs(x), 0.0, 1.0) * 255).round().astype(np.uint8)
        out.append(Image.fromarray(np.repeat(grey, height, axis=0), "L").convert("RGB"))
    return out


@pytest.fixture(scope="module")
def animate_ckpt(tmp_path_factory):
    from tests.tiny_animate import save_animate_checkpoint

    return save_animate_checkpoint(tmp_path_factory.mktemp("animate") / "wan-animate-tiny")


@pytest.fixture(scope="module")
def animate_pipes(animate_ckpt):
    from tests.tiny_animate import load_animate_reference
    from wanpipe import WanPipeline

    ours = WanPipeline.from_pretrained(animate_ckpt, device="cpu", dtype="float32")
    return ours, load_animate_reference(animate_ckpt)


@pytest.fixture(scope="module")
def animate_tokenizer(animate_pipes) -> WanTokenizer:
    return animate_pipes[0].tokenizer


def _inputs(frames: int = 7, seed: int = 0, replace_mode: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    out = {
        "image": Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),
        "pose_video": _frames(rng, frames, 64, 96),
        "face_video": _frames(rng, frames, 20, 20),
    }
    if replace_mode:
        out.update(
            background_video=_frames(rng, frames, 64, 96), mask_video=_masks(frames, 64, 96), mode="replace"
        )
    return out


def _request(**kw) -> WanRequest:
    base = dict(prompt="a cat", height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=3)
    base.update(segment_frame_length=5, prev_segment_conditioning_frames=1)
    return WanRequest(**{**base, **kw})


# -- validation -------------------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, dict, str, str]]:
    """(case, changes to a good animate request, the param named, a regex of the message)."""
    return [
        ("no pose", {"pose_video": None}, "pose_video", "needs pose_video"),
        ("no face", {"face_video": None}, "face_video", "needs face_video"),
        ("no character", {"image": None}, "image", "the character"),
        ("short face", {"face_video": "face[:5]"}, "face_video", "has 5 frames and pose_video 7"),
        ("long face", {"face_video": "face*2"}, "face_video", "has 14 frames and pose_video 7"),
        ("bad mode", {"mode": "dance"}, "mode", "animate or replace"),
        ("replace, no background", {"mode": "replace", "mask_video": "masks"}, "background_video", "needs"),
        ("replace, no mask", {"mode": "replace", "background_video": "pose"}, "mask_video", "needs"),
        ("animate with a background", {"background_video": "pose"}, "background_video", 'mode="replace"'),
        ("animate with a mask", {"mask_video": "masks"}, "mask_video", 'mode="replace"'),
        ("overlap 3", {"prev_segment_conditioning_frames": 3}, "prev_segment_conditioning_frames", "1 or 5"),
        (
            "overlap 0",
            {"prev_segment_conditioning_frames": 0},
            "prev_segment_conditioning_frames",
            "positive",
        ),
        ("segment 10", {"segment_frame_length": 10}, "segment_frame_length", "4k\\+1"),
        (
            "segment too short",
            {"segment_frame_length": 9, "prev_segment_conditioning_frames": 5},
            "segment_frame_length",
            "too short",
        ),
        ("one pose frame", {"pose_video": "pose[:1]", "face_video": "face[:1]"}, "pose_video", "1 frame"),
        ("num_frames", {"num_frames": 9}, "num_frames", "as long as pose_video \\(7 frames\\)"),
        ("last image", {"last_image": "image"}, "last_image", "takes no last_image"),
        ("video", {"video": "pose"}, "video", "takes no video"),
        ("unreadable pose", {"pose_video": "/nonexistent.mp4"}, "pose_video", "cannot read"),
        ("latents", {"latents": np.zeros((16, 2, 4, 6), np.float32)}, "latents", r"\(1, 16, 3, 4, 6\)"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_animate_requests_name_the_param(animate_tokenizer, case) -> None:
    _, changes, param, pattern = case
    inputs = _inputs()
    named = {
        "face[:5]": inputs["face_video"][:5],
        "face*2": inputs["face_video"] * 2,
        "masks": _masks(7, 64, 96),
        "pose": inputs["pose_video"],
        "pose[:1]": inputs["pose_video"][:1],
        "face[:1]": inputs["face_video"][:1],
        "image": inputs["image"],
    }
    kw = {**inputs, **{k: named.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}}
    with pytest.raises(InvalidRequestError, match=pattern) as e:
        animate_tokenizer.resolve(_request(**kw))
    assert e.value.param == param, (e.value.param, str(e.value))


@pytest.mark.parametrize(
    "field, value",
    [
        ("pose_video", "frames"),
        ("face_video", "frames"),
        ("background_video", "frames"),
        ("mask_video", "frames"),
        ("mode", "replace"),
        ("segment_frame_length", 77),
        ("prev_segment_conditioning_frames", 1),
    ],
)
def test_animate_inputs_refused_elsewhere(wan_pipe, field, value) -> None:
    """A text-to-video checkpoint refuses every Animate field, naming it."""
    frames = _frames(np.random.default_rng(0), 3, 32, 32)
    request = WanRequest(
        prompt="a cat", height=32, width=32, num_frames=5, **{field: frames if value == "frames" else value}
    )
    with pytest.raises(InvalidRequestError, match=f"{field} is for Wan2.2-Animate-14B") as e:
        wan_pipe.tokenizer.resolve(request)
    assert e.value.param == field


def test_resolve_defaults_and_is_stable(animate_tokenizer) -> None:
    """The size comes from the pose video, the frame count is the pose video's (any length), the mode
    and segments get their defaults; resolving again gives the same request."""
    inputs = _inputs(frames=10, replace_mode=True)
    request = WanRequest(prompt="a cat", seed=1, **inputs)
    first = animate_tokenizer.resolve(request)
    assert (first.height, first.width, first.num_frames) == (64, 96, 10)
    assert (first.mode, first.segment_frame_length, first.prev_segment_conditioning_frames) == (
        "replace",
        77,
        1,
    )
    assert first.pose_video.shape == (10, 64, 96, 3) and first.face_video.shape == (10, FACE, FACE, 3)
    assert first.mask_video.shape == (10, 64, 96) and first.mask_video.dtype == np.uint8
    again = animate_tokenizer.resolve(first)
    for name in ("image", "pose_video", "face_video", "background_video", "mask_video"):
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert animate_tokenizer.batch_key(first) == animate_tokenizer.batch_key(again)
    other = animate_tokenizer.resolve(replace(request, mode=None, background_video=None, mask_video=None))
    assert animate_tokenizer.batch_key(other) != animate_tokenizer.batch_key(first)


def test_segments_and_reflection_as_diffusers() -> None:
    """The padded length, the number of segments and the reflected frames, as diffusers computes them."""
    from diffusers import WanAnimatePipeline

    for frames, segment, prev in [(7, 5, 1), (8, 5, 1), (2, 5, 1), (77, 77, 1), (100, 77, 5), (30, 13, 5)]:
        step = segment - prev
        last = (frames - prev) % step
        target = frames + (0 if last == 0 else step - last)
        assert segment_plan(frames, segment, prev) == (target, target // step), (frames, segment, prev)
        padded = WanAnimatePipeline.pad_video_frames(None, list(range(frames)), target)
        assert reflect_indices(frames, target).tolist() == padded


# -- preprocessing against diffusers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_animate(animate_pipes):
    """diffusers' WanAnimatePipeline on the same tiny checkpoint (its preprocessing and prepare_*)."""
    return animate_pipes[1]


def _worst(ours: torch.Tensor | np.ndarray, theirs: torch.Tensor) -> float:
    ours = torch.as_tensor(np.asarray(ours) if isinstance(ours, np.ndarray) else ours).float()
    assert tuple(ours.shape) == tuple(theirs.shape), (ours.shape, theirs.shape)
    return (ours - theirs.float()).abs().max().item()


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_preprocessing_matches_diffusers(animate_tokenizer, diffusers_animate, mode) -> None:
    """The character, the reflected pose / face / background / mask videos at their sizes, as diffusers'
    processors make them (the same PIL resizes: exact up to float rounding)."""
    pipe = diffusers_animate
    inputs = _inputs(replace_mode=mode == "replace")
    ctx = animate_tokenizer.make_context(_request(**inputs))
    cond = ctx.conditioning
    target = segment_plan(7, 5, 1)[0]
    character = pipe.vae_image_processor.preprocess(
        inputs["image"], height=HEIGHT, width=WIDTH, resize_mode="fill"
    )
    worst = {"character": _worst(cond.condition_pixels, character)}

    def video(frames: np.ndarray) -> torch.Tensor:  # uint8 (T, H, W, 3) -> (1, 3, T, H, W) in [-1, 1]
        return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1

    process = pipe.video_processor.preprocess_video
    pose = process(pipe.pad_video_frames(inputs["pose_video"], target), height=HEIGHT, width=WIDTH)
    face = process(pipe.pad_video_frames(inputs["face_video"], target), height=FACE, width=FACE)
    worst["pose"] = _worst(video(cond.pose_frames), pose)
    worst["face"] = _worst(video(cond.face_frames), face)
    if mode == "replace":
        background = process(
            pipe.pad_video_frames(inputs["background_video"], target), height=HEIGHT, width=WIDTH
        )
        mask = pipe.video_processor_for_mask.preprocess_video(
            pipe.pad_video_frames(inputs["mask_video"], target), height=HEIGHT, width=WIDTH
        )
        worst["background"] = _worst(video(cond.background_frames), background)
        worst["mask"] = _worst(torch.from_numpy(cond.mask_frames)[None, None].float() / 255, mask)
    else:
        assert cond.background_frames is None and cond.mask_frames is None
    print(f"{mode}: worst diffs {worst}")
    assert max(worst.values()) < 1e-6


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_segment_conditioning_matches_diffusers(
    animate_tokenizer, animate_pipes, diffusers_animate, mode
) -> None:
    """The character's latents, each segment's pose latents, face pixels and conditioning latents (the
    first from zeros / the background, the second from the last frame of the first) and each segment's
    noise, against diffusers' prepare_* on the same VAE and generator."""
    pipe, seed = diffusers_animate, 11
    inputs = _inputs(seed=1, replace_mode=mode == "replace")
    ctx = animate_tokenizer.make_context(_request(seed=seed, **inputs))
    batch = collate([ctx])
    assert batch.segments == 2 and conditioning_class(batch, False) is AnimateSegments
    cond, noise = AnimateSegments.prepare(batch, animate_pipes[0].executor.encoders)
    assert isinstance(cond, AnimateSegments)

    target = segment_plan(7, 5, 1)[0]
    process = pipe.video_processor.preprocess_video
    pose = process(pipe.pad_video_frames(inputs["pose_video"], target), height=HEIGHT, width=WIDTH)
    face = process(pipe.pad_video_frames(inputs["face_video"], target), height=FACE, width=FACE)
    background = mask = None
    if mode == "replace":
        background = process(
            pipe.pad_video_frames(inputs["background_video"], target), height=HEIGHT, width=WIDTH
        )
        mask = pipe.video_processor_for_mask.preprocess_video(
            pipe.pad_video_frames(inputs["mask_video"], target), height=HEIGHT, width=WIDTH
        )
    character = pipe.vae_image_processor.preprocess(
        inputs["image"], height=HEIGHT, width=WIDTH, resize_mode="fill"
    )
    generator = torch.Generator().manual_seed(seed)
    worst: dict[str, float] = {}
    with torch.no_grad():
        reference = pipe.prepare_reference_image_latents(character, 1, device="cpu")
        previous = None
        for index, start in enumerate((0, 4)):
            span = slice(start, start + 5)
            expected_noise = pipe.prepare_latents(1, 16, HEIGHT, WIDTH, 5, torch.float32, "cpu", generator)
            if index:
                decoded = torch.rand(1, 5, HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(5))
                noise = cond.next_segment(1, decoded)
                previous = decoded.permute(0, 4, 1, 2, 3)[:, :, -1:] * 2 - 1
            theirs = pipe.prepare_prev_segment_cond_latents(
                previous,
                background_video=None if background is None else background[:, :, span],
                mask_video=None if mask is None else mask[:, :, span],
                batch_size=1,
                segment_frame_length=5,
                start_frame=start,
                height=HEIGHT,
                width=WIDTH,
                prev_segment_cond_frames=1,
                task=mode,
                device="cpu",
            )
            worst[f"noise {index}"] = _worst(noise, expected_noise)
            worst[f"condition {index}"] = _worst(cond.condition, torch.cat([reference, theirs], dim=2))
            worst[f"pose {index}"] = _worst(
                cond.pose, pipe.prepare_pose_latents(pose[:, :, span], 1, device="cpu")
            )
            worst[f"face {index}"] = _worst(cond.face, face[:, :, span])
    x = torch.randn(1, 16, 3, 4, 6)
    assert cond.model_input(x).shape == (1, 16 + 4 + 16, 3, 4, 6)
    assert cond.finish(x).shape == (1, 16, 2, 4, 6)
    guided = cond.dit_kwargs(True)
    assert guided["pose_hidden_states"].shape[0] == 2 and (guided["face_pixel_values"][1] == -1).all()
    print(f"{mode}: worst diffs {worst}")
    assert max(worst.values()) < 1e-4


def test_preprocessed_folder(tmp_path) -> None:
    """The original preprocessing script's files become the request fields; bg + mask select replace."""
    from wanpipe.media import Video

    rng = np.random.default_rng(2)
    for name in ("src_pose.mp4", "src_face.mp4"):
        Video.from_uint8(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), 30).save(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="lacks src_ref.png"):
        preprocessed_inputs(tmp_path)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "src_ref.png")
    found = preprocessed_inputs(tmp_path)
    assert set(found) == {"image", "pose_video", "face_video"}
    for name in ("src_bg.mp4", "src_mask.mp4"):
        Video.from_uint8(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), 30).save(tmp_path / name)
    found = preprocessed_inputs(tmp_path)
    assert found["mode"] == "replace" and found["mask_video"].endswith("src_mask.mp4")


# -- end to end against diffusers' WanAnimatePipeline (the animate-model branch's tiny checkpoint) --------


def _e2e_inputs(frames: int, mode: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {
        "image": Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)),
        "pose_video": _frames(rng, frames, HEIGHT, WIDTH),
        "face_video": _frames(rng, frames, FACE_SIZE, FACE_SIZE),
    }
    if mode == "replace":
        out["background_video"] = _frames(rng, frames, HEIGHT, WIDTH)
        out["mask_video"] = _masks(frames, HEIGHT, WIDTH)
    return out


E2E_CASES = [
    # (name, mode, pose frames, segment length, overlap, guidance)
    ("animate, one segment, guidance 1", "animate", 5, 5, 1, 1.0),
    ("animate, two segments, guidance 1", "animate", 7, 5, 1, 1.0),
    ("replace, two segments, guidance 1", "replace", 7, 5, 1, 1.0),
    ("animate, two segments, guidance 2.5", "animate", 8, 5, 1, 2.5),
    ("replace, one segment, guidance 3", "replace", 5, 5, 1, 3.0),
    ("animate, overlap 5, two segments", "animate", 15, 13, 5, 1.0),
]


@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c[0])
def test_animate_matches_diffusers(animate_pipes, case) -> None:
    """The whole video (every segment decoded, concatenated and cut) against WanAnimatePipeline on the
    same tiny weights, inputs and seed: fp32, CPU, max abs diff 1e-3."""
    ours, reference = animate_pipes
    name, mode, frames, segment, prev, guidance = case
    inputs = _e2e_inputs(frames, mode, seed=frames)
    common = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=guidance)
    common.update(segment_frame_length=segment, prev_segment_conditioning_frames=prev, mode=mode)
    prompt, negative = "a cat walks on the grass", "blurred details"
    with torch.no_grad():
        expected = reference(
            prompt=prompt,
            negative_prompt=negative,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
            **inputs,
            **common,
        ).frames[0]
    video = ours.generate(prompt, negative_prompt=negative, seed=7, progress=False, **inputs, **common)
    assert video.frames.shape == expected.shape == (frames, HEIGHT, WIDTH, 3)
    worst = float(np.abs(video.frames - expected).max())
    print(f"{name}: worst abs diff {worst:.2e}")
    assert worst < 1e-3


def test_animate_batch_of_two(animate_pipes) -> None:
    """Two Animate requests of one shape run as one batch and give each one's own video."""
    ours, _ = animate_pipes
    requests = [
        WanRequest(
            prompt="a cat",
            seed=s,
            num_inference_steps=2,
            segment_frame_length=5,
            **_e2e_inputs(7, "animate", s),
        )
        for s in (1, 2)
    ]
    batch = ours.generate_batch(requests, progress=False)
    alone = ours.generate_batch([requests[1]], progress=False)[0]
    assert float(np.abs(batch[1].frames - alone.frames).max()) < 1e-4
    assert float(np.abs(batch[0].frames - batch[1].frames).max()) > 1e-3


def test_cli_preprocessed_folder_generates(animate_pipes, animate_ckpt, tmp_path) -> None:
    """``wanpipe generate --preprocessed DIR`` reads the preprocessing script's files and writes the
    frames pipe.generate makes from the same files."""
    from wanpipe.cli import main
    from wanpipe.media import Video

    ours, _ = animate_pipes
    inputs = _e2e_inputs(7, "replace", seed=3)
    prep = tmp_path / "prep"
    prep.mkdir()
    inputs["image"].save(prep / "src_ref.png")
    for name, file in (
        ("pose_video", "src_pose"),
        ("face_video", "src_face"),
        ("background_video", "src_bg"),
    ):
        Video.from_uint8(np.stack([np.asarray(f) for f in inputs[name]]), 30).save(prep / f"{file}.mp4")
    Video.from_uint8(np.stack([np.asarray(f) for f in inputs["mask_video"]]), 30).save(prep / "src_mask.mp4")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(animate_ckpt), "--prompt", "a cat", "--preprocessed", str(prep)]
    argv += ["--steps", "2", "--segment-frame-length", "5", "--seed", "4", "--output", str(out)]
    assert main([*argv, "--no-progress", "--device", "cpu", "--dtype", "float32"]) == 0
    written = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))])
    expected = ours.generate(
        "a cat",
        seed=4,
        num_inference_steps=2,
        segment_frame_length=5,
        progress=False,
        **preprocessed_inputs(prep),
    )
    assert written.shape == (7, HEIGHT, WIDTH, 3)  # the pose video's size
    assert np.abs(written.astype(np.float32) / 255 - expected.frames).max() < 2 / 255 + 1e-6
