"""VACE's request side: validation (each error names its field), the preprocessing of video, mask and
reference images, and the control tensor against diffusers' own ``WanVACEPipeline.preprocess_conditions``
/ ``prepare_video_latents`` / ``prepare_masks`` on the same tiny VAE."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny
from tests.tiny_vace import load_vace_reference, save_vace_checkpoint
from wanpipe import WanPipeline
from wanpipe.arguments import REQUEST_FLAGS
from wanpipe.batch import collate
from wanpipe.cli import build_parser, main
from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.media import Video, read_video
from wanpipe.stages.conditioning import VaceControl, conditioning_class
from wanpipe.tokenizer import WanTokenizer

VACE_LAYERS = (0, 1)
HEIGHT, WIDTH, FRAMES = 32, 48, 5


def _rng_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _soft_mask(height: int, width: int, frame: int) -> Image.Image:
    """Black (keep) on the left, white (generate) on the right, a grey ramp between, moving per frame."""
    x = np.linspace(-2.0, 2.0, width)[None, :] + 0.3 * frame - 0.4
    values = np.clip(0.5 + x, 0.0, 1.0) * 255
    return Image.fromarray(np.repeat(values, height, axis=0).round().astype(np.uint8), "L")


@pytest.fixture(scope="module")
def vace_tokenizer(wan_pipe) -> WanTokenizer:
    """The tiny checkpoint's tokenizer with a VACE DiT config (the request side needs no VACE weights)."""
    arch = wan_pipe.arch
    dit = replace(arch.transformer, vace_layers=VACE_LAYERS, vace_in_channels=96)
    return WanTokenizer(replace(arch, transformer=dit), wan_pipe.tokenizer.text_tokenizer)


@pytest.fixture(scope="module")
def vace_encoders(wan_pipe):
    return replace(wan_pipe.executor.encoders, vace_layers=VACE_LAYERS)


@pytest.fixture(scope="module")
def diffusers_vace(reference_pipe):
    """diffusers' WanVACEPipeline around the reference's VAE (its transformer is only asked its patch)."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    dit = WanVACETransformer3DModel(**tiny.TRANSFORMER_KW, vace_layers=list(VACE_LAYERS), vace_in_channels=96)
    return WanVACEPipeline(
        tokenizer=reference_pipe.tokenizer,
        text_encoder=reference_pipe.text_encoder,
        vae=reference_pipe.vae,
        scheduler=reference_pipe.scheduler,
        transformer=dit.eval(),
    )


def _request(**kw) -> WanRequest:
    base = dict(prompt="a cat", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2, seed=3)
    return WanRequest(**{**base, **kw})


def _inputs(rng: np.random.Generator, case: str, scale: int = 1):
    """(video, mask, reference images) of a case, as PIL images (what both pipelines take)."""
    video = mask = refs = None
    if "video" in case:
        video = [_rng_image(rng, HEIGHT * scale, WIDTH * scale) for _ in range(FRAMES)]
    if "mask" in case:
        mask = [_soft_mask(HEIGHT * scale, WIDTH * scale, i) for i in range(FRAMES)]
    if "refs" in case:
        refs = [_rng_image(rng, 20, 30), _rng_image(rng, 37, 21)]
    return video, mask, refs


CASES = [("refs", 1), ("video", 1), ("video+mask", 1), ("video+mask+refs", 1), ("video+mask", 2), ("none", 1)]


@pytest.mark.parametrize(("case", "scale"), CASES, ids=[f"{c}-x{s}" for c, s in CASES])
def test_control_matches_diffusers(case, scale, vace_tokenizer, vace_encoders, diffusers_vace) -> None:
    """The preprocessed pixels and the (1, 96, R + f, h, w) control equal diffusers' on the same VAE."""
    video, mask, refs = _inputs(np.random.default_rng(7), case, scale)
    ctx = vace_tokenizer.make_context(_request(video=video, mask=mask, reference_images=refs))
    cond = ctx.conditioning
    inputs = collate([ctx])
    assert conditioning_class(inputs, False, vace=True) is VaceControl
    ours, latents = VaceControl.prepare(inputs, vace_encoders)
    assert isinstance(ours, VaceControl)

    ref = diffusers_vace
    with torch.no_grad():
        video_t, mask_t, refs_t = ref.preprocess_conditions(
            video, mask, refs, 1, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu"
        )
        control = torch.cat(
            [
                ref.prepare_video_latents(video_t, mask_t, refs_t, None, "cpu"),
                ref.prepare_masks(mask_t, refs_t, None),
            ],
            dim=1,
        )
    count = len(refs or [])
    assert cond.conditioning_scale.tolist() == [1.0, 1.0]
    if video is None:
        assert cond.control_pixels is None and cond.control_mask is None
    else:
        assert np.abs(cond.control_pixels - video_t[0].numpy()).max() < 1e-6
    if mask is not None:
        assert np.abs(cond.control_mask - mask_t[0, :1].numpy()).max() < 1e-6
    if refs is None:
        assert cond.reference_pixels is None
    else:
        assert np.abs(cond.reference_pixels - torch.stack(refs_t[0]).numpy()).max() < 1e-6
    assert ours.control.shape == control.shape == (1, 96, count + 2, HEIGHT // 8, WIDTH // 8)
    assert latents.shape == (1, 16, count + 2, HEIGHT // 8, WIDTH // 8)
    diff = (ours.control - control).abs().max().item()
    print(f"VACE control {case} x{scale}: max abs diff vs diffusers {diff:.2e}")
    assert diff < 1e-3
    assert torch.equal(ours.finish(latents), latents[:, :, count:])


def test_vace_conditioning_rows_and_select(vace_tokenizer, vace_encoders) -> None:
    """Two rows with their own video and scale: guided steps see the rows twice (cond, then uncond);
    select keeps a row's control and scale, and the guided copy is made again for the rows left."""
    rng = np.random.default_rng(1)
    contexts = []
    for scale in (0.5, [1.0, 2.0]):
        video, mask, refs = _inputs(rng, "video+mask+refs")
        request = _request(video=video, mask=mask, reference_images=refs, conditioning_scale=scale)
        contexts.append(vace_tokenizer.make_context(request))
    inputs = collate(contexts)
    vace, _ = VaceControl.prepare(inputs, vace_encoders)
    assert torch.equal(vace.scale, torch.tensor([[0.5, 0.5], [1.0, 2.0]]))
    plain = vace.dit_kwargs(False)
    assert plain["control_hidden_states"] is vace.control
    guided = vace.dit_kwargs(True)
    assert guided["control_hidden_states"].shape[0] == 4
    assert torch.equal(guided["control_hidden_states"][2:], vace.control)
    assert vace.dit_kwargs(True)["control_hidden_states"] is guided["control_hidden_states"]  # made once
    one = vace.select([1])
    assert torch.equal(one.control, vace.control[1:]) and torch.equal(one.scale, vace.scale[1:])
    again = one.dit_kwargs(True)
    assert torch.equal(again["control_hidden_states_scale"], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert not torch.equal(vace.control[0], vace.control[1])  # each row its own video


# -- validation ------------------------------------------------------------------------------------------


def _refused(tokenizer: WanTokenizer, request: WanRequest, param: str) -> str:
    with pytest.raises(InvalidRequestError) as info:
        tokenizer.resolve(request)
    assert info.value.param == param, str(info.value)
    return str(info.value)


def test_vace_inputs_refused_on_a_plain_checkpoint(wan_pipe) -> None:
    image = np.zeros((32, 48, 3), np.uint8)
    for name, value in (("mask", image), ("reference_images", [image]), ("conditioning_scale", 0.5)):
        message = _refused(wan_pipe.tokenizer, _request(**{name: value}), name)
        assert "VACE" in message


def test_vace_request_errors_name_their_field(vace_tokenizer) -> None:
    rng = np.random.default_rng(2)
    video, mask, _ = _inputs(rng, "video+mask")
    t = vace_tokenizer
    assert "mask needs video" in _refused(t, _request(mask=mask), "mask")
    assert "4 frames and the video 5" in _refused(t, _request(video=video, mask=mask[:4]), "mask")
    small_mask = [m.resize((24, 16)) for m in mask]
    assert "give the mask at the video's size" in _refused(t, _request(video=video, mask=small_mask), "mask")
    assert "2 VACE layers" in _refused(t, _request(conditioning_scale=[1.0, 2.0, 3.0]), "conditioning_scale")
    _refused(t, _request(conditioning_scale=float("nan")), "conditioning_scale")
    _refused(t, _request(conditioning_scale="strong"), "conditioning_scale")
    small = [f.resize((32, 32)) for f in video]
    assert "smaller than the output 48x32" in _refused(t, _request(video=small), "video")
    assert "fewer than num_frames=9" in _refused(t, _request(video=video, num_frames=9), "video")
    _refused(t, _request(image=video[0]), "image")
    _refused(t, _request(video=video, strength=0.5), "strength")
    _refused(t, _request(reference_images=["/no/such/image.png"]), "reference_images")
    _refused(t, _request(video=[np.zeros((32, 48, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)]), "video")


def test_vace_resolve_fills_in_and_is_stable(vace_tokenizer) -> None:
    """num_frames comes from the video (4k+1 frames, the rest cut); one mask image stands for every
    frame; reference images stay as given; resolving again changes nothing; the batch key tells apart
    requests with another number of reference images or without a mask."""
    rng = np.random.default_rng(3)
    video = [np.asarray(_rng_image(rng, 64, 96)) for _ in range(7)]
    mask = np.asarray(_soft_mask(64, 96, 0))
    refs = np.asarray(_rng_image(rng, 20, 30))
    request = WanRequest(prompt="a cat", video=video, mask=mask, reference_images=refs, conditioning_scale=2)
    r = vace_tokenizer.resolve(replace(request, height=HEIGHT, width=WIDTH))
    assert r.num_frames == 5 and r.video.shape == (5, HEIGHT, WIDTH, 3) and r.mask.shape == (1, HEIGHT, WIDTH)
    assert len(r.reference_images) == 1 and r.reference_images[0].shape == (20, 30, 3)
    assert r.conditioning_scale == [2.0, 2.0] and r.strength is None
    again = vace_tokenizer.resolve(r)
    for name in ("num_frames", "seed", "conditioning_scale", "height", "width"):
        assert getattr(again, name) == getattr(r, name)
    assert np.array_equal(again.video, r.video) and np.array_equal(again.mask, r.mask)
    ctx = vace_tokenizer.make_context(r)
    assert ctx.latents.shape == (16, 3, HEIGHT // 8, WIDTH // 8)  # one reference frame first
    assert ctx.conditioning.control_mask.shape == (1, 5, HEIGHT, WIDTH)
    key = vace_tokenizer.batch_key
    assert key(r) != key(replace(r, reference_images=None))
    assert key(r) != key(replace(r, mask=None))
    assert key(r) == key(replace(r, conditioning_scale=[0.5, 1.0]))


def test_cli_vace_flags() -> None:
    """--control-video sets video (--video still does), --reference-image repeats, --conditioning-scale
    takes X or X,Y,...; the request is built from them field by field."""
    parser = build_parser()
    argv = ["generate", "--prompt", "a", "--control-video", __file__, "--mask", __file__]
    argv += ["--reference-image", __file__, "--reference-image", __file__, "--conditioning-scale", "0.5, 1"]
    args = parser.parse_args(argv)
    params = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in REQUEST_FLAGS.items()}
    assert params["video"] == params["mask"] == __file__
    assert params["reference_images"] == [__file__, __file__]
    assert params["conditioning_scale"] == [0.5, 1.0]
    assert (
        parser.parse_args(["generate", "--prompt", "a", "--conditioning-scale", "2"]).conditioning_scale
        == 2.0
    )
    assert parser.parse_args(["generate", "--prompt", "a", "--video", __file__]).video == __file__


# -- end to end against diffusers' WanVACEPipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def vace_ckpt(tmp_path_factory):
    return save_vace_checkpoint(tmp_path_factory.mktemp("vace") / "vace-tiny")


@pytest.fixture(scope="module")
def vace_pair(vace_ckpt):
    """(diffusers' WanVACEPipeline, wanpipe's pipeline) on the same tiny VACE checkpoint."""
    return load_vace_reference(vace_ckpt), WanPipeline.from_pretrained(
        vace_ckpt, device="cpu", dtype="float32"
    )


def _compare(ref, pipe, case: str, *, ours: dict | None = None, **inputs) -> float:
    """Generate the same request with both pipelines; the worst absolute difference of the frames."""
    kw = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3, guidance_scale=5.0)
    seed = 11
    with torch.no_grad():
        expected = ref(
            prompt="a cat walks on the grass",
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **kw,
            **inputs,
        ).frames[0]
    got = pipe.generate(
        "a cat walks on the grass", seed=seed, progress=False, **kw, **{**inputs, **(ours or {})}
    )
    assert got.frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    diff = float(np.abs(got.frames - expected).max())
    print(f"VACE parity {case}: max abs diff vs diffusers {diff:.2e}")
    assert diff < 1e-3
    return diff


PARITY = ["refs", "video", "video+mask", "video+mask+refs"]


@pytest.mark.parametrize("case", PARITY)
def test_vace_matches_diffusers(case, vace_pair) -> None:
    video, mask, refs = _inputs(np.random.default_rng(5), case)
    _compare(*vace_pair, case, video=video, mask=mask, reference_images=refs)


def test_vace_per_layer_scale_and_one_mask_image_match_diffusers(vace_pair) -> None:
    """A conditioning scale per VACE layer; one mask image for every frame here, each frame there."""
    ref, pipe = vace_pair
    video, _, refs = _inputs(np.random.default_rng(6), "video+refs")
    mask = _soft_mask(HEIGHT, WIDTH, 1)
    layers = len(pipe.arch.transformer.vace_layers)
    scale = [0.5 + i for i in range(layers)]
    _compare(
        ref, pipe, "per-layer scale", video=video, mask=[mask] * FRAMES, reference_images=refs,
        conditioning_scale=scale, ours={"mask": mask},
    )  # fmt: skip
    plain = pipe.generate("a cat", seed=1, video=video, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                          progress=False).frames  # fmt: skip
    weak = pipe.generate("a cat", seed=1, video=video, height=HEIGHT, width=WIDTH, num_inference_steps=2,
                         conditioning_scale=0.0, progress=False).frames  # fmt: skip
    assert np.abs(plain - weak).max() > 1e-3  # the scale reaches the model


def test_vace_two_experts_match_diffusers(tmp_path) -> None:
    """The Wan 2.2 VACE-Fun A14B layout (two VACE experts and a boundary), which diffusers' pipeline takes."""
    folder = save_vace_checkpoint(tmp_path / "vace-2", two_experts=True, boundary_ratio=0.6)
    ref = load_vace_reference(folder)
    pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert pipe.arch.has_second_expert and pipe.arch.accepts_vace
    video, mask, refs = _inputs(np.random.default_rng(8), "video+mask+refs")
    _compare(ref, pipe, "two experts", video=video, mask=mask, reference_images=refs, guidance_scale_2=3.0)


def test_vace_batch_of_two_is_each_alone(vace_pair) -> None:
    """Two VACE requests with their own inputs in one batch give each one's frames alone."""
    _, pipe = vace_pair
    rng = np.random.default_rng(9)
    requests = []
    for seed, scale in ((1, 1.0), (2, 0.5)):
        video, mask, refs = _inputs(rng, "video+mask+refs")
        requests.append(
            _request(video=video, mask=mask, reference_images=refs, conditioning_scale=scale, seed=seed)
        )
    assert len({pipe.tokenizer.batch_key(pipe.tokenizer.resolve(r)) for r in requests}) == 1
    together = pipe.generate_batch(requests, progress=False)
    for request, video in zip(requests, together, strict=True):
        alone = pipe.generate_batch([request], progress=False)[0]
        assert np.abs(alone.frames - video.frames).max() < 1e-4


def test_cli_generates_vace(vace_ckpt, tmp_path, capsys) -> None:
    """``wanpipe generate`` with --control-video, --mask, --reference-image (twice) and a per-layer
    --conditioning-scale writes the frames pipe.generate makes from the same files."""
    rng = np.random.default_rng(10)
    video, mask, refs = _inputs(rng, "video+mask+refs")
    Video.from_uint8(np.stack([np.asarray(f) for f in video]), 16).save(tmp_path / "control.mp4")
    mask[0].save(tmp_path / "mask.png")
    for i, r in enumerate(refs):
        r.save(tmp_path / f"ref{i}.png")
    argv = ["generate", "--model", str(vace_ckpt), "--prompt", "a cat", "--height", "32", "--width", "48"]
    argv += [
        "--steps",
        "2",
        "--seed",
        "4",
        "--no-progress",
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    argv += ["--control-video", str(tmp_path / "control.mp4"), "--mask", str(tmp_path / "mask.png")]
    argv += ["--reference-image", str(tmp_path / "ref0.png"), "--reference-image", str(tmp_path / "ref1.png")]
    argv += ["--dtype", "float32", "--conditioning-scale", "0.5,1.5"]
    assert main(argv) == 0, capsys.readouterr().err
    written = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "out").glob("*.png"))])
    pipe = WanPipeline.from_pretrained(vace_ckpt, device="cpu", dtype="float32")
    direct = pipe.generate(
        "a cat", height=32, width=48, num_inference_steps=2, seed=4, progress=False,
        video=read_video(tmp_path / "control.mp4")[0], mask=str(tmp_path / "mask.png"),
        reference_images=[str(tmp_path / "ref0.png"), str(tmp_path / "ref1.png")], conditioning_scale=[0.5, 1.5],
    )  # fmt: skip
    assert written.shape == (5, 32, 48, 3)
    np.testing.assert_array_equal(written, direct.to_uint8())
    assert main([*argv[:-2], "--conditioning-scale", "1,2,3"]) == 2
    assert "--conditioning-scale has 3 values; this checkpoint has 2 VACE layers" in capsys.readouterr().err
