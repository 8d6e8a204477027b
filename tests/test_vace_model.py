"""The VACE transformer: parity of wanpipe's DiT with diffusers' ``WanVACETransformer3DModel`` on the same
weights (fp32, CPU), loading from the diffusers layout (one DiT, and Wan 2.2 VACE-Fun's two experts),
from the original names (whole files, original folders, a VACE module held as its own file) written here
from diffusers' names with diffusers' own conversion rules, and the runtime paths (compiled and streamed
blocks, a parallel world of one, model offload) through the one block call site; what they refuse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny_formats, tiny_vace
from wanpipe import WanPipeline
from wanpipe.models.transformer import WanTransformerModel, run_blocks
from wanpipe.models.transformer_layers import TransformerConfig, VaceBlock
from wanpipe.runtime.options import RuntimeOptions
from wanpipe.runtime.runner import DiTRunner
from wanpipe.weights.safetensors_io import CheckpointError
from wanpipe.weights.single_file import infer_transformer_config
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_KEYS, prepare_transformer_state

TOL = 1e-3
TEXT_LEN = 7
# 5 blocks with hints after blocks 0, 1 and 3: unevenly spaced, so a hint added after the wrong block shows
PARITY_KW = {
    **tiny_vace.VACE_TRANSFORMER_KW,
    "num_layers": 5,
    "vace_layers": [0, 1, 3],
    "vace_in_channels": 10,
}


def _worst(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _pair(kw: dict, seed: int = 0):
    """diffusers' VACE DiT with random weights and ours with the same weights."""
    ref = tiny_vace.make_vace_transformer(seed, **kw)
    ours = WanTransformerModel(TransformerConfig.from_dict(ref.config)).eval()
    ours.load_state_dict(prepare_transformer_state(ref.state_dict()), strict=True)
    return ref, ours


def _inputs(cfg: TransformerConfig, shape=(3, 4, 6), batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, *shape, generator=g)
    timestep = torch.tensor([999.0, 321.5, 40.0][:batch])
    text = torch.randn(batch, TEXT_LEN, cfg.text_dim, generator=g)
    control = torch.randn(batch, cfg.vace_in_channels, *shape, generator=g)
    return latents, timestep, text, control


# --------------------------------------------------------------------------------------------
# (a) the forward against diffusers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_forward_matches_diffusers() -> None:
    ref, ours = _pair(PARITY_KW)
    cfg = ours.config
    assert cfg.vace_layers == (0, 1, 3) and cfg.vace_in_channels == 10 and len(ours.vace_blocks) == 3
    for shape in [(3, 4, 6), (1, 2, 2)]:
        latents, t, text, control = _inputs(cfg, shape)
        for name, scale in [("no scale", None), ("per layer", torch.tensor([0.5, 1.7, -0.8]))]:
            expected = ref(
                latents,
                t,
                text,
                control_hidden_states=control,
                control_hidden_states_scale=scale,
                return_dict=False,
            )[0]
            got = ours(latents, t, text, control_hidden_states=control, control_hidden_states_scale=scale)
            worst = _worst(got, expected)
            print(f"vace forward {shape} {name}: max abs diff {worst:.2e}")
            assert worst <= TOL
            assert expected.abs().max() > 0.1
    # the hints matter: another control, or a zero scale for one layer, changes the output
    latents, t, text, control = _inputs(cfg)
    got = ours(latents, t, text, control_hidden_states=control)
    assert _worst(ours(latents, t, text, control_hidden_states=control.roll(1, dims=1)), got) > 1e-3
    assert (
        _worst(
            ours(
                latents,
                t,
                text,
                control_hidden_states=control,
                control_hidden_states_scale=torch.tensor([1.0, 0.0, 1.0]),
            ),
            got,
        )
        > 1e-3
    )


@torch.no_grad()
def test_per_row_scales_match_diffusers_row_by_row() -> None:
    """(B, n) scales: each row as diffusers computes it with that row's (n,) scales."""
    ref, ours = _pair(PARITY_KW, seed=4)
    latents, t, text, control = _inputs(ours.config, batch=3)
    scales = torch.tensor([[1.0, 1.0, 1.0], [0.3, -1.2, 2.0], [0.0, 0.5, 0.0]])
    got = ours(latents, t, text, control_hidden_states=control, control_hidden_states_scale=scales)
    worst = 0.0
    for row in range(3):
        expected = ref(
            latents[row : row + 1],
            t[row : row + 1],
            text[row : row + 1],
            control_hidden_states=control[row : row + 1],
            control_hidden_states_scale=scales[row],
            return_dict=False,
        )[0]
        worst = max(worst, _worst(got[row : row + 1], expected))
    print(f"vace forward, per-row scales: max abs diff {worst:.2e}")
    assert worst <= TOL


@torch.no_grad()
def test_without_control_a_vace_model_is_its_base_dit() -> None:
    """No control latents: the VACE blocks do not run; the output is the base DiT's (diffusers' plain
    WanTransformer3DModel with the same main-block weights)."""
    from diffusers import WanTransformer3DModel

    ref, ours = _pair(PARITY_KW, seed=5)
    base_kw = {k: v for k, v in PARITY_KW.items() if not k.startswith("vace_")}
    base = WanTransformer3DModel(**base_kw).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("vace_")}
    base.load_state_dict(state, strict=True)
    latents, t, text, _ = _inputs(ours.config)
    worst = _worst(ours(latents, t, text), base(latents, t, text, return_dict=False)[0])
    print(f"vace model without control vs the base DiT: max abs diff {worst:.2e}")
    assert worst <= TOL
    assert ours.block_sequence() == list(ours.blocks)
    sequence = ours.block_sequence(vace=True)
    assert [type(b).__name__ for b in sequence] == ["VaceBlock", "WanBlock"] * 2 + [
        "WanBlock",
        "VaceBlock",
    ] + ["WanBlock"] * 2


@torch.no_grad()
def test_bf16_parity(tmp_path) -> None:
    """bf16 with the fp32 islands (the VACE blocks' modulation and norms too), scales in the model dtype
    as diffusers' pipeline passes them."""
    from diffusers import WanVACETransformer3DModel

    ref32, _ = _pair(PARITY_KW, seed=8)
    ref32.save_pretrained(tmp_path)
    ref = WanVACETransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours = WanTransformerModel(TransformerConfig.from_dict(ref32.config)).eval().to(torch.bfloat16)
    for name, p in ours.named_parameters():
        if WanTransformerModel.keeps_fp32(name):
            p.data = p.data.float()
    ours.load_state_dict(prepare_transformer_state(ref32.state_dict()), strict=True)
    ref_dtypes = {k: v.dtype for k, v in prepare_transformer_state(ref.state_dict()).items()}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == ref_dtypes

    latents, t, text, control = _inputs(ours.config)
    scale = torch.tensor([0.5, 1.7, -0.8])
    exact = ref32(
        latents, t, text, control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False
    )[0]
    bf = [x.to(torch.bfloat16) for x in (latents, text, control, scale)]
    expected = ref(
        bf[0], t, bf[1], control_hidden_states=bf[2], control_hidden_states_scale=bf[3], return_dict=False
    )[0]
    got = ours(bf[0], t, bf[1], control_hidden_states=bf[2], control_hidden_states_scale=bf[3])
    assert got.dtype == torch.bfloat16
    worst = _worst(got, expected)
    print(
        f"vace bf16: ours vs diffusers {worst:.2e}; vs fp32: ours {_worst(got, exact):.2e}, "
        f"diffusers {_worst(expected, exact):.2e} (output max {exact.abs().max():.2f})"
    )
    assert worst <= 2e-2


def test_bad_inputs_and_configs_are_refused() -> None:
    _, ours = _pair(PARITY_KW, seed=6)
    latents, t, text, control = _inputs(ours.config)
    with pytest.raises(ValueError, match=r"control_hidden_states must have shape \(2, 10, 3, 4, 6\)"):
        ours(latents, t, text, control_hidden_states=control[:, :, :2])  # fewer frames: not zero-padded
    with pytest.raises(ValueError, match=r"control_hidden_states_scale must have shape \(3,\) or \(2, 3\)"):
        ours(latents, t, text, control_hidden_states=control, control_hidden_states_scale=torch.ones(2))
    with pytest.raises(ValueError, match="needs control_hidden_states"):
        ours(latents, t, text, control_hidden_states_scale=torch.ones(3))
    plain = WanTransformerModel(
        TransformerConfig.from_dict({k: v for k, v in PARITY_KW.items() if "vace" not in k})
    )
    with pytest.raises(ValueError, match="no VACE blocks"):
        plain(latents, t, text, control_hidden_states=control)
    # run_blocks refuses a sequence that leaves VACE blocks out
    x = ours.embed(latents, t, text, control_hidden_states=control)
    with pytest.raises(ValueError, match="added 0 of the 3 VACE hints"):
        run_blocks(ours.blocks, x.hidden, x)
    base = {k: v for k, v in PARITY_KW.items() if "vace" not in k}
    for bad, message in [
        ({"vace_layers": [1, 3], "vace_in_channels": 4}, "from 0"),
        ({"vace_layers": [0, 3, 2], "vace_in_channels": 4}, "ascending"),
        ({"vace_layers": [0, 5], "vace_in_channels": 4}, "below num_layers=5"),
        ({"vace_layers": [0, 2]}, "come together"),
    ]:
        with pytest.raises(ValueError, match=message):
            TransformerConfig.from_dict({**base, **bad})


def test_vace_key_rules_are_exercised_and_fp32_islands_match_diffusers() -> None:
    ref, ours = _pair(PARITY_KW, seed=7)
    ckpt = ref.state_dict()
    used = {p for p, _ in TRANSFORMER_DIFFUSERS_KEYS for k in ckpt if re.fullmatch(p, k)}
    assert {p for p, _ in TRANSFORMER_DIFFUSERS_KEYS if p.startswith("vace_")} <= used
    renamed = prepare_transformer_state({k: k for k in ckpt})
    assert renamed["vace_blocks.0.before_proj.weight"] == "vace_blocks.0.proj_in.weight"
    assert renamed["vace_blocks.2.after_proj.bias"] == "vace_blocks.2.proj_out.bias"
    assert renamed["vace_blocks.1.norm3.weight"] == "vace_blocks.1.norm2.weight"
    keep = ref._keep_in_fp32_modules
    for ours_name, ref_name in renamed.items():
        assert WanTransformerModel.keeps_fp32(ours_name) == any(m in ref_name.split(".") for m in keep), (
            ours_name
        )


# --------------------------------------------------------------------------------------------
# (b) loading the diffusers layout
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vace_folder(tmp_path_factory) -> Path:
    return tiny_vace.save_vace_checkpoint(tmp_path_factory.mktemp("vace") / "Wan2.1-VACE-tiny", seed=10)


@pytest.fixture(scope="module")
def vace_pipe(vace_folder):
    return WanPipeline.from_pretrained(vace_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def experts_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vace2") / "Wan2.2-VACE-Fun-tiny"
    return tiny_vace.save_vace_checkpoint(folder, two_experts=True, seed=20)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@torch.no_grad()
def _parity_with_reference(ours: WanTransformerModel, ref) -> float:
    latents, t, text, control = _inputs(ours.config, (2, 4, 4))
    scale = torch.tensor([0.7, 1.3])
    expected = ref(
        latents, t, text, control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False
    )[0]
    return _worst(
        ours(latents, t, text, control_hidden_states=control, control_hidden_states_scale=scale), expected
    )


def test_diffusers_folder_loads_as_a_vace_variant(vace_folder, vace_pipe) -> None:
    ref = tiny_vace.load_vace_reference(vace_folder)
    arch = vace_pipe.arch
    assert arch.variant.name == "wan2.1-vace-1.3b" and arch.variant.task == "vace"
    assert arch.accepts_vace and not arch.accepts_image and not arch.has_second_expert
    assert arch.transformer.vace_layers == (0, 2) and arch.transformer.vace_in_channels == 96
    dit = vace_pipe.executor.transformer
    assert vace_pipe.executor.accepts_vace
    _assert_same_weights(_state(dit), prepare_transformer_state(ref.transformer.state_dict()))
    worst = _parity_with_reference(dit, ref.transformer)
    print(f"loaded VACE DiT vs diffusers' WanVACEPipeline.transformer: max abs diff {worst:.2e}")
    assert worst <= TOL


def test_two_expert_folder_loads_both_vace_experts(experts_folder) -> None:
    ref = tiny_vace.load_vace_reference(experts_folder)
    pipe = WanPipeline.from_pretrained(experts_folder, device="cpu", dtype="float32")
    arch = pipe.arch
    assert arch.variant.name == "wan2.2-vace-fun-a14b" and arch.accepts_vace
    assert arch.boundary_timestep == pytest.approx(875.0)
    high, low = pipe.executor.experts.high, pipe.executor.experts.low
    assert low is not None and low.vace_blocks is not None
    for ours, theirs, which in [(high, ref.transformer, "high"), (low, ref.transformer_2, "low")]:
        _assert_same_weights(_state(ours), prepare_transformer_state(theirs.state_dict()))
        worst = _parity_with_reference(ours, theirs)
        print(f"two-expert VACE, {which} expert vs diffusers: max abs diff {worst:.2e}")
        assert worst <= TOL


def test_a_plain_checkpoint_takes_no_vace(tiny_ckpt) -> None:
    from wanpipe.weights.arch import read_diffusers_arch

    arch = read_diffusers_arch(tiny_ckpt)
    assert not arch.accepts_vace and arch.variant.task == "t2v" and arch.transformer.vace_layers is None


# --------------------------------------------------------------------------------------------
# (c) original names: whole files, original folders, the VACE module as its own file
# --------------------------------------------------------------------------------------------

# diffusers' single_file_utils.convert_wan_transformer_to_diffusers renames original keys by substring
# replacements; these are those replacements read backwards (diffusers name -> original name), written
# here from diffusers' rules, not from wanpipe's tables. Each test checks them by running diffusers' own
# conversion on the result.
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("proj_in", "before_proj"),
)


def original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key.removeprefix("proj_out.")
    for a, b in _TO_ORIGINAL:
        key = key.replace(a, b)
    return key.replace("scale_shift_table", "modulation").replace(".proj_out.", ".after_proj.")


def to_original(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-named VACE DiT state dict in the original Wan2.1 ``VaceWanModel`` names, checked by
    converting it back with diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {original_key(k): v for k, v in diffusers_state.items()}
    back = convert_wan_transformer_to_diffusers(dict(out))
    assert set(back) == set(diffusers_state)
    assert all(back[k] is diffusers_state[k] for k in back)
    return out


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _vace_shape(cfg: TransformerConfig) -> tuple:
    return (cfg.dim, cfg.num_attention_heads, cfg.num_layers, cfg.vace_layers, cfg.vace_in_channels)


def _write_files(diffusers_folder: Path, out: Path, dit: str = "transformer") -> dict[str, Path]:
    """ComfyUI-style files: the whole VACE DiT (``model.diffusion_model.`` + original names), the base DiT
    alone, the VACE module alone (Kijai's layout: only the ``vace_*`` tensors, no prefix), VAE, UMT5."""
    paths = tiny_formats.write_comfy(diffusers_folder, out)  # its VAE and UMT5 files are used here
    original = to_original(_safetensors(diffusers_folder / dit))
    vace = {k: v for k, v in original.items() if k.startswith("vace_")}
    assert (
        any(k.startswith("vace_blocks.0.before_proj") for k in vace) and "vace_patch_embedding.weight" in vace
    )
    base = {k: v for k, v in original.items() if k not in vace}
    files = {
        "whole": out / f"wan2.1_vace_{dit}.safetensors",
        "base": out / f"wan2.1_t2v_{dit}.safetensors",
        "module": out / f"Wan2_1-VACE_module_{dit}.safetensors",
    }
    save_file(
        {f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()}, str(files["whole"])
    )
    save_file({k: v.contiguous() for k, v in base.items()}, str(files["base"]))
    save_file({k: v.contiguous() for k, v in vace.items()}, str(files["module"]))
    return {**paths, **files}


def test_original_names_and_a_separate_vace_module_load_the_same_weights(
    vace_folder, vace_pipe, tmp_path
) -> None:
    files = _write_files(vace_folder, tmp_path / "comfy")
    expected = _state(vace_pipe.executor.transformer)
    common = dict(vae=files["vae"], text_encoder=files["text_encoder"], tokenizer=vace_folder / "tokenizer")
    whole = WanPipeline.from_single_files(
        files["whole"], num_heads=2, device="cpu", dtype="float32", **common
    )
    joined = WanPipeline.from_single_files(
        files["base"], vace=files["module"], num_heads=2, device="cpu", dtype="float32", **common
    )
    for pipe in (whole, joined):
        assert pipe.arch.variant.name == "wan2.1-vace-1.3b" and pipe.arch.accepts_vace
        assert _vace_shape(pipe.arch.transformer) == _vace_shape(vace_pipe.arch.transformer)
        _assert_same_weights(_state(pipe.executor.transformer), expected)
    # the base file alone is a plain text-to-video DiT
    plain = WanPipeline.from_single_files(files["base"], num_heads=2, device="cpu", dtype="float32", **common)
    assert not plain.arch.accepts_vace and plain.arch.variant.task == "t2v"
    # a VACE module joined to a DiT that has VACE blocks already, or a whole file given as the module
    with pytest.raises(CheckpointError, match="holds VACE blocks already"):
        WanPipeline.from_single_files(files["whole"], vace=files["module"], num_heads=2, **common)
    with pytest.raises(CheckpointError, match="is not a VACE module"):
        WanPipeline.from_single_files(files["base"], vace=files["whole"], num_heads=2, **common)


def test_original_folder_with_its_vace_config(vace_folder, vace_pipe, tmp_path) -> None:
    """An original Wan2.1-VACE repository: ``config.json`` (``VaceWanModel``: vace_layers, vace_in_dim)
    next to the DiT in original names, the VAE and T5 ``.pth`` files and the tokenizer folder."""
    out = tiny_formats.write_original(vace_folder, tmp_path / "Wan2.1-VACE-tiny")
    for f in out.glob("diffusion_pytorch_model*"):
        f.unlink()
    save_file(
        to_original(_safetensors(vace_folder / "transformer")),
        str(out / "diffusion_pytorch_model.safetensors"),
    )
    cfg = json.loads((vace_folder / "transformer" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    config.update(
        _class_name="VaceWanModel", model_type="vace", vace_layers=cfg["vace_layers"], vace_in_dim=96
    )
    (out / "config.json").write_text(json.dumps(config))
    pipe = WanPipeline.from_pretrained(out, device="cpu", dtype="float32")
    assert pipe.arch.variant.name == "wan2.1-vace-1.3b"
    assert _vace_shape(pipe.arch.transformer) == _vace_shape(vace_pipe.arch.transformer)
    assert pipe.arch.scheduler.flow_shift == 16.0  # the original VACE sample_shift
    _assert_same_weights(_state(pipe.executor.transformer), _state(vace_pipe.executor.transformer))


def test_two_expert_single_files_with_a_vace_module_each(experts_folder, tmp_path) -> None:
    expected = WanPipeline.from_pretrained(experts_folder, device="cpu", dtype="float32")
    high = _write_files(experts_folder, tmp_path / "high", "transformer")
    low = _write_files(experts_folder, tmp_path / "low", "transformer_2")
    common = dict(vae=high["vae"], text_encoder=high["text_encoder"], tokenizer=experts_folder / "tokenizer")
    pipe = WanPipeline.from_single_files(
        high["base"],
        transformer_2=low["base"],
        vace=high["module"],
        vace_2=low["module"],
        num_heads=2,
        device="cpu",
        dtype="float32",
        **common,
    )
    assert pipe.arch.variant.name == "wan2.2-vace-fun-a14b" and pipe.arch.boundary_ratio == 0.875
    _assert_same_weights(_state(pipe.executor.experts.high), _state(expected.executor.experts.high))
    _assert_same_weights(_state(pipe.executor.experts.low), _state(expected.executor.experts.low))
    with pytest.raises(CheckpointError, match="one VACE module per expert"):
        WanPipeline.from_single_files(
            high["base"], transformer_2=low["base"], vace=high["module"], num_heads=2, **common
        )


def test_convert_both_ways_keeps_the_vace_blocks(experts_folder, tmp_path) -> None:
    """``wanpipe convert``: to the diffusers layout (read back by diffusers' ``WanVACEPipeline``) and to the
    original layout (``VaceWanModel`` configs, read back by wanpipe), the same weights."""
    from wanpipe.weights.components import open_checkpoint
    from wanpipe.weights.convert import write_diffusers, write_original

    arch, weights = open_checkpoint(experts_folder)
    expected = {"transformer": weights.transformer(), "transformer_2": weights.transformer_2()}
    out = write_diffusers(arch, weights, tmp_path / "diffusers")
    ref = tiny_vace.load_vace_reference(out)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanVACEPipeline"
    for name in expected:
        _assert_same_weights(prepare_transformer_state(getattr(ref, name).state_dict()), expected[name])
    back = write_original(arch, weights, tmp_path / "original")
    config = json.loads((back / "high_noise_model" / "config.json").read_text())
    assert config["_class_name"] == "VaceWanModel" and config["vace_layers"] == [0, 2]
    arch2, weights2 = open_checkpoint(back)
    assert arch2.variant.name == "wan2.2-vace-fun-a14b" and arch2.transformer.vace_layers == (0, 2)
    _assert_same_weights(dict(weights2.transformer()), expected["transformer"])
    _assert_same_weights(dict(weights2.transformer_2()), expected["transformer_2"])


def test_vace_layers_from_a_config_or_evenly_spaced() -> None:
    shapes = {
        k: torch.empty(v.shape, device="meta")
        for k, v in WanTransformerModel(TransformerConfig.from_dict(PARITY_KW)).state_dict().items()
    }
    with pytest.raises(CheckpointError, match="not evenly spaced"):
        infer_transformer_config(shapes, num_heads=2)  # 3 VACE blocks over 5: the config must say where
    assert infer_transformer_config(shapes, num_heads=2, vace_layers=(0, 1, 3)).vace_layers == (0, 1, 3)
    even = {k: v for k, v in shapes.items() if not k.startswith(("vace_blocks.2.", "blocks.4."))}
    assert infer_transformer_config(even, num_heads=2).vace_layers == (0, 2)  # 2 over 4: every 2nd


# --------------------------------------------------------------------------------------------
# the runtime: one block call site, what applies and what is refused
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_runner_paths_give_the_same_prediction(vace_pipe) -> None:
    from wanpipe.parallel import ParallelConfig, ParallelMesh
    from wanpipe.runtime.offload import BlockStreamer

    dit = vace_pipe.executor.transformer
    latents, t, text, control = _inputs(dit.config, (2, 4, 4))
    kw = dict(
        control_hidden_states=control, control_hidden_states_scale=torch.tensor([[0.5, 2.0], [1.0, -1.0]])
    )
    expected = dit(latents, t, text, **kw)
    streamer = BlockStreamer("cpu", num_buffers=2)
    mesh = ParallelMesh.build(ParallelConfig())
    for name, runner in [
        ("plain", DiTRunner()),
        ("streamed", DiTRunner(streamer=streamer)),
        ("parallel", DiTRunner(mesh=mesh)),
    ]:
        got = runner.forward(dit, latents, t, text, **kw)
        print(f"runner {name}: max abs diff {_worst(got, expected):.2e}")
        assert torch.equal(got, expected) if name != "parallel" else _worst(got, expected) <= 1e-5
    # every block of the sequence went through a buffer: a ring of 2 for the main blocks, one each for
    # the first VACE block (its input projection) and the other VACE block
    assert streamer.copies == len(dit.blocks) + len(dit.vace_blocks)
    assert len(streamer.rings) == 3 and len(streamer.buffers) == 4
    assert sum(isinstance(b, VaceBlock) for b in streamer.buffers) == 2


def test_compiled_blocks_give_the_same_prediction(vace_pipe) -> None:
    from wanpipe.runtime.compile import CompiledDiT

    dit = vace_pipe.executor.transformer
    latents, t, text, control = _inputs(dit.config, (1, 2, 2), batch=1)
    runner = DiTRunner(compiled=CompiledDiT())
    with torch.no_grad():
        expected = dit(latents, t, text, control_hidden_states=control)
        got = runner.forward(dit, latents, t, text, control_hidden_states=control)
    worst = _worst(got, expected)
    print(f"compiled VACE blocks: max abs diff {worst:.2e}")
    assert worst <= 1e-5 and runner.compile_s > 0


def test_executor_offload_and_refused_step_caches(vace_pipe) -> None:
    from wanpipe.context import Approximations

    executor = vace_pipe.executor
    before = executor.runtime
    try:
        vace_pipe.set_runtime(RuntimeOptions(offload="block"))
        assert executor.runner.streamer is not None
        vace_pipe.set_runtime(RuntimeOptions(offload="model"))
        assert executor.experts.offload is not None
        for kind in ("first-block", "teacache"):
            with pytest.raises(
                ValueError, match=f"do not apply to VACE checkpoints yet: leave --cache {kind} off"
            ):
                vace_pipe.set_runtime(RuntimeOptions(cache=kind, residual_threshold=0.1))
        vace_pipe.set_runtime(before)
        with pytest.raises(ValueError, match="leave residual_threshold off"):
            executor.check_step_cache(Approximations(residual_threshold=0.05))
        executor.check_step_cache(Approximations())  # no cache: fine
    finally:
        vace_pipe.set_runtime(before)


def test_lora_reaches_the_vace_blocks(vace_pipe) -> None:
    dit = vace_pipe.executor.transformer
    base = _state(dit)
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 24, generator=g), torch.randn(24, 2, generator=g)
    adapters = {
        "peft": {
            "transformer.vace_blocks.1.attn1.to_q.lora_A.weight": down,
            "transformer.vace_blocks.1.attn1.to_q.lora_B.weight": up,
        },
        "kohya": {
            "lora_unet_vace_blocks_1_self_attn_q.lora_down.weight": down,
            "lora_unet_vace_blocks_1_self_attn_q.lora_up.weight": up,
            "lora_unet_vace_blocks_1_self_attn_q.alpha": torch.tensor(2.0),
        },
    }
    for name, state in adapters.items():
        report = vace_pipe.load_lora(state, scale=0.5, name=name, strict=True)
        assert report.layers == ["vace_blocks.1.self_attn.q"]
        merged = dit.vace_blocks[1].self_attn.q.weight
        assert torch.allclose(merged, base["vace_blocks.1.self_attn.q.weight"] + 0.5 * up @ down, atol=1e-6)
        vace_pipe.unload_lora()
        _assert_same_weights(_state(dit), base)
