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
