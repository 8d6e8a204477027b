"""Hostile input to wanpipe serve: uploads that are bombs, animations, videos, truncated or lying about
their type, refused with a 400 before they are decoded; video ids with path characters, a 404.

The decoding checks run without a model (``decode_image`` with a spy on PIL's decoder); the HTTP checks
on one server of the session's tiny pipeline.
"""

from __future__ import annotations

import base64
import http.client as http_client
import io
import struct
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.serving_helpers import ThreadServer, assert_error, png_bytes
from wanpipe.serving.app import create_app
from wanpipe.serving.errors import APIError
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits
from wanpipe.serving.store import JobStore
from wanpipe.serving.uploads import MAX_IMAGE_PIXELS_FACTOR, Upload, decode_image, parse_image, sniff_format

LIMITS = ServeLimits(max_queue=8, max_batch=2, max_pixels=32 * 32, max_frames=5, max_steps=2)
IMAGE_LIMIT = LIMITS.max_image_pixels  # 40 x 1024 = 40960 pixels


# -- hostile files -----------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` pixels, with a few hundred bytes of data: 10^10
    pixels (30 GB decoded) in a file under 1 kB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width), 9)  # one row; the decoder would want them all
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def animation(fmt: str, frames: int = 2000, size: int = 8) -> bytes:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format=fmt, save_all=True, append_images=pictures[1:], duration=40)
    return buffer.getvalue()


def jpeg_bytes(height: int = 16, width: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mp4_bytes(tmp_path_factory) -> bytes:
    """An mp4 with 2000 frames."""
    from wanpipe.media import Video

    path = tmp_path_factory.mktemp("mp4") / "long.mp4"
    frames = np.random.default_rng(1).integers(0, 255, (2000, 16, 16, 3), dtype=np.uint8)
    Video.from_uint8(frames, fps=24).save(path)
    return path.read_bytes()


@pytest.fixture
def decoder_calls(monkeypatch) -> list[str]:
    """The formats PIL's decoder (``ImageFile.load`` with tiles to decode) ran on: empty while every file
    was refused from its first bytes or its header."""
    calls: list[str] = []
    load = ImageFile.ImageFile.load

    def spy(self):
        if self.tile:
            calls.append(self.format)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def refused(data: bytes, **kwargs) -> str:
    with pytest.raises(APIError) as info:
        decode_image(data, "input_reference", max_pixels=IMAGE_LIMIT, **kwargs)
    error = info.value
    assert error.status == 400 and error.param == "input_reference" and error.code == "invalid_image"
    return error.message


# -- decoding, without a server ------------------------------------------------------------------------
def test_a_good_image_decodes_once(decoder_calls) -> None:
    image = decode_image(
        png_bytes(24, 40), "input_reference", max_pixels=IMAGE_LIMIT, content_type="image/png"
    )
    assert image.shape == (24, 40, 3) and image.dtype == np.uint8
    assert decoder_calls == ["PNG"]
    upload = Upload(jpeg_bytes(), "photo.JPG", "application/octet-stream")  # no claim but the name's
    assert parse_image(upload, "input_reference", max_pixels=IMAGE_LIMIT).shape == (16, 16, 3)


def test_a_decompression_bomb_is_refused_from_its_header(decoder_calls) -> None:
    data = bomb_png()
    assert len(data) < 1000
    message = refused(data, content_type="image/png")
    assert "100000x100000" in message or "too large" in message
    # Under PIL's own bomb limit, but over the server's: refused with the server's figure.
    message = refused(bomb_png(300, 300))
    assert "300x300 (90000 pixels)" in message and f"{IMAGE_LIMIT}" in message
    assert f"{MAX_IMAGE_PIXELS_FACTOR} x --max-pixels" in message
    assert decoder_calls == []


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_an_animation_with_thousands_of_frames_is_refused_from_its_header(fmt, decoder_calls) -> None:
    data = animation(fmt)
    message = refused(data)
    assert f"animated {fmt}" in message and "still image" in message
    assert decoder_calls == []


def test_a_video_is_not_an_image(mp4_bytes, decoder_calls) -> None:
    assert sniff_format(mp4_bytes) == "MP4"
    assert "this is a video (MP4)" in refused(mp4_bytes)
    assert "this is a video (MP4)" in refused(mp4_bytes, content_type="image/png", filename="still.png")
    assert "is a video (content type video/mp4)" in refused(b"\x00" * 64, content_type="video/mp4")
    assert "is a video (file name 'clip.mov')" in refused(png_bytes(8, 8), filename="clip.mov")
    assert decoder_calls == []


def test_bytes_that_lie_about_their_type(decoder_calls) -> None:
    message = refused(jpeg_bytes(), content_type="image/png")
    assert "content type image/png says PNG, but the bytes are a JPEG image" in message
    message = refused(png_bytes(8, 8), filename="photo.jpg")
    assert "file name 'photo.jpg' says JPEG, but the bytes are a PNG image" in message
    assert "not an image this server reads" in refused(b"GARBAGE" * 20, content_type="image/png")
    assert "not an image this server reads" in refused(b"%!PS-Adobe-3.0 EPSF-3.0\n" * 4)  # no EPS
    tiff = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiff, format="TIFF")
    assert "a TIFF image; send PNG, JPEG" in refused(tiff.getvalue(), content_type="image/tiff")
    assert decoder_calls == []
    # a data URL's media type is a claim too
    url = "data:image/png;base64," + base64.b64encode(jpeg_bytes()).decode()
    with pytest.raises(APIError, match="says PNG, but the bytes are a JPEG"):
        parse_image(url, "last_image", max_pixels=IMAGE_LIMIT)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_refused(fmt) -> None:
    buffer = io.BytesIO()
    picture = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(buffer, format=fmt)
    data = buffer.getvalue()
    message = refused(data[: len(data) // 2])
    assert "cannot read the image, truncated or corrupt?" in message
    assert "cannot read" in refused(data[:12])  # cut inside the header


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(wan_pipe, tmp_path_factory):
    store = JobStore(tmp_path_factory.mktemp("uploads") / "out")
    manager = JobManager(store, lambda: wan_pipe, model_name="wan-tiny", limits=LIMITS)
    with ThreadServer(create_app(manager)) as srv:
        assert manager.wait_ready(60)
        srv.manager = manager
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


FORM = {"prompt": "the picture comes alive", "size": "32x32", "num_frames": "1", "num_inference_steps": "1"}


def test_hostile_uploads_over_http(http, mp4_bytes, decoder_calls) -> None:
    cases = [
        (("bomb.png", bomb_png(), "image/png"), "too large"),
        (("big.png", bomb_png(300, 300), "image/png"), "more than this server decodes"),
        (("anim.png", animation("PNG"), "image/png"), "animated PNG"),
        (("anim.gif", animation("GIF"), "image/gif"), "animated GIF"),
        (("clip.mp4", mp4_bytes, "video/mp4"), "is a video"),
        (("still.png", mp4_bytes, "image/png"), "this is a video (MP4)"),
        (("photo.png", jpeg_bytes(), "image/png"), "the bytes are a JPEG image"),
        (("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png"), "cannot read the image"),
        (("a.png", png_bytes(32, 32)[:100], "image/png"), "cannot read the image"),
    ]
    for upload, words in cases:
        response = http.post("/v1/videos", data=FORM, files={"input_reference": upload})
        error = assert_error(response, 400, "input_reference", "invalid_image")
        assert words in error["message"], (upload[0], error)
    # Only the truncated PNG reached PIL's decoder (and failed there); the rest were refused from
    # their first bytes or their header.
    assert decoder_calls == ["PNG"], decoder_calls
    # as data URLs, in both APIs
    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    json_body = {**FORM, "num_frames": 1, "num_inference_steps": 1, "input_reference": url}
    assert_error(http.post("/v1/videos", json=json_body), 400, "input_reference", "invalid_image")
    message = {
        "role": "user",
        "content": [{"type": "input_text", "text": "go"}, {"type": "input_image", "image_url": url}],
    }
    assert_error(http.post("/v1/responses", json={"input": [message]}), 400, "input", "invalid_image")
    # the server goes on: a plain image reaches the engine (a text-to-video checkpoint refuses it)
    response = http.post(
        "/v1/videos", data=FORM, files={"input_reference": ("a.png", png_bytes(32, 32), "image/png")}
    )
    assert "text-to-video" in assert_error(response, 400, "input_reference")["message"]


def raw_request(url: str, method: str, path: str) -> tuple[int, dict]:
    """A request whose path goes out byte for byte (httpx would normalize ``..`` and encodings)."""
    parts = urlsplit(url)
    connection = http_client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "video_id",
    [
        "..%2F..%2Fjobs.sqlite3",
        "%2E%2E",
        "..",
        "video_%00",
        "%2Fetc%2Fpasswd",
        "video_" + "a" * 5000,
        "video_%2e%2e%5c%2e%2e%5cjobs.sqlite3",
    ],
)
def test_ids_with_path_characters_are_404(server, video_id) -> None:
    store = server.manager.store
    assert (store.folder / "jobs.sqlite3").is_file()
    for method, suffix in (
        ("GET", ""),
        ("GET", "/content"),
        ("GET", "/content?variant=thumbnail"),
        ("DELETE", ""),
    ):
        status, body = raw_request(server.url, method, f"/v1/videos/{video_id}{suffix}")
        assert status == 404, (method, video_id, status, body[:200])
        assert b'"error"' in body and b"SQLite" not in body
    assert (store.folder / "jobs.sqlite3").is_file()


def test_path_helpers_stay_in_the_output_dir(server, tmp_path: Path) -> None:
    """Only ids the store made reach a path, and content is served from the videos folder alone."""
    from wanpipe.serving.app import VIDEO_ID

    for bad in ("../x", "a/b", "a\\b", "x\x00", "", "v" * 65, "video_é"):
        assert VIDEO_ID.fullmatch(bad) is None
    from wanpipe.serving.store import new_job_id

    assert VIDEO_ID.fullmatch(new_job_id())
