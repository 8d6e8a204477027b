"""The command line: a real mp4 from a checkpoint, clear errors for bad input, the demo checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wanpipe.cli import main
from wanpipe.media import read_video


def test_generate_writes_an_mp4(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "video.mp4"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_ckpt),
            "--prompt",
            "a cat walks",
            "--height",
            "32",
            "--width",
            "48",
            "--num-frames",
            "9",
            "--steps",
            "2",
            "--seed",
            "3",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    frames, fps = read_video(out)
    assert frames.shape == (9, 32, 48, 3)
    assert fps == pytest.approx(16)
    text = capsys.readouterr().out
    assert "seed 3" in text and "text encode" in text and "denoise" in text and "decode" in text


def test_generate_single_frame_png(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "frame.png"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_ckpt),
                "--prompt",
                "a dog",
                "--height",
                "32",
                "--width",
                "32",
                "--num-frames",
                "1",
                "--steps",
                "1",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "33"], "multiple of 16"),
        (["--num-frames", "8"], "4k+1"),
        (["--steps", "0"], "at least 1"),
        (["--guidance-scale", "nan"], "finite"),
        (["--output", "x.avi"], "cannot tell the output format"),
        (["--num-frames", "9", "--output", "x.png"], "single image"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_ckpt: Path, tmp_path: Path, capsys, args, message) -> None:
    argv = [
        "generate",
        "--model",
        str(tiny_ckpt),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        "5",
        "--steps",
        "1",
        "--output",
        str(tmp_path / "o.mp4"),
        "--no-progress",
    ]
    code = main(argv + args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    code = main(["generate", "--model", str(tmp_path), "--prompt", "a", "--output", str(tmp_path / "o.mp4")])
    assert code == 2
    assert "model_index.json" in capsys.readouterr().err


def test_demo_checkpoint_runs_without_model(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANPIPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.mp4"
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a cat walks on the grass",
                "--steps",
                "2",
                "--seed",
                "0",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "demo checkpoint" in capsys.readouterr().out
    frames, _ = read_video(out)
    assert frames.shape == (9, 128, 128, 3)
    assert frames.std() > 1.0
    assert (tmp_path / "cache" / "demo-v1" / "model_index.json").is_file()


def test_demo_checkpoint_is_a_diffusers_checkpoint(tmp_path: Path) -> None:
    """The demo is written by wanpipe's own code; diffusers reads it and gives the same frames."""
    from tests import tiny
    from wanpipe import WanPipeline
    from wanpipe.demo import ensure_demo_checkpoint

    folder = ensure_demo_checkpoint(tmp_path)
    assert ensure_demo_checkpoint(tmp_path) == folder  # made once
    ref = tiny.load_reference(folder)
    ours = WanPipeline.from_pretrained(folder, device="cpu")
    kw = dict(
        prompt="a dog runs",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=5.0,
        seed=1,
    )
    theirs = ref(
        generator=__import__("torch").Generator().manual_seed(1),
        output_type="np",
        **{k: v for k, v in kw.items() if k != "seed"},
    ).frames[0]
    assert float(np.abs(ours.generate(**kw, progress=False).frames - theirs).max()) <= 1e-3


def test_image_on_a_text_to_video_checkpoint_is_refused(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "in.png")
    code = main(
        [
            "generate",
            "--model",
            str(tiny_ckpt),
            "--prompt",
            "a cat",
            "--image",
            str(tmp_path / "in.png"),
            "--height",
            "32",
            "--width",
            "32",
            "--num-frames",
            "5",
            "--output",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert code == 2
    assert "text-to-video only" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_video_to_video_from_a_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    from wanpipe.media import Video

    rng = np.random.default_rng(0)
    Video(rng.random((9, 32, 32, 3), dtype=np.float32), fps=16).save(tmp_path / "in.mp4")
    out = tmp_path / "out.gif"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_ckpt),
            "--prompt",
            "a cat",
            "--video",
            str(tmp_path / "in.mp4"),
            "--strength",
            "0.5",
            "--steps",
            "4",
            "--height",
            "32",
            "--width",
            "32",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape[1:] == (32, 32, 3) and frames.shape[0] <= 9


def test_offload_and_speed_flags_keep_the_frames(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    common = [
        "generate",
        "--model",
        str(tiny_ckpt),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--num-frames",
        "5",
        "--steps",
        "3",
        "--seed",
        "2",
        "--no-progress",
    ]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert (
        main(
            [
                *common,
                "--offload",
                "block",
                "--text-encoder-device",
                "cpu",
                "--output",
                str(tmp_path / "offload"),
            ]
        )
        == 0
    )
    plain = sorted((tmp_path / "plain").glob("*.png"))
    offload = sorted((tmp_path / "offload").glob("*.png"))
    assert len(plain) == len(offload) == 5
    for a, b in zip(plain, offload):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert main([*common, "--cfg-truncation", "0.5", "--output", str(tmp_path / "trunc")]) == 0
    assert "timings:" in capsys.readouterr().out


def test_bench_subcommand_is_wired(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--engines" in text and "--repeats" in text
