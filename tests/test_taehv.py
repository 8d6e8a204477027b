"""TAEHV (wanpipe.models.taehv) against the reference taehv.py (tests/reference/taehv.py, MIT) on the
same random weights, 16- and 48-channel forms, fp32 on the CPU; loading from files and hub ids."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.reference.taehv import TAEHV as ReferenceTAEHV
from tests.reference.taehv import StreamingTAEHV
from wanpipe.models.taehv import TAEHV, TAEHVConfig
from wanpipe.weights.safetensors_io import CheckpointError
from wanpipe.weights.taehv import config_from_state_dict, load_taehv, resolve_tiny_vae

TOL = 1e-4
FORMS = {"taew2_1": dict(latent_channels=16, patch_size=1), "taew2_2": dict(latent_channels=48, patch_size=2)}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """He-scaled random weights and biases, so activations neither vanish nor saturate the clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + 0.2)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)


def _reference(form: str, seed: int = 0, **kwargs) -> ReferenceTAEHV:
    ref = ReferenceTAEHV(checkpoint_path=None, **FORMS[form], **kwargs)
    _randomize(ref, seed)
    with torch.no_grad():  # centre the output on 0.5 so that most values are inside the final clamp
        ref.decoder[-1].weight.mul_(0.3)
        ref.decoder[-1].bias.add_(0.3)
    return ref.eval()


def _worst(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    worst = (ours - theirs).abs().max().item()
    print(f"{what}: worst abs diff {worst:.3g}")
    return worst


def _latents(form: str, batch: int = 2, frames: int = 3, seed: int = 1) -> torch.Tensor:
    """Normalized latents (B, C, f, 4, 5)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FORMS[form]["latent_channels"], frames, 4, 5, generator=g)


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_decode_matches_reference(form: str) -> None:
    ref = _reference(form)
    model = load_taehv(ref.state_dict())
    assert model.config == getattr(TAEHVConfig, form)()
    z = _latents(form)
    expected = ref.decode_video(z.permute(0, 2, 1, 3, 4), parallel=True, show_progress_bar=False)
    expected = expected.permute(0, 2, 1, 3, 4)
    video = model.decode_video(z)
    s = 8 * FORMS[form]["patch_size"]
    assert video.shape == (2, 3, 4 * (3 - 1) + 1, 4 * s, 5 * s)  # as many frames as the full Wan VAE
    inside = ((video > 0) & (video < 1)).float().mean().item()
    assert inside > 0.3, f"only {inside:.0%} of the values are off the clamp: the test would be weak"
    assert _worst(video, expected, f"{form} decode") <= TOL
    # frame by frame: the reference's sequential mode and our stream, fed in uneven pieces
    sequential = ref.decode_video(z.permute(0, 2, 1, 3, 4), parallel=False, show_progress_bar=False)
    sequential = sequential.permute(0, 2, 1, 3, 4)
    assert _worst(model.decode_video(z, chunk_frames=1), sequential, "frame by frame") <= TOL
    assert _worst(model.decode_video(z, chunk_frames=2), expected, "2 latent frames at a time") <= TOL
    stream = model.stream()
    pieces = [stream.push(z[:, :, :1]), stream.push(z[:, :, 1:])]
    assert pieces[0] is not None and pieces[0].shape[2] == 1  # the first latent frame: one frame out
    assert _worst(torch.cat(pieces, dim=2), expected, f"{form} stream pushes") <= TOL


@torch.no_grad()
def test_streaming_matches_reference_streaming() -> None:
    ref = _reference("taew2_1", seed=3)
    model = load_taehv(ref.state_dict())
    z = _latents("taew2_1", batch=1, frames=4)
    theirs = StreamingTAEHV(ref)
    frames = []
    for i in range(z.shape[2]):
        frame = theirs.decode(z[:, :, i : i + 1].permute(0, 2, 1, 3, 4))
        while frame is not None:
            frames.append(frame)
            frame = theirs.decode()
    expected = torch.cat(frames, dim=1).permute(0, 2, 1, 3, 4)
    stream = model.stream()
    ours = torch.cat([p for i in range(4) if (p := stream.push(z[:, :, i : i + 1])) is not None], dim=2)
    assert _worst(ours, expected, "StreamingTAEHV") <= TOL


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_encode_matches_reference(form: str) -> None:
    ref = _reference(form, seed=2)
    model = load_taehv(ref.state_dict())
    g = torch.Generator().manual_seed(4)
    s = 8 * FORMS[form]["patch_size"]
    video = torch.rand(1, 3, 9, 2 * s, 3 * s, generator=g)
    expected = ref.encode_video(video.permute(0, 2, 1, 3, 4), show_progress_bar=False).permute(0, 2, 1, 3, 4)
    latents = model.encode_video(video)
    assert latents.shape == (1, FORMS[form]["latent_channels"], 3, 2, 3)  # 4k + 1 frames -> k + 1
    assert _worst(latents, expected, f"{form} encode") <= TOL


@torch.no_grad()
def test_time_upscale_off_matches_reference() -> None:
    ref = _reference("taew2_1", seed=5)
    cheap = ReferenceTAEHV(checkpoint_path=None, decoder_time_upscale=(False, False)).eval()
    cheap.load_state_dict(cheap.patch_tgrow_layers(dict(ref.state_dict())))
    model = load_taehv(ref.state_dict(), time_upscale=(False, False, False))
    z = _latents("taew2_1", batch=1)
    expected = cheap.decode_video(z.permute(0, 2, 1, 3, 4), show_progress_bar=False).permute(0, 2, 1, 3, 4)
    video = model.decode_video(z)
    assert video.shape[2] == 3  # one frame per latent frame
    assert _worst(video, expected, "no temporal upscale") <= TOL


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@torch.no_grad()
def test_load_from_file(tmp_path: Path, suffix: str) -> None:
    ref = _reference("taew2_2", seed=6)
    path = tmp_path / f"taew2_2{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = load_taehv(path)
    assert model.config.latent_channels == 48 and model.config.patch_size == 2
    z = _latents("taew2_2", batch=1, frames=2)
    expected = ref.decode_video(z.permute(0, 2, 1, 3, 4), show_progress_bar=False).permute(0, 2, 1, 3, 4)
    assert _worst(model.decode_video(z), expected, f"loaded from {suffix}") <= TOL


def test_hub_file_goes_through_the_downloader(tmp_path: Path) -> None:
    ref = _reference("taew2_1", seed=7)
    path = tmp_path / "taew2_1.pth"
    torch.save(ref.state_dict(), path)
    calls = []

    def download(**kwargs) -> str:
        calls.append(kwargs)
        return str(path)

    assert resolve_tiny_vae("someone/taehv-copy/taew2_1.pth", download=download) == path
    assert calls == [{"repo_id": "someone/taehv-copy", "filename": "taew2_1.pth"}]
    model = load_taehv("someone/taehv-copy/sub/taew2_1.pth", download=download)
    assert calls[-1]["filename"] == "sub/taew2_1.pth" and model.config.latent_channels == 16
    with pytest.raises(CheckpointError, match="owner/name/FILE"):
        resolve_tiny_vae("someone/taehv-copy", download=download)


def test_bad_state_dicts_are_named() -> None:
    state = _reference("taew2_1").state_dict()
    with pytest.raises(CheckpointError, match="super"):
        config_from_state_dict({**state, "decoder.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="decoder.1.weight"):
        config_from_state_dict({k: v for k, v in state.items() if k != "decoder.1.weight"})
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\)"):
        TAEHV(TAEHVConfig()).decode_video(torch.zeros(1, 48, 2, 4, 4))


def test_pipeline_loads_the_tiny_vae(wan_pipe, tmp_path: Path) -> None:
    ref = _reference("taew2_1", seed=8)
    path = tmp_path / "taew2_1.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    try:
        wan_pipe.load_tiny_vae(path)
        tiny = wan_pipe.executor.tiny_vae
        assert isinstance(tiny, TAEHV) and tiny.config.latent_channels == wan_pipe.arch.vae.z_dim
        z = _latents("taew2_1", batch=1, frames=2)
        expected = ref.decode_video(z.permute(0, 2, 1, 3, 4), show_progress_bar=False)
        frames = wan_pipe.executor.decode(z, "tiny")  # (B, F, H, W, 3), as the full decode returns
        assert frames.shape == (1, 5, 32, 40, 3)
        assert _worst(frames, expected.permute(0, 1, 3, 4, 2), "pipeline decode") <= TOL
        wrong = tmp_path / "taew2_2.pth"
        torch.save(_reference("taew2_2").state_dict(), wrong)
        with pytest.raises(CheckpointError, match="use taew2_1"):
            wan_pipe.load_tiny_vae(wrong)
    finally:
        wan_pipe.load_tiny_vae(None)
    assert wan_pipe.executor.tiny_vae is None
