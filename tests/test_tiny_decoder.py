"""decoder="tiny": the final video decoded by TAEHV (Python, CLI, server), and refused without one loaded."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.serving_helpers import ThreadServer, assert_error, wait_until
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.models.taehv import TAEHV, TAEHVConfig

SMALL = dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=3)


@pytest.fixture(scope="module")
def taehv_file(tmp_path_factory) -> Path:
    """A random 16-channel TAEHV (taew2_1's shapes) saved as the published files are."""
    torch.manual_seed(0)
    model = TAEHV(TAEHVConfig.taew2_1())
    with torch.no_grad():
        model.decoder[-1].bias.fill_(0.5)  # frames mostly inside [0, 1]
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def tiny_pipe(wan_pipe, taehv_file):
    wan_pipe.load_tiny_vae(taehv_file)
    yield wan_pipe
    wan_pipe.load_tiny_vae(None)


def test_tiny_decoder_decodes_the_final_latents(tiny_pipe, monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, str]] = []
    decode = tiny_pipe.executor.decode

    def spy(latents: torch.Tensor, decoder: str = "vae") -> torch.Tensor:
        seen.append((latents.clone(), decoder))
        return decode(latents, decoder)

    monkeypatch.setattr(tiny_pipe.executor, "decode", spy)
    full = tiny_pipe.generate("a cat", **SMALL, progress=False)
    tiny = tiny_pipe.generate("a cat", **SMALL, decoder="tiny", progress=False)
    assert full.decoder == "vae" and tiny.decoder == "tiny"
    assert [d for _, d in seen] == ["vae", "tiny"]
    assert torch.equal(seen[0][0], seen[1][0])  # the same denoised latents, only the decode differs
    with torch.no_grad():
        expected = tiny_pipe.executor.tiny_vae.decode_video(seen[1][0])[0].permute(1, 2, 3, 0).numpy()
    assert tiny.frames.shape == full.frames.shape == (5, 32, 32, 3)
    worst = np.abs(tiny.frames - expected).max()
    print(f"tiny decode vs TAEHV.decode_video: worst abs diff {worst:.3g}")
    assert worst <= 1e-6
    assert np.abs(tiny.frames - full.frames).max() > 1e-3  # really another decoder


def test_tiny_rows_never_share_a_batch_with_vae_rows(wan_pipe) -> None:
    tok = wan_pipe.tokenizer
    vae = tok.resolve(WanRequest("a", **SMALL))
    tiny = tok.resolve(WanRequest("a", **SMALL, decoder="tiny"))
    assert vae.decoder == "vae" and tok.resolve(WanRequest("a", **SMALL, decoder=None)).decoder == "vae"
    assert tok.batch_key(vae) != tok.batch_key(tiny)
    assert tok.make_context(vae).batch_key != tok.make_context(tiny).batch_key


def test_tiny_decoder_needs_a_loaded_tiny_vae(wan_pipe) -> None:
    assert wan_pipe.executor.tiny_vae is None
    with pytest.raises(InvalidRequestError, match="--tiny-vae") as info:
        wan_pipe.check(WanRequest("a", **SMALL, decoder="tiny"))
    assert info.value.param == "decoder"
    with pytest.raises(InvalidRequestError, match="--tiny-vae"):
        wan_pipe.generate("a", **SMALL, decoder="tiny", progress=False)
    with pytest.raises(InvalidRequestError, match="decoder must be one of vae, tiny") as info:
        wan_pipe.check(WanRequest("a", **SMALL, decoder="taesd"))
    assert info.value.param == "decoder"


def test_cli_decoder_flags(tiny_ckpt, taehv_file, tmp_path: Path, capsys) -> None:
    from wanpipe.cli import main

    common = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--height", "32", "--width", "32"]
    common += ["--num-frames", "5", "--steps", "2", "--seed", "1", "--no-progress"]
    assert main([*common, "--decoder", "tiny", "--output", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert "--decoder" in err and "--tiny-vae" in err
    bad = tmp_path / "nothing.pth"
    assert main([*common, "--tiny-vae", str(bad), "--output", str(tmp_path / "b.mp4")]) == 2
    assert "--tiny-vae:" in capsys.readouterr().err
    out = tmp_path / "c.mp4"
    assert main([*common, "--tiny-vae", str(taehv_file), "--decoder", "tiny", "--output", str(out)]) == 0
    assert out.is_file() and "decoder tiny" in capsys.readouterr().out


def test_server_decoder_field(wan_pipe, taehv_file, tmp_path: Path) -> None:
    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.store import JobStore

    manager = JobManager(JobStore(tmp_path / "out"), lambda: wan_pipe, model_name="wan-tiny")
    body = {"prompt": "a cat", "size": "32x32", "num_frames": 5, "num_inference_steps": 2}
    with ThreadServer(create_app(manager)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert manager.wait_ready(60)
        assert_error(http.post("/v1/videos", json={**body, "decoder": "tiny"}), 400, "decoder")
        assert_error(http.post("/v1/videos", json={**body, "decoder": "taesd"}), 400, "decoder")
        wan_pipe.load_tiny_vae(taehv_file)
        try:
            job = http.post("/v1/videos", json={**body, "decoder": "tiny"}).json()
            plain = http.post("/v1/videos", json=body).json()

            def finished(video_id: str) -> dict | None:
                video = http.get(f"/v1/videos/{video_id}").json()
                return video if video["status"] in ("completed", "failed") else None

            done = wait_until(lambda: finished(job["id"]), 120, "the tiny-decoded job")
            assert done["status"] == "completed" and done["parameters"]["decoder"] == "tiny"
            other = wait_until(lambda: finished(plain["id"]), 120, "the plain job")
            assert other["parameters"]["decoder"] == "vae"
            assert http.get(f"/v1/videos/{job['id']}/content").status_code == 200
        finally:
            wan_pipe.load_tiny_vae(None)


def test_both_apis_parse_decoder_and_the_store_keeps_it() -> None:
    from wanpipe.serving.job_request import job_request
    from wanpipe.serving.parsing import JobSpec, parse_responses_create, parse_video_create

    videos = parse_video_create({"prompt": "a", "decoder": "tiny"}, default_fps=16)
    assert (
        videos.spec.decoder == "tiny"
        and parse_video_create({"prompt": "a"}, default_fps=16).spec.decoder == "vae"
    )
    responses, _ = parse_responses_create({"input": "a", "provider_options": {"video": {"decoder": "tiny"}}})
    assert (
        responses.spec.decoder == "tiny"
        and responses.param_names["decoder"] == "provider_options.video.decoder"
    )
    assert JobSpec.from_json(videos.spec.to_json()) == videos.spec  # the job store's round trip
    assert job_request(videos.spec, None, None).decoder == "tiny"
