from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import tiny

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan 2.1 T2V checkpoint (UniPC scheduler) in the diffusers layout."""
    return tiny.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "wan-tiny")


@pytest.fixture(scope="session")
def reference_pipe(tiny_ckpt: Path):
    return tiny.load_reference(tiny_ckpt)


@pytest.fixture(scope="session")
def wan_pipe(tiny_ckpt: Path):
    from wanpipe import WanPipeline

    return WanPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="float32")


@pytest.fixture
def dit_rows(wan_pipe, monkeypatch) -> list[int]:
    """The batch rows of every DiT forward (one per denoising step; cond and uncond rows when guided)."""
    rows: list[int] = []
    runner = wan_pipe.executor.runner
    forward = runner.forward

    def counted(dit, latents, *args, **kwargs):
        rows.append(latents.shape[0])
        return forward(dit, latents, *args, **kwargs)

    monkeypatch.setattr(runner, "forward", counted)
    return rows


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (tests/postgres.py), started once per session; skipped without its binaries."""
    from tests.postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package: .ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e .[test])")
    if os.getuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(
                "running as root without a postgres user to run the server as (Debian's package adds it)"
            )
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return postgres_server.new_database()
