"""Extension: continue an existing video with clips conditioned on its last frames (docs/long-video.md).

:func:`extend_video` (``WanPipeline.extend``) makes ``num_frames`` NEW frames after a given video and
returns the joined video (the given frames unchanged, then the new ones). Each clip is one ordinary
request of the checkpoint, conditioned on the frames made so far:

- image-to-video (Wan2.1-I2V, Wan2.2-I2V-A14B, Wan2.2-TI2V-5B's image mode): ``image`` = the last frame;
  the clip's first frame (the model's copy of that frame) is dropped when joining;
- first-last-frame (Wan2.1-FLF2V, or Wan2.2-I2V-A14B with ``last_image``): ``image`` = the last frame,
  ``last_image`` = the end frame; one clip of ``num_frames + 1`` frames that ends at the end frame;
- VACE: ``video`` = the last ``overlap_frames`` frames then grey ones, ``mask`` black (keep) on those
  frames and white (generate) after; the clip's copies of the kept frames are dropped when joining.

Longer than one clip: clips are chained, each continuing from the frames before it, until
``num_frames`` new frames exist (the last clip is the shortest 4k+1 length that covers what is left, its
surplus frames cut). Frames are held as uint8 between clips.

Colour drift (``color_match``, on by default): each new clip's colour statistics are moved to those of
the frames it continues, per channel in CIELAB (mean and standard deviation, Reinhard et al. 2001, as
the ``reinhard`` method of the ``color-matcher`` package that ComfyUI-KJNodes' ``ColorMatch`` node wraps),
one transform per clip computed over all its new frames, so the clip keeps its own motion of light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from wanpipe.config import WanArchConfig
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.media import Video, read_image, read_video

EXTEND_CHECKPOINTS = (
    "image-to-video (Wan2.1-I2V, Wan2.2-I2V-A14B, Wan2.2-TI2V-5B), first-last-frame (Wan2.1-FLF2V) or "
    "VACE (Wan2.1-VACE, Wan2.2-VACE-Fun)"
)
"""The checkpoints that can continue a video (for messages)."""

VACE_OVERLAP_FRAMES = 5
"""The frames a VACE clip keeps from the video before it by default: one latent frame and the next
(4k+1 frames fill whole latent frames)."""

GREY = 128
"""The value of the frames a VACE clip generates, in its control video (docs/vace.md)."""

_SET_BY_EXTEND = ("image", "video", "mask", "num_frames", "latents", "strength")
"""Request fields each clip's request gets from the extension, not from the caller."""


class _Generator(Protocol):
    """What extension needs of a pipeline (``WanPipeline``)."""

    arch: WanArchConfig

    def generate_batch(
        self,
        requests: list[WanRequest],
        callback: Callable[[int, int, float], None] | None = None,
        *,
        progress: bool = True,
    ) -> list[Video]: ...


@dataclass(frozen=True)
class ExtensionPlan:
    """How a video is continued: ``mode`` "image" | "first_last" | "vace"; ``overlap`` the frames each
    clip continues from (1 for the image modes); ``clips`` each clip's frame count (4k+1, the
    ``overlap`` frames included); ``new_frames`` the frames added in all (the clips' surplus cut)."""

    mode: str
    overlap: int
    clips: tuple[int, ...]
    new_frames: int


def extension_mode(arch: WanArchConfig, last_image: bool) -> str:
    """The way this checkpoint continues a video, or InvalidRequestError (param ``video``, or
    ``last_image`` when the checkpoint cannot go towards an end frame)."""
    name, task = arch.variant.name, arch.variant.task
    if arch.accepts_vace:
        if last_image:
            raise InvalidRequestError(
                "last_image: a VACE checkpoint continues from the video's last frames, without an end frame; "
                "use a first-last-frame checkpoint (Wan2.1-FLF2V, Wan2.2-I2V-A14B) for that",
                "last_image",
            )
        return "vace"
    if task not in ("i2v", "flf2v", "ti2v"):
        raise InvalidRequestError(
            f"this {name} checkpoint cannot extend a video; extension needs an {EXTEND_CHECKPOINTS} "
            "checkpoint",
            "video",
        )
    if last_image and not arch.accepts_last_image:
        raise InvalidRequestError(
            f"last_image needs a first-last-frame checkpoint (Wan2.1-FLF2V, Wan2.2-I2V-A14B); this {name} "
            "checkpoint continues from the last frame only",
            "last_image",
        )
    if task == "flf2v" and not last_image:
        raise InvalidRequestError(
            f"this {name} checkpoint is first-last-frame: pass last_image (the frame the continuation "
            "ends at)",
            "last_image",
        )
    return "first_last" if last_image else "image"


def plan_extension(
    arch: WanArchConfig,
    num_frames: Any,
    *,
    given_frames: int,
    clip_frames: Any = None,
    overlap_frames: Any = None,
    last_image: bool = False,
) -> ExtensionPlan:
    """Check the counts and plan the clips: ``num_frames`` new frames after a video of
    ``given_frames``, in clips of at most ``clip_frames`` (4k+1, default the checkpoint's frame count)
    that each continue from ``overlap_frames`` frames (VACE; default 5; 1 elsewhere). ``num_frames`` None:
    one clip's new frames (``clip_frames - overlap_frames``)."""
    mode = extension_mode(arch, last_image)
    stride = arch.temporal_stride
    if mode == "vace":
        overlap = _count(
            VACE_OVERLAP_FRAMES if overlap_frames is None else overlap_frames, "overlap_frames", 1
        )
    else:
        overlap = _count(1 if overlap_frames is None else overlap_frames, "overlap_frames", 1)
        if overlap != 1:
            raise InvalidRequestError(
                f"overlap_frames must be 1 on this {arch.variant.name} checkpoint (an image-to-video clip "
                f"continues from the last frame); more frames need a VACE checkpoint, got {overlap}",
                "overlap_frames",
            )
    if overlap > given_frames:
        raise InvalidRequestError(
            f"overlap_frames={overlap} is more than the video's {given_frames} frames", "overlap_frames"
        )
    clip = _count(arch.defaults.num_frames if clip_frames is None else clip_frames, "clip_frames", 1)
    new = _count(clip - overlap if num_frames is None else num_frames, "num_frames", 1)
    if mode == "first_last":
        if new % stride:
            raise InvalidRequestError(
                f"with last_image the continuation is one clip that ends at last_image: num_frames (the new "
                f"frames) must be a multiple of {stride} ({stride}, {2 * stride}, ..., 80), got {new}",
                "num_frames",
            )
        return ExtensionPlan(mode, 1, (new + 1,), new)
    if (clip - 1) % stride or clip <= overlap:
        raise InvalidRequestError(
            f"clip_frames must be {stride}k+1 (5, 9, ..., 81) and more than overlap_frames={overlap}, got {clip}",
            "clip_frames",
        )
    clips, left = [], new
    while left > 0:
        length = min(clip, -(-(left + overlap - 1) // stride) * stride + 1)  # the shortest 4k+1 covering it
        clips.append(length)
        left -= length - overlap
    return ExtensionPlan(mode, overlap, tuple(clips), new)


def extend_video(
    pipe: _Generator,
    video: Any,
    prompt: str,
    num_frames: int | None = None,
    *,
    overlap_frames: int | None = None,
    last_image: Any = None,
    color_match: bool = True,
    clip_frames: int | None = None,
    callback: Callable[[int, int, float], None] | None = None,
    progress: bool = True,
    **request: Any,
) -> Video:
    """Continue ``video`` (a path, a :class:`~wanpipe.media.Video`, a list of frames or uint8 (F, H, W, 3))
    with ``num_frames`` new frames (default: one clip of the checkpoint's length) -> the joined video,
    (F + num_frames, H, W, 3): the given frames unchanged, then the new ones, at the checkpoint's fps.

    ``request``: the other :class:`~wanpipe.context.WanRequest` fields (negative_prompt, height/width
    (default the video's; the video is resized to them), num_inference_steps, guidance, seed (clip i
    uses seed + i), sampler, cache, reference_images, conditioning_scale, ...). ``overlap_frames``:
    the frames each VACE clip keeps (default 5); ``last_image``: the end frame (first-last-frame);
    ``clip_frames``: the longest clip (4k+1, default the checkpoint's frame count); ``color_match``:
    move each clip's colour statistics to those of the frames it continues; ``callback(step, steps, t)``
    after every denoising step of every clip (``progress``: a bar per clip). Bad values raise
    :class:`~wanpipe.context.InvalidRequestError` naming the parameter (``video`` for the video)."""
    arch = pipe.arch
    extension_mode(arch, last_image is not None)  # a T2V checkpoint is refused before reading anything
    names = {f.name for f in fields(WanRequest)}
    for key in request:
        if key in _SET_BY_EXTEND:
            raise InvalidRequestError(
                f"{key} is set by the extension for each clip (from the video's last frames); leave it out",
                key,
            )
        if key not in names:
            raise InvalidRequestError(f"unknown request field {key!r}", key)
    frames = read_frames(video)
    height, width = _output_size(frames, request.get("height"), request.get("width"), arch.spatial_multiple)
    frames = resize_frames(frames, height, width)
    plan = plan_extension(
        arch,
        num_frames,
        given_frames=len(frames),
        clip_frames=clip_frames,
        overlap_frames=overlap_frames,
        last_image=last_image is not None,
    )
    seed = request.pop("seed", None)
    seed = int(np.random.default_rng().integers(2**31)) if seed is None else _count(seed, "seed", 0)
    base = WanRequest(prompt=prompt, **{**request, "height": height, "width": width})
    pieces, fps, timings = [frames], None, {}
    for i, length in enumerate(plan.clips):
        context = _tail(pieces, plan.overlap)
        clip_request = _clip_request(base, plan, context, length, last_image, seed + i)
        clip = pipe.generate_batch([clip_request], callback=callback, progress=progress)[0]
        fps = clip.fps
        for key, value in (clip.timings or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                timings[key] = timings.get(key, 0) + value
        made = clip.to_uint8()
        del clip
        new = made[plan.overlap :]  # the clip's copies of the frames it continues dropped
        if color_match:
            new = match_colors(new, context)
        pieces.append(new)
    joined = np.concatenate(pieces)[: len(frames) + plan.new_frames]
    assert fps is not None
    out = Video.from_uint8(joined, fps)
    out.seed, out.timings = seed, timings
    return out


def _clip_request(
    base: WanRequest, plan: ExtensionPlan, context: np.ndarray, length: int, last_image: Any, seed: int
) -> WanRequest:
    """One clip's request: ``context`` uint8 (K, H, W, 3) the frames it continues from."""
    if plan.mode == "vace":
        assert base.height is not None and base.width is not None
        grey = np.full((length - len(context), base.height, base.width, 3), GREY, np.uint8)
        mask = np.full((length, base.height, base.width), 255, np.uint8)
        mask[: len(context)] = 0
        return replace(base, video=np.concatenate([context, grey]), mask=mask, num_frames=length, seed=seed)
    return replace(
        base,
        image=context[-1],
        last_image=last_image if plan.mode == "first_last" else None,
        num_frames=length,
        seed=seed,
    )


def _tail(pieces: list[np.ndarray], count: int) -> np.ndarray:
    """The last ``count`` frames of the pieces joined (uint8 (count, H, W, 3)), without joining them all."""
    out: list[np.ndarray] = []
    for piece in reversed(pieces):
        out.insert(0, piece[max(0, len(piece) - (count - sum(len(p) for p in out))) :])
        if sum(len(p) for p in out) >= count:
            break
    return np.concatenate(out)


# -- the given video -----------------------------------------------------------------------------------


def read_frames(video: Any) -> np.ndarray:
    """The video to extend: a file path, a :class:`Video`, a list of frames or an (F, H, W, 3) array ->
    uint8 (F, H, W, 3). Unreadable input is an InvalidRequestError naming ``video``."""
    try:
        if isinstance(video, Video):
            return video.to_uint8()
        if isinstance(video, str | os.PathLike):
            frames, _ = read_video(Path(video))
            return frames
        if isinstance(video, np.ndarray) and video.ndim == 4:
            return video if video.dtype == np.uint8 else np.stack([read_image(f) for f in video])
        if isinstance(video, list | tuple) and video:
            frames = [read_image(f) for f in video]
            if len({f.shape for f in frames}) > 1:
                raise ValueError("the frames differ in size")
            return np.stack(frames)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"video: cannot read the video to extend ({e})", "video") from None
    raise InvalidRequestError(
        "video (the video to extend) must be a file path, a Video, a list of frames or an (F, H, W, 3) array",
        "video",
    )


def _output_size(frames: np.ndarray, height: Any, width: Any, multiple: int) -> tuple[int, int]:
    """The joined video's size: height and width as given, else the video's (a multiple of ``multiple``)."""
    given_h, given_w = frames.shape[1:3]
    if height is None and width is None and (given_h % multiple or given_w % multiple):
        raise InvalidRequestError(
            f"the video to extend is {given_w}x{given_h}; the model makes multiples of {multiple}: give height "
            "and width (the video is resized to them)",
            "video",
        )
    h = given_h if height is None else _count(height, "height", 1)
    w = given_w if width is None else _count(width, "width", 1)
    return h, w


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (F, H0, W0, 3) -> uint8 (F, height, width, 3), PIL Lanczos; the same array at that size."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames]
    )


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return int(value)


# -- colour matching -----------------------------------------------------------------------------------

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=np.float64,
)
_WHITE = _RGB_TO_XYZ.sum(axis=1)  # D65 white in XYZ (R = G = B = 1)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 or float in [0, 1] (..., 3) -> CIELAB float64 (..., 3) (L in [0, 100], D65 white)."""
    x = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ _RGB_TO_XYZ.T) / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) -> sRGB float64 in [0, 1] (..., 3) (clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    linear = np.clip(xyz @ np.linalg.inv(_RGB_TO_XYZ).T, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def lab_statistics(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (F, H, W, 3) -> the per-channel mean and standard deviation (3,) in CIELAB over all
    their pixels (one frame at a time)."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for frame in frames:
        lab = rgb_to_lab(frame).reshape(-1, 3)
        total += lab.sum(0)
        squares += (lab**2).sum(0)
        count += len(lab)
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


def match_colors(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) -> uint8 (F, H, W, 3): each CIELAB channel of ``frames`` shifted and scaled
    (one transform for all the frames) so that its mean and standard deviation over the frames equal
    those of ``reference`` (uint8 (K, H', W', 3)); a flat channel is only shifted."""
    mean, std = lab_statistics(frames)
    ref_mean, ref_std = lab_statistics(reference)
    scale = np.where(std > 1e-6, ref_std / np.maximum(std, 1e-6), 1.0)
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        lab = (rgb_to_lab(frame) - mean) * scale + ref_mean
        out[i] = (lab_to_rgb(lab) * 255).round().astype(np.uint8)
    return out
