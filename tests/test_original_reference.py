"""wanpipe's loaders against the original Wan code, not against wanpipe's own rename tables.

Tiny random modules are built from the original repositories' classes (:mod:`tests.wan_reference`:
``WanModel``, ``WanVAE_``, ``T5Encoder``), their ``state_dict()`` written as the files wanpipe reads
(the original repository's DiT folder written by ``WanModel.save_pretrained``, ``Wan2.1_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth``; ComfyUI-style single files), loaded with wanpipe, and the outputs
compared with the original modules' outputs on the same inputs: a wrong or missing rename, a transposed
or swapped tensor, a wrong inferred config (heads, buckets, blocks per level) changes the numbers.

Everything runs in float32 on the CPU. Bounds are absolute, on outputs of order 1, 7-12x above the
largest difference measured (float32 rounding of equivalent computations done in another order or
precision: the original rotates RoPE in float64 and embeds the timestep per token, wanpipe in float32
and per sample); a layout error gives differences of order 1.

Wan 2.1's CLIP branch (I2V-14B, FLF2V: ``img_emb``, ``k_img``/``v_img``) is not in the installed
original code (see :mod:`tests.wan_reference`) and is not covered here.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny, wan_reference
from wanpipe import WanPipeline
from wanpipe.models.transformer import WanTransformerModel
from wanpipe.models.transformer_layers import compress_text_padding
from wanpipe.weights.loader import load_weights
from wanpipe.weights.single_file import (
    infer_transformer_config,
    open_weights_file,
    strip_prefix,
    transformer_to_runtime,
)

# the original code's torch.amp.autocast("cuda", ...) blocks say so on a CPU-only torch
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")

DIT_TOL = 5e-5  # measured max 6.7e-6 (outputs up to 4, std 0.8): float64 RoPE there, float32 here
VAE_TOL = 5e-5  # measured max 4.1e-6 decoding (pixels in [-1, 1], std 0.5), 3.8e-7 encoding
T5_TOL = 1e-5  # measured max 9.7e-7 (hidden states up to 4.2, std 0.9)

TEXT_DIM = 32
DIT_KW = dict(
    model_type="t2v",
    patch_size=(1, 2, 2),
    text_len=512,
    in_dim=16,
    dim=256,  # 2 heads of 128, as every released Wan DiT (single files infer heads = width / 128)
    ffn_dim=512,
    freq_dim=64,
    text_dim=TEXT_DIM,
    out_dim=16,
    num_heads=2,
    num_layers=2,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
)
VAE_KW = dict(
    dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)
"""The released Wan 2.1 VAE's structure (``_video_vae``), narrower: dim 96 -> 8, dim_mult [1, 2, 4, 4] -> [1, 2, 2, 2]."""
T5_KW = dict(
    vocab_size=128,  # >= the tiny tokenizer's 96 tokens
    dim=TEXT_DIM,
    dim_attn=48,  # 4 heads of 12: not the model width, so the head size is read, not assumed
    dim_ffn=64,
    num_heads=4,
    encoder_layers=2,
    num_buckets=32,  # UMT5-XXL's
)
"""``umt5_xxl``'s config (shared_pos=False: one relative-position table per layer), narrower."""

LATENT = (3, 8, 8)  # latent frames, height, width -> 3 x 4 x 4 = 48 tokens with patch (1, 2, 2)
TEXT_LENGTHS = (7, 12)


def randomize(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter redrawn from a seeded normal (the original inits zero the DiT's output layer);
    norm weights (the VAE's ``gamma``) around 1."""
    tiny.randomize(module, seed, scale)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".gamma"):
                p.add_(1.0)
    return module.eval().requires_grad_(False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


# -- the original modules and their files ---------------------------------------------------------------


def original_dit(ref, seed: int, **kw) -> torch.nn.Module:
    return randomize(ref.model.WanModel(**{**DIT_KW, **kw}), seed, 0.05)


def original_t5(ref, seed: int) -> torch.nn.Module:
    model = ref.t5.umt5_xxl(encoder_only=True, return_tokenizer=False, **T5_KW)
    return randomize(model, seed, 0.2)


def write_shared_files(folder: Path, vae: torch.nn.Module, t5: torch.nn.Module) -> None:
    """The original repository's VAE and T5 files and tokenizer folder next to the DiT."""
    torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")
    torch.save(t5.state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    tiny.make_tokenizer().save_pretrained(folder / "google" / "umt5-xxl")


class Originals:
    """The original modules and the files written from them."""

    def __init__(self, ref, root: Path) -> None:
        self.ref = ref
        self.dit = original_dit(ref, 1)
        self.vae = randomize(ref.vae21.WanVAE_(**VAE_KW), 2, 0.05)
        self.t5 = original_t5(ref, 3)
        self.folder = root / "Wan2.1-T2V-tiny"
        self.dit.save_pretrained(self.folder)  # config.json + diffusion_pytorch_model.safetensors
        write_shared_files(self.folder, self.vae, self.t5)
        # The original wrapper (latent statistics, clamping) over our tiny VAE, loaded from the .pth by
        # the original loader.
        tiny_video_vae = functools.partial(ref.vae21._video_vae, **VAE_KW)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ref.vae21, "_video_vae", tiny_video_vae)
            self.vae_wrapper = ref.vae21.Wan2_1_VAE(vae_pth=str(self.folder / "Wan2.1_VAE.pth"), device="cpu")
        # ComfyUI-style single files: the DiT with ComfyUI's prefix, the VAE as safetensors (both in
        # the original names); ComfyUI's UMT5 file is in transformers' names, which the original code
        # does not make: the original .pth stands in.
        comfy = root / "comfy"
        comfy.mkdir()
        dit_state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in self.dit.state_dict().items()}
        save_file(dit_state, str(comfy / "wan2.1_t2v_tiny_fp32.safetensors"))
        save_file(
            {k: v.contiguous() for k, v in self.vae.state_dict().items()},
            str(comfy / "wan_2.1_vae.safetensors"),
        )
        self.comfy = {
            "transformer": comfy / "wan2.1_t2v_tiny_fp32.safetensors",
            "vae": comfy / "wan_2.1_vae.safetensors",
            "text_encoder": self.folder / "models_t5_umt5-xxl-enc-bf16.pth",
            "tokenizer": self.folder / "google" / "umt5-xxl",
        }


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Originals:
    ref = wan_reference.require()
    torch.manual_seed(0)
    return Originals(ref, tmp_path_factory.mktemp("original-reference"))


@pytest.fixture(scope="module")
def loaded(originals):
    """wanpipe pipelines read from each layout: the original folder and the ComfyUI-style files."""
    return {
        "original": WanPipeline.from_pretrained(originals.folder, device="cpu", dtype="float32"),
        "comfy": WanPipeline.from_single_files(**originals.comfy, device="cpu", dtype="float32"),
    }


LAYOUTS = ["original", "comfy"]


# -- DiT --------------------------------------------------------------------------------------------------


def dit_inputs(in_dim: int, seed: int) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, in_dim, *LATENT, generator=g)
    context = [torch.randn(n, TEXT_DIM, generator=g) for n in TEXT_LENGTHS]
    padded = torch.zeros(2, DIT_KW["text_len"], TEXT_DIM)
    for i, c in enumerate(context):
        padded[i, : len(c)] = c
    return {"latents": latents, "context": context, "text": padded}


def original_dit_forward(dit, latents, t, context, y=None) -> torch.Tensor:
    """WanModel.forward on a batch: per-sample lists, no padding of the patch tokens (seq_len = L)."""
    seq_len = math.prod(LATENT) // 4
    if t.ndim == 1:  # the original expands (B,) to (B, L) only for B == 1
        t = t[:, None].expand(-1, seq_len)
    out = dit(list(latents), t=t, context=context, seq_len=seq_len, y=None if y is None else list(y))
    return torch.stack(out)


def wanpipe_dit(pipe: WanPipeline, which: str = "high") -> WanTransformerModel:
    return pipe.executor.experts.get(which)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dit_matches_the_original(originals, loaded, layout) -> None:
    pipe = loaded[layout]
    assert pipe.arch.transformer.num_attention_heads == DIT_KW["num_heads"]
    x = dit_inputs(16, 10)
    t = torch.tensor([999.0, 250.5])
    with torch.no_grad():
        want = original_dit_forward(originals.dit, x["latents"], t, x["context"])
        got = wanpipe_dit(pipe)(x["latents"], t, x["text"])
        text, bias = compress_text_padding(x["text"])
        got_compressed = wanpipe_dit(pipe)(x["latents"], t, text, text_bias=bias)
    assert float(want.std()) > 0.1  # not a degenerate output
    diff = max_diff(got, want)
    assert diff <= DIT_TOL, diff
    diff = max_diff(got_compressed, want)
    assert diff <= DIT_TOL, diff


def load_dit_file(path: Path) -> WanTransformerModel:
    """A DiT single file as WanPipeline.from_single_files loads it (config from the tensors)."""
    state = transformer_to_runtime(strip_prefix(open_weights_file(path, "transformer"), "transformer"))
    with torch.device("meta"):
        model = WanTransformerModel(infer_transformer_config(state))
    return load_weights(
        model,
        state,
        component="transformer",
        dtype=torch.float32,
        keep_in_fp32=WanTransformerModel.keep_in_fp32,
    )


@pytest.mark.parametrize(
    "kind",
    [
        "i2v",  # Wan 2.2 I2V-A14B: 16 noise + 20 condition channels in, 16 out
        "ti2v",  # Wan 2.2 TI2V-5B: 48 channels, per-token timesteps (the first frame's are 0)
    ],
)
def test_dit_variants_match_the_original(kind, tmp_path) -> None:
    ref = wan_reference.require()
    in_dim, out_dim = {"i2v": (36, 16), "ti2v": (48, 48)}[kind]
    dit = original_dit(ref, 20, model_type=kind, in_dim=in_dim, out_dim=out_dim)
    path = tmp_path / f"wan2.2_{kind}_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    model = load_dit_file(path)
    assert (model.config.in_channels, model.config.out_channels) == (in_dim, out_dim)
    x = dit_inputs(in_dim, 11)
    with torch.no_grad():
        if kind == "i2v":
            t = torch.tensor([700.0, 30.0])
            noise, cond = x["latents"][:, :16], x["latents"][:, 16:]
            want = original_dit_forward(dit, noise, t, x["context"], y=cond)
        else:
            per_token = torch.tensor([800.0, 120.0])[:, None].repeat(1, math.prod(LATENT) // 4)
            per_token[:, :16] = 0.0  # the first latent frame (16 tokens) is the given image
            t = per_token
            want = original_dit_forward(dit, x["latents"], t, x["context"])
        got = model(x["latents"], t, x["text"])
    assert float(want.std()) > 0.1
    diff = max_diff(got, want)
    assert diff <= DIT_TOL, diff


def test_wan22_expert_folders_match_the_original(originals, tmp_path) -> None:
    """Wan 2.2 A14B's original layout: high_noise_model/ and low_noise_model/, each a DiT folder."""
    ref = originals.ref
    folder = tmp_path / "Wan2.2-T2V-A14B-tiny"
    experts = {"high": original_dit(ref, 30), "low": original_dit(ref, 31)}
    for which, dit in experts.items():
        dit.save_pretrained(folder / f"{which}_noise_model")
    write_shared_files(folder, originals.vae, originals.t5)
    pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert pipe.arch.variant.name == "wan2.2-t2v-a14b"
    x = dit_inputs(16, 12)
    t = torch.tensor([900.0, 400.0])
    for which, dit in experts.items():
        with torch.no_grad():
            want = original_dit_forward(dit, x["latents"], t, x["context"])
            got = wanpipe_dit(pipe, which)(x["latents"], t, x["text"])
        diff = max_diff(got, want)
        assert diff <= DIT_TOL, (which, diff)


# -- VAE --------------------------------------------------------------------------------------------------


def video(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vae_encode_matches_the_original(originals, loaded, layout) -> None:
    vae = loaded[layout].executor.vae
    x = video(20)
    with torch.no_grad():
        raw = originals.vae.encode(x, [0.0, 1.0])  # WanVAE_.encode: the posterior mean, unscaled
        want = originals.vae_wrapper.encode([x[0]])[0][None]  # scaled by the wrapper's mean and 1 / std
        got_raw = vae.encode_mean(x)
        got = vae.normalize_latents(got_raw)
    assert raw.shape == (1, 16, 3, 2, 2) and float(raw.std()) > 0.05
    diff = max_diff(got_raw, raw)
    assert diff <= VAE_TOL, diff
    diff = max_diff(got, want)
    assert diff <= VAE_TOL, diff


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vae_decode_matches_the_original(originals, loaded, layout) -> None:
    vae = loaded[layout].executor.vae
    g = torch.Generator().manual_seed(21)
    z = torch.randn(1, 16, 3, 2, 2, generator=g)
    with torch.no_grad():
        want = originals.vae_wrapper.decode([z[0]])[0][None]  # denormalized, decoded, clamped
        got = vae.decode(vae.denormalize_latents(z))
    assert want.shape == (1, 3, 9, 16, 16)
    assert float(want.std()) > 0.3
    assert float((want.abs() < 1).float().mean()) > 0.8  # the clamp hides few values
    diff = max_diff(got, want)
    assert diff <= VAE_TOL, diff


VAE22_KW = dict(dim=8, dec_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


@pytest.fixture(scope="module")
def wan22_vae(tmp_path_factory):
    """A tiny Wan 2.2 VAE built by the original code (random weights) saved as the original
    ``Wan2.2_VAE.pth``, the original wrapper ``Wan2_2_VAE`` on it, and wanpipe's VAE loaded from the file."""
    ref = wan_reference.require()
    torch.manual_seed(22)
    vae = ref.vae22.WanVAE_(**VAE22_KW, temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("vae22") / "Wan2.2_VAE.pth"
    torch.save(vae.state_dict(), path)
    tiny = functools.partial(ref.vae22._video_vae, dec_dim=VAE22_KW["dec_dim"], num_res_blocks=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref.vae22, "_video_vae", tiny)
        wrapper = ref.vae22.Wan2_2_VAE(
            z_dim=48, c_dim=8, vae_pth=str(path), dim_mult=[1, 2, 2, 2], device="cpu"
        )
    from wanpipe.models.vae import WanVAE
    from wanpipe.weights.single_file import vae_to_runtime

    state, config = vae_to_runtime(strip_prefix(open_weights_file(path, "vae"), "vae"))
    assert (config.is_residual, config.z_dim, config.dim_mult, config.decoder_base_dim) == (
        True,
        48,
        (1, 2, 2, 2),
        12,
    )
    with torch.device("meta"):
        ours = WanVAE(config)
    load_weights(ours, state, component="vae", dtype=torch.float32)
    return wrapper, ours


def test_wan22_vae_file_matches_the_original(wan22_vae) -> None:
    """``Wan2.2_VAE.pth`` (the original names of ``vae2_2.py``) gives the original wrapper's latents
    (normalized by its 48 means and stds) and pixels (denormalized, decoded, clamped)."""
    wrapper, ours = wan22_vae
    g = torch.Generator().manual_seed(23)
    x = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        want = wrapper.encode([x[0]])[0][None]
        got = ours.normalize_latents(ours.encode_mean(x))
    assert want.shape == (1, 48, 2, 2, 2) and float(want.std()) > 0.05
    diff = max_diff(got, want)
    print(f"Wan2.2_VAE.pth encode vs the original: worst diff {diff:.2e}")
    assert diff <= VAE_TOL, diff
    z = torch.randn(1, 48, 2, 2, 2, generator=g)
    with torch.no_grad():
        want = wrapper.decode([z[0]])[0][None]
        got = ours.decode(ours.denormalize_latents(z))
    assert want.shape == (1, 3, 5, 32, 32) and float(want.std()) > 0.1
    diff = max_diff(got, want)
    print(f"Wan2.2_VAE.pth decode vs the original: worst diff {diff:.2e}")
    assert diff <= VAE_TOL, diff


# -- UMT5 text encoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_t5_matches_the_original(originals, loaded, layout) -> None:
    encoder = loaded[layout].executor.text_encoder
    g = torch.Generator().manual_seed(30)
    # 150 tokens: relative distances past UMT5's max distance 128 (the last bucket), which the
    # weights do not tell and wanpipe assumes
    length = 150
    ids = torch.randint(1, T5_KW["vocab_size"], (2, length), generator=g)
    mask = torch.zeros(2, length, dtype=torch.long)
    mask[0, :] = 1
    mask[1, :61] = 1
    ids[1, 61:] = 0  # padding
    with torch.no_grad():
        hidden = originals.t5(ids, mask)
    # T5EncoderModel.__call__ keeps each row's first seq_len vectors; the DiT pads them with zeros
    want = hidden * mask[..., None]
    got = encoder(ids, mask.bool())
    assert float(want.std()) > 0.1
    diff = max_diff(got, want)
    assert diff <= T5_TOL, diff


def test_original_config_json_is_the_originals(originals) -> None:
    """What wanpipe reads from the original config.json (heads, eps) is what WanModel wrote."""
    config = json.loads((originals.folder / "config.json").read_text())
    assert config["_class_name"] == "WanModel"
    assert (config["num_heads"], config["eps"]) == (DIT_KW["num_heads"], DIT_KW["eps"])


def test_wan22_vae_names_both_ways(tmp_path) -> None:
    """The Wan 2.2 VAE's way back (``convert --to original``) gives the original module's names and
    values, tensor for tensor."""
    from wanpipe.weights.keymap import remap_state_dict
    from wanpipe.weights.original import vae22_to_original_tables
    from wanpipe.weights.single_file import vae_to_runtime

    ref = wan_reference.require()
    vae = ref.vae22.WanVAE_(**VAE22_KW, temperal_downsample=[False, True, True])
    want = vae.state_dict()
    runtime, config = vae_to_runtime(dict(want))
    inner, outer = vae22_to_original_tables(config.num_res_blocks, len(config.dim_mult))
    back = remap_state_dict(remap_state_dict(runtime, inner), outer)
    assert set(back) == set(want)
    assert all(torch.equal(back[k], want[k]) for k in want)
