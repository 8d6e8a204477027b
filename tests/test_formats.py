"""Every layout wanpipe reads gives the frames of the diffusers original: the original Wan repository
layout, ComfyUI-style single files (original or diffusers names, ``.pth``), fp8 (e4m3fn scaled, e5m2),
``wanpipe convert`` both ways, the original sigma grid, and clear errors for bad files.

Renames must give exactly our diffusers-layout frames (the same numbers in, the same numbers out);
diffusers itself is matched to 1e-3; fp8 is compared with diffusers running the dequantized weights
(1e-3) and, for the record, with the unquantized model (``FP8_TOL``).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests import tiny_formats
from wanpipe import WanPipeline
from wanpipe.cli import main
from wanpipe.weights.components import open_checkpoint
from wanpipe.weights.convert import write_diffusers
from wanpipe.weights.fp8 import Fp8Linear, check_fp8_mode, dequantize, quantize, scaled_mm_linear
from wanpipe.weights.safetensors_io import CheckpointError

FRAME_TOL = 1e-3
FP8_TOL = 0.05  # worst |frame difference| in [0, 1] of an e4m3fn DiT against the unquantized one
E5M2_TOL = 0.1  # e5m2 has 2 mantissa bits and, unscaled, no per-tensor scale
KW = dict(
    prompt="a cat walks on the grass",
    negative_prompt="worst quality",
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=5.0,
    seed=4,
    flow_shift=3.0,
)


def frames(pipe: WanPipeline) -> np.ndarray:
    return pipe.generate(**KW, progress=False).frames


def reference_frames(ref) -> np.ndarray:
    kw = {k: v for k, v in KW.items() if k not in ("seed", "flow_shift", "num_inference_steps")}
    out = ref(
        generator=torch.Generator("cpu").manual_seed(KW["seed"]),
        num_inference_steps=KW["num_inference_steps"],
        output_type="np",
        **kw,
    ).frames[0]
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers folder, diffusers pipeline, our pipeline from it, our frames)."""
    folder = tmp_path_factory.mktemp("formats") / "diffusers"
    ref = tiny_formats.t2v(folder)
    ours = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    return folder, ref, ours, frames(ours)


@pytest.fixture(scope="module")
def original(base, tmp_path_factory):
    return tiny_formats.write_original(base[0], tmp_path_factory.mktemp("original") / "Wan2.1-T2V-tiny")


@pytest.fixture(scope="module")
def comfy(base, tmp_path_factory):
    return tiny_formats.write_comfy(base[0], tmp_path_factory.mktemp("comfy"))


def test_diffusers_layout_matches_diffusers(base) -> None:
    _, ref, _, ours = base
    diff = float(np.abs(ours - reference_frames(ref)).max())
    assert diff <= FRAME_TOL, diff
    assert float(ours.std()) > 1e-3


def test_original_layout_gives_the_same_frames(base, original) -> None:
    pipe = WanPipeline.from_pretrained(original, device="cpu", dtype="float32", sigma_grid="diffusers")
    assert pipe.arch.variant.name == "wan2.1-t2v-1.3b"
    assert pipe.arch.transformer == replace(base[2].arch.transformer, rope_max_seq_len=1024)
    assert len(list(original.glob("diffusion_pytorch_model-*.safetensors"))) > 1  # sharded
    out = frames(pipe)
    np.testing.assert_array_equal(out, base[3])


def test_original_layout_defaults_to_the_original_sampler(original) -> None:
    arch, _ = open_checkpoint(original)
    assert arch.scheduler.sigma_grid == "original"
    assert arch.scheduler.flow_shift == 5.0  # Wan2.1 generate.py's sample_shift


def test_original_sigma_grid() -> None:
    from wanpipe.schedulers import SchedulerConfig, make_schedule

    steps, shift = 10, 5.0
    sched = make_schedule(SchedulerConfig(kind="unipc", sigma_grid="original"), steps, shift)
    # Wan's FlowUniPCMultistepScheduler.set_timesteps: linspace(sigma_max, sigma_min, N + 1)[:-1] with
    # sigma_max = float32(1 - 1/1000), sigma_min = 0, then shifted; timesteps int64(sigma * 1000).
    sigmas = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    np.testing.assert_array_equal(sched.timesteps, (sigmas * 1000).astype(np.int64).astype(np.float32))
    np.testing.assert_array_equal(sched.sigmas, np.append(sigmas, 0.0).astype(np.float32))
    default = make_schedule(SchedulerConfig(kind="unipc"), steps, shift)
    assert not np.array_equal(default.timesteps, sched.timesteps)
    with pytest.raises(ValueError, match="sigma_grid"):
        SchedulerConfig(kind="unipc", sigma_grid="karras")  # type: ignore[arg-type]


def test_comfy_single_files_give_the_same_frames(base, comfy) -> None:
    pipe = WanPipeline.from_single_files(
        **comfy, tokenizer=base[0] / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers"
    )
    assert pipe.arch.transformer == replace(base[2].arch.transformer, rope_max_seq_len=1024)
    np.testing.assert_array_equal(frames(pipe), base[3])


def test_diffusers_named_single_files_and_pth(base, tmp_path) -> None:
    """A DiT file in diffusers names, the VAE in diffusers names, the UMT5 encoder as an original .pth."""
    folder = base[0]
    dit = next((folder / "transformer").glob("*.safetensors"))
    vae = next((folder / "vae").glob("*.safetensors"))
    t5 = tmp_path / "t5.pth"
    torch.save(tiny_formats.original_state(folder)["text_encoder"], t5)
    pipe = WanPipeline.from_single_files(
        dit, vae, t5, tokenizer=folder / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers"
    )
    np.testing.assert_array_equal(frames(pipe), base[3])


def test_tokenizer_defaults_to_umt5_xxl_by_hub_id(base, comfy, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_download(**kw):
        calls.append(kw)
        return str(base[0] / "tokenizer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pipe = WanPipeline.from_single_files(**comfy, device="cpu", dtype="float32")
    assert calls[0]["repo_id"] == "google/umt5-xxl"
    assert "spiece.model" in calls[0]["allow_patterns"]
    assert not any(p.endswith((".bin", ".pth", ".safetensors")) for p in calls[0]["allow_patterns"])
    assert pipe.arch.scheduler.sigma_grid == "original"


@pytest.mark.parametrize("fmt", ["e4m3fn_scaled", "e5m2"])
def test_fp8_dit_runs_upcast_per_layer(base, tmp_path, fmt) -> None:
    from diffusers import WanPipeline as DiffusersWanPipeline

    folder, _, _, base_frames = base
    files = tiny_formats.write_comfy(folder, tmp_path, fp8=fmt)
    pipe = WanPipeline.from_single_files(
        **files, tokenizer=folder / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers"
    )
    linear = pipe.executor.transformer.blocks[0].self_attn.q
    assert isinstance(linear, Fp8Linear) and linear.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    out = frames(pipe)
    # diffusers with the same (dequantized) weights
    ref = DiffusersWanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.load_state_dict(tiny_formats.dequantized_dit(files["transformer"]))
    diff = float(np.abs(out - reference_frames(ref)).max())  # vs diffusers on the dequantized weights
    assert diff <= FRAME_TOL, diff
    lossy = float(np.abs(out - base_frames).max())  # vs the unquantized model
    assert 0 < lossy <= (FP8_TOL if fmt == "e4m3fn_scaled" else E5M2_TOL), lossy
    # dequantizing at load gives the very same frames as upcasting per layer
    pipe2 = WanPipeline.from_single_files(
        **files,
        tokenizer=folder / "tokenizer",
        device="cpu",
        dtype="float32",
        sigma_grid="diffusers",
        fp8="dequantize",
    )
    assert not isinstance(pipe2.executor.transformer.blocks[0].self_attn.q, Fp8Linear)
    np.testing.assert_array_equal(frames(pipe2), out)


def test_fp8_quantize_a_full_precision_checkpoint(base) -> None:
    pipe = WanPipeline.from_pretrained(base[0], device="cpu", dtype="float32", fp8="quantize")
    assert pipe.executor.transformer.blocks[1].ffn[0].weight.dtype == torch.float8_e4m3fn
    lossy = float(np.abs(frames(pipe) - base[3]).max())
    assert lossy <= FP8_TOL


def test_scaled_mm_dispatch_on_cpu(monkeypatch) -> None:
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        check_fp8_mode("scaled_mm", "cpu")
    with pytest.raises(ValueError, match="fp8 must be one of"):
        check_fp8_mode("int4", "cpu")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    q, s = quantize(w)
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):  # what torch._scaled_mm computes
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)

    import wanpipe.weights.fp8 as fp8

    monkeypatch.setattr(fp8, "_scaled_mm", fake_scaled_mm)
    bias = torch.randn(32, generator=g)
    out = scaled_mm_linear(x, q, s, bias)
    assert calls == [(torch.float8_e4m3fn, torch.float8_e4m3fn, (15, 64), (64, 32))]
    assert out.shape == (3, 5, 32) and out.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.float(), dequantize(q, s), bias)
    rel = float((out.float() - exact).norm() / exact.norm())
    assert rel < 0.08, rel
    # on a CPU input an Fp8Linear in scaled_mm mode upcasts instead
    layer = Fp8Linear(64, 32, mode="scaled_mm")
    layer.weight.data, layer.weight_scale.data, layer.bias.data = q, s, bias
    upcast = torch.nn.functional.linear(x, dequantize(q, s, torch.bfloat16), bias.bfloat16())
    torch.testing.assert_close(layer(x), upcast, rtol=0, atol=0)


def test_convert_both_ways(base, original, tmp_path) -> None:
    from diffusers import WanPipeline as DiffusersWanPipeline

    # original -> diffusers: diffusers itself reads it and gives the original frames
    out = tmp_path / "as-diffusers"
    assert (
        main(
            ["convert", str(original), "--to", "diffusers", "--output", str(out), "--max-shard-size", "100KB"]
        )
        == 0
    )
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ref = DiffusersWanPipeline.from_pretrained(out, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = type(base[1].scheduler).from_config(base[1].scheduler.config)  # shift 3.0, diffusers grid
    diff = float(np.abs(reference_frames(ref) - base[3]).max())  # run by diffusers
    assert diff <= FRAME_TOL, diff
    np.testing.assert_array_equal(
        frames(WanPipeline.from_pretrained(out, device="cpu", dtype="float32", sigma_grid="diffusers")),
        base[3],
    )
    # diffusers -> original -> load
    back = tmp_path / "as-original"
    assert main(["convert", str(base[0]), "--to", "original", "--output", str(back)]) == 0
    assert (back / "Wan2.1_VAE.pth").is_file() and (back / "google" / "umt5-xxl").is_dir()
    pipe = WanPipeline.from_pretrained(back, device="cpu", dtype="float32", sigma_grid="diffusers")
    np.testing.assert_array_equal(frames(pipe), base[3])


def test_convert_fp8_single_files_to_diffusers(base, tmp_path) -> None:
    files = tiny_formats.write_comfy(base[0], tmp_path / "fp8", fp8="e4m3fn_scaled")
    arch, weights = open_checkpoint(**files, tokenizer=base[0] / "tokenizer")
    write_diffusers(arch, weights, tmp_path / "out", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(tmp_path / "out", device="cpu", dtype="float32")
    assert not isinstance(pipe.executor.transformer.blocks[0].self_attn.q, Fp8Linear)
    assert float(np.abs(frames(pipe) - base[3]).max()) <= FP8_TOL


def test_cli_generate_from_single_files_with_fp8_flag(base, comfy, tmp_path, capsys) -> None:
    out = tmp_path / "v.mp4"
    args = ["generate", "--transformer", str(comfy["transformer"]), "--vae", str(comfy["vae"])]
    args += ["--text-encoder", str(comfy["text_encoder"]), "--tokenizer", str(base[0] / "tokenizer")]
    args += ["--prompt", "a cat", "--height", "32", "--width", "32", "--num-frames", "5", "--steps", "2"]
    args += ["--fp8", "quantize", "--sigma-grid", "diffusers", "--output", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    assert out.is_file()
    assert (
        main(["generate", "--transformer", str(comfy["transformer"]), "--prompt", "x", "--output", str(out)])
        == 2
    )
    assert "--vae" in capsys.readouterr().err


# -- bad files ------------------------------------------------------------------------------------------


def test_wrong_shapes_are_named(base, comfy, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(comfy["transformer"])
    key = "model.diffusion_model.blocks.1.ffn.0.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors.*blocks\.1\.ffn\.0\.weight"):
        WanPipeline.from_single_files(
            bad, comfy["vae"], comfy["text_encoder"], tokenizer=base[0] / "tokenizer"
        )


def test_unknown_layout(base, comfy, tmp_path) -> None:
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"net.layer1.weight": torch.zeros(2, 2)}, str(odd))
    with pytest.raises(CheckpointError, match="transformer: unknown layout"):
        WanPipeline.from_single_files(
            odd, comfy["vae"], comfy["text_encoder"], tokenizer=base[0] / "tokenizer"
        )
    with pytest.raises(CheckpointError, match="vae: unknown layout"):
        WanPipeline.from_single_files(
            comfy["transformer"], odd, comfy["text_encoder"], tokenizer=base[0] / "tokenizer"
        )
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a Wan checkpoint"):
        WanPipeline.from_pretrained(folder, device="cpu")


def test_truncated_files(base, comfy, original, tmp_path) -> None:
    cut = tmp_path / "cut.safetensors"
    data = comfy["transformer"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted safetensors"):
        WanPipeline.from_single_files(
            cut, comfy["vae"], comfy["text_encoder"], tokenizer=base[0] / "tokenizer"
        )
    broken = tmp_path / "broken"
    shutil.copytree(original, broken)
    pth = broken / "Wan2.1_VAE.pth"
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="weights_only=True"):
        WanPipeline.from_pretrained(broken, device="cpu")


@pytest.mark.gpu
def test_scaled_mm_speed_and_error_on_gpu() -> None:
    """fp8 matmuls of a 14B-sized linear against bf16 (prints time and error; needs capability >= 8.9)."""
    import time

    from wanpipe.weights.fp8 import fp8_matmul_supported

    if not fp8_matmul_supported("cuda"):
        pytest.skip("no fp8 tensor cores")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(8192, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(13824, 5120, device="cuda", generator=g) * 0.02
    q, s = quantize(w)
    layer = Fp8Linear(5120, 13824, mode="scaled_mm").cuda()
    layer.weight.data, layer.weight_scale.data = q, s
    layer.bias.data = torch.zeros(13824, device="cuda")
    dense = dequantize(q, s, torch.bfloat16)

    def bench(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 20

    t_fp8 = bench(lambda: layer(x))
    t_bf16 = bench(lambda: torch.nn.functional.linear(x, dense))
    exact = torch.nn.functional.linear(x.float(), dense.float())
    rel = float((layer(x).float() - exact).norm() / exact.norm())
    print(f"scaled_mm {t_fp8 * 1e3:.2f} ms vs bf16 {t_bf16 * 1e3:.2f} ms, relative error {rel:.4f}")
    assert rel < 0.08
