"""Live previews: the linear latent-to-RGB projection, previews leave the video unchanged, when they come,
the CLI's --preview file, bad preview_every values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_family
from wanpipe import WanPipeline, WanRequest
from wanpipe.cli import main
from wanpipe.context import InvalidRequestError, Preview
from wanpipe.media import encode_webp
from wanpipe.stages.preview import LinearPreviewDecoder, preview_size

# Typed from ComfyUI's comfy/latent_formats.py (Comfy-Org/ComfyUI@9a9a69fd745de98e89b0f1a629cd3bc43d513a42),
# class Wan21: latent_rgb_factors (16 rows of R, G, B) and latent_rgb_factors_bias.
COMFY_WAN21 = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
]
COMFY_WAN21_BIAS = [-0.1835, -0.0868, -0.3360]
# class Wan22 (48 channels): its first four rows, last row and bias, enough to tell the table apart.
COMFY_WAN22_ROWS = {
    0: [0.0119, 0.0103, 0.0046],
    1: [-0.1062, -0.0504, 0.0165],
    2: [0.0140, 0.0409, 0.0491],
    3: [-0.0813, -0.0677, 0.0607],
    39: [-0.3441, -0.3543, -0.2008],
    47: [-0.0837, 0.0168, 0.0055],
}
COMFY_WAN22_BIAS = [0.0317, -0.0878, -0.1388]


def hand_projection(latents: np.ndarray, factors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(C, f, h, w) -> (f, h, w, 3) uint8, written out: rgb = sum_c latent_c * factor_c + bias, then
    ComfyUI's preview_to_image: ((rgb + 1) / 2) clamped to [0, 1], * 255, truncated."""
    c, f, h, w = latents.shape
    out = np.zeros((f, h, w, 3), dtype=np.float64)
    for k in range(3):
        for ch in range(c):
            out[..., k] += latents[ch].astype(np.float64) * factors[ch, k]
        out[..., k] += bias[k]
    return (np.clip((out + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def test_linear_preview_is_comfyuis_projection_by_hand() -> None:
    latents = torch.randn(1, 16, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 2
    decoder = LinearPreviewDecoder(16)
    small = decoder(latents, (4, 5))[0].numpy()
    hand = hand_projection(latents[0].numpy(), np.array(COMFY_WAN21), np.array(COMFY_WAN21_BIAS))
    assert small.shape == (3, 4, 5, 3) and small.dtype == np.uint8
    diff = np.abs(small.astype(int) - hand.astype(int))
    print(f"linear preview vs hand: max diff {diff.max()} levels, {np.mean(diff == 0):.4f} equal")
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # float32 vs float64 sums may cross a level
    assert len(np.unique(small)) > 20  # not saturated: the values mean something
    # enlarged by nearest neighbour: each latent pixel becomes a k x k block
    big = decoder(latents, (4 * 8, 5 * 8))[0].numpy()
    assert np.array_equal(big, small.repeat(8, axis=1).repeat(8, axis=2))
    # the Wan 2.2 (48-channel) table: one-hot latents read single rows back
    decoder = LinearPreviewDecoder(48)
    for row, factors in COMFY_WAN22_ROWS.items():
        one = torch.zeros(1, 48, 1, 1, 1)
        one[0, row] = 1.0
        got = decoder(one, (1, 1))[0, 0, 0, 0].numpy()
        want = hand_projection(one[0].numpy(), _one_row(48, row, factors), np.array(COMFY_WAN22_BIAS))
        assert np.array_equal(got, want[0, 0, 0]), row
    with pytest.raises(ValueError, match="no latent-to-RGB factors for 4 latent channels"):
        LinearPreviewDecoder(4)


def _one_row(channels: int, row: int, factors: list[float]) -> np.ndarray:
    table = np.zeros((channels, 3))
    table[row] = factors
    return table


def test_preview_size_keeps_the_aspect_and_never_enlarges_past_the_video() -> None:
    assert preview_size(480, 832) == (148, 256)
    assert preview_size(720, 1280) == (144, 256)
    assert preview_size(128, 128) == (128, 128)
    assert preview_size(32, 48) == (32, 48)


REQUEST = dict(prompt="a cat walks", height=32, width=48, num_frames=9, num_inference_steps=5, seed=3)


def test_previews_leave_the_video_bit_identical_t2v(wan_pipe) -> None:
    request = WanRequest(**REQUEST, guidance_scale=5.0)
    plain = wan_pipe.generate_batch([request], progress=False)[0].frames
    got: list[Preview] = []
    shown = wan_pipe.generate_batch([request], progress=False, preview=got.append)[0].frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(shown))
    assert [p.step for p in got] == [1, 3, 4]  # the default: every 2 steps, and the last
    last = got[-1]
    assert last.num_steps == 5 and last.row == 0 and last.decoder == "linear"
    assert last.frames.shape == (3, 32, 48, 3) and last.frames.dtype == np.uint8  # one per latent frame
    assert last.fps == pytest.approx(16 * 3 / 9)


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory) -> WanPipeline:
    folder = tmp_path_factory.mktemp("ti2v-5b") / "ckpt"
    tiny_family.ti2v_5b(folder)
    return WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")


def test_previews_leave_the_video_bit_identical_ti2v_with_an_image(ti2v_pipe) -> None:
    """TI2V-5B (48 channels) from an image: the clean first latent frame is put back into each x0."""
    image = tiny_family.picture(32, 64, 11)
    kw = dict(REQUEST, width=64, num_frames=5, num_inference_steps=3, guidance_scale=5.0, image=image)
    plain = ti2v_pipe.generate(**kw, progress=False).frames
    got: list[Preview] = []
    shown = ti2v_pipe.generate(**kw, progress=False, preview=got.append, preview_every=1).frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(shown))
    assert [p.step for p in got] == [0, 1, 2]
    assert got[0].frames.shape == (2, 32, 64, 3)  # 5 frames = 2 latent frames
    # the first latent frame is the image's clean latents at every step: its preview does not change
    assert np.array_equal(got[0].frames[0], got[-1].frames[0])
    assert not np.array_equal(got[0].frames[1], got[-1].frames[1])


def test_each_row_previews_at_its_own_steps(wan_pipe) -> None:
    requests = [
        WanRequest(**{**REQUEST, "seed": 1}, preview_every=1),
        WanRequest(**{**REQUEST, "seed": 2}, preview_every=3),
    ]
    got: list[Preview] = []
    videos = wan_pipe.generate_batch(requests, progress=False, preview=got.append)
    steps = {row: [p.step for p in got if p.row == row] for row in (0, 1)}
    assert steps == {0: [0, 1, 2, 3, 4], 1: [2, 4]}
    # each row's preview is its own: at the last step they differ as the videos do
    last = {p.row: p.frames for p in got if p.step == 4}
    assert not np.array_equal(last[0], last[1])
    assert not np.array_equal(videos[0].frames, videos[1].frames)


def test_previews_are_off_without_a_callback(wan_pipe, monkeypatch) -> None:
    from wanpipe.stages import preview as preview_module

    calls = []
    monkeypatch.setattr(preview_module.PreviewSink, "submit", lambda *a: calls.append(a))
    wan_pipe.generate(**REQUEST, progress=False, preview_every=1)
    assert calls == []


@pytest.mark.parametrize("value", [0, -2, 1.5, "3", True])
def test_bad_preview_every_is_refused(wan_pipe, value) -> None:
    with pytest.raises(InvalidRequestError) as e:
        wan_pipe.check(WanRequest(prompt="a cat", preview_every=value))
    assert e.value.param == "preview_every" and "preview_every must be" in str(e.value)


def test_encode_webp_round_trip() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (4, 24, 40, 3), dtype=np.uint8)
    data = encode_webp(frames, 4.0)
    import io

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP" and image.n_frames == 4 and image.size == (40, 24)
        image.seek(2)
        image.load()
        assert image.info["duration"] == 250 and image.info["timestamp"] == 500  # 4 fps
    with pytest.raises(ValueError, match="uint8"):
        encode_webp(frames.astype(np.float32), 4.0)


def test_cli_writes_the_preview_webp(tiny_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    from wanpipe import media

    written: list[int] = []
    write = media.write_atomic

    def spy(path, data):  # each preview rewrites the file: count them, check the file after each
        out = write(path, data)
        with Image.open(out) as image:
            written.append(image.n_frames)
        return out

    monkeypatch.setattr(media, "write_atomic", spy)
    preview = tmp_path / "previews" / "live.webp"
    preview.parent.mkdir()
    args = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--height", "32", "--width", "48"]
    args += ["--num-frames", "9", "--steps", "4", "--seed", "3", "--no-progress", "--preview-every", "1"]
    code = main([*args, "--output", str(tmp_path / "v.mp4"), "--preview", str(preview)])
    assert code == 0
    assert written == [3, 3, 3, 3]  # one per step, 3 latent frames each
    with Image.open(preview) as image:
        assert image.format == "WEBP" and image.n_frames == 3 and image.size == (48, 32)
    assert sorted(p.name for p in preview.parent.iterdir()) == ["live.webp"]  # no temporary left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preview-every", "0"], "--preview-every"),
        (["--preview", "live.gif"], "--preview"),
    ],
)
def test_cli_refuses_bad_preview_flags(tiny_ckpt: Path, tmp_path: Path, capsys, extra, message) -> None:
    args = ["generate", "--model", str(tiny_ckpt), "--prompt", "a cat", "--output", str(tmp_path / "v.mp4")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def _sink(callback, every: int = 1, threaded: bool = True):
    from wanpipe.stages.preview import PreviewPlan, PreviewSink

    plan = PreviewPlan(callback, every=[every, every], fps=[16.0, 16.0], sizes=[(8, 8), (8, 8)])
    return PreviewSink(plan, LinearPreviewDecoder(16), 4, torch.device("cpu"), threaded=threaded)


def _step(view, i: int) -> None:
    latents = torch.full((2, 16, 2, 4, 4), float(i))
    view(i, [0, 1], latents, torch.zeros_like(latents), 0.5, lambda x: x)


def test_the_side_thread_delivers_in_order_and_drops_when_behind() -> None:
    """The CUDA path's side thread (forced on the CPU): a slow callback makes previews drop, never the
    last step's; what comes, comes in order, row by row."""
    import threading

    got: list[Preview] = []
    release = threading.Event()

    def slow(message: Preview) -> None:
        release.wait(5)
        got.append(message)

    with _sink(slow) as sink:
        view = sink.segment(0, 10, [0, 1])
        for i in range(10):
            _step(view, i)
        release.set()
    steps = [p.step for p in got if p.row == 0]
    assert steps == sorted(steps) and steps[-1] == 9 and len(steps) < 10
    assert sink.dropped == 10 - len(steps) and [p.step for p in got if p.row == 1] == steps
    assert got[-1].frames.shape == (2, 8, 8, 3) and got[-1].fps == pytest.approx(16 * 2 / 5)


def test_a_failing_callback_stops_the_run() -> None:
    def fail(message: Preview) -> None:
        raise RuntimeError("disk full")

    for threaded in (False, True):
        with pytest.raises(RuntimeError, match="disk full"), _sink(fail, threaded=threaded) as sink:
            view = sink.segment(0, 4, [0, 1])
            for i in range(4):
                _step(view, i)


def test_previews_through_the_side_thread_leave_the_video_bit_identical(wan_pipe, monkeypatch) -> None:
    from functools import partial

    from wanpipe import executor
    from wanpipe.stages.preview import PreviewSink

    monkeypatch.setattr(executor, "PreviewSink", partial(PreviewSink, threaded=True))
    request = WanRequest(**REQUEST, guidance_scale=5.0, preview_every=1)
    plain = wan_pipe.generate_batch([request], progress=False)[0].frames
    got: list[Preview] = []
    shown = wan_pipe.generate_batch([request], progress=False, preview=got.append)[0].frames
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(shown))
    assert [p.step for p in got] == [0, 1, 2, 3, 4]  # the callback is fast: nothing dropped
