"""Where the server's uploads and videos live (``wanpipe.serving.media_store``): a local folder, a shared
folder (``--media-dir``) or S3-compatible object storage (``--media s3://...``).

S3 is moto's standalone server (an emulator of the S3 API) started on a loopback port by a fixture and
reached through boto3 over HTTP exactly as AWS would be: endpoint and credentials come from the usual AWS
environment variables. Checked: the store's semantics on both backends; atomic writes (a write that
fails half-way, a multipart upload cut after its first part, leave no object and no file); ``wanpipe
serve --media s3://...`` end to end with an image-to-video upload, read back by a second process with
``--media-redirect``; two servers over one ``--media-dir`` serving each other's videos; bad media
configuration stopping ``wanpipe serve`` within seconds with one line on stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving_helpers import ServerProcess, ThreadServer, png_bytes, read_mp4, wait_until
from wanpipe.serving.media_store import (
    LocalMedia,
    MediaStore,
    array_key,
    input_key,
    read_input,
    thumbnail_key,
    video_key,
    write_input,
    write_video,
)

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "wanpipe-test",
    "AWS_SECRET_ACCESS_KEY": "wanpipe-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port; the AWS variables point boto3 at it for the module's tests."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": url})
    try:
        wait_until(lambda: _answers(url), 30, "moto's S3 server")
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        return False


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"wanpipe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def media(request: pytest.FixtureRequest, tmp_path: Path) -> MediaStore:
    if request.param == "local":
        return LocalMedia(tmp_path / "media", shared=True)
    from wanpipe.serving.media_s3 import S3Media

    request.getfixturevalue("s3_endpoint")
    return S3Media.from_url(f"s3://{request.getfixturevalue('bucket')}/some/prefix")


def test_store_semantics(media: MediaStore, tmp_path: Path) -> None:
    media.check()
    key = video_key("video_abc")
    assert not media.exists(key) and media.keys("videos/") == []
    with pytest.raises(FileNotFoundError):
        media.get(key)
    with pytest.raises(FileNotFoundError):
        media.open(key)
    media.put(key, b"first")
    media.put(key, b"second version")  # replaced whole
    assert media.exists(key) and media.get(key) == b"second version"
    with media.open(key) as stream:
        assert stream.read(6) + stream.read() == b"second version"
    with media.writing(thumbnail_key("video_abc"), ".jpg") as path:
        assert path.suffix == ".jpg"
        path.write_bytes(b"jpeg bytes")
    picture = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    write_input(media, input_key("video_abc", "image"), picture)
    write_input(media, array_key("video_abc", "video"), frames)
    write_input(media, input_key("video_abd", "image"), picture)  # another job: not under "video_abc."
    assert np.array_equal(read_input(media, input_key("video_abc", "image")), picture)
    assert np.array_equal(read_input(media, array_key("video_abc", "video")), frames)
    assert media.keys("videos/") == ["videos/video_abc.jpg", "videos/video_abc.mp4"]
    assert media.keys("inputs/video_abc.") == ["inputs/video_abc.image.png", "inputs/video_abc.video.npy"]
    media.delete(key)
    media.delete(key)  # absent: nothing happens
    assert not media.exists(key) and media.keys("videos/") == ["videos/video_abc.jpg"]
    if isinstance(media, LocalMedia):  # the layout of --output-dir, wherever the folder is
        assert (tmp_path / "media" / "inputs" / "video_abc.image.png").is_file()
        assert media.path(thumbnail_key("video_abc")) == tmp_path / "media" / "videos" / "video_abc.jpg"
    else:
        names = boto3.client("s3").list_objects_v2(Bucket=media.bucket)["Contents"]
        assert "some/prefix/videos/video_abc.jpg" in {item["Key"] for item in names}


def _visible(media: MediaStore) -> list[str]:
    """Every key and, for a local folder, every file (temporary ones too)."""
    if isinstance(media, LocalMedia):
        return sorted(str(p.relative_to(media.root)) for p in media.root.rglob("*") if p.is_file())
    answer = boto3.client("s3").list_objects_v2(Bucket=media.bucket)
    return sorted(item["Key"] for item in answer.get("Contents", ()))


def test_a_failed_write_leaves_nothing(media: MediaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = video_key("video_x")
    with pytest.raises(RuntimeError, match="cut"), media.writing(key, ".mp4") as path:
        path.write_bytes(b"half a video")
        raise RuntimeError("cut in the middle of the write")
    assert not media.exists(key) and _visible(media) == []
    media.put(key, b"the whole video")
    with pytest.raises(RuntimeError), media.writing(key) as path:  # a failed rewrite keeps the old one
        path.write_bytes(b"half")
        raise RuntimeError("cut")
    assert media.get(key) == b"the whole video"
    media.delete(key)

    # write_video: the thumbnail fails after the video was stored -> neither stays
    from wanpipe.media import Video

    save = Video.save

    def failing_save(self, path, *, format=None, **kw):
        if format == "jpg":
            raise OSError("no room for the thumbnail")
        return save(self, path, format=format, **kw)

    monkeypatch.setattr(Video, "save", failing_save)
    frames = np.full((5, 16, 16, 3), 0.5, np.float32)
    with pytest.raises(OSError, match="thumbnail"):
        write_video(media, "video_y", frames, 16.0)
    assert _visible(media) == []
    monkeypatch.setattr(Video, "save", save)
    write_video(media, "video_y", frames, 16.0)
    assert sorted(media.keys("videos/")) == ["videos/video_y.jpg", "videos/video_y.mp4"]
    assert media.get(video_key("video_y"))[4:8] == b"ftyp"


def test_a_multipart_upload_cut_after_its_first_part_leaves_no_object(bucket: str) -> None:
    """A video larger than boto3's multipart threshold (8 MiB) goes up in parts; the upload fails at its
    second part: no object under the key, the multipart upload aborted (no parts kept)."""
    from wanpipe.serving.media_s3 import S3Media

    media = S3Media(bucket, "cut")
    parts: list[int] = []

    def cut(params, **kwargs):
        parts.append(params["PartNumber"])
        if len(parts) == 2:
            raise ConnectionError("the network went away after the first part")

    media.client.meta.events.register("before-parameter-build.s3.UploadPart", cut)
    key = video_key("video_big")
    with pytest.raises(Exception, match="network went away"), media.writing(key, ".mp4") as path:
        path.write_bytes(os.urandom(20 * 2**20))
    assert len(parts) >= 2, parts
    assert not media.exists(key) and media.keys("videos/") == []
    s3 = boto3.client("s3")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    media.client.meta.events.unregister("before-parameter-build.s3.UploadPart", cut)
    with media.writing(key, ".mp4") as path:
        path.write_bytes(b"\0" * (9 * 2**20))
    assert s3.head_object(Bucket=bucket, Key=f"cut/{key}")["ContentLength"] == 9 * 2**20


def _wait_completed(http: httpx.Client, job_id: str, timeout: float = 120) -> None:
    def completed() -> bool:
        body = http.get(f"/v1/videos/{job_id}").json()
        assert body["status"] != "failed", body
        return body["status"] == "completed"

    wait_until(completed, timeout, f"{job_id} to complete")


def _i2v_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import tiny_family

    folder = tmp_path_factory.mktemp("i2v") / "ckpt"
    tiny_family.i2v_14b(folder)
    return folder


def test_serve_with_s3_media_end_to_end(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    """``wanpipe serve --media s3://...`` on an image-to-video checkpoint: the upload and the video are
    objects in the bucket (none in the output folder); a second process (the same job database, the same
    bucket, ``--media-redirect``) answers the content with a redirect to a presigned URL of the same
    bytes."""
    checkpoint = _i2v_checkpoint(tmp_path_factory)
    out = tmp_path / "jobs"
    args = ("--model", str(checkpoint), "--output-dir", str(out), "--media", f"s3://{bucket}/wan")
    env = {"OMP_NUM_THREADS": "1", **AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    first = ServerProcess(*args, env=env)
    try:
        assert f"media in s3://{bucket}/wan" in "".join(first.output)
        first.wait_ready(120)
        with httpx.Client(base_url=first.url, timeout=60) as http:
            picture = png_bytes(32, 32, seed=3)
            created = http.post(
                "/v1/videos",
                data={"prompt": "the picture moves", "seed": "7", **{k: str(v) for k, v in SMALL.items()}},
                files={"input_reference": ("first.png", picture, "image/png")},
            )
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            assert created.json()["parameters"]["image"] is True
            _wait_completed(http, job_id, 180)
            content = http.get(f"/v1/videos/{job_id}/content")
            assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
            thumbnail = http.get(f"/v1/videos/{job_id}/content", params={"variant": "thumbnail"})
            assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"
    finally:
        first.terminate()
    s3 = boto3.client("s3")
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"wan/videos/{job_id}.mp4", f"wan/videos/{job_id}.jpg", f"wan/inputs/{job_id}.image.png"}
    stored = s3.get_object(Bucket=bucket, Key=f"wan/videos/{job_id}.mp4")["Body"].read()
    assert stored == content.content
    frames, _ = read_mp4(content.content, tmp_path)
    assert frames.shape == (5, 32, 32, 3)
    assert not (out / "videos").exists() and not (out / "inputs").exists()  # nothing local

    second = ServerProcess(*args, "--media-redirect", env=env)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as http:
            moved = http.get(f"/v1/videos/{job_id}/content")
            assert moved.status_code == 307, moved.text
            assert moved.headers["location"].startswith(f"{s3_endpoint}/{bucket}/wan/videos/{job_id}.mp4?")
            fetched = httpx.get(moved.headers["location"], timeout=30)
            assert fetched.status_code == 200 and fetched.content == content.content
            assert fetched.headers["content-type"] == "video/mp4"
            missing = http.get(f"/v1/videos/{job_id}/content")  # a deleted object: 404, not a dead link
            s3.delete_object(Bucket=bucket, Key=f"wan/videos/{job_id}.mp4")
            missing = http.get(f"/v1/videos/{job_id}/content")
            assert missing.status_code == 404 and "missing from the media store" in missing.text
    finally:
        second.terminate()


def test_two_servers_over_one_media_dir_serve_each_others_videos(tiny_ckpt: Path, tmp_path: Path) -> None:
    """Two app instances, each with its own worker and pipeline, over one ``--media-dir`` (the job rows in
    one SQLite file opened by both, as a PostgreSQL store would share them): a video one of them made is
    served by the other, byte for byte."""
    from wanpipe import WanPipeline
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.store import JobStore

    shared = tmp_path / "nfs"
    managers = []
    for _ in range(2):
        pipe = WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")
        store = JobStore(tmp_path / "db", exclusive=False, media=LocalMedia(shared, shared=True))
        managers.append(JobManager(store, lambda pipe=pipe: pipe, model_name="wan-tiny"))
    a, b = managers
    with ThreadServer(create_app(a)) as server_a, ThreadServer(create_app(b)) as server_b:
        assert a.wait_ready(60) and b.wait_ready(60)
        made: dict[str, tuple[str, bytes]] = {}
        for maker, other, url in ((a, b, server_a.url), (b, a, server_b.url)):
            other.pause()  # the job runs on the maker
            maker.resume()
            with httpx.Client(base_url=url, timeout=60) as http:
                job = http.post("/v1/videos", json={"prompt": "a cat", "seed": len(made), **SMALL}).json()
                _wait_completed(http, job["id"])
                made[url] = (job["id"], http.get(f"/v1/videos/{job['id']}/content").content)
        for url, reader in ((server_a.url, server_b.url), (server_b.url, server_a.url)):
            job_id, data = made[url]
            served = httpx.get(f"{reader}/v1/videos/{job_id}/content", timeout=30)
            assert served.status_code == 200 and served.content == data and data[4:8] == b"ftyp"
    names = sorted(p.name for p in (shared / "videos").iterdir())
    assert names == sorted(f"{job_id}.{ext}" for job_id, _ in made.values() for ext in ("jpg", "mp4"))
    assert list((tmp_path / "db" / "videos").glob("*")) == []  # the job folder holds no media


def test_serve_media_dir_keeps_the_files_there(tiny_ckpt: Path, tmp_path: Path) -> None:
    """``wanpipe serve --media-dir DIR``: the job database in --output-dir, the video in DIR."""
    out, shared = tmp_path / "jobs", tmp_path / "mount"
    server = ServerProcess(
        "--model", str(tiny_ckpt), "--output-dir", str(out), "--media-dir", str(shared),
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert f"media in {shared}" in "".join(server.output)
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            job = http.post("/v1/videos", json={"prompt": "a cat", "seed": 5, **SMALL}).json()
            _wait_completed(http, job["id"])
            content = http.get(f"/v1/videos/{job['id']}/content").content
    finally:
        server.terminate()
    assert (shared / "videos" / f"{job['id']}.mp4").read_bytes() == content
    assert (out / "jobs.sqlite3").is_file() and not (out / "videos").exists()


def _serve_fails(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, list[str], float]:
    command = [sys.executable, "-m", "wanpipe", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    t0 = time.monotonic()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        cwd=tmp_path,
    )
    return done.returncode, done.stderr.splitlines(), time.monotonic() - t0


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("missing bucket", "does not exist"),
        ("unreachable endpoint", "cannot reach the S3 endpoint"),
        ("bad URL", "expected s3://BUCKET"),
        ("bad bucket name", "is not a bucket name"),
        ("redirect without S3", "--media-redirect needs"),
        ("media dir is a file", "--media-dir"),
    ],
)
def test_bad_media_configuration_stops_serve_with_one_line(
    case: str, named: str, tiny_ckpt: Path, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    media = ["--media", f"s3://{bucket}-missing/videos"]
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_free_port()}"
        media = ["--media", f"s3://{bucket}"]
    elif case == "bad URL":
        media = ["--media", f"https://{bucket}/videos"]
    elif case == "bad bucket name":
        media = ["--media", "s3://Not_A_Bucket/x"]
    elif case == "redirect without S3":
        media = ["--media-redirect"]
    elif case == "media dir is a file":
        (tmp_path / "a-file").write_text("not a folder")
        media = ["--media-dir", str(tmp_path / "a-file")]
    args = ["--model", str(tiny_ckpt), "--output-dir", str(tmp_path / "out"), *media]
    code, stderr, seconds = _serve_fails(args, env, tmp_path)
    print(f"\n{case}: exit {code} after {seconds:.1f} s: {stderr}")
    assert code != 0 and len(stderr) == 1, stderr
    assert named in stderr[0] and stderr[0].startswith(("wanpipe serve: error:", "wanpipe: error:")), stderr
    if case == "missing bucket":
        assert f"{bucket}-missing" in stderr[0]
    if case == "unreachable endpoint":
        assert env["AWS_ENDPOINT_URL"] in stderr[0]
    assert seconds < 30  # the interpreter's start and imports, then at most two 3 s connection attempts
