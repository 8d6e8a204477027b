"""GGUF transformer files: each type's dequantization equals gguf-py's reference (``gguf.quants``), and a
tiny DiT written to GGUF with gguf's writer (one type per layer, in the original names as city96's Wan
GGUFs are) gives diffusers' frames when diffusers loads the same file with its GGUF loader.

gguf-py quantizes only the 32-value types (Q4_0 ... Q8_0) and BF16; the K types (Q2_K ... Q6_K) are
written as random blocks with sane scales, so the file's weights are whatever those blocks decode to
(for wanpipe and diffusers alike).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from tests import tiny_formats
from tests.test_formats import FRAME_TOL, frames, reference_frames
from wanpipe import WanPipeline
from wanpipe.weights.fp8 import dit_fp8_keep
from wanpipe.weights.gguf_quants import GGUF_TYPES, GGUFLinear, dequantize
from wanpipe.weights.safetensors_io import CheckpointError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
PLAIN = [Q.F16, Q.BF16, Q.F32]
K_FIELDS = {  # the fp16 super-block scale (d) and minimum scale (dmin) offsets, and dmin / d for a zero mean
    Q.Q2_K: (80, 82, 1.5),
    Q.Q3_K: (108, None, 0.0),
    Q.Q4_K: (0, 2, 7.5),
    Q.Q5_K: (0, 2, 15.5),
    Q.Q6_K: (208, None, 0.0),
}
DIT = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512)  # widths of whole K blocks (256)


def random_k_blocks(rows: int, cols: int, qtype, rng: np.random.Generator, std: float = 0.05) -> np.ndarray:
    """Random K-type blocks (rows, cols / 256 * type_size) whose values have about ``std``."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // 256 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    d_at, m_at, ratio = K_FIELDS[qtype]

    def put(d: float) -> None:
        blocks[:, d_at : d_at + 2] = np.array([d], np.float16).view(np.uint8)
        if m_at is not None:
            blocks[:, m_at : m_at + 2] = np.array([d * ratio], np.float16).view(np.uint8)

    put(1.0)
    put(std / float(gguf.quants.dequantize(raw, qtype).std()))
    return raw


def write_gguf(state: dict[str, torch.Tensor], path, seed: int = 0, prefix: str = "") -> dict[str, str]:
    """The DiT (original names) as GGUF: the blocks' linears cycle through every type, a few other 2-D
    weights take 32-value types (dequantized at load), 1-D and small tensors F32, the 5-D patch
    embedding F16. Returns {name: type name}."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "wan")
    block_types = itertools.cycle([*BLOCK_TYPES, *PLAIN])
    other_types = itertools.cycle([Q.Q8_0, Q.Q4_1, Q.Q5_0])
    written = {}
    for name, value in state.items():
        data = value.float().numpy()
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and dit_fp8_keep(layer):
            qtype = next(block_types)
        elif data.ndim == 2 and data.shape[1] % 32 == 0 and data.size > 1024:
            qtype = next(other_types)
        elif data.ndim == 5:
            qtype = Q.F16
        else:
            qtype = Q.F32
        if qtype in K_FIELDS:
            raw = random_k_blocks(data.shape[0], data.shape[1], qtype, rng)
        else:
            raw = gguf.quants.quantize(data, qtype)
        writer.add_tensor(prefix + name, raw, raw_dtype=qtype)
        written[name] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_reference(qtype) -> None:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert GGUF_TYPES[int(qtype)][1:] == (block, size)
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(5, 3 * size), dtype=np.uint8)  # any bytes: every bit pattern
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), int(qtype)).numpy()
    assert ours.shape == ref.shape == (5, 3 * block)
    finite = np.isfinite(ref)
    assert finite.mean() > 0.5 and np.array_equal(np.isfinite(ours), finite)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    if qtype not in K_FIELDS:  # and on gguf-py's own quantization of real numbers
        x = rng.standard_normal((4, 2 * block)).astype(np.float32)
        q = gguf.quants.quantize(x, qtype)
        deq = dequantize(torch.from_numpy(q), int(qtype)).numpy()
        np.testing.assert_array_equal(deq, gguf.quants.dequantize(q, qtype))
        assert 0 < np.abs(deq - x).max() < 0.5


@pytest.fixture(scope="module")
def gguf_dit(tmp_path_factory):
    """(diffusers folder, the .gguf file, its types, the comfy single files for the other components)."""
    root = tmp_path_factory.mktemp("gguf")
    folder = root / "diffusers"
    tiny_formats.t2v(folder, dit_kw=DIT)
    state = tiny_formats.original_state(folder)["transformer"]
    path = root / "wan2.1-t2v-tiny-Q4_K_M.gguf"
    types = write_gguf(state, path)
    comfy = tiny_formats.write_comfy(folder, root / "comfy")
    return folder, path, types, comfy, state


def test_gguf_dit_matches_diffusers_gguf_loader(gguf_dit, monkeypatch) -> None:
    import diffusers.quantizers.gguf.utils as gguf_utils
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
    from diffusers import WanPipeline as DiffusersWanPipeline

    folder, path, types, comfy, _ = gguf_dit
    assert {t.name for t in [*BLOCK_TYPES, *PLAIN]} <= set(types.values())
    pipe = WanPipeline.from_single_files(
        path,
        comfy["vae"],
        comfy["text_encoder"],
        tokenizer=folder / "tokenizer",
        device="cpu",
        dtype="float32",
        sigma_grid="diffusers",
    )
    dit = pipe.executor.transformer
    kept = {n: m for n, m in dit.named_modules() if isinstance(m, GGUFLinear)}
    quantized = {q.name for q in BLOCK_TYPES}
    expected = {
        k.removesuffix(".weight") for k, t in types.items() if t in quantized and k.startswith("blocks.")
    }
    assert set(kept) == expected and all(m.weight.dtype == torch.uint8 for m in kept.values())
    assert dit.time_embedding[2].weight.dtype == torch.float32  # a Q8_0 tensor outside the blocks
    out = frames(pipe)

    def diffusers_frames() -> np.ndarray:
        transformer = WanTransformer3DModel.from_single_file(
            str(path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(folder),
            subfolder="transformer",
            torch_dtype=torch.float32,
        )
        ref = DiffusersWanPipeline.from_pretrained(folder, transformer=transformer, torch_dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        return reference_frames(ref)

    # diffusers' GGUF layers dequantize in float16 (its block functions' default dtype); ggml and gguf-py
    # (and wanpipe) in float32. Its own functions with dtype=float32 are the reference; the float16 run
    # is recorded.
    fp16 = float(np.abs(out - diffusers_frames()).max())
    for qtype, fn in list(gguf_utils.dequantize_functions.items()):
        monkeypatch.setitem(
            gguf_utils.dequantize_functions, qtype, functools.partial(fn, dtype=torch.float32)
        )
    diff = float(np.abs(out - diffusers_frames()).max())
    print(
        f"GGUF DiT vs diffusers' GGUF loader: worst |frame diff| {diff:.2e} (its float16 dequantization: {fp16:.2e})"
    )
    assert diff <= FRAME_TOL, diff
    assert fp16 < 0.1, fp16
    assert float(out.std()) > 1e-3


def test_gguf_errors(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="GGUF"):
        WanPipeline.from_single_files(bad, bad, bad)
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "wan")
    writer.add_tensor("blocks.0.ffn.0.weight", np.zeros((4, 256 // 256 * 66), np.uint8), raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="IQ2_XXS.*not read"):
        WanPipeline.from_single_files(tmp_path / "iq.gguf", bad, bad)


def test_gguf_dequantize_at_load_and_convert(gguf_dit, tmp_path) -> None:
    """``wanpipe convert`` of a GGUF DiT (dequantized to float32) gives the frames of running it quantized."""
    from wanpipe.weights.components import open_checkpoint
    from wanpipe.weights.convert import write_diffusers

    folder, path, _, comfy, _ = gguf_dit
    files = dict(transformer=path, vae=comfy["vae"], text_encoder=comfy["text_encoder"])
    pipe = WanPipeline.from_single_files(
        **files, tokenizer=folder / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers"
    )
    arch, weights = open_checkpoint(**files, tokenizer=folder / "tokenizer", sigma_grid="diffusers")
    write_diffusers(arch, weights, tmp_path / "out", dtype=torch.float32)
    converted = WanPipeline.from_pretrained(tmp_path / "out", device="cpu", dtype="float32")
    assert not any(isinstance(m, GGUFLinear) for m in converted.executor.transformer.modules())
    diff = float(np.abs(frames(converted) - frames(pipe)).max())
    print(f"GGUF DiT quantized per layer vs converted to float32: worst |frame diff| {diff:.2e}")
    assert diff <= 1e-5, diff


def test_lora_on_a_gguf_dit_merges_in_float_and_unloads_exactly(gguf_dit, tmp_path) -> None:
    """A LoRA on a GGUF DiT: the touched layers dequantized and merged in float give the frames of the same
    LoRA on the DiT converted to float32; unloading puts the quantized blocks back bit for bit."""
    from wanpipe.weights.components import open_checkpoint
    from wanpipe.weights.convert import write_diffusers

    folder, path, _, comfy, _ = gguf_dit
    files = dict(transformer=path, vae=comfy["vae"], text_encoder=comfy["text_encoder"])
    pipe = WanPipeline.from_single_files(
        **files, tokenizer=folder / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers"
    )
    arch, weights = open_checkpoint(**files, tokenizer=folder / "tokenizer", sigma_grid="diffusers")
    write_diffusers(arch, weights, tmp_path / "float", dtype=torch.float32)
    converted = WanPipeline.from_pretrained(tmp_path / "float", device="cpu", dtype="float32")
    layer = pipe.executor.transformer.blocks[0].ffn[0]
    assert isinstance(layer, GGUFLinear) and not layer.weight.is_floating_point()
    raw = layer.weight.detach().clone()
    plain = frames(pipe)
    g = torch.Generator().manual_seed(3)
    lora = {
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, layer.in_features, generator=g)
        * 0.3,
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(layer.out_features, 2, generator=g)
        * 0.3,
        "diffusion_model.blocks.1.self_attn.q.lora_down.weight": torch.randn(
            2, layer.in_features, generator=g
        ),
        "diffusion_model.blocks.1.self_attn.q.lora_up.weight": torch.randn(layer.in_features, 2, generator=g),
    }
    pipe.load_lora(lora, name="a")
    converted.load_lora(lora, name="a")
    merged, reference = frames(pipe), frames(converted)
    diff = float(np.abs(merged - reference).max())
    print(f"LoRA on a GGUF DiT vs on the DiT converted to float32: worst |frame diff| {diff:.2e}")
    assert diff <= 1e-5, diff
    assert float(np.abs(merged - plain).max()) > 1e-3  # the LoRA changed the video
    pipe.unload_lora()
    assert torch.equal(layer.weight, raw) and layer.weight.dtype == torch.uint8
    assert float(np.abs(frames(pipe) - plain).max()) == 0.0


def test_gguf_with_comfy_prefix_and_experts_swap(gguf_dit, tmp_path) -> None:
    """ComfyUI's ``model.diffusion_model.`` prefix is stripped; two GGUF experts with experts="swap" give
    the frames of both resident (the raw blocks are swapped in place)."""
    folder, path, _, comfy, state = gguf_dit
    prefixed = tmp_path / "prefixed.gguf"
    write_gguf(state, prefixed, prefix="model.diffusion_model.")
    common = dict(tokenizer=folder / "tokenizer", device="cpu", dtype="float32", sigma_grid="diffusers")
    plain = WanPipeline.from_single_files(path, comfy["vae"], comfy["text_encoder"], **common)
    np.testing.assert_array_equal(
        frames(WanPipeline.from_single_files(prefixed, comfy["vae"], comfy["text_encoder"], **common)),
        frames(plain),
    )
    low = tmp_path / "low.gguf"
    write_gguf(state, low, seed=1)  # other K blocks: another expert
    two = dict(transformer_2=low, **common)
    resident = WanPipeline.from_single_files(path, comfy["vae"], comfy["text_encoder"], **two)
    swap = WanPipeline.from_single_files(path, comfy["vae"], comfy["text_encoder"], experts="swap", **two)
    out = frames(resident)
    assert float(np.abs(out - frames(plain)).max()) > 1e-4  # the low-noise expert ran
    np.testing.assert_array_equal(frames(swap), out)
