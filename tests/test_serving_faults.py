"""wanpipe serve under faults: the output disk fills up, the job database on start is corrupt or unreadable.

(A job of a batch that raises, and deleting one job of a running batch, are in test_serving_api.py.)
Figures and commands: docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import Gate, ThreadServer, wait_until
from tests.test_serving_store import make_job
from wanpipe.serving.app import create_app
from wanpipe.serving.manager import JobManager
from wanpipe.serving.parsing import ServeLimits
from wanpipe.serving.step_gate import StepGate
from wanpipe.serving.store import JobStatus, JobStore

SMALL = {"size": "32x32", "num_frames": 5, "num_inference_steps": 2}
# A job whose mp4 is ~145 KB (measured on the tiny checkpoint): far more than the room left on the disk.
BIG = {"size": "256x256", "num_frames": 9, "num_inference_steps": 2, "seed": 5}
ROOM_LEFT = 48 * 1024  # enough for the store's few WAL pages, not for BIG's video


def _is_root() -> bool:
    return os.geteuid() == 0


def _wait_done(http: httpx.Client, video_id: str) -> dict:
    def done() -> dict | None:
        body = http.get(f"/v1/videos/{video_id}").json()
        return body if body["status"] in ("completed", "failed") else None

    return wait_until(done, 60, f"{video_id} to finish")


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` up, then give back ``leave`` bytes; the filler file's path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


@pytest.fixture
def small_disk():
    """A 4 MiB tmpfs, mounted for the test (root only; CI runs as root)."""
    if not _is_root():
        pytest.skip("mounting a tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="wanpipe-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
        folder.rmdir()


def test_a_full_output_disk_fails_the_job_and_the_server_goes_on(
    wan_pipe, small_disk: Path, tmp_path
) -> None:
    limits = ServeLimits(max_pixels=256 * 256, max_frames=17, max_steps=10)
    manager = JobManager(JobStore(small_disk / "out"), lambda: wan_pipe, model_name="wan-tiny", limits=limits)
    gate = Gate(tmp_path / "gate")
    manager.step_gate = StepGate(gate.folder)
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert manager.wait_ready(60)
        gate.allow(2)
        before = http.post("/v1/videos", json={"prompt": "before", **SMALL}).json()
        assert _wait_done(http, before["id"])["status"] == "completed"

        big = http.post("/v1/videos", json={"prompt": "too big for the disk", **BIG}).json()
        gate.hold_at(2)  # the big job taken (its row says so), held before its first step
        filler = _fill(small_disk, ROOM_LEFT)
        gate.open()
        failed = _wait_done(http, big["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "disk_full", failed
        assert "disk is full" in failed["error"]["message"], failed
        print(f"\nFAULT disk full: {failed['error']}")
        # the server serves on: health, the list, the earlier video
        assert http.get("/health").status_code == 200
        listed = {v["id"]: v["status"] for v in http.get("/v1/videos").json()["data"]}
        assert listed == {before["id"]: "completed", big["id"]: "failed"}
        assert http.get(f"/v1/videos/{before['id']}/content").content[4:8] == b"ftyp"
        assert not [p.name for p in (small_disk / "out" / "videos").iterdir() if p.name.startswith(".")]

        filler.unlink()  # space is back: the same job now succeeds
        again = http.post("/v1/videos", json={"prompt": "too big for the disk", **BIG}).json()
        assert _wait_done(http, again["id"])["status"] == "completed"
        assert len(http.get(f"/v1/videos/{again['id']}/content").content) > ROOM_LEFT
    # the server stopped (the lifespan stopped the manager): the store is whole
    db = sqlite3.connect(small_disk / "out" / "jobs.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
    store = JobStore(small_disk / "out")
    try:
        jobs = {job.id: job for job in store.list(limit=10)[0]}
        assert {i: j.status for i, j in jobs.items()} == {
            before["id"]: JobStatus.COMPLETED,
            big["id"]: JobStatus.FAILED,
            again["id"]: JobStatus.COMPLETED,
        }
        assert jobs[big["id"]].error["code"] == "disk_full"
        assert not store.video_path(big["id"]).exists() and store.video_path(again["id"]).exists()
    finally:
        store.close()


# -- a job database that cannot be read ------------------------------------------------------------
def _database(folder: Path, jobs: int = 300) -> Path:
    """A real job database with ``jobs`` queued rows (several pages), closed cleanly."""
    store = JobStore(folder)
    for _ in range(jobs):
        store.add(make_job())
    store.close()
    return folder / "jobs.sqlite3"


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 200)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damaged_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 4 * page] = bytes(range(256)) * (page // 256)  # a b-tree page of the jobs table
    path.write_bytes(bytes(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve(out: Path, tiny_ckpt: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m wanpipe.serving`` on ``out``, run to its end."""
    args = ["--host", "127.0.0.1", "--port", "0", "--output-dir", str(out), "--model", str(tiny_ckpt)]
    command = [*(prefix or []), sys.executable, "-m", "wanpipe.serving", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _damaged_page], ids=lambda f: f.__name__[1:])
def test_a_corrupt_job_database_is_refused_and_left_as_it_is(damage, tiny_ckpt: Path, tmp_path: Path) -> None:
    path = _database(tmp_path / "out")
    damage(path)
    digest = _sha256(path)
    names = sorted(p.name for p in path.parent.iterdir())
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(sqlite3.DatabaseError):  # what a plain open would run into, sooner or later
        db = sqlite3.connect(copy)
        try:
            db.execute("PRAGMA integrity_check").fetchall()
            db.execute("SELECT * FROM jobs").fetchall()
        finally:
            db.close()
    assert _sha256(path) == digest
    run = _serve(path.parent, tiny_ckpt)
    assert run.returncode == 1, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanpipe serve: error: cannot read the job database"), run
    assert str(path) in lines[0] and "listening" not in run.stdout
    print(f"\nFAULT {damage.__name__[1:]} database: exit {run.returncode}: {lines[0]}")
    assert _sha256(path) == digest  # byte-identical
    assert sorted(p.name for p in path.parent.iterdir()) == names  # no journal left beside it either


def test_an_unreadable_job_database_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A database the server may not read (mode 000; as root, the server runs without the capabilities
    that override file permissions)."""
    path = _database(tmp_path / "out", jobs=3)
    path.chmod(0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # root here may still read it
    prefix = []
    if _is_root():
        if shutil.which("setpriv") is None:
            pytest.skip("as root this needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    run = _serve(path.parent, tiny_ckpt, prefix=prefix)
    assert run.returncode == 1, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanpipe serve: error: cannot read the job database"), run
    assert "unable to open" in lines[0], lines
    print(f"\nFAULT unreadable database: exit {run.returncode}: {lines[0]}")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and path.stat().st_mode & 0o777 == 0
