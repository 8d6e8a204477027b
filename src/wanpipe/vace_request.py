"""VACE's request side: ``video``, ``mask``, ``reference_images`` and ``conditioning_scale`` checked,
read and preprocessed as diffusers' ``WanVACEPipeline`` does (``docs/vace.md`` tells the conventions).

:func:`resolve_vace` (called by :meth:`WanTokenizer.resolve <wanpipe.tokenizer.WanTokenizer.resolve>`)
validates them against a VACE checkpoint and reads them: the video and the mask resized to the output
size (uint8), the reference images as given (uint8), one conditioning scale per VACE layer.
:func:`refuse_vace` refuses them on other checkpoints. :func:`vace_conditioning` turns a resolved
request's into the float arrays of :class:`~wanpipe.context.ConditioningInputs`.

What diffusers does, and where wanpipe differs:

- the mask is read as grey levels (0 = keep, 255 = generate); the video is split at 0.5 into the kept
  part (``video * (mask <= 0.5)``) and the generated part (``video * (mask > 0.5)``), each VAE-encoded,
  while the mask channels the model sees keep the soft values;
- reference images are fitted into the output size keeping their aspect (bilinear), centred on a white
  canvas, and each becomes one latent frame put before the video's, the last image first;
- a control video smaller than the output is refused here (diffusers keeps it small and pads its tokens
  with zeros, out of place); a larger one is resized to the output size (Lanczos), as diffusers does when
  the aspect ratios agree;
- a mask is one image for every frame, or one frame per video frame at the video's size.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wanpipe.config import WanArchConfig
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.media import read_image, read_video

VACE_FIELDS = ("mask", "reference_images", "conditioning_scale")
"""The request fields only a VACE checkpoint takes (``video`` means video-to-video elsewhere)."""

STILL_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
"""Files read as one image (others, GIF and WebP animations included, as videos)."""

VACE_CHECKPOINTS = "Wan2.1-VACE-1.3B / -14B or Wan2.2-VACE-Fun-A14B"


def refuse_vace(request: WanRequest, arch: WanArchConfig) -> None:
    """On a checkpoint without VACE blocks: refuse mask, reference_images and conditioning_scale."""
    for name in VACE_FIELDS:
        if getattr(request, name) is not None:
            raise InvalidRequestError(
                f"{name} is for VACE checkpoints ({VACE_CHECKPOINTS}); this {arch.variant.name} checkpoint "
                "has no VACE blocks",
                name,
            )


def resolve_vace(
    request: WanRequest, arch: WanArchConfig, num_frames: int, height: int, width: int
) -> dict[str, Any]:
    """Check and read a VACE request's inputs -> the fields of the resolved request: ``num_frames``
    (from the video when not given), ``video`` uint8 (F, height, width, 3) or None, ``mask`` uint8
    (1 or F, height, width) or None, ``reference_images`` [uint8 (H_i, W_i, 3)] or None,
    ``conditioning_scale`` [float] (one per VACE layer). Resolving the result again gives it back."""
    name = arch.variant.name
    for param in ("image", "last_image"):
        if getattr(request, param) is not None:
            raise InvalidRequestError(
                f"this VACE checkpoint ({name}) takes no {param}: give video with that frame and a mask "
                "black on it (kept), or reference_images for a subject (docs/vace.md)",
                param,
            )
    if request.strength is not None:
        raise InvalidRequestError(
            "strength is for video-to-video; on a VACE checkpoint video is the control video "
            "(use mask and conditioning_scale)",
            "strength",
        )
    if request.mask is not None and request.video is None:
        raise InvalidRequestError(
            "mask needs video too: the mask marks which pixels of the video to keep (black) and which "
            "to generate (white)",
            "mask",
        )
    out: dict[str, Any] = {
        "num_frames": num_frames,
        "video": None,
        "mask": None,
        "reference_images": _reference_images(request.reference_images),
        "conditioning_scale": _conditioning_scale(
            request.conditioning_scale, len(arch.transformer.vace_layers or ())
        ),
    }
    if request.video is None:
        return out
    frames = _read_frames(request.video, "video")
    stride = arch.temporal_stride
    given, frame_h, frame_w = frames.shape[:3]
    if request.num_frames is None:
        num_frames = (given - 1) // stride * stride + 1
    if given < num_frames:
        raise InvalidRequestError(
            f"the video has {given} frames, fewer than num_frames={num_frames}", "video"
        )
    if frame_h < height or frame_w < width:
        raise InvalidRequestError(
            f"the video is {frame_w}x{frame_h}, smaller than the output {width}x{height}: give a control "
            "video at least as large as the output (it is resized to the output size), or a smaller "
            "width/height",
            "video",
        )
    out["num_frames"] = num_frames
    out["video"] = np.stack([_resize(f, height, width) for f in frames[:num_frames]])
    if request.mask is not None:
        mask = _read_mask(request.mask)
        if mask.shape[0] not in (1, given):
            raise InvalidRequestError(
                f"the mask has {mask.shape[0]} frames and the video {given}: give one mask image for "
                "every frame, or one mask frame per video frame",
                "mask",
            )
        if mask.shape[1:] != (frame_h, frame_w):
            raise InvalidRequestError(
                f"the mask is {mask.shape[2]}x{mask.shape[1]} and the video {frame_w}x{frame_h}: give the "
                "mask at the video's size",
                "mask",
            )
        out["mask"] = np.stack([_resize(m, height, width) for m in mask[:num_frames]])
    return out


def vace_conditioning(r: WanRequest, spatial_stride: int) -> dict[str, np.ndarray | None]:
    """A resolved VACE request's inputs as :class:`~wanpipe.context.ConditioningInputs` fields:
    control_pixels (3, F, H, W) in [-1, 1], control_mask (1, F, H, W) in [0, 1] (each None when not
    given), reference_pixels (R, 3, H, W) in [-1, 1] or None, conditioning_scale (N,) float32."""
    assert r.height is not None and r.width is not None and r.num_frames is not None
    control = mask = references = None
    if r.video is not None:
        pixels = np.asarray(r.video, dtype=np.float32) / 255.0
        control = np.ascontiguousarray((2.0 * pixels - 1.0).transpose(3, 0, 1, 2))
    if r.mask is not None:
        values = np.asarray(r.mask, dtype=np.float32) / 255.0
        mask = np.ascontiguousarray(np.broadcast_to(values, (r.num_frames, r.height, r.width))[None])
    if r.reference_images:
        references = np.stack(
            [_fit_on_canvas(im, r.height, r.width, spatial_stride) for im in r.reference_images]
        )
    scale = np.asarray(r.conditioning_scale, dtype=np.float32)
    return {
        "control_pixels": control,
        "control_mask": mask,
        "reference_pixels": references,
        "conditioning_scale": scale,
    }


# -- reading ------------------------------------------------------------------------------------------


def _reference_images(value: Any) -> list[np.ndarray] | None:
    """One image or a list of them (paths, PIL images, (H, W, 3) arrays; an (R, H, W, 3) array) ->
    [uint8 (H, W, 3)] or None for none."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 4:
        value = list(value)
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        return None
    images = []
    for item in items:
        try:
            image = read_image(item)
        except (OSError, ValueError, TypeError) as e:
            raise InvalidRequestError(
                f"reference_images: cannot read the image ({e})", "reference_images"
            ) from None
        images.append(image)
    return images


def _conditioning_scale(value: Any, layers: int) -> list[float]:
    """None (1.0), one number, or a list of one per VACE layer -> ``layers`` floats."""
    if value is None:
        return [1.0] * layers
    if isinstance(value, np.ndarray | torch.Tensor):
        value = value.tolist()
    one = not isinstance(value, list | tuple)
    values = [value] if one else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
            raise InvalidRequestError(
                f"conditioning_scale must be a finite number or a list of them, got {value!r}",
                "conditioning_scale",
            )
    if one:
        return [float(value)] * layers
    if len(values) != layers:
        raise InvalidRequestError(
            f"conditioning_scale has {len(values)} values; this checkpoint has {layers} VACE layers: give "
            f"one number, or {layers} (one per layer)",
            "conditioning_scale",
        )
    return [float(v) for v in values]


def _read_frames(value: Any, param: str) -> np.ndarray:
    """A video file, a list of frames or an (F, H, W, 3) array -> uint8 (F, H, W, 3)."""
    try:
        if isinstance(value, str | os.PathLike):
            if Path(value).suffix.lower() in STILL_IMAGE_SUFFIXES:
                return read_image(value)[None]  # as Pillow reads images (one frame)
            frames, _ = read_video(value)
            return frames
        if isinstance(value, np.ndarray) and value.ndim == 4:
            return np.stack([read_image(f) for f in value])
        if isinstance(value, list | tuple) and value:
            frames = [read_image(f) for f in value]
            if len({f.shape for f in frames}) > 1:
                raise ValueError("the frames differ in size")
            return np.stack(frames)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"{param}: cannot read the frames ({e})", param) from None
    raise InvalidRequestError(
        f"{param} must be a file path, a list of frames or an (F, H, W, 3) array", param
    )


def _read_mask(value: Any) -> np.ndarray:
    """A mask: one image (a still image file, PIL image, (H, W) or (H, W, C) array) or frames (a video
    file, a list, an (F, H, W) or (F, H, W, C) array) -> uint8 (M, H, W) grey levels."""
    if isinstance(value, np.ndarray) and (
        value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (1, 3, 4))
    ):
        value = [value]  # one image
    elif isinstance(value, np.ndarray) and value.ndim == 3:
        value = list(value)  # (F, H, W) grey frames
    elif isinstance(value, Image.Image):
        value = [value]
    frames = _read_frames(value, "mask")
    return np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in frames])


# -- preprocessing ------------------------------------------------------------------------------------


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H0, W0[, 3]) -> uint8 (height, width[, 3]), PIL Lanczos (the same image when no resize)."""
    image = Image.fromarray(frame)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(image)


def _fit_on_canvas(image: np.ndarray, height: int, width: int, stride: int) -> np.ndarray:
    """A reference image uint8 (h, w, 3) -> float32 (3, height, width) in [-1, 1]: its size cut down to
    a multiple of ``stride`` (Lanczos), then scaled to fit inside (bilinear, aspect kept) and centred on
    a white canvas, as diffusers' ``preprocess_conditions`` does."""
    h0, w0 = image.shape[:2]
    h1, w1 = max(h0 // stride, 1) * stride, max(w0 // stride, 1) * stride
    pixels = torch.from_numpy(_resize(image, h1, w1).astype(np.float32) / 255.0)
    pixels = (2.0 * pixels - 1.0).permute(2, 0, 1).unsqueeze(0)
    scale = min(height / h1, width / w1)
    new_h, new_w = int(h1 * scale), int(w1 * scale)
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return canvas.numpy()
