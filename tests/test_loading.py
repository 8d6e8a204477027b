"""Checkpoint loading: shards, memory mapping, hub ids, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import tiny
from wanpipe import WanPipeline
from wanpipe.weights.arch import read_diffusers_arch
from wanpipe.weights.loader import HUB_ALLOW_PATTERNS, load_pickle_weights, load_weights, resolve_checkpoint
from wanpipe.weights.safetensors_io import CheckpointError, SafetensorsIndex


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_arch_config_reads_the_checkpoint(tiny_ckpt: Path) -> None:
    arch = read_diffusers_arch(tiny_ckpt)
    assert arch.get_max_seq_len() == 512
    assert arch.variant.name == "wan2.1-t2v-1.3b" and arch.variant.task == "t2v"
    assert arch.transformer.num_layers == 2 and arch.transformer.dim == 24
    assert arch.vae.z_dim == 16 and arch.spatial_multiple == 16 and arch.temporal_stride == 4
    assert arch.defaults.num_frames == 81 and arch.defaults.height == 480 and arch.defaults.width == 832
    assert arch.text_encoder.d_model == 16
    assert arch.transformer_2 is None and arch.boundary_ratio is None


def test_sharded_checkpoint_loads_the_same_weights(tmp_path: Path, tiny_ckpt: Path, wan_pipe) -> None:
    folder = tiny.save_checkpoint(tmp_path / "sharded", max_shard_size="20KB")
    assert list((folder / "transformer").glob("*.safetensors.index.json"))
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    pipe = WanPipeline.from_pretrained(folder, device="cpu")
    ours = pipe.executor.transformer.state_dict()
    for name, tensor in wan_pipe.executor.transformer.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


def test_weights_are_memory_mapped_views(tiny_ckpt: Path) -> None:
    index = SafetensorsIndex.from_folder(tiny_ckpt / "transformer")
    name = next(iter(index))
    a, b = index[name], index[name]
    # Two reads share the one file mapping: no copy per access.
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert (
        a.untyped_storage().nbytes()
        == (tiny_ckpt / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    )


def test_hub_id_goes_through_snapshot_download(tmp_path: Path, tiny_ckpt: Path, monkeypatch) -> None:
    calls = []

    def fake_download(**kw):
        calls.append(kw)
        return str(tiny_ckpt)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    folder = resolve_checkpoint("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", revision="main", cache_dir=tmp_path)
    assert folder == tiny_ckpt
    assert calls[0]["repo_id"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert calls[0]["revision"] == "main"
    assert calls[0]["allow_patterns"] == list(HUB_ALLOW_PATTERNS)
    patterns = calls[0]["allow_patterns"]
    # No pickles but the original layout's named files (read with weights_only=True)
    assert [p for p in patterns if p.endswith((".bin", ".pth", ".pt", ".ckpt"))] == [
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "Wan2.2_VAE.pth",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    ]
    assert "*/*.safetensors" in patterns and "Wan2.1_VAE.pth" in patterns and "google/umt5-xxl/*" in patterns
    # and the whole pipeline takes a hub id
    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", device="cpu")
    assert pipe.arch.path == tiny_ckpt


def test_local_folder_is_used_as_it_is(tiny_ckpt: Path) -> None:
    assert resolve_checkpoint(str(tiny_ckpt)) == tiny_ckpt


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a Wan checkpoint.*model_index.json"):
        WanPipeline.from_pretrained(tmp_path / "empty", device="cpu")
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hugging Face hub id"):
        resolve_checkpoint(str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "f.txt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="not a Wan pipeline"):
        WanPipeline.from_pretrained(other, device="cpu")


def test_corrupted_safetensors(tmp_path: Path, tiny_ckpt: Path) -> None:
    folder = _copy(tiny_ckpt, tmp_path / "bad")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="corrupted safetensors"):
        WanPipeline.from_pretrained(folder, device="cpu")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        WanPipeline.from_pretrained(folder, device="cpu")


def test_missing_unexpected_and_misshaped_tensors(tmp_path: Path, tiny_ckpt: Path) -> None:
    index = SafetensorsIndex.from_folder(tiny_ckpt / "transformer")
    state = {k: index[k].clone() for k in index}
    from wanpipe.models.transformer import WanTransformerModel
    from wanpipe.weights.transformer_keys import prepare_transformer_state

    def attempt(sd):
        with torch.device("meta"):
            model = WanTransformerModel(read_diffusers_arch(tiny_ckpt).transformer)
        return load_weights(
            model,
            sd,
            component="transformer",
            dtype=torch.float32,
            prepare=prepare_transformer_state,
        )

    missing = dict(state)
    del missing["blocks.1.attn1.to_q.weight"]
    with pytest.raises(
        CheckpointError, match=r"transformer.*missing tensors.*blocks\.1\.self_attn\.q\.weight"
    ):
        attempt(missing)
    extra = dict(state, **{"blocks.0.attn1.to_z.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*blocks\.0\.attn1\.to_z\.weight"):
        attempt(extra)
    shaped = dict(state, **{"proj_out.weight": torch.zeros(3, 3)})
    with pytest.raises(
        CheckpointError, match=r"mis-shaped.*head\.head\.weight: checkpoint \[3, 3\] vs model \[64, 24\]"
    ):
        attempt(shaped)
    assert attempt(state) is not None


def test_pickles_are_read_without_code(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_pickle_weights(good)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.pth"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pickle_weights(bad)


def test_no_safetensors_names_the_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights.*diffusion_pytorch_model\.bin"):
        SafetensorsIndex.from_folder(folder, "transformer")


def test_dtype_cast_on_load(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.randn(4, 3, dtype=torch.bfloat16), "bias": torch.randn(4)}, str(path))
    index = SafetensorsIndex([path])
    with torch.device("meta"):
        layer = torch.nn.Linear(3, 4)
    load_weights(layer, index, component="x", dtype=torch.float16, keep_in_fp32=[r"bias"])
    assert layer.weight.dtype == torch.float16 and layer.bias.dtype == torch.float32
    torch.testing.assert_close(layer.weight.float(), index["weight"].float(), atol=1e-2, rtol=1e-2)
