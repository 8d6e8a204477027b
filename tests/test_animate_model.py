"""The Wan2.2-Animate transformer: parity of wanpipe's DiT with diffusers' ``WanAnimateTransformer3DModel``
and with the original ``WanAnimateModel`` (Wan-Video/Wan2.2, :mod:`tests.wan_animate_reference`) on the
same weights (fp32, CPU); loading the diffusers layout and the original layout (names taken from the
original module's ``state_dict()``, and diffusers' own conversion of them); the runtime paths (compiled and
streamed blocks) through the one block call site; what is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny, tiny_animate, tiny_formats, wan_animate_reference
from wanpipe import WanPipeline
from wanpipe.models.animate import FaceBlock
from wanpipe.models.transformer import WanTransformerModel, run_blocks
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.runtime.runner import DiTRunner
from wanpipe.weights.animate_keys import (
    ANIMATE_ORIGINAL_IGNORED,
    animate_original_keys,
    animate_runtime_to_original,
)
from wanpipe.weights.single_file import infer_transformer_config, transformer_to_runtime
from wanpipe.weights.transformer_keys import (
    TRANSFORMER_DIFFUSERS_KEYS,
    prepare_transformer_state,
)

TOL = 1e-3
TEXT_LEN = 512  # diffusers' Wan attention takes the last 512 context tokens as text, the rest as image
CLIP_TOKENS = 17
FACE = tiny_animate.FACE_SIZE


def _worst(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _pair(seed: int = 0, **kw):
    """diffusers' Animate DiT with random weights and ours with the same weights."""
    ref = tiny_animate.make_animate_transformer(seed, **kw)
    ours = WanTransformerModel(TransformerConfig.from_dict(ref.config)).eval()
    ours.load_state_dict(prepare_transformer_state(ref.state_dict()), strict=True)
    return ref, ours


def _inputs(cfg: TransformerConfig, shape=(3, 4, 6), batch: int = 2, faces: int = 8, seed: int = 1):
    """latents (B, 36, f, h, w), timesteps, text (B, 512, text_dim), CLIP tokens, pose latents
    (B, 16, f - 1, h, w), face frames (B, 3, faces, S, S) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = shape
    return dict(
        latents=torch.randn(batch, cfg.in_channels, f, h, w, generator=g),
        timestep=torch.tensor([999.0, 321.5, 40.0][:batch]),
        text=torch.randn(batch, TEXT_LEN, cfg.text_dim, generator=g),
        image=torch.randn(batch, CLIP_TOKENS, cfg.image_dim, generator=g),
        pose=torch.randn(batch, cfg.latent_channels, f - 1, h, w, generator=g),
        face=torch.rand(batch, 3, faces, FACE, FACE, generator=g) * 2 - 1,
    )


def _ours(model: WanTransformerModel, x: dict, **kw) -> torch.Tensor:
    return model(
        x["latents"],
        x["timestep"],
        x["text"],
        x["image"],
        pose_hidden_states=x["pose"],
        face_pixel_values=x["face"],
        **kw,
    )


def _diffusers(ref, x: dict, **kw) -> torch.Tensor:
    return ref(
        x["latents"],
        x["timestep"],
        x["text"],
        x["image"],
        pose_hidden_states=x["pose"],
        face_pixel_values=x["face"],
        return_dict=False,
        **kw,
    )[0]


# --------------------------------------------------------------------------------------------
# (a) the forward against diffusers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_forward_matches_diffusers() -> None:
    ref, ours = _pair()
    cfg = ours.config
    assert (
        cfg.is_animate
        and cfg.num_face_blocks == 2
        and cfg.motion_encoder_channel_sizes
        == (
            (4, 8),
            (8, 6),
            (16, 4),
        )
    )
    for shape, faces in [((3, 4, 6), 8), ((3, 4, 6), 5), ((2, 2, 2), 3)]:
        x = _inputs(cfg, shape, faces=faces)
        # the guided pass's face video: diffusers' pipeline gives face_video * 0 - 1 for the negative one
        for name, face in [("face video", x["face"]), ("blank face (uncond)", x["face"] * 0 - 1)]:
            case = {**x, "face": face}
            expected = _diffusers(ref, case)
            got = _ours(ours, case)
            worst = _worst(got, expected)
            print(f"animate forward {shape}, {faces} face frames, {name}: max abs diff {worst:.2e}")
            assert worst <= TOL
            assert expected.abs().max() > 0.1
    # each Animate input matters: another face video, another pose, no reference-frame exemption
    x = _inputs(cfg)
    got = _ours(ours, x)
    assert _worst(_ours(ours, {**x, "face": x["face"].flip(2)}), got) > 1e-3
    assert _worst(_ours(ours, {**x, "pose": x["pose"].roll(1, dims=1)}), got) > 1e-3
    assert _worst(_ours(ours, {**x, "face": x["face"] * 0 - 1}), got) > 1e-3


@torch.no_grad()
def test_motion_encode_batch_size_changes_memory_not_numerics() -> None:
    ref, ours = _pair(seed=3)
    x = _inputs(ours.config, faces=7)
    base = _ours(ours, x)
    for size in (1, 2, 5, 64):
        worst = _worst(_ours(ours, x, motion_encode_batch_size=size), base)
        expected = _diffusers(ref, x, motion_encode_batch_size=size)
        print(
            f"motion_encode_batch_size={size}: vs default {worst:.2e}, vs diffusers {_worst(base, expected):.2e}"
        )
        assert worst <= 1e-5 and _worst(base, expected) <= TOL


@torch.no_grad()
def test_block_sequence_and_run_blocks() -> None:
    _, ours = _pair(seed=4)
    names = [type(b).__name__ for b in ours.block_sequence(animate=True)]
    assert names == ["WanBlock", "FaceBlock", "WanBlock", "WanBlock", "FaceBlock", "WanBlock"]
    assert ours.block_sequence() == list(ours.blocks)
    x = _inputs(ours.config)
    embedded = ours.embed(
        x["latents"],
        x["timestep"],
        x["text"],
        x["image"],
        pose_hidden_states=x["pose"],
        face_pixel_values=x["face"],
    )
    assert embedded.motion is not None and tuple(embedded.motion.shape) == (2, 3, 3, ours.config.dim)
    assert torch.equal(embedded.motion[:, 0], torch.zeros_like(embedded.motion[:, 0]))
    with pytest.raises(ValueError, match="ran 0 of the 2 face adapter blocks"):
        run_blocks(ours.blocks, embedded.hidden, embedded)
    assert isinstance(ours.block_sequence(animate=True)[1], FaceBlock)


def test_bad_inputs_and_configs_are_refused() -> None:
    _, ours = _pair(seed=6)
    x = _inputs(ours.config)
    with pytest.raises(ValueError, match="needs pose_hidden_states and face_pixel_values"):
        _ours(ours, {**x, "face": None})
    with pytest.raises(ValueError, match=r"pose_hidden_states must have shape \(2, 16, 2, 4, 6\)"):
        _ours(ours, {**x, "pose": x["pose"][:, :, :1]})
    with pytest.raises(ValueError, match="give 5 to 8 face frames"):
        _ours(ours, {**x, "face": x["face"][:, :, :4]})
    with pytest.raises(ValueError, match=r"face_pixel_values must have shape \(2, 3, T, 16, 16\)"):
        _ours(ours, {**x, "face": x["face"][..., :8, :8]})
    base = {k: v for k, v in tiny_animate.ANIMATE_TRANSFORMER_KW.items() if k in tiny.TRANSFORMER_KW}
    plain = WanTransformerModel(TransformerConfig.from_dict({**base, "in_channels": 16, "num_layers": 2}))
    with pytest.raises(ValueError, match="not an Animate model"):
        plain(
            torch.randn(1, 16, 2, 4, 4),
            torch.tensor([1.0]),
            torch.randn(1, 3, 16),
            pose_hidden_states=x["pose"],
        )
    animate = dict(tiny_animate.ANIMATE_TRANSFORMER_KW)
    for bad, message in [
        ({"num_layers": 5}, "multiple of inject_face_latents_blocks"),
        ({"in_channels": 20}, "2 \\* latent_channels \\+ 4"),
        ({"motion_encoder_size": 24}, "power of two"),
        ({"motion_encoder_channel_sizes": {"16": 4, "8": 6}}, "no channels for sizes \\[4\\]"),
        ({"vace_layers": [0], "vace_in_channels": 4}, "either a VACE or an Animate"),
    ]:
        with pytest.raises(ValueError, match=message):
            TransformerConfig.from_dict({**animate, **bad})
    # one Animate field alone: the others take the released model's values
    cfg = TransformerConfig.from_dict(
        {**base, "in_channels": 36, "num_layers": 5, "inject_face_latents_blocks": 5}
    )
    assert (cfg.latent_channels, cfg.motion_encoder_size, cfg.motion_dim, cfg.face_encoder_num_heads) == (
        16,
        512,
        20,
        4,
    )


def test_key_rules_and_fp32_islands_match_diffusers() -> None:
    ref, ours = _pair(seed=7)
    renamed = prepare_transformer_state({k: k for k in ref.state_dict()})
    assert set(renamed) == set(ours.state_dict())
    # the Animate parts keep diffusers' names; the main DiT's are renamed as for every variant
    assert renamed["face_adapter.1.to_q.weight"] == "face_adapter.1.to_q.weight"
    assert renamed["blocks.0.cross_attn.k_img.weight"] == "blocks.0.attn2.add_k_proj.weight"
    own = [k for k in renamed if k.split(".")[0] in ("motion_encoder", "face_encoder", "face_adapter")]
    assert own and all(renamed[k] == k for k in own)
    assert not any(re.fullmatch(p, k) for k in own for p, _ in TRANSFORMER_DIFFUSERS_KEYS)
    keep = ref._keep_in_fp32_modules
    for ours_name, ref_name in renamed.items():
        assert WanTransformerModel.keeps_fp32(ours_name) == any(m in ref_name.split(".") for m in keep), (
            ours_name
        )


# --------------------------------------------------------------------------------------------
# (b) the original layout: names from the original module, values through diffusers' conversion
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_model():
    """The original ``WanAnimateModel``: a tiny main DiT (the released one's width is not needed), the
    motion encoder, face encoder and adapter at the released sizes (the original hard-codes them)."""
    reference = wan_animate_reference.require()
    torch.manual_seed(0)
    model = reference.model_animate.WanAnimateModel(
        dim=24, ffn_dim=32, freq_dim=8, text_dim=16, num_heads=2, num_layers=5, in_dim=36, out_dim=16
    ).eval()
    tiny.randomize(model, 3, 0.2)
    tiny.randomize(model.motion_encoder, 4, 1.0)
    return model


def test_original_names_map_onto_ours_exactly(original_model) -> None:
    state = original_model.state_dict()
    runtime = transformer_to_runtime(state)
    cfg = infer_transformer_config(runtime, num_heads=2)
    assert cfg.is_animate and cfg.num_face_blocks == 1 and cfg.motion_encoder_channel_sizes is None
    assert (cfg.motion_encoder_size, cfg.face_encoder_hidden_dim, cfg.image_dim) == (512, 1024, 1280)
    ours = WanTransformerModel(cfg)
    assert set(runtime) == set(ours.state_dict())  # none missing, none left over
    dropped = {k for k in state if any(re.fullmatch(p, k) for p in ANIMATE_ORIGINAL_IGNORED)}
    assert dropped and all(k.endswith(".kernel") for k in dropped)
    assert sum(v.numel() for v in runtime.values()) == sum(
        v.numel() for k, v in state.items() if k not in dropped
    )
    # every rule of the table is used by the original's names
    table = animate_original_keys(7).to_runtime()
    unused = [p for p, _ in table if not any(re.fullmatch(p, k) for k in state)]
    assert not unused, unused
    # and back: the original names and shapes, but the blur filters (constants)
    back = animate_runtime_to_original(runtime)
    assert set(back) == set(state) - dropped
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_diffusers_conversion_of_the_original_gives_the_same_weights(original_model) -> None:
    """diffusers' own converter (``single_file_utils.convert_wan_transformer_to_diffusers``) of the
    original state dict, renamed to ours, is our conversion of it, tensor for tensor."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    state = {k: v.clone() for k, v in original_model.state_dict().items()}
    converted = convert_wan_transformer_to_diffusers(dict(state))
    converted = {k: v for k, v in converted.items() if not k.endswith(".kernel")}
    theirs = prepare_transformer_state(converted)
    ours = transformer_to_runtime(state)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


@torch.no_grad()
def test_forward_matches_the_original_model(original_model) -> None:
    runtime = transformer_to_runtime(original_model.state_dict())
    ours = WanTransformerModel(infer_transformer_config(runtime, num_heads=2)).eval()
    ours.load_state_dict(runtime, strict=True)
    g = torch.Generator().manual_seed(1)
    f, h, w = 2, 4, 6
    noise, cond = torch.randn(16, f, h, w, generator=g), torch.randn(20, f, h, w, generator=g)
    text, clip = torch.randn(5, 16, generator=g), torch.randn(1, 257, 1280, generator=g)
    pose = torch.randn(16, f - 1, h, w, generator=g)
    face = torch.rand(1, 3, 2, 512, 512, generator=g) * 2 - 1
    t = torch.tensor([700.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the original's CUDA autocast and checkpoint on the CPU
        expected = original_model(
            [noise],
            t,
            clip,
            [text],
            seq_len=f * h * w // 4,
            y=[cond],
            pose_latents=[pose],
            face_pixel_values=face,
        )[0]
    padded = torch.cat([text, text.new_zeros(TEXT_LEN - 5, 16)])[None]
    got = ours(
        torch.cat([noise, cond])[None], t, padded, clip, pose_hidden_states=pose[None], face_pixel_values=face
    )
    worst = _worst(got[0], expected)
    print(f"animate forward vs the original WanAnimateModel: max abs diff {worst:.2e}")
    assert worst <= TOL and expected.abs().max() > 0.1


# --------------------------------------------------------------------------------------------
# (c) loading: the diffusers folder, an original folder, single files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def animate_folder(tmp_path_factory) -> Path:
    return tiny_animate.save_animate_checkpoint(
        tmp_path_factory.mktemp("animate") / "Wan2.2-Animate-tiny", seed=10
    )


@pytest.fixture(scope="module")
def animate_pipe(animate_folder):
    return WanPipeline.from_pretrained(animate_folder, device="cpu", dtype="float32")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_diffusers_folder_loads_as_the_animate_variant(animate_folder, animate_pipe) -> None:
    ref = tiny_animate.load_animate_reference(animate_folder)
    arch = animate_pipe.arch
    assert arch.variant.name == "wan2.2-animate-14b" and arch.variant.task == "animate"
    assert arch.accepts_animate and not arch.accepts_vace and not arch.takes_image
    defaults = arch.defaults
    assert (defaults.height, defaults.width, defaults.num_frames, defaults.num_inference_steps) == (
        720,
        1280,
        77,
        20,
    )
    assert defaults.guidance_scale == 1.0 and defaults.fps == 30
    assert arch.image_encoder is not None and animate_pipe.executor.image_encoder is not None
    executor = animate_pipe.executor
    assert executor.accepts_animate
    dit = executor.transformer
    _assert_same_weights(_state(dit), prepare_transformer_state(ref.transformer.state_dict()))
    with torch.no_grad():
        x = _inputs(dit.config, (2, 4, 4), faces=4)
        worst = _worst(_ours(dit, x), _diffusers(ref.transformer, x))
    print(f"loaded Animate DiT vs diffusers' WanAnimatePipeline.transformer: max abs diff {worst:.2e}")
    assert worst <= TOL


def test_a_plain_checkpoint_is_not_animate(tiny_ckpt) -> None:
    from wanpipe.weights.arch import read_diffusers_arch

    arch = read_diffusers_arch(tiny_ckpt)
    assert not arch.accepts_animate and not arch.transformer.is_animate


def _original_dit(diffusers_folder: Path) -> dict[str, torch.Tensor]:
    """The tiny diffusers DiT in the original names (main blocks by the rename table read backwards, the
    Animate parts by :func:`animate_runtime_to_original`), with the original's blur-filter buffers."""
    state = {}
    for f in sorted((diffusers_folder / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    runtime = prepare_transformer_state(state)
    original = animate_runtime_to_original(runtime)
    kernel = torch.tensor([1.0, 3.0, 3.0, 1.0])
    for key in list(original):
        if m := re.fullmatch(r"(motion_encoder\.enc\.net_app\.convs\.\d+)\.conv2\.1\.weight", key):
            for slot in ("conv2", "skip"):
                original[f"{m.group(1)}.{slot}.0.kernel"] = torch.outer(kernel, kernel) / 64
    return original


def test_original_folder_and_single_file(animate_folder, animate_pipe, tmp_path) -> None:
    """An original Wan2.2-Animate-14B folder (``config.json`` of ``WanAnimateModel``, the DiT shards in the
    original names with the blur buffers, the VAE and T5 ``.pth``, the tokenizer folder, a CLIP vision file
    in the transformers names), and the DiT as one ComfyUI-style file: the same weights, the variant found."""
    out = tiny_formats.write_original(animate_folder, tmp_path / "Wan2.2-Animate-tiny")
    for f in out.glob("diffusion_pytorch_model*"):
        f.unlink()
    original = _original_dit(animate_folder)
    save_file(original, str(out / "diffusion_pytorch_model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config.update(_class_name="WanAnimateModel", in_dim=36, motion_encoder_dim=8, use_img_emb=True)
    (out / "config.json").write_text(json.dumps(config))
    clip = load_file(animate_folder / "image_encoder" / "model.safetensors")
    save_file(clip, str(out / "models_clip_tiny.safetensors"))
    expected = _state(animate_pipe.executor.transformer)
    pipe = WanPipeline.from_pretrained(out, device="cpu", dtype="float32")
    assert pipe.arch.variant.name == "wan2.2-animate-14b" and pipe.arch.accepts_animate
    assert pipe.arch.scheduler.flow_shift == 5.0  # wan_animate_14B.py's sample_shift
    # the files do not say rope_max_seq_len or the encode batch size: the released model's values
    assert pipe.arch.transformer == replace(
        animate_pipe.arch.transformer, rope_max_seq_len=1024, motion_encoder_batch_size=8
    )
    _assert_same_weights(_state(pipe.executor.transformer), expected)
    single = tmp_path / "wan2.2_animate_14B.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(single))
    files = tiny_formats.write_comfy(animate_folder, tmp_path / "comfy")
    pipe = WanPipeline.from_single_files(
        single,
        vae=files["vae"],
        text_encoder=files["text_encoder"],
        image_encoder=out / "models_clip_tiny.safetensors",
        tokenizer=animate_folder / "tokenizer",
        num_heads=2,
        device="cpu",
        dtype="float32",
    )
    assert pipe.arch.variant.name == "wan2.2-animate-14b"
    _assert_same_weights(_state(pipe.executor.transformer), expected)


def test_convert_to_diffusers_is_read_back_by_diffusers(animate_folder, tmp_path) -> None:
    from wanpipe.weights.components import open_checkpoint
    from wanpipe.weights.convert import write_diffusers

    arch, weights = open_checkpoint(animate_folder)
    expected = dict(weights.transformer())
    out = write_diffusers(arch, weights, tmp_path / "diffusers")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanAnimatePipeline"
    ref = tiny_animate.load_animate_reference(out)
    _assert_same_weights(prepare_transformer_state(ref.transformer.state_dict()), expected)
    assert ref.transformer.config.motion_encoder_channel_sizes == {"4": 8, "8": 6, "16": 4}


# --------------------------------------------------------------------------------------------
# the runtime: one block call site, what applies and what is refused
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_runner_paths_give_the_same_prediction(animate_pipe) -> None:
    from wanpipe.runtime.compile import CompiledDiT
    from wanpipe.runtime.offload import BlockStreamer

    dit = animate_pipe.executor.transformer
    x = _inputs(dit.config, (2, 2, 2), batch=1, faces=4)
    kw = dict(pose_hidden_states=x["pose"], face_pixel_values=x["face"])
    expected = dit(x["latents"], x["timestep"], x["text"], x["image"], **kw)
    streamer = BlockStreamer("cpu", num_buffers=2)
    for name, runner in [
        ("plain", DiTRunner()),
        ("streamed", DiTRunner(streamer=streamer)),
        ("compiled", DiTRunner(compiled=CompiledDiT())),
    ]:
        got = runner.forward(dit, x["latents"], x["timestep"], x["text"], x["image"], **kw)
        worst = _worst(got, expected)
        print(f"animate runner {name}: max abs diff {worst:.2e}")
        assert worst <= 1e-5
    # every main and face block went through a buffer (a ring per kind of block)
    assert streamer.copies == len(dit.blocks) + len(dit.face_adapter)
    assert sum(isinstance(b, FaceBlock) for b in streamer.buffers) == 2


def test_step_caches_and_parallelism_are_refused(animate_pipe) -> None:
    from wanpipe.context import Approximations
    from wanpipe.parallel import ParallelConfig, ParallelMesh

    executor = animate_pipe.executor
    before = executor.runtime
    try:
        animate_pipe.set_runtime(RuntimeOptions(offload="block"))
        assert executor.runner.streamer is not None
        for kind in ("first-block", "teacache"):
            with pytest.raises(
                ValueError, match=f"do not apply to Animate checkpoints yet: leave --cache {kind} off"
            ):
                animate_pipe.set_runtime(RuntimeOptions(cache=kind, residual_threshold=0.1))
        animate_pipe.set_runtime(before)
        with pytest.raises(ValueError, match="leave residual_threshold off"):
            executor.check_step_cache(Approximations(residual_threshold=0.05))
        with pytest.raises(ValueError, match="does not combine with an Animate checkpoint"):
            animate_pipe.enable_parallel(ParallelConfig())
        assert executor.parallel is None
        dit = executor.transformer
        x = _inputs(dit.config, (2, 2, 2), batch=1, faces=4)
        runner = DiTRunner(mesh=ParallelMesh.build(ParallelConfig()))
        with pytest.raises(ValueError, match="parallelism does not apply to Animate"):
            runner.forward(
                dit,
                x["latents"],
                x["timestep"],
                x["text"],
                x["image"],
                pose_hidden_states=x["pose"],
                face_pixel_values=x["face"],
            )
    finally:
        animate_pipe.set_runtime(before)
