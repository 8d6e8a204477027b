"""Parity of wanpipe's Wan DiT with diffusers' WanTransformer3DModel on tiny random models."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanpipe.models.transformer import DiTInputs, WanTransformerModel
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_KEYS, prepare_transformer_state

TEXT_LEN = 7
# diffusers' I2V attention takes everything but the last 512 context tokens as image tokens.
I2V_TEXT_LEN = 512

T2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
I2V = {**T2V, "in_channels": 6, "image_dim": 12, "added_kv_proj_dim": 32}
FLF2V = {**I2V, "pos_embed_seq_len": 6}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter so that none is trivially 0 or 1 (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            is_norm_weight = re.search(r"norm[^.]*\.weight$", name) is not None
            p.copy_(1 + noise if is_norm_weight else noise * 2)


def _pair(cfg: dict, seed: int = 0) -> tuple[WanTransformer3DModel, WanTransformerModel]:
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**cfg).eval()
    _randomize(ref, seed)
    ours = WanTransformerModel(TransformerConfig.from_dict(cfg)).eval()
    ours.load_state_dict(prepare_transformer_state(ref.state_dict()), strict=True)
    return ref, ours


def _inputs(cfg: dict, shape: tuple[int, int, int], text_len: int, image_len: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, cfg["in_channels"], *shape, generator=gen)
    timestep = torch.tensor([999.0, 250.5, 17.0, 600.0][:batch])
    text = torch.randn(batch, text_len, cfg["text_dim"], generator=gen)
    image = torch.randn(batch, image_len, cfg["image_dim"], generator=gen) if image_len else None
    return latents, timestep, text, image


def _ref_image(cfg: dict, image: torch.Tensor | None) -> torch.Tensor | None:
    # diffusers' FLF2V takes (2B, Li/2, D) and folds pairs of rows; ours takes (B, Li, D).
    if image is not None and cfg.get("pos_embed_seq_len"):
        return image.reshape(image.shape[0] * 2, image.shape[1] // 2, image.shape[2])
    return image


def _worst(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# fp32 parity
# ---------------------------------------------------------------------------------------------

T2V_CASES = [
    ("hd16", T2V, [(1, 4, 4), (3, 4, 6), (2, 6, 2)]),
    ("hd12", {**T2V, "attention_head_dim": 12, "ffn_dim": 24}, [(2, 4, 6)]),
    ("hd10", {**T2V, "attention_head_dim": 10, "ffn_dim": 24}, [(3, 2, 4)]),
    ("patch222", {**T2V, "patch_size": (2, 2, 2)}, [(4, 4, 2)]),
    ("no_cross_norm", {**T2V, "cross_attn_norm": False}, [(2, 2, 4)]),
]


@pytest.mark.parametrize("cfg,shapes", [c[1:] for c in T2V_CASES], ids=[c[0] for c in T2V_CASES])
@torch.no_grad()
def test_t2v_parity(cfg: dict, shapes: list[tuple[int, int, int]]) -> None:
    ref, ours = _pair(cfg)
    for shape in shapes:
        latents, t, text, _ = _inputs(cfg, shape, TEXT_LEN)
        expected = ref(latents, t, text, return_dict=False)[0]
        got = ours(latents, t, text)
        worst = _worst(got, expected)
        print(f"t2v {shape}: max abs diff {worst:.2e}")
        assert worst <= 1e-4
        assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("cfg", [I2V, FLF2V], ids=["i2v", "flf2v"])
@torch.no_grad()
def test_i2v_parity(cfg: dict) -> None:
    ref, ours = _pair(cfg, seed=3)
    image_len = cfg.get("pos_embed_seq_len") or 5
    for shape in [(1, 4, 4), (2, 2, 6)]:
        latents, t, text, image = _inputs(cfg, shape, I2V_TEXT_LEN, image_len)
        expected = ref(latents, t, text, _ref_image(cfg, image), return_dict=False)[0]
        got = ours(latents, t, text, image)
        worst = _worst(got, expected)
        print(f"{'flf2v' if cfg is FLF2V else 'i2v'} {shape}: max abs diff {worst:.2e}")
        assert worst <= 1e-4
        # the image tokens matter: other image embeddings give another output
        assert _worst(ours(latents, t, text, image.roll(1, dims=-1)), got) > 1e-3


@torch.no_grad()
def test_per_token_timesteps_parity() -> None:
    cfg = {**T2V, "in_channels": 5, "out_channels": 5}
    ref, ours = _pair(cfg, seed=5)
    shape = (2, 4, 6)
    latents, _, text, _ = _inputs(cfg, shape, TEXT_LEN)
    num_tokens = 2 * 2 * 3
    t = torch.rand(2, num_tokens, generator=torch.Generator().manual_seed(2)) * 1000
    t[:, :6] = 0.0  # like TI2V's clean first-frame tokens
    expected = ref(latents, t, text, return_dict=False)[0]
    got = ours(latents, t, text)
    x = ours.embed(latents, t, text)
    assert x.modulation.shape == (2, num_tokens, 6, 32) and x.temb.shape == (2, num_tokens, 32)
    worst = _worst(got, expected)
    print(f"per-token timesteps: max abs diff {worst:.2e}")
    assert worst <= 1e-4


# ---------------------------------------------------------------------------------------------
# Block-level API
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_blocks_by_hand_equal_forward() -> None:
    _, ours = _pair(I2V, seed=7)
    latents, t, text, image = _inputs(I2V, (2, 4, 2), 9, 4)
    x = ours.embed(latents, t, text, image)
    assert isinstance(x, DiTInputs)
    assert x.grid == (2, 2, 1) and x.num_image_tokens == 4
    assert x.hidden.shape == (2, 4, 32) and x.context.shape == (2, 13, 32)
    assert x.modulation.shape == (2, 6, 32) and x.modulation.dtype == torch.float32
    assert x.temb.shape == (2, 32) and x.rope[0].shape == (4, 8)
    hidden = x.hidden
    for block in ours.blocks:
        hidden = block(hidden, x.context, x.modulation, x.rope, num_image_tokens=x.num_image_tokens)
    out = ours.head(hidden, x.temb, x.grid)
    assert out.shape == latents.shape[:1] + (4,) + latents.shape[2:]
    assert torch.equal(out, ours(latents, t, text, image))


@torch.no_grad()
def test_meta_init_and_assign_load() -> None:
    ref, ours = _pair(T2V, seed=9)
    with torch.device("meta"):
        lazy = WanTransformerModel(TransformerConfig.from_dict(T2V))
    lazy.load_state_dict(prepare_transformer_state(ref.state_dict()), strict=True, assign=True)
    latents, t, text, _ = _inputs(T2V, (1, 2, 4), TEXT_LEN)
    assert torch.equal(lazy.eval()(latents, t, text), ours(latents, t, text))


def test_rope_is_cached_and_float64_exact() -> None:
    ours = WanTransformerModel(TransformerConfig.from_dict(T2V))
    cos, sin = ours.compute_rope(3, 2, 5)
    again = ours.compute_rope(3, 2, 5)
    assert again[0] is cos and again[1] is sin
    assert ours.compute_rope(3, 5, 2)[0] is not cos
    assert cos.shape == (30, 8) and cos.dtype == torch.float32
    # frame-axis angle of the last frame in its fastest channel is exactly 2 rad (float64 then cast)
    assert cos[-1, 0].item() == torch.tensor(2.0, dtype=torch.float64).cos().float().item()
    ours.clear_rope_cache()
    assert ours.compute_rope(3, 2, 5)[0] is not cos
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours.compute_rope(1, 1, 2000)


# ---------------------------------------------------------------------------------------------
# Weights and config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [T2V, FLF2V], ids=["t2v", "flf2v"])
def test_every_key_maps_both_ways(cfg: dict) -> None:
    ref = WanTransformer3DModel(**cfg)
    ours = WanTransformerModel(TransformerConfig.from_dict(cfg))
    ckpt = ref.state_dict()
    renamed = prepare_transformer_state(ckpt)
    assert set(renamed) == set(ours.state_dict())
    for new, old in zip(renamed, ckpt):
        assert renamed[new].shape == ckpt[old].shape
    # every rule is exercised by the FLF2V checkpoint; unmatched keys are only the patch embedding
    used = {p for p, _ in TRANSFORMER_DIFFUSERS_KEYS for k in ckpt if re.fullmatch(p, k)}
    if cfg is FLF2V:  # the VACE blocks' own rules: tests/test_vace_model.py
        assert used == {p for p, _ in TRANSFORMER_DIFFUSERS_KEYS if not p.startswith("vace_")}
    assert {k for k in ckpt if k in renamed} == {"patch_embedding.weight", "patch_embedding.bias"}
    # diffusers' own ignored key is dropped; our names pass through unchanged
    extra = {**ckpt, "blocks.0.attn2.norm_added_q.weight": torch.ones(32)}
    assert set(prepare_transformer_state(extra)) == set(renamed)
    assert set(prepare_transformer_state(ours.state_dict())) == set(renamed)


def test_keep_in_fp32_matches_diffusers_modules() -> None:
    ref = WanTransformer3DModel(**FLF2V)
    keep = ref._keep_in_fp32_modules
    renamed = prepare_transformer_state({k: k for k in ref.state_dict()})
    for ours_name, ref_name in renamed.items():
        ref_keeps = any(m in ref_name.split(".") for m in keep)
        assert WanTransformerModel.keeps_fp32(ours_name) == ref_keeps, (ours_name, ref_name)


def test_config_from_dict_and_validation() -> None:
    raw = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", "unknown": 1, **T2V}
    raw["patch_size"] = [1, 2, 2]
    cfg = TransformerConfig.from_dict(raw)
    assert cfg.patch_size == (1, 2, 2) and cfg.dim == 32 and cfg.rope_dims == (8, 4, 4)
    assert asdict(cfg) == {**asdict(TransformerConfig()), **T2V}
    assert TransformerConfig(out_channels=None, in_channels=36).out_channels == 36
    with pytest.raises(ValueError, match="attention_head_dim"):
        TransformerConfig(attention_head_dim=15)
    with pytest.raises(ValueError, match="qk_norm"):
        TransformerConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match="patch_size"):
        TransformerConfig(patch_size=(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        TransformerConfig(image_dim=1280)
    ours = WanTransformerModel(TransformerConfig.from_dict(T2V))
    with pytest.raises(ValueError, match="multiple of patch"):
        ours.embed(torch.zeros(1, 4, 1, 3, 4), torch.zeros(1), torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="timestep"):
        ours.embed(torch.zeros(1, 4, 1, 2, 4), torch.zeros(1, 3), torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="image_embeds"):
        ours.embed(torch.zeros(1, 4, 1, 2, 4), torch.zeros(1), torch.zeros(1, 2, 16), torch.zeros(1, 2, 12))


# ---------------------------------------------------------------------------------------------
# bf16 with fp32 islands
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bf16_parity(tmp_path) -> None:
    cfg = I2V
    ref32, _ = _pair(cfg, seed=11)
    ref32.save_pretrained(tmp_path)
    ref = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()

    ours = WanTransformerModel(TransformerConfig.from_dict(cfg)).eval().to(torch.bfloat16)
    for name, p in ours.named_parameters():
        if WanTransformerModel.keeps_fp32(name):
            p.data = p.data.float()
    ours.load_state_dict(prepare_transformer_state(ref32.state_dict()), strict=True)

    ref_dtypes = {k: v.dtype for k, v in prepare_transformer_state(ref.state_dict()).items()}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == ref_dtypes
    assert torch.float32 in ref_dtypes.values() and torch.bfloat16 in ref_dtypes.values()

    latents, t, text, image = _inputs(cfg, (2, 4, 4), I2V_TEXT_LEN, 5)
    exact = ref32(latents, t, text, image, return_dict=False)[0]
    bf = [x.to(torch.bfloat16) for x in (latents, text, image)]
    expected = ref(bf[0], t, bf[1], bf[2], return_dict=False)[0]
    got = ours(bf[0], t, bf[1], bf[2])
    assert got.dtype == torch.bfloat16
    worst = _worst(got, expected)
    print(
        f"bf16: ours vs diffusers {worst:.2e}; vs fp32: ours {_worst(got, exact):.2e}, "
        f"diffusers {_worst(expected, exact):.2e} (output max {exact.abs().max():.2f})"
    )
    assert worst <= 2e-2


def test_tanh_gelu_cpu_form_matches_torch() -> None:
    from wanpipe.models.transformer_layers import TanhGELU

    x = torch.linspace(-12, 12, 10_001)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    with torch.no_grad():
        got = TanhGELU()(x)
    assert (got - expected).abs().max().item() < 2e-6
    assert not got.equal(expected)  # the CPU form really ran (different rounding)
    assert TanhGELU()(x).equal(expected)  # with autograd on: torch's kernel


def test_rope_forms_agree_and_the_block_traces_without_graph_breaks(monkeypatch) -> None:
    from wanpipe.models.transformer_layers import apply_rope

    model = WanTransformerModel(TransformerConfig.from_dict(T2V)).eval()
    rope = model.compute_rope(1, 5, 8)
    x = torch.randn(2, 40, 2, 16)
    eager = apply_rope(x, rope)  # the complex multiply
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = apply_rope(x, rope)  # the real-arithmetic form the compiler gets
    monkeypatch.undo()
    assert (eager - real).abs().max().item() < 1e-6
    hidden, context, modulation = torch.randn(2, 40, 32), torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        explained = torch._dynamo.explain(model.blocks[0])(
            hidden, context, modulation, rope, 0, context_bias=torch.zeros(2, 1, 1, 5)
        )
    assert explained.graph_break_count == 0  # --compile gets one graph per block
