"""The original open-clip image encoder file of Wan 2.1 I2V / FLF2V
(``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``): a tiny ``XLMRobertaCLIP`` built by the
original code (wan22's ``wan/modules/animate/clip.py``, the same code as Wan 2.1's ``clip.py``; see
:func:`tests.wan_animate_reference.load_clip`) with random weights, saved as the original file, read by
wanpipe (vision tower renamed, fused q/k/v split, text tower dropped) gives the original's image tokens
(``visual(x, use_31_block=True)``: the second-to-last block's output), and ``convert``'s way back writes
the original names and shapes.
"""

from __future__ import annotations

import pytest
import torch

from tests import wan_animate_reference
from wanpipe.models.image_encoder import WanImageEncoder, build_clip_vision
from wanpipe.weights.image_encoder_keys import (
    clip_key_map,
    clip_runtime_to_original,
    materialize_clip_buffers,
)
from wanpipe.weights.loader import load_weights
from wanpipe.weights.single_file import clip_to_runtime, open_weights_file, strip_prefix

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:CUDA is not available:UserWarning")

CLIP_TOL = 1e-5
TINY = dict(
    embed_dim=32,
    image_size=28,
    patch_size=14,
    vision_dim=160,  # 2 heads of 80, as the released ViT-H/14 (1280 = 16 x 80)
    vision_mlp_ratio=4,
    vision_heads=2,
    vision_layers=3,
    vision_pool="token",
    activation="gelu",
    vocab_size=64,
    max_text_len=16,
    type_size=1,
    pad_id=1,
    text_dim=32,
    text_heads=2,
    text_layers=1,
    text_post_norm=True,
)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    try:
        clip = wan_animate_reference.load_clip()
    except ModuleNotFoundError as e:
        pytest.skip(f"the original Wan code is not installed ({e})")
    torch.manual_seed(31)
    model = clip.XLMRobertaCLIP(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("clip") / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_file_gives_the_original_image_tokens(original) -> None:
    model, path = original
    state = strip_prefix(open_weights_file(path, "image_encoder"), "image_encoder")
    assert any(k.startswith("textual.") for k in state)  # the whole original file
    runtime, config = clip_to_runtime(state)
    assert (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (160, 2, 3)
    assert (config["image_size"], config["patch_size"], config["intermediate_size"]) == (28, 14, 640)
    vision = build_clip_vision(config)
    load_weights(
        vision,
        runtime,
        component="image_encoder",
        dtype=torch.float32,
        prepare=clip_key_map(vision),
        materialize=materialize_clip_buffers,
    )
    encoder = WanImageEncoder(vision)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        want = model.visual(x, use_31_block=True)
        got = encoder(x)
    assert want.shape == got.shape == (2, 5, 160) and float(want.std()) > 0.1
    diff = float((got - want).abs().max())
    print(f"open-clip .pth vs the original VisionTransformer: worst diff {diff:.2e}")
    assert diff <= CLIP_TOL, diff


def test_open_clip_names_both_ways(original) -> None:
    """The way back (``wanpipe convert --to original``) gives the original vision tower's names, shapes
    and values, tensor for tensor (without the unused projection head)."""
    model, path = original
    runtime, _ = clip_to_runtime(dict(open_weights_file(path, "image_encoder")))
    back = clip_runtime_to_original(runtime)
    want = {k: v for k, v in model.state_dict().items() if k.startswith("visual.") and k != "visual.head"}
    assert set(back) == set(want)
    for key, value in want.items():
        assert torch.equal(back[key], value), key


def _safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("kind", ["ti2v_5b", "i2v_14b"])
def test_convert_to_original_writes_the_wan22_vae_and_clip(kind, tmp_path) -> None:
    """``wanpipe convert --to original`` of a TI2V-5B (Wan 2.2 VAE) and a Wan 2.1 I2V (CLIP) diffusers
    folder: ``Wan2.2_VAE.pth`` and the open-clip file, read back, hold the very same tensors."""
    from tests import tiny_family
    from wanpipe.cli import main
    from wanpipe.weights.single_file import vae_to_runtime
    from wanpipe.weights.vae_keys import prepare_vae_state

    folder = tmp_path / "diffusers"
    getattr(tiny_family, kind)(folder)
    back = tmp_path / "original"
    assert (
        main(["convert", str(folder), "--to", "original", "--output", str(back), "--dtype", "float32"]) == 0
    )
    want_vae = prepare_vae_state(_safetensors(folder / "vae"))
    vae_file = back / ("Wan2.2_VAE.pth" if kind == "ti2v_5b" else "Wan2.1_VAE.pth")
    saved = torch.load(vae_file, weights_only=True)
    got_vae, config = vae_to_runtime(saved)
    assert set(got_vae) == set(want_vae) and all(torch.equal(got_vae[k], want_vae[k]) for k in want_vae)
    if kind == "ti2v_5b":
        assert any(k.startswith("encoder.downsamples.0.downsamples.") for k in saved)  # vae2_2.py names
        assert (config.is_residual, config.decoder_base_dim, config.patch_size) == (True, 12, 2)
        return
    clip_file = back / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    saved = torch.load(clip_file, weights_only=True)
    assert "visual.transformer.0.attn.to_qkv.weight" in saved
    got, _ = clip_to_runtime(saved)
    want = {
        k if k.startswith("vision_model.") else f"vision_model.{k}": v
        for k, v in _safetensors(folder / "image_encoder").items()
        if "position_ids" not in k
    }
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
