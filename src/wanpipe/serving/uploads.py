"""Uploaded images and videos, checked before they are decoded.

An upload is checked from its first bytes and its header before anything is decoded: its real type
(magic bytes) against the type it claims (content type, file name, data URL), a video or an animation
refused as such where an image is wanted, its size against the server's limit. Only then is its one
frame decoded. A video (VACE's control video, a mask given as frames) is decoded frame by frame up to
the server's frame limit, its frame size read from the stream before the first frame.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from wanpipe.serving.errors import APIError, invalid, shown

DEFAULT_MAX_PIXELS = 1280 * 720
"""``--max-pixels``' default (``ServeLimits.max_pixels``)."""
# An uploaded image may have this many times --max-pixels pixels (36.9 M at the default 1280x720: a
# 24-megapixel photo passes); a larger one is refused from its header, before it is decoded.
MAX_IMAGE_PIXELS_FACTOR = 40
DEFAULT_MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS_FACTOR * DEFAULT_MAX_PIXELS

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may open here (no EPS, TIFF, PSD, ...)
ACCEPTED_IMAGES = "PNG, JPEG, WebP, GIF or BMP"
_IMAGE_TYPES = {
    "image/png": "PNG",
    "image/apng": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
}
_IMAGE_EXTENSIONS = {
    ".png": "PNG",
    ".apng": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
}
_VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".3gp")


@dataclass(frozen=True)
class Upload:
    """A file of a multipart form: its bytes, and the name and content type the client gave it."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


def sniff_format(data: bytes) -> str | None:
    """The format the first bytes show: an image format of PIL's, a video container, or None."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM"):
        return "BMP"
    if head[4:8] == b"ftyp":
        return "MP4" if head[8:12] != b"qt  " else "QuickTime"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/Matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "AVI"
    if head.startswith(b"II*\x00") or head.startswith(b"MM\x00*"):
        return "TIFF"
    return None


_VIDEO_FORMATS = ("MP4", "QuickTime", "WebM/Matroska", "AVI")


def _claimed_format(content_type: str | None, filename: str | None) -> tuple[str, str] | None:
    """(format, what said so) the client claims: its content type, else its file name's extension.
    ``application/octet-stream`` and unknown names claim nothing."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in _IMAGE_TYPES:
        return _IMAGE_TYPES[media], f"content type {media}"
    if media.startswith("video/"):
        return "video", f"content type {media}"
    if media.startswith("image/"):
        return media.removeprefix("image/").upper(), f"content type {media}"
    suffix = Path(filename).suffix.lower() if filename else ""
    if suffix in _IMAGE_EXTENSIONS:
        return _IMAGE_EXTENSIONS[suffix], f"file name {filename!r}"
    if suffix in _VIDEO_EXTENSIONS:
        return "video", f"file name {filename!r}"
    return None


def _bad_image(param: str, message: str) -> APIError:
    return invalid(f"{param}: {message}", param, "invalid_image")


def decode_image(
    data: bytes,
    param: str,
    *,
    max_pixels: int | None = None,
    content_type: str | None = None,
    filename: str | None = None,
) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, GIF, BMP) -> uint8 (H, W, 3), EXIF orientation applied.

    Refused with a 400 before decoding: an empty file, a video, bytes of another type than the one the
    client names (``content_type``, ``filename``), an image format not in :data:`IMAGE_FORMATS`, an
    animation, more than ``max_pixels`` pixels (read from the header: a decompression bomb is never
    decoded). A truncated or corrupt file is refused when its decoding fails."""
    max_pixels = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise _bad_image(param, "the image is empty")
    found = sniff_format(data)
    if found in _VIDEO_FORMATS:
        raise _bad_image(
            param, f"this is a video ({found}), not an image: send one frame as {ACCEPTED_IMAGES}"
        )
    claim = _claimed_format(content_type, filename)
    if claim is not None:
        claimed, said = claim
        if claimed == "video":
            raise _bad_image(param, f"the upload is a video ({said}), not an image: send {ACCEPTED_IMAGES}")
        if found is not None and found != claimed:
            raise _bad_image(
                param,
                f"the {said} says {claimed}, but the bytes are a {found} image: the file lies about its type",
            )
    if found not in IMAGE_FORMATS:
        what = f"a {found} image" if found is not None else "not an image this server reads"
        raise _bad_image(param, f"the file is {what}; send {ACCEPTED_IMAGES}")
    try:
        with Image.open(BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise _bad_image(
                    param,
                    f"the image is {width}x{height} ({width * height} pixels), more than this server "
                    f"decodes ({max_pixels}: {MAX_IMAGE_PIXELS_FACTOR} x --max-pixels)",
                )
            if image.format in ("PNG", "GIF", "WEBP") and getattr(image, "is_animated", False):
                raise _bad_image(
                    param, f"the image is an animated {image.format}: send a still image (one frame)"
                )
            image.load()
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad_image(param, f"the image is too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise _bad_image(param, f"cannot read the image, truncated or corrupt? ({e})") from None


def decode_data_url(url: str, param: str, *, max_pixels: int | None = None) -> np.ndarray:
    """``data:image/png;base64,...`` -> uint8 (H, W, 3). Web URLs are refused: the server fetches nothing."""
    data, content_type = data_url_bytes(url, param)
    return decode_image(data, param, max_pixels=max_pixels, content_type=content_type)


def data_url_bytes(url: str, param: str, kind: str = "image") -> tuple[bytes, str | None]:
    """``data:TYPE;base64,...`` -> (the bytes, TYPE or None). Web URLs are refused. ``kind``: what the
    field holds, "image" or "video" (its messages and error code)."""
    example = "data:video/mp4;base64,..." if kind == "video" else "data:image/png;base64,..."
    code = f"invalid_{kind}"
    if re.match(r"(?i)https?://", url):
        raise invalid(
            f"{param}: this server does not fetch URLs; send the {kind} as a file upload or a "
            f"data URL ({example})",
            param,
            "unsupported_url",
        )
    match = re.fullmatch(r"(?s)data:([\w.+/-]*)((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", url.strip())
    if match is None:
        raise invalid(f"{param} must be an {kind} upload or a base64 data URL ({example})", param, code)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match.group(3)), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URL is not valid base64", param, code) from None
    return data, match.group(1) or None


def parse_image(value: Any, param: str, *, max_pixels: int | None = None) -> np.ndarray:
    """An upload (:class:`Upload` or bytes), a data URL, or ``{"image_url": ...}`` (OpenAI's
    ImageInputReferenceParam)."""
    if isinstance(value, Upload):
        return decode_image(
            value.data, param, max_pixels=max_pixels, content_type=value.content_type, filename=value.filename
        )
    if isinstance(value, bytes):
        return decode_image(value, param, max_pixels=max_pixels)
    if isinstance(value, str):
        return decode_data_url(value, param, max_pixels=max_pixels)
    if isinstance(value, Mapping):
        if "file_id" in value and "image_url" not in value:
            raise invalid(
                f"{param}: file ids are not supported here; upload the image or send a data URL",
                param,
                "unsupported_file_id",
            )
        unknown = sorted(set(value) - {"image_url"})
        if unknown or not isinstance(value.get("image_url"), str):
            raise invalid(f'{param} must be an upload, a data URL or {{"image_url": "data:..."}}', param)
        return decode_data_url(value["image_url"], param, max_pixels=max_pixels)
    raise invalid(f"{param} must be an image upload or a data URL, got {shown(value)}", param)


# ---------------------------------------------------------------------------------------------------------
# Videos (VACE's control video; a mask given as frames)

MAX_VIDEO_PIXELS_FACTOR = 4
"""A frame of an uploaded video may have this many times --max-pixels pixels (3.7 M at the default:
1440p passes); the video is resized to the output size."""
ACCEPTED_VIDEOS = "MP4, MOV, WebM/Matroska, AVI, or an animated GIF or WebP"


def _bad_video(param: str, message: str) -> APIError:
    return invalid(f"{param}: {message}", param, "invalid_video")


def _upload_bytes(value: Any, param: str, kind: str) -> tuple[bytes, str | None, str | None]:
    """An upload, bytes or a data URL -> (bytes, content type, file name); ``kind``: "image" or "video"."""
    if isinstance(value, Upload):
        return value.data, value.content_type, value.filename
    if isinstance(value, bytes):
        return value, None, None
    if isinstance(value, str):
        data, content_type = data_url_bytes(value, param, kind)
        return data, content_type, None
    raise invalid(
        f"{param} must be an {kind} upload or a base64 data URL, got {shown(value)}", param, f"invalid_{kind}"
    )


def _animated(data: bytes) -> bool:
    try:
        with Image.open(BytesIO(data), formats=("GIF", "WEBP")) as image:
            return bool(getattr(image, "is_animated", False))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error):
        return False


def decode_video(
    data: bytes,
    param: str,
    *,
    max_frames: int,
    max_pixels: int,
    content_type: str | None = None,
    filename: str | None = None,
) -> np.ndarray:
    """Encoded video bytes (MP4, MOV, WebM, AVI; an animated GIF or WebP) -> uint8 (F, H, W, 3).

    Refused with a 400: an empty file, a file that is no video (from its first bytes), a still image
    named as a video or a video named as an image, frames of more than ``max_pixels`` pixels (read
    before the first frame is decoded), more than ``max_frames`` frames (decoding stops there), a
    truncated or corrupt file."""
    if not data:
        raise _bad_video(param, "the video is empty")
    found = sniff_format(data)
    animation = found in ("GIF", "WEBP") and _animated(data)
    claim = _claimed_format(content_type, filename)
    if claim is not None and claim[0] != "video" and not (animation and claim[0] == found):
        raise _bad_video(param, f"the {claim[1]} says {claim[0]}, not a video: send {ACCEPTED_VIDEOS}")
    if animation:
        frames = _pillow_frames(data, param, max_frames, max_pixels)
    elif found in _VIDEO_FORMATS:
        frames = _pyav_frames(data, param, max_frames, max_pixels)
    else:
        what = f"a still {found} image" if found in IMAGE_FORMATS else "not a video this server reads"
        raise _bad_video(param, f"the file is {what}; send {ACCEPTED_VIDEOS}")
    if not frames:
        raise _bad_video(param, "the video has no frames")
    return np.stack(frames)


def _check_frames(param: str, width: int, height: int, count: int, max_frames: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _bad_video(
            param,
            f"the frames are {width}x{height} ({width * height} pixels), more than this server decodes "
            f"({max_pixels}: {MAX_VIDEO_PIXELS_FACTOR} x --max-pixels)",
        )
    if count > max_frames:
        raise _bad_video(param, f"the video has more than {max_frames} frames (--max-frames)")


def _pyav_frames(data: bytes, param: str, max_frames: int, max_pixels: int) -> list[np.ndarray]:
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(BytesIO(data)) as container:
            if not container.streams.video:
                raise _bad_video(param, "the file has no video stream")
            stream = container.streams.video[0]
            _check_frames(
                param, stream.codec_context.width, stream.codec_context.height, 0, max_frames, max_pixels
            )
            for frame in container.decode(stream):
                _check_frames(param, frame.width, frame.height, len(frames) + 1, max_frames, max_pixels)
                frames.append(frame.to_ndarray(format="rgb24"))
    except APIError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise _bad_video(param, f"cannot read the video, truncated or corrupt? ({e})") from None
    return frames


def _pillow_frames(data: bytes, param: str, max_frames: int, max_pixels: int) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    try:
        with Image.open(BytesIO(data), formats=("GIF", "WEBP")) as image:
            count = getattr(image, "n_frames", 1)
            _check_frames(param, *image.size, count, max_frames, max_pixels)
            for i in range(count):
                image.seek(i)
                frames.append(np.asarray(image.convert("RGB")).copy())
    except APIError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as e:
        raise _bad_video(param, f"cannot read the animation, truncated or corrupt? ({e})") from None
    return frames


def parse_video(value: Any, param: str, *, max_frames: int, max_pixels: int) -> np.ndarray:
    """A video upload (:class:`Upload` or bytes) or a data URL (``data:video/mp4;base64,...``) ->
    uint8 (F, H, W, 3)."""
    data, content_type, filename = _upload_bytes(value, param, "video")
    return decode_video(
        data,
        param,
        max_frames=max_frames,
        max_pixels=max_pixels,
        content_type=content_type,
        filename=filename,
    )


def parse_frames(
    value: Any, param: str, *, max_frames: int, max_pixels: int, max_image_pixels: int
) -> np.ndarray:
    """A mask: a still image (every frame) or a video / animation (one frame per frame), uploaded or as
    a data URL -> uint8 (M, H, W, 3), M = 1 for a still image."""
    data, content_type, filename = _upload_bytes(value, param, "image")
    found = sniff_format(data)
    if found in _VIDEO_FORMATS or (found in ("GIF", "WEBP") and _animated(data)):
        return decode_video(
            data,
            param,
            max_frames=max_frames,
            max_pixels=max_pixels,
            content_type=content_type,
            filename=filename,
        )
    image = decode_image(
        data, param, max_pixels=max_image_pixels, content_type=content_type, filename=filename
    )
    return image[None]
