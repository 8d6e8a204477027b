"""Tiny checkpoints in every layout wanpipe reads, written by renaming one diffusers tiny checkpoint
through the documented rename tables (``wanpipe.weights.original``, ``transformer_keys``, ``vae_keys``),
fp8 files by quantizing it, and LoRA adapters in each format.

Written with wanpipe's own tables, these files check the loaders' plumbing and that each table and its
inverse agree, not that a table matches the original code: a wrong entry made in both directions passes
here. ``tests/test_original_reference.py`` checks the layouts against the original Wan modules.

The DiT has one head of Wan's head size 128 (so single files infer ``heads = width / 128`` as for the
released models); the UMT5 encoder uses UMT5-XXL's 32 buckets and max distance 128 (single files and
original ``.pth`` files carry no text-encoder config).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests import tiny, tiny_family
from wanpipe.weights.convert import write_sharded
from wanpipe.weights.fp8 import dit_fp8_keep, quantize
from wanpipe.weights.keymap import remap_state_dict
from wanpipe.weights.original import T5_TO_ORIGINAL_KEYS, vae21_to_original_tables
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_KEYS, TRANSFORMER_TO_DIFFUSERS_KEYS
from wanpipe.weights.vae_keys import VAE_DIFFUSERS_KEYS

DIT_KW: dict[str, Any] = dict(num_attention_heads=1, attention_head_dim=128)


def t2v(folder: Path, seed: int = 700, dit_kw: dict[str, Any] | None = None):
    """A diffusers-layout Wan 2.1 T2V tiny checkpoint (UniPC, shift 3.0); returns the diffusers pipeline.
    ``dit_kw`` overrides the DiT's config (:data:`DIT_KW`)."""
    from diffusers import WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny.make_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    ).eval()
    tiny.randomize(text_encoder, seed, 0.2)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_family.vae(seed + 1),
        scheduler=tiny_family.scheduler("unipc", 3.0),
        transformer=tiny_family.transformer(seed + 2, **{**DIT_KW, **(dit_kw or {})}),
    )
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def original_state(diffusers_folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors renamed to the original repositories' names."""
    dit = remap_state_dict(_safetensors(diffusers_folder / "transformer"), TRANSFORMER_DIFFUSERS_KEYS)
    vae_cfg = json.loads((diffusers_folder / "vae" / "config.json").read_text())
    inner, outer = vae21_to_original_tables(vae_cfg["num_res_blocks"], len(vae_cfg["dim_mult"]))
    vae = remap_state_dict(_safetensors(diffusers_folder / "vae"), VAE_DIFFUSERS_KEYS)
    vae = remap_state_dict(remap_state_dict(vae, inner), outer)
    te = _safetensors(diffusers_folder / "text_encoder")
    te.pop("encoder.embed_tokens.weight", None)
    t5 = remap_state_dict(te, T5_TO_ORIGINAL_KEYS)
    return {"transformer": dit, "vae": vae, "text_encoder": t5}


def write_original(diffusers_folder: Path, out: Path) -> Path:
    """An original Wan repository: config.json + 2 DiT shards, Wan2.1_VAE.pth, the T5 .pth, google/umt5-xxl/."""
    states = original_state(diffusers_folder)
    cfg = json.loads((diffusers_folder / "transformer" / "config.json").read_text())
    write_sharded(states["transformer"], out, "diffusion_pytorch_model", 200_000)
    (out / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"],
                "num_heads": cfg["num_attention_heads"],
                "num_layers": cfg["num_layers"],
                "ffn_dim": cfg["ffn_dim"],
                "freq_dim": cfg["freq_dim"],
                "in_dim": cfg["in_channels"],
                "out_dim": cfg["out_channels"],
                "text_len": 512,
                "eps": 1e-6,
            }
        )
    )
    torch.save(states["vae"], out / "Wan2.1_VAE.pth")
    torch.save(states["text_encoder"], out / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(diffusers_folder / "tokenizer", out / "google" / "umt5-xxl")
    return out


def write_comfy(diffusers_folder: Path, out: Path, *, fp8: str | None = None) -> dict[str, Path]:
    """ComfyUI-style single files: the DiT with ``model.diffusion_model.`` and original names (fp8:
    "e4m3fn_scaled" quantizes the block linears with per-tensor ``scale_weight``s and the
    ``scaled_fp8`` marker; "e5m2" casts them), the VAE in original names, UMT5 in transformers names."""
    out.mkdir(parents=True, exist_ok=True)
    states = original_state(diffusers_folder)
    dit: dict[str, torch.Tensor] = {}
    for key, value in states["transformer"].items():
        layer = key.removesuffix(".weight")
        if fp8 is not None and key.endswith(".weight") and dit_fp8_keep(layer):
            if fp8 == "e4m3fn_scaled":
                q, s = quantize(value)
                dit[f"model.diffusion_model.{key}"] = q
                dit[f"model.diffusion_model.{layer}.scale_weight"] = s.reshape(1)
            else:
                dit[f"model.diffusion_model.{key}"] = value.to(torch.float8_e5m2)
        else:
            dit[f"model.diffusion_model.{key}"] = value
    if fp8 == "e4m3fn_scaled":
        dit["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    paths = {
        "transformer": out / f"wan_dit{'_' + fp8 if fp8 else ''}.safetensors",
        "vae": out / "wan_2.1_vae.safetensors",
        "text_encoder": out / "umt5_xxl.safetensors",
    }
    save_file(dit, str(paths["transformer"]))
    save_file(states["vae"], str(paths["vae"]))
    te = _safetensors(diffusers_folder / "text_encoder")
    te.pop("encoder.embed_tokens.weight", None)
    save_file(te, str(paths["text_encoder"]))
    return paths


def dequantized_dit(fp8_file: Path) -> dict[str, torch.Tensor]:
    """The fp8 DiT file's weights as float32 in diffusers names (to load into diffusers' model)."""
    state = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(fp8_file).items()}
    state.pop("scaled_fp8", None)
    out = {}
    for key, value in state.items():
        if key.endswith(".scale_weight"):
            continue
        scale = state.get(key.removesuffix(".weight") + ".scale_weight")
        w = value.float() * (scale.float() if scale is not None else 1.0)
        out[key] = w
    return remap_state_dict(out, TRANSFORMER_TO_DIFFUSERS_KEYS)


# -- LoRA adapters -------------------------------------------------------------------------------------

LORA_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k")
LORA_LAYERS += ("cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def lora_weights(
    model: torch.nn.Module, seed: int, rank: int = 2
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) pairs for every block linear of ``model`` (our layer names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(len(model.blocks)):
        for layer in LORA_LAYERS:
            w = model.get_submodule(f"blocks.{i}.{layer}").weight
            down = torch.randn(rank, w.shape[1], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, generator=g) * 0.3
            out[f"blocks.{i}.{layer}"] = (down, up)
    return out


def write_lora(pairs, path: Path, fmt: str, *, alpha: float = 4.0, diff_b: dict | None = None) -> Path:
    """One adapter file in ``fmt``: "peft" (diffusers names, no alpha), "original" (``diffusion_model.``,
    lora_down/lora_up/alpha, optional ``diff_b``), "kohya" (``lora_unet_*``, lora_down/lora_up/alpha)."""
    state: dict[str, torch.Tensor] = {}
    for layer, (down, up) in pairs.items():
        if fmt == "peft":
            name = "transformer." + remap_state_dict(
                {layer + ".weight": 0}, TRANSFORMER_TO_DIFFUSERS_KEYS
            ).popitem()[0].removesuffix(".weight")
            state[f"{name}.lora_A.weight"] = down.contiguous()
            state[f"{name}.lora_B.weight"] = up.contiguous()
            continue
        name = f"diffusion_model.{layer}" if fmt == "original" else "lora_unet_" + layer.replace(".", "_")
        state[f"{name}.lora_down.weight"] = down.contiguous()
        state[f"{name}.lora_up.weight"] = up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha)
    for layer, bias in (diff_b or {}).items():
        state[f"diffusion_model.{layer}.diff_b"] = bias
    save_file(state, str(path))
    return path
