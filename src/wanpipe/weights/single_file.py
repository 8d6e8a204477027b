"""One-file components (ComfyUI's repackaged files, the original repositories' ``.pth``/``.safetensors``):
open them, strip wrapper prefixes, recognise their naming, and infer each component's config from
tensor names and shapes.

Naming is recognised by marker keys (a table below); configs come from shapes (width from the patch
embedding, layers by counting, in-channels, image projections...). The head width of every released
Wan DiT is 128 and is used to count the heads, which shapes alone cannot tell.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from wanpipe.models.animate import MOTION_ENCODER_CHANNELS
from wanpipe.models.text_encoder import TextEncoderConfig
from wanpipe.models.transformer_layers import TransformerConfig
from wanpipe.models.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, VAEConfig
from wanpipe.weights.animate_keys import animate_original_to_runtime, is_animate_original
from wanpipe.weights.image_encoder_keys import clip_original_to_runtime, is_clip_original
from wanpipe.weights.keymap import remap_state_dict
from wanpipe.weights.loader import load_pickle_weights
from wanpipe.weights.original import T5_ORIGINAL_KEYS, vae21_original_tables, vae22_original_tables
from wanpipe.weights.safetensors_io import CheckpointError, SafetensorsIndex
from wanpipe.weights.text_encoder_keys import TEXT_ENCODER_ALIASES
from wanpipe.weights.transformer_keys import prepare_transformer_state
from wanpipe.weights.vae_keys import prepare_vae_state

WAN_HEAD_DIM = 128
"""attention_head_dim of every released Wan DiT (1.3B: 1536/12, 14B: 5120/40, 5B: 3072/24)."""

UMT5_RELATIVE_MAX_DISTANCE = 128
"""UMT5-XXL's relative_attention_max_distance (not visible in the weights)."""

PREFIXES: dict[str, tuple[str, ...]] = {
    "transformer": ("model.diffusion_model.", "diffusion_model.", "transformer.", "model."),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "text_encoder."),
    "image_encoder": ("clip_vision.", "image_encoder."),
}
"""Wrapper prefixes stripped from every key of a one-file component (ComfyUI, bundled checkpoints)."""

FP8_MARKERS: tuple[str, ...] = ("scaled_fp8",)
"""Keys ComfyUI adds to "scaled" fp8 files to mark them; not weights."""

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")


def open_weights_file(path: str | Path, component: str) -> Mapping[str, torch.Tensor]:
    """A ``.safetensors`` or ``.gguf`` file memory-mapped, or a ``.pth``/``.pt``/``.bin`` read with
    ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{component}: {path} is not a file")
    if path.suffix == ".safetensors":
        return SafetensorsIndex([path])
    if path.suffix == ".gguf":
        from wanpipe.weights.gguf_file import read_gguf

        return read_gguf(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        state = load_pickle_weights(path)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{component}: {path} does not hold a state dict of tensors")
        return state
    raise CheckpointError(
        f"{component}: {path} has an unknown weights format (expected one of {WEIGHT_SUFFIXES})"
    )


def strip_prefix(state: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """Drop the first wrapper prefix (``PREFIXES``) that every weight key carries; marker keys go."""
    keys = [k for k in state if k not in FP8_MARKERS]
    for prefix in PREFIXES.get(component, ()):
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :]: state[k] for k in keys}
    return {k: state[k] for k in keys}


# -- naming -----------------------------------------------------------------------------------------

NAMING_MARKERS: dict[str, tuple[tuple[str, str], ...]] = {
    "transformer": (
        (r"condition_embedder\..+|blocks\.\d+\.attn1\..+", "diffusers"),
        (r"blocks\.\d+\.self_attn\..+|time_embedding\..+", "original"),
    ),
    "vae": (
        (r"encoder\.conv_in\..+|decoder\.up_blocks\..+", "diffusers"),
        (r"encoder\.conv1\..+|decoder\.upsamples\..+", "original"),
    ),
    "text_encoder": (
        (r"encoder\.block\.\d+\..+|shared\.weight", "transformers"),
        (r"blocks\.\d+\.attn\..+|token_embedding\.weight", "original"),
    ),
}
"""Per component, ``(regex, naming)``: the first regex some key matches names the checkpoint's naming."""


def naming_of(keys: Iterable[str], component: str) -> str:
    keys = list(keys)
    for pattern, naming in NAMING_MARKERS[component]:
        rx = re.compile(pattern)
        if any(rx.fullmatch(k) for k in keys):
            return naming
    sample = sorted(keys)[:6]
    raise CheckpointError(
        f"{component}: unknown layout: none of its {len(keys)} tensor names look like a Wan {component} "
        f"in the diffusers or the original naming (first names: {sample})"
    )


def _shape(state: Mapping[str, torch.Tensor], key: str, component: str) -> tuple[int, ...]:
    if isinstance(state, SafetensorsIndex):
        if key in state.records:
            return state.shape(key)
    elif key in state:
        return tuple(state[key].shape)
    raise CheckpointError(f"{component}: tensor {key!r} is missing (needed to infer the model's shape)")


# -- DiT ----------------------------------------------------------------------------------------------


def transformer_to_runtime(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiT state dict in either naming (prefixes already stripped) -> wanpipe's (= the original's)."""
    if naming_of(state, "transformer") == "original":
        return animate_original_to_runtime(state) if is_animate_original(state) else dict(state)
    return prepare_transformer_state(state)


def infer_vace_layers(num_layers: int, num_vace: int) -> tuple[int, ...]:
    """The main blocks the VACE hints go to, when no config names them: evenly spaced from block 0, as
    in every released VACE model (1.3B: 15 over 30 blocks, every 2nd; 14B: 8 over 40, every 5th)."""
    if num_vace < 1 or num_layers % num_vace:
        raise CheckpointError(
            f"transformer: cannot tell which of the {num_layers} blocks take the hints of {num_vace} VACE "
            "blocks (not evenly spaced): give the original config.json with its vace_layers"
        )
    return tuple(range(0, num_layers, num_layers // num_vace))


def infer_transformer_config(
    state: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    eps: float = 1e-6,
    vace_layers: tuple[int, ...] | None = None,
) -> TransformerConfig:
    """The DiT's config from its tensors in wanpipe names (see :func:`transformer_to_runtime`).

    VACE (``vace_blocks.N.*`` and ``vace_patch_embedding.*``): ``vace_layers`` from an original config,
    else :func:`infer_vace_layers`."""
    c = "transformer"
    dim, in_channels, *patch = _shape(state, "patch_embedding.weight", c)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise CheckpointError(
            f"{c}: no contiguous blocks.N.* tensors (found block indices {sorted(layers)[:8]})"
        )
    head_out = _shape(state, "head.head.weight", c)[0]
    patch_volume = patch[0] * patch[1] * patch[2]
    if head_out % patch_volume:
        raise CheckpointError(
            f"{c}: head.head.weight rows {head_out} are not a multiple of the patch {patch}"
        )
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(
                f"{c}: width {dim} is not a multiple of Wan's head size {WAN_HEAD_DIM}; pass the head count"
            )
        num_heads = dim // WAN_HEAD_DIM
    image_dim = added_kv = pos_len = None
    if "img_emb.proj.1.weight" in state:
        image_dim = _shape(state, "img_emb.proj.1.weight", c)[1]
        added_kv = dim
        if "img_emb.emb_pos" in state:
            pos_len = _shape(state, "img_emb.emb_pos", c)[1]
    vace = {int(m.group(1)) for k in state if (m := re.match(r"vace_blocks\.(\d+)\.", k))}
    vace_in = None
    if vace or "vace_patch_embedding.weight" in state:
        if sorted(vace) != list(range(len(vace))) or not vace:
            raise CheckpointError(
                f"{c}: VACE tensors without contiguous vace_blocks.N.* (found indices {sorted(vace)[:8]})"
            )
        vace_in = _shape(state, "vace_patch_embedding.weight", c)[1]
        if vace_layers is None:
            vace_layers = infer_vace_layers(len(layers), len(vace))
        elif len(vace_layers) != len(vace):
            raise CheckpointError(
                f"{c}: the config names {len(vace_layers)} VACE layers, the file has {len(vace)} VACE blocks"
            )
    else:
        vace_layers = None
    animate = infer_animate_fields(state, len(layers)) if "pose_patch_embedding.weight" in state else {}
    try:
        return TransformerConfig(
            patch_size=tuple(patch),
            num_attention_heads=num_heads,
            attention_head_dim=dim // num_heads,
            in_channels=in_channels,
            out_channels=head_out // patch_volume,
            text_dim=_shape(state, "text_embedding.0.weight", c)[1],
            freq_dim=_shape(state, "time_embedding.0.weight", c)[1],
            ffn_dim=_shape(state, "blocks.0.ffn.0.weight", c)[0],
            num_layers=len(layers),
            cross_attn_norm="blocks.0.norm3.weight" in state,
            qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in state else None,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv,
            pos_embed_seq_len=pos_len,
            vace_layers=vace_layers,
            vace_in_channels=vace_in,
            **animate,
        )
    except ValueError as e:
        raise CheckpointError(f"{c}: the tensor shapes give an unusable config: {e}") from None


def infer_animate_fields(state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, Any]:
    """An Animate DiT's own config fields from its tensors in wanpipe names (the motion encoder's size
    from its residual levels, its channels per level, the widths; the face blocks' spacing from their
    count; the encode batch size is diffusers' default)."""
    c = "transformer"
    res = {int(m.group(1)) for k in state if (m := re.match(r"motion_encoder\.res_blocks\.(\d+)\.", k))}
    faces = {int(m.group(1)) for k in state if (m := re.match(r"face_adapter\.(\d+)\.", k))}
    if not res or sorted(res) != list(range(len(res))) or not faces or num_layers % len(faces):
        raise CheckpointError(
            f"{c}: Animate tensors without contiguous motion_encoder.res_blocks.N.* and face_adapter.N.* "
            f"({len(res)} residual levels, {len(faces)} face blocks over {num_layers} blocks)"
        )
    size = 2 ** (len(res) + 2)
    channels = {size: _shape(state, "motion_encoder.conv_in.weight", c)[0]}
    for i in range(len(res)):
        channels[size >> (i + 1)] = _shape(state, f"motion_encoder.res_blocks.{i}.conv2.weight", c)[0]
    default = all(MOTION_ENCODER_CHANNELS.get(k) == v for k, v in channels.items())
    hidden = _shape(state, "face_encoder.conv2.weight", c)[0]
    return {
        "latent_channels": _shape(state, "pose_patch_embedding.weight", c)[1],
        "motion_encoder_channel_sizes": None if default else tuple(sorted(channels.items())),
        "motion_encoder_size": size,
        "motion_style_dim": _shape(state, "motion_encoder.conv_out.weight", c)[0],
        "motion_dim": _shape(state, "motion_encoder.motion_synthesis_weight", c)[1],
        "motion_encoder_dim": _shape(state, "motion_encoder.motion_synthesis_weight", c)[0],
        "face_encoder_hidden_dim": hidden,
        "face_encoder_num_heads": _shape(state, "face_encoder.conv1_local.weight", c)[0] // hidden,
        "inject_face_latents_blocks": num_layers // len(faces),
    }


def transformer_config_from_original(config: Mapping[str, Any]) -> dict[str, Any]:
    """What an original ``config.json`` (``WanModel``: dim, num_heads, in_dim...; ``VaceWanModel``:
    vace_layers) says beyond the shapes."""
    out: dict[str, Any] = {}
    if "num_heads" in config:
        out["num_heads"] = int(config["num_heads"])
    if "eps" in config:
        out["eps"] = float(config["eps"])
    if config.get("vace_layers") is not None:  # VaceWanModel
        out["vace_layers"] = tuple(int(i) for i in config["vace_layers"])
    return out


# -- VAE ----------------------------------------------------------------------------------------------


def vae_to_runtime(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """A Wan 2.1 or 2.2 VAE state dict in either naming -> wanpipe names, and its config from the shapes."""
    c = "vae"
    if any(
        k.startswith(("encoder.down_blocks.0.resnets", "encoder.downsamples.0.downsamples")) for k in state
    ):
        return vae22_to_runtime(state)
    if naming_of(state, c) == "diffusers":
        runtime = prepare_vae_state(state)
        prefix = "encoder.down_blocks"
    else:
        runtime = None
        prefix = "encoder.downsamples"
    src = state if runtime is None else runtime
    base_dim = _shape(src, "encoder.conv1.weight" if runtime is None else "encoder.conv_in.weight", c)[0]
    z_dim = _shape(src, "conv2.weight" if runtime is None else "post_quant_conv.weight", c)[0]
    # Walk the encoder's flat list: residual blocks (conv1 at slot residual.2 / conv1), resamples (conv).
    indices = sorted({int(m.group(1)) for k in src if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in indices:
        p = f"{prefix}.{i}."
        if any(k.startswith(p + ("resample." if runtime is None else "conv.")) for k in src):
            temporal.append(any(k.startswith(p + "time_conv.") for k in src))
            levels.append([])
        else:
            conv = p + ("residual.2.weight" if runtime is None else "conv1.weight")
            levels[-1].append(_shape(src, conv, c)[0])
    if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
        raise CheckpointError(f"{c}: cannot read the encoder's block structure from the tensor names")
    dim_mult = [lv[0] // base_dim for lv in levels]
    try:
        config = VAEConfig(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=tuple(dim_mult),
            num_res_blocks=len(levels[0]),
            temperal_downsample=tuple(temporal),
        )
    except ValueError as e:
        raise CheckpointError(f"{c}: the tensor shapes give an unusable config: {e}") from None
    if runtime is None:
        outer, inner = vae21_original_tables(config.num_res_blocks, len(config.dim_mult))
        runtime = remap_state_dict(remap_state_dict(state, outer), inner)
    return runtime, config


def _indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))})


def vae22_to_runtime(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """Wan 2.2's residual VAE (TI2V-5B; the original ``Wan2.2_VAE.pth`` names of ``vae2_2.py``, or
    diffusers' residual layout) -> wanpipe names, and its config from the shapes (the latents' mean and
    std: the original ``Wan2_2_VAE``'s, for its 48 channels)."""
    c = "vae"
    if naming_of(state, c) == "diffusers":
        runtime = prepare_vae_state(state)
    else:
        levels = _indices(state, "encoder.downsamples")
        blocks = _indices(state, "encoder.downsamples.0.downsamples")
        resnets = [j for j in blocks if f"encoder.downsamples.0.downsamples.{j}.residual.2.weight" in state]
        outer, inner = vae22_original_tables(len(resnets), len(levels))
        runtime = remap_state_dict(remap_state_dict(state, outer), inner)
    levels = _indices(runtime, "encoder.down_blocks")
    num_res = len(_indices(runtime, "encoder.down_blocks.0.resnets"))
    base_dim, in_channels = _shape(runtime, "encoder.conv_in.weight", c)[:2]
    dim_mult = [
        _shape(runtime, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", c)[0] // base_dim for i in levels
    ]
    temporal = [f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in runtime for i in levels[:-1]]
    z_dim = _shape(runtime, "post_quant_conv.weight", c)[0]
    out_channels, decoder_out = _shape(runtime, "decoder.conv_out.weight", c)[:2]
    patch = int(round((in_channels / 3) ** 0.5))
    if z_dim != len(WAN22_LATENTS_MEAN):
        raise CheckpointError(
            f"{c}: a Wan 2.2 VAE with {z_dim} latent channels; only the released 48-channel one has known "
            "latent statistics (give it as a diffusers folder with its config.json)"
        )
    try:
        config = VAEConfig(
            base_dim=base_dim,
            decoder_base_dim=decoder_out // dim_mult[0],
            z_dim=z_dim,
            dim_mult=tuple(dim_mult),
            num_res_blocks=num_res,
            temperal_downsample=tuple(temporal),
            latents_mean=WAN22_LATENTS_MEAN,
            latents_std=WAN22_LATENTS_STD,
            is_residual=True,
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch,
            scale_factor_temporal=2 ** sum(temporal),
            scale_factor_spatial=2 ** (len(dim_mult) - 1) * patch,
        )
    except ValueError as e:
        raise CheckpointError(f"{c}: the tensor shapes give an unusable config: {e}") from None
    return runtime, config


# -- text encoder -------------------------------------------------------------------------------------


def text_encoder_to_runtime(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], TextEncoderConfig]:
    """A UMT5 encoder in transformers' or the original's naming -> transformers names, and its config."""
    c = "text_encoder"
    runtime = (
        dict(state) if naming_of(state, c) == "transformers" else remap_state_dict(state, T5_ORIGINAL_KEYS)
    )
    for tied, shared in TEXT_ENCODER_ALIASES.items():
        if shared not in runtime and tied in runtime:
            runtime[shared] = runtime[tied]
    vocab, d_model = _shape(runtime, "shared.weight", c)
    buckets, heads = _shape(
        runtime, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", c
    )
    inner = _shape(runtime, "encoder.block.0.layer.0.SelfAttention.q.weight", c)[0]
    layers = {int(m.group(1)) for k in runtime if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    raw = {
        "architectures": ["UMT5EncoderModel"],
        "model_type": "umt5",
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": _shape(runtime, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", c)[0],
        "num_layers": len(layers),
        "num_decoder_layers": len(layers),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": UMT5_RELATIVE_MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "scalable_attention": True,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    return runtime, TextEncoderConfig.from_dict(raw)


# -- CLIP image encoder (transformers naming) ---------------------------------------------------------

CLIP_HEAD_DIM = 80
"""Wan 2.1 I2V's CLIP ViT-H/14: 1280 wide, 16 heads."""


def clip_to_runtime(
    state: Mapping[str, torch.Tensor], *, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A CLIP vision tower in transformers' naming (``vision_model.*`` or not) or the original open-clip
    file's (``visual.*``, its text tower dropped), and its config."""
    c = "image_encoder"
    if is_clip_original(state):
        state = clip_original_to_runtime(state)
    runtime = {k.removeprefix("vision_model."): v for k, v in state.items()}
    if "embeddings.patch_embedding.weight" not in runtime:
        raise CheckpointError(
            f"{c}: not a CLIP vision tower in the transformers naming (embeddings.patch_embedding.weight) "
            "or the original open-clip naming (visual.patch_embedding.weight)"
        )
    hidden, _, patch, _ = _shape(runtime, "embeddings.patch_embedding.weight", c)
    positions = _shape(runtime, "embeddings.position_embedding.weight", c)[0]
    grid = int(round((positions - 1) ** 0.5))
    layers = {int(m.group(1)) for k in runtime if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    heads = num_heads or max(1, hidden // CLIP_HEAD_DIM)
    config = {
        "hidden_size": hidden,
        "intermediate_size": _shape(runtime, "encoder.layers.0.mlp.fc1.weight", c)[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    return {f"vision_model.{k}": v for k, v in runtime.items()}, config
