"""Wan2.2-Animate's request side: the character ``image``, the driving ``pose_video`` / ``face_video``
(and for ``mode="replace"`` the ``background_video`` / ``mask_video``), the segments, checked, read and
preprocessed as diffusers' ``WanAnimatePipeline`` does (``docs/animate.md`` tells the conventions).

:func:`read_animate` (first thing in :meth:`WanTokenizer.resolve <wanpipe.tokenizer.WanTokenizer.resolve>`)
reads the videos and takes the output size from the pose video when none is given;
:func:`resolve_animate` validates them against an Animate checkpoint and resizes them (uint8);
:func:`refuse_animate` refuses them on other checkpoints; :func:`animate_conditioning` turns a resolved
request into the arrays of :class:`~wanpipe.context.ConditioningInputs`; :func:`preprocessed_inputs`
reads the folder the original repository's preprocessing script writes.

What diffusers does, and where wanpipe differs:

- the output is as long as ``pose_video`` (T frames). It is made in segments of
  ``segment_frame_length`` (S) frames, each but the first continuing from the last
  ``prev_segment_conditioning_frames`` (P) frames of the one before, until T frames are covered: the
  videos are lengthened by reflection (``1 2 3 4 5 4 3 2 ...``) to ``P + k (S - P)`` frames, and the
  output is cut back to T. wanpipe does the same;
- diffusers cuts a longer face video to the pose video's length and reflects a shorter one (and the
  background and mask videos likewise), so a face video from another clip or a dropped frame goes
  unnoticed and the face drifts from the pose. wanpipe refuses videos whose frame counts differ: the
  preprocessing script writes them from the same frames;
- diffusers rounds a segment length that is not 4k+1 down with a warning; wanpipe refuses it (as it
  refuses such a ``num_frames``), and refuses S <= 2 P (diffusers then runs an extra segment past the
  video's end and fails) and a pose video of P frames or fewer (no segment at all);
- background and mask videos in ``mode="animate"`` are refused (diffusers ignores them silently);
- the size defaults to the pose video's (the preprocessing script's ``resolution_area``), diffusers'
  to 1280x720. Pose, background and mask videos are resized to the output size and the face video to
  the motion encoder's (Lanczos), the mask read as grey levels (white = the character), the character
  fitted inside the output size (Lanczos, aspect kept) on a black canvas.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wanpipe.config import WanArchConfig
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.media import read_image, read_video

ANIMATE_VIDEOS = ("pose_video", "face_video", "background_video", "mask_video")
ANIMATE_FIELDS = (*ANIMATE_VIDEOS, "mode", "segment_frame_length", "prev_segment_conditioning_frames")
"""The request fields only an Animate checkpoint takes."""

MODES = ("animate", "replace")
PREV_SEGMENT_FRAMES = (1, 5)
"""The overlaps the model was trained with (the original ``refert_num``; diffusers checks the same)."""
DEFAULT_SEGMENT_FRAMES = 77  # the original's clip_len and diffusers' default
DEFAULT_FACE_SIZE = 512  # the motion encoder's input size when the config does not say

PREPROCESSED_FILES = {
    "image": "src_ref.png",
    "pose_video": "src_pose.mp4",
    "face_video": "src_face.mp4",
    "background_video": "src_bg.mp4",
    "mask_video": "src_mask.mp4",
}
"""What ``wan/modules/animate/preprocess/preprocess_data.py`` (Wan-Video/Wan2.2) writes into its
``--save_path``: the last two only with ``--replace_flag``."""

ANIMATE_CHECKPOINTS = "Wan2.2-Animate-14B"


def preprocessed_inputs(folder: str | os.PathLike) -> dict[str, Any]:
    """The request fields for a folder written by the original preprocessing script: ``image``,
    ``pose_video``, ``face_video`` paths, and with ``src_bg.mp4`` and ``src_mask.mp4`` there also
    ``background_video``, ``mask_video`` and ``mode="replace"``. FileNotFoundError names a missing file."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {str(root)!r}")
    found = {k: root / name for k, name in PREPROCESSED_FILES.items() if (root / name).is_file()}
    missing = [PREPROCESSED_FILES[k] for k in ("image", "pose_video", "face_video") if k not in found]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} lacks {', '.join(missing)}: give the --save_path folder of the original "
            "preprocessing script (wan/modules/animate/preprocess/preprocess_data.py)"
        )
    out: dict[str, Any] = {k: str(found[k]) for k in ("image", "pose_video", "face_video")}
    if "background_video" in found and "mask_video" in found:
        out.update(background_video=str(found["background_video"]), mask_video=str(found["mask_video"]))
        out["mode"] = "replace"
    return out


def refuse_animate(request: WanRequest, arch: WanArchConfig) -> None:
    """On a checkpoint that is not Animate: refuse every Animate field."""
    for name in ANIMATE_FIELDS:
        if getattr(request, name) is not None:
            raise InvalidRequestError(
                f"{name} is for {ANIMATE_CHECKPOINTS} checkpoints; this {arch.variant.name} checkpoint "
                "cannot animate a character",
                name,
            )


def face_size(arch: WanArchConfig) -> int:
    """The face video's side: the motion encoder's input size (``motion_encoder_size``, 512)."""
    return arch.transformer.motion_encoder_size or DEFAULT_FACE_SIZE


def read_animate(request: WanRequest, arch: WanArchConfig) -> WanRequest:
    """Read the driving videos (uint8 (F, H, W, 3)) and, when height or
    width is not given, take it from the pose video (rounded down to the model's multiple)."""
    assert arch.accepts_animate
    read: dict[str, Any] = {}
    for name in ANIMATE_VIDEOS:
        value = getattr(request, name)
        if value is not None:
            read[name] = _read_frames(value, name)
    pose = read.get("pose_video")
    if pose is not None and (request.height is None or request.width is None):
        multiple = arch.spatial_multiple
        h, w = (max(s // multiple, 1) * multiple for s in pose.shape[1:3])
        read.setdefault("height", request.height if request.height is not None else h)
        read.setdefault("width", request.width if request.width is not None else w)
    return _replace(request, read)


def resolve_animate(request: WanRequest, arch: WanArchConfig, height: int, width: int) -> dict[str, Any]:
    """Check an Animate request (videos read by :func:`read_animate`) -> the fields of the resolved
    request: ``image`` uint8, the videos resized (pose / background (T, height, width, 3), face
    (T, M, M, 3), mask (T, height, width)), ``mode``, ``segment_frame_length``,
    ``prev_segment_conditioning_frames`` and ``num_frames`` = T. Resolving the result again gives it back."""
    for param in ("last_image", "video", "strength"):
        if getattr(request, param) is not None:
            raise InvalidRequestError(
                f"this {ANIMATE_CHECKPOINTS} checkpoint takes no {param}: it animates image (the character) "
                "with pose_video and face_video (docs/animate.md)",
                param,
            )
    if request.image is None:
        raise InvalidRequestError(
            "this Animate checkpoint needs image: the character to animate (src_ref.png)", "image"
        )
    mode = "animate" if request.mode is None else request.mode
    if mode not in MODES:
        raise InvalidRequestError(f"mode must be animate or replace, got {mode!r}", "mode")
    videos = {name: getattr(request, name) for name in ANIMATE_VIDEOS}
    for name in ("pose_video", "face_video"):
        if videos[name] is None:
            raise InvalidRequestError(
                f"Animate needs {name} (src_{name.split('_')[0]}.mp4 of the original preprocessing script)",
                name,
            )
    for name in ("background_video", "mask_video"):
        if mode == "replace" and videos[name] is None:
            raise InvalidRequestError(
                f'mode="replace" needs background_video and mask_video (src_bg.mp4, src_mask.mp4); '
                f"{name} is missing",
                name,
            )
        if mode == "animate" and videos[name] is not None:
            raise InvalidRequestError(
                f'{name} is for mode="replace" (the character put into the driving video); '
                'give mode="replace", or leave it out to animate the character on its own background',
                name,
            )
    prev = _choice(request.prev_segment_conditioning_frames, 1, "prev_segment_conditioning_frames")
    if prev not in PREV_SEGMENT_FRAMES:
        raise InvalidRequestError(
            f"prev_segment_conditioning_frames must be 1 or 5 (what the model was trained with), got {prev}",
            "prev_segment_conditioning_frames",
        )
    segment = _choice(request.segment_frame_length, DEFAULT_SEGMENT_FRAMES, "segment_frame_length")
    stride = arch.temporal_stride
    if (segment - 1) % stride:
        raise InvalidRequestError(
            f"segment_frame_length must be {stride}k+1 (e.g. 77 or 81), got {segment}", "segment_frame_length"
        )
    if segment <= 2 * prev:
        raise InvalidRequestError(
            f"segment_frame_length {segment} is too short for prev_segment_conditioning_frames={prev}: each "
            f"segment must add more new frames than it continues from (more than {2 * prev} frames)",
            "segment_frame_length",
        )
    frames = videos["pose_video"].shape[0]
    if frames <= prev:
        raise InvalidRequestError(
            f"pose_video has {frames} frame(s); it needs more than prev_segment_conditioning_frames={prev}",
            "pose_video",
        )
    for name in ("face_video", "background_video", "mask_video"):
        if videos[name] is not None and videos[name].shape[0] != frames:
            raise InvalidRequestError(
                f"{name} has {videos[name].shape[0]} frames and pose_video {frames}: the driving videos "
                "must have one frame per pose frame (as the preprocessing script writes them)",
                name,
            )
    if request.num_frames is not None and request.num_frames != frames:
        raise InvalidRequestError(
            f"on Animate the video is as long as pose_video ({frames} frames); leave num_frames out "
            f"(got {request.num_frames})",
            "num_frames",
        )
    size = face_size(arch)
    return {
        "image": _read_image(request.image),
        "num_frames": frames,
        "pose_video": _resize_all(videos["pose_video"], height, width),
        "face_video": _resize_all(videos["face_video"], size, size),
        "background_video": None
        if videos["background_video"] is None
        else _resize_all(videos["background_video"], height, width),
        "mask_video": None
        if videos["mask_video"] is None
        else _grey(_resize_all(videos["mask_video"], height, width)),
        "mode": mode,
        "segment_frame_length": segment,
        "prev_segment_conditioning_frames": prev,
    }


def segment_plan(frames: int, segment: int, prev: int) -> tuple[int, int]:
    """(the frames made, T' >= ``frames``; the number of segments): segments of ``segment`` frames,
    each after the first continuing from the last ``prev`` of the one before, covering ``frames``."""
    step = segment - prev
    short = (frames - prev) % step
    target = frames + (step - short if short else 0)
    return target, (target - prev) // step


def reflect_indices(count: int, target: int) -> np.ndarray:
    """The frames of a ``count``-frame video lengthened to ``target`` by reflection, as diffusers'
    ``pad_video_frames`` and the original's ``inputs_padding``: 0 1 2 3 2 1 0 1 ... (count 4).
    A longer video is cut."""
    if count == 1:
        return np.zeros(target, dtype=np.int64)
    period = 2 * (count - 1)
    phase = np.arange(target) % period
    return np.where(phase < count, phase, period - phase)


def animate_latent_shape(arch: WanArchConfig, segment: int, height: int, width: int) -> tuple[int, ...]:
    """(C, f + 1, h, w): one segment's latents, the character's latent frame first."""
    return (
        arch.transformer.out_channels,
        (segment - 1) // arch.temporal_stride + 2,
        height // arch.vae.spatial_stride,
        width // arch.vae.spatial_stride,
    )


def segment_noise(seed: int, shape: tuple[int, ...], segments: int, first: np.ndarray | None) -> np.ndarray:
    """Every segment's initial noise (N, *shape) float32 as diffusers draws it: one generator seeded
    once, a draw per segment in turn. Given latents (``first``) stand for the first segment's draw (the
    others then start from the seeded generator)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    draws = [] if first is None else [torch.from_numpy(first)]
    while len(draws) < segments:
        draws.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(draws).numpy()


def animate_conditioning(r: WanRequest, face: int) -> dict[str, Any]:
    """A resolved Animate request as :class:`~wanpipe.context.ConditioningInputs` fields (without the
    noise): the character (condition_pixels (1, 3, H, W) in [-1, 1]), the videos reflected to every
    segment's frames (uint8), the segment length and overlap."""
    assert r.height is not None and r.width is not None and r.num_frames is not None
    assert r.segment_frame_length is not None and r.prev_segment_conditioning_frames is not None
    target, _ = segment_plan(r.num_frames, r.segment_frame_length, r.prev_segment_conditioning_frames)
    index = reflect_indices(r.num_frames, target)

    def reflected(frames: np.ndarray | None) -> np.ndarray | None:
        return None if frames is None else np.ascontiguousarray(np.asarray(frames)[index])

    assert np.asarray(r.face_video).shape[1:3] == (face, face)
    return {
        "condition_pixels": fit_character(r.image, r.height, r.width)[None],
        "pose_frames": reflected(r.pose_video),
        "face_frames": reflected(r.face_video),
        "background_frames": reflected(r.background_video),
        "mask_frames": reflected(r.mask_video),
        "segment_frame_length": r.segment_frame_length,
        "prev_segment_conditioning_frames": r.prev_segment_conditioning_frames,
    }


def fit_character(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) -> float32 (3, height, width) in [-1, 1]: scaled to fit inside (aspect kept),
    centred on a black canvas, as diffusers' ``WanAnimateImageProcessor`` (resize_mode "fill", fill
    colour 0) does: with PIL Lanczos, the base processor's default that its registered config ends up
    with (the original's ``padding_resize`` uses OpenCV's bilinear)."""
    pil = Image.fromarray(image)
    if width / height < pil.width / pil.height:
        new_w, new_h = width, pil.height * width // pil.width
    else:
        new_w, new_h = pil.width * height // pil.height, height
    canvas = Image.new("RGB", (width, height), color=0)
    canvas.paste(
        pil.resize((new_w, new_h), resample=Image.Resampling.LANCZOS),
        box=(width // 2 - new_w // 2, height // 2 - new_h // 2),
    )
    pixels = np.asarray(canvas).astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1))


# -- reading ------------------------------------------------------------------------------------------


def _replace(request: WanRequest, values: dict[str, Any]) -> WanRequest:
    from dataclasses import replace

    return replace(request, **values) if values else request


def _choice(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
    return int(value)


def _read_image(value: Any) -> np.ndarray:
    try:
        return read_image(value)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"image: cannot read the image ({e})", "image") from None


def _read_frames(value: Any, param: str) -> np.ndarray:
    """A video file, a list of frames (paths, PIL images, arrays) or an (F, H, W[, 3]) array -> uint8
    (F, H, W, 3) (grey frames expanded to RGB)."""
    try:
        if isinstance(value, str | os.PathLike):
            frames, _ = read_video(value)
        elif isinstance(value, np.ndarray | torch.Tensor) and value.ndim in (3, 4):
            frames = _stack(np.asarray(value))
        elif isinstance(value, list | tuple) and value:
            frames = _stack(value)
        else:
            raise InvalidRequestError(
                f"{param} must be a video file, a list of frames or an (F, H, W, 3) array", param
            )
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, InvalidRequestError):
            raise
        raise InvalidRequestError(f"{param}: cannot read the frames ({e})", param) from None
    if len(frames) == 0:
        raise InvalidRequestError(f"{param} has no frames", param)
    return frames


def _stack(frames: Iterable[Any]) -> np.ndarray:
    images = [read_image(f) for f in frames]
    if len({im.shape for im in images}) > 1:
        raise ValueError("the frames differ in size")
    return np.stack(images)


def _resize_all(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (F, H0, W0, 3) -> (F, height, width, 3), each frame resized as diffusers' video processor
    does (PIL Lanczos; a frame of that size already is kept as it is)."""
    if frames.shape[1:3] == (height, width):
        return frames
    resample = Image.Resampling.LANCZOS
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), resample=resample)) for f in frames]
    )


def _grey(frames: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) -> (F, H, W) grey levels, PIL's "L" (diffusers' mask processor, after the
    resize)."""
    return np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in frames])
