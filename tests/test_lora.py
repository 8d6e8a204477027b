"""LoRA adapters: each format gives the frames of diffusers' ``load_lora_weights`` (peft) on the same
base, several adapters add up, unloading restores the base weights and frames exactly, unmatched keys
are reported by name, and Wan 2.2's experts take adapters separately (resident and swap)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import tiny_family, tiny_formats
from tests.test_formats import frames, reference_frames
from wanpipe import WanPipeline
from wanpipe.weights.safetensors_io import CheckpointError

FRAME_TOL = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "diffusers"
    ref = tiny_formats.t2v(folder, seed=900)
    ours = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    base_state = {k: v.clone() for k, v in ours.executor.transformer.state_dict().items()}
    return ref, ours, frames(ours), base_state


@pytest.fixture(scope="module")
def adapters(setup, tmp_path_factory):
    model = setup[1].executor.transformer
    out = tmp_path_factory.mktemp("adapters")
    g = torch.Generator().manual_seed(3)
    # diffusers turns diff_b into peft's lora_B.bias, which it needs on every adapted layer
    bias = {
        layer: torch.randn(model.get_submodule(layer).bias.shape, generator=g) * 0.2
        for layer in tiny_formats.lora_weights(model, 2)
    }
    return {
        "peft": tiny_formats.write_lora(
            tiny_formats.lora_weights(model, 1), out / "peft.safetensors", "peft"
        ),
        "original": tiny_formats.write_lora(
            tiny_formats.lora_weights(model, 2), out / "original.safetensors", "original", diff_b=bias
        ),
        "kohya": tiny_formats.write_lora(
            tiny_formats.lora_weights(model, 3), out / "kohya.safetensors", "kohya"
        ),
    }


def assert_base(ours, base_frames, base_state) -> None:
    for k, v in ours.executor.transformer.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    np.testing.assert_array_equal(frames(ours), base_frames)


@pytest.mark.parametrize("fmt", ["peft", "original", "kohya"])
def test_each_format_matches_diffusers_and_unloads_exactly(setup, adapters, fmt) -> None:
    ref, ours, base_frames, base_state = setup
    scale = 0.8
    report = ours.load_lora(adapters[fmt], scale, strict=True)
    assert len(report.layers) == 2 * 10 and not report.unmatched
    try:
        ref.load_lora_weights(str(adapters[fmt]), adapter_name=fmt)
        ref.set_adapters([fmt], [scale])
        theirs = reference_frames(ref)
    finally:
        ref.unload_lora_weights()
    out = frames(ours)
    diff = float(np.abs(out - theirs).max())
    assert diff <= FRAME_TOL, (fmt, diff)
    assert float(np.abs(out - base_frames).max()) > 1e-2  # the adapter changed something
    ours.unload_lora()
    assert ours.loras == []
    assert_base(ours, base_frames, base_state)


def test_two_adapters_add_up(setup, adapters) -> None:
    ref, ours, base_frames, base_state = setup
    ours.load_lora(adapters["peft"], 0.7)
    ours.load_lora(adapters["kohya"], 0.5)
    assert ours.loras == ["peft", "kohya"]
    try:
        ref.load_lora_weights(str(adapters["peft"]), adapter_name="a")
        ref.load_lora_weights(str(adapters["kohya"]), adapter_name="b")
        ref.set_adapters(["a", "b"], [0.7, 0.5])
        theirs = reference_frames(ref)
    finally:
        ref.unload_lora_weights()
    assert float(np.abs(frames(ours) - theirs).max()) <= FRAME_TOL
    ours.unload_lora("peft")  # one goes, the other stays
    single = frames(ours)
    ours.unload_lora()
    ours.load_lora(adapters["kohya"], 0.5)
    np.testing.assert_array_equal(frames(ours), single)
    ours.unload_lora()
    assert_base(ours, base_frames, base_state)


def test_unmatched_keys_are_reported(setup, tmp_path) -> None:
    from safetensors.torch import save_file

    _, ours, base_frames, base_state = setup
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 128),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 2),
        "diffusion_model.blocks.0.not_a_layer.lora_down.weight": torch.zeros(2, 128),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 16),
    }
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    report = ours.load_lora(path)
    assert report.unmatched == sorted(k for k in state if "not_a_layer" in k or "lora_te" in k)
    ours.unload_lora()
    with pytest.raises(CheckpointError, match="not_a_layer"):
        ours.load_lora(path, strict=True)
    save_file({"foo.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="none of its 1 keys"):
        ours.load_lora(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="one DiT"):
        ours.load_lora(path, expert="low")
    assert ours.loras == []
    assert_base(ours, base_frames, base_state)


def test_experts_take_adapters_separately(tmp_path) -> None:
    folder = tmp_path / "a14b"
    tiny_family.t2v_a14b(folder)
    resident = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    swap = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32", experts="swap")
    kw = dict(
        prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0, seed=1
    )
    base = resident.generate(**kw, progress=False).frames
    high_before = {k: v.clone() for k, v in resident.executor.experts.high.state_dict().items()}
    path = tiny_formats.write_lora(
        tiny_formats.lora_weights(resident.executor.experts.low, 5), tmp_path / "low.safetensors", "original"
    )
    for pipe in (resident, swap):
        pipe.load_lora(path, 1.0, expert="low")
    for k, v in resident.executor.experts.high.state_dict().items():
        assert torch.equal(v, high_before[k]), k
    with_lora = resident.generate(**kw, progress=False).frames
    assert float(np.abs(with_lora - base).max()) > 1e-2
    np.testing.assert_allclose(swap.generate(**kw, progress=False).frames, with_lora, atol=1e-6, rtol=0)
    for pipe in (resident, swap):
        pipe.unload_lora()
        np.testing.assert_array_equal(pipe.generate(**kw, progress=False).frames, base)


def test_lightx2v_style_diffs_match_diffusers_plus_the_diffs_it_drops(setup, adapters, tmp_path) -> None:
    """A step-distillation LoRA as lightx2v ships them: lora_down/lora_up/alpha pairs, ``diff_b`` biases,
    ``head.head.diff``, full ``diff``/``diff_b`` of the norms and ``diff_m`` of each block's and the
    head's modulation table. diffusers reads the pairs, biases and the head (``load_lora_weights``) and
    drops the norm and modulation diffs (its converter assumes them zero): the reference adds those to
    its parameters by hand (norm3 is diffusers' norm2, modulation its scale_shift_table)."""
    from safetensors.torch import load_file, save_file

    ref, ours, base_frames, base_state = setup
    model = ours.executor.transformer
    g = torch.Generator().manual_seed(11)
    state = load_file(str(adapters["original"]))  # pairs with alpha and diff_b on every adapted layer
    head = model.head.head
    state["diffusion_model.head.head.diff"] = torch.randn(head.weight.shape, generator=g) * 0.05
    state["diffusion_model.head.head.diff_b"] = torch.randn(head.bias.shape, generator=g) * 0.05
    by_hand: dict[str, torch.Tensor] = {}  # diffusers parameter -> unscaled delta
    for i, block in enumerate(model.blocks):
        diff_m = torch.randn(block.modulation.shape, generator=g) * 0.1
        state[f"diffusion_model.blocks.{i}.diff_m"] = diff_m
        by_hand[f"blocks.{i}.scale_shift_table"] = diff_m
        for ours_name, theirs in (("norm3", "norm2"), ("self_attn.norm_q", "attn1.norm_q")):
            norm = model.get_submodule(f"blocks.{i}.{ours_name}")
            d = torch.randn(norm.weight.shape, generator=g) * 0.1
            state[f"diffusion_model.blocks.{i}.{ours_name}.diff"] = d
            by_hand[f"blocks.{i}.{theirs}.weight"] = d
            if getattr(norm, "bias", None) is not None:
                b = torch.randn(norm.bias.shape, generator=g) * 0.1
                state[f"diffusion_model.blocks.{i}.{ours_name}.diff_b"] = b
                by_hand[f"blocks.{i}.{theirs}.bias"] = b
    head_m = torch.randn(model.head.modulation.shape, generator=g) * 0.1
    state["diffusion_model.head.diff_m"] = head_m
    by_hand["scale_shift_table"] = head_m
    path = tmp_path / "lightx2v.safetensors"
    save_file(state, str(path))

    scale = 0.7
    report = ours.load_lora(path, scale, strict=True)
    assert not report.unmatched
    assert {"blocks.0", "head", "head.head", "blocks.1.norm3"} <= set(report.layers)
    params = dict(ref.transformer.named_parameters())
    saved = {name: params[name].detach().clone() for name in by_hand}
    try:
        ref.load_lora_weights(str(path), adapter_name="lightx2v")
        ref.set_adapters(["lightx2v"], [scale])
        with torch.no_grad():
            for name, delta in by_hand.items():
                params[name].add_(scale * delta.reshape(params[name].shape))
        theirs = reference_frames(ref)
    finally:
        ref.unload_lora_weights()
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    out = frames(ours)
    diff = float(np.abs(out - theirs).max())
    print(f"lightx2v-style LoRA vs diffusers + hand-added diffs: max abs diff {diff:.3g}")
    assert diff <= FRAME_TOL, diff
    ours.unload_lora()
    ours.load_lora({k: v for k, v in state.items() if ".diff_m" not in k}, scale, name="no_m")
    assert float(np.abs(frames(ours) - out).max()) > 1e-4  # diff_m changed the video
    ours.unload_lora()
    assert_base(ours, base_frames, base_state)


def test_unmatched_keys_are_counted_and_named_in_the_warning(setup, tmp_path, caplog) -> None:
    from safetensors.torch import save_file

    _, ours, base_frames, base_state = setup
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 128),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, 2),
        **{f"diffusion_model.blocks.0.extra{i}.lora_down.weight": torch.zeros(2, 2) for i in range(12)},
    }
    save_file(state, str(tmp_path / "extra.safetensors"))
    with caplog.at_level("WARNING", logger="wanpipe.weights.lora"):
        ours.load_lora(tmp_path / "extra.safetensors")
    ours.unload_lora()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "12 of its 14 keys match no DiT layer" in message, message
    assert "diffusion_model.blocks.0.extra0.lora_down.weight" in message and "..." in message
    assert_base(ours, base_frames, base_state)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """(diffusers A14B pipeline, ours, its base frames, a Wan 2.1-style adapter file). Wan 2.1 14B and
    the Wan 2.2 A14B experts share layer names and shapes: users apply 2.1 adapters to either expert."""
    folder = tmp_path_factory.mktemp("a14b-lora") / "ckpt"
    ref = tiny_family.t2v_a14b(folder)
    ours = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    path = tiny_formats.write_lora(
        tiny_formats.lora_weights(ours.executor.experts.high, 7),
        folder.parent / "wan21.safetensors",
        "original",
    )
    return ref, ours, path


A14B_SEEN: dict[str, np.ndarray] = {}
A14B_KW = dict(
    prompt="a cat", height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0, seed=1
)


@pytest.mark.parametrize("expert", ["high", "low", "both"])
def test_wan21_lora_on_a14b_experts_matches_diffusers(a14b, expert) -> None:
    ref, ours, path = a14b
    scale = 0.9
    base = ours.generate(**A14B_KW, progress=False).frames
    ours.load_lora(path, scale, expert=expert)
    try:
        if expert in ("high", "both"):
            ref.load_lora_weights(str(path), adapter_name="h")
        if expert in ("low", "both"):
            ref.load_lora_weights(str(path), adapter_name="l", load_into_transformer_2=True)
        names = {"high": ["h"], "low": ["l"], "both": ["h", "l"]}[expert]
        ref.set_adapters(names, [scale] * len(names))
        kw = {k: v for k, v in A14B_KW.items() if k != "seed"}
        theirs = ref(
            generator=torch.Generator("cpu").manual_seed(A14B_KW["seed"]), output_type="np", **kw
        ).frames[0]
    finally:
        ref.unload_lora_weights()
    out = ours.generate(**A14B_KW, progress=False).frames
    ours.unload_lora()
    diff = float(np.abs(out - np.asarray(theirs, dtype=np.float32)).max())
    print(f"Wan 2.1 LoRA @{expert} on A14B vs diffusers: max abs diff {diff:.3g}")
    assert diff <= FRAME_TOL, (expert, diff)
    assert float(np.abs(out - base).max()) > 1e-2
    for other, frames_other in A14B_SEEN.items():  # each choice of experts makes another video
        assert float(np.abs(out - frames_other).max()) > 1e-2, (expert, other)
    A14B_SEEN[expert] = out
    np.testing.assert_array_equal(ours.generate(**A14B_KW, progress=False).frames, base)
