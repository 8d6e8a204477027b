"""Key maps of the Wan2.2-Animate DiT's own parts, kept as data: the original repository's names
(Wan-Video/Wan2.2 ``wan/modules/animate/``: ``model_animate.py`` ``WanAnimateModel``, ``motion_encoder.py``
``Generator``, ``face_blocks.py`` ``FaceEncoder`` / ``FaceAdapter``) <-> wanpipe's, which are diffusers'
(``WanAnimateTransformer3DModel``): a diffusers checkpoint's Animate tensors need no renaming, and the main
DiT's go through ``transformer_keys.py`` as for every variant.

The original's names are ``nn.Sequential`` slots (``enc.net_app.convs.K.conv2.1.weight``: after the blur),
so the rename table depends on how many residual levels the motion encoder has
(:func:`animate_original_keys`). Besides renames, three things differ, each written as data below: the
blur filters are stored buffers there (constants here: dropped, :data:`ANIMATE_ORIGINAL_IGNORED`), the
leaky ReLU biases are (1, C, 1, 1) there and (C,) here (:data:`ANIMATE_FLAT_BIASES`), and the face blocks
fuse the key and value projections (``linear1_kv``: keys then values, split here into ``to_k`` / ``to_v``,
:data:`ANIMATE_FUSED`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from wanpipe.weights.keymap import KeyMap, KeyTable, remap_state_dict

ANIMATE_ORIGINAL_MARKER = r"motion_encoder\.enc\.net_app\..+|face_adapter\.fuser_blocks\..+"
"""A DiT state dict holding a key like this is an Animate DiT in the original names."""

ANIMATE_ORIGINAL_IGNORED: tuple[str, ...] = (
    r"motion_encoder\.enc\.net_app\.convs\.\d+\.(conv2|skip)\.0\.kernel",
)
"""The original's stored blur filters (``Blur.kernel`` buffers, the fixed [1, 3, 3, 1] filter): dropped."""

ANIMATE_FLAT_BIASES = r"motion_encoder\.(conv_in|res_blocks\.\d+\.conv[12])\.act_fn\.bias"
"""Runtime names of the leaky ReLU biases, stored (1, C, 1, 1) in the original and (C,) here."""

ANIMATE_FUSED: dict[str, tuple[str, str]] = {"to_kv": ("to_k", "to_v")}
"""The face blocks' fused projection (the original ``linear1_kv``) and the two it holds, in that order along
the output dimension."""

_FUSED_NAME = r"face_adapter\.(?P<n>\d+)\.(?P<fused>{})\.(?P<wb>weight|bias)"


def animate_original_keys(num_res_blocks: int) -> KeyTable:
    """``(original, wanpipe)`` name templates of the Animate parts for a motion encoder with
    ``num_res_blocks`` residual levels (7 for the released 512-pixel encoder): its flat ``convs`` list is
    [input conv, residual blocks..., output conv]."""
    motion = "motion_encoder.enc.net_app.convs"
    rules: list[tuple[str, str]] = [
        (f"{motion}.0.0.weight", "motion_encoder.conv_in.weight"),
        (f"{motion}.0.1.bias", "motion_encoder.conv_in.act_fn.bias"),
        (f"{motion}.{num_res_blocks + 1}.weight", "motion_encoder.conv_out.weight"),
    ]
    for i in range(num_res_blocks):
        k = i + 1
        res = f"motion_encoder.res_blocks.{i}"
        rules += [
            (f"{motion}.{k}.conv1.0.weight", f"{res}.conv1.weight"),
            (f"{motion}.{k}.conv1.1.bias", f"{res}.conv1.act_fn.bias"),
            (f"{motion}.{k}.conv2.1.weight", f"{res}.conv2.weight"),
            (f"{motion}.{k}.conv2.2.bias", f"{res}.conv2.act_fn.bias"),
            (f"{motion}.{k}.skip.1.weight", f"{res}.conv_skip.weight"),
        ]
    rules += [
        ("motion_encoder.enc.fc.{n}.{wb}", "motion_encoder.motion_network.{n}.{wb}"),
        ("motion_encoder.dec.direction.weight", "motion_encoder.motion_synthesis_weight"),
        ("face_encoder.{conv}.conv.{wb}", "face_encoder.{conv}.{wb}"),
        ("face_adapter.fuser_blocks.{n}.linear1_kv.{wb}", "face_adapter.{n}.to_kv.{wb}"),
        ("face_adapter.fuser_blocks.{n}.linear1_q.{wb}", "face_adapter.{n}.to_q.{wb}"),
        ("face_adapter.fuser_blocks.{n}.linear2.{wb}", "face_adapter.{n}.to_out.{wb}"),
        ("face_adapter.fuser_blocks.{n}.{qk}_norm.weight", "face_adapter.{n}.norm_{qk}.weight"),
    ]
    return KeyTable(tuple(rules), fields={"conv": "conv1_local|conv2|conv3", "qk": "q|k"})


def _num_res_blocks(keys: list[str]) -> int:
    """How many residual levels an original motion encoder has: its ``convs`` entries with a ``conv1``."""
    found = {
        int(m.group(1))
        for k in keys
        if (m := re.fullmatch(r"motion_encoder\.enc\.net_app\.convs\.(\d+)\.conv1\..+", k))
    }
    return len(found)


def is_animate_original(keys: list[str] | Mapping[str, object]) -> bool:
    """Whether DiT tensor names (wrapper prefix stripped) are those of an original Animate checkpoint."""
    return any(re.fullmatch(ANIMATE_ORIGINAL_MARKER, k) for k in keys)


def animate_original_to_runtime(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout Animate DiT (main blocks in the original names, which are wanpipe's) -> wanpipe's
    names and shapes: renamed (:func:`animate_original_keys`), blur filters dropped, biases flattened, the
    face blocks' fused key/value projections split."""
    keys = [k for k in state if not any(re.fullmatch(p, k) for p in ANIMATE_ORIGINAL_IGNORED)]
    table: KeyMap = animate_original_keys(_num_res_blocks(keys)).to_runtime()
    renamed = remap_state_dict({k: state[k] for k in keys}, table)
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(_FUSED_NAME.format("|".join(ANIMATE_FUSED)))
    for key, value in renamed.items():
        m = fused.fullmatch(key)
        if m is not None:
            parts = ANIMATE_FUSED[m["fused"]]
            for name, piece in zip(parts, value.chunk(len(parts), dim=0)):
                out[f"face_adapter.{m['n']}.{name}.{m['wb']}"] = piece
        elif re.fullmatch(ANIMATE_FLAT_BIASES, key):
            out[key] = value.reshape(-1)
        else:
            out[key] = value
    return out


def animate_runtime_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """wanpipe's Animate DiT -> the original names and shapes (for ``wanpipe convert``): the inverse of
    :func:`animate_original_to_runtime` (the blur filters, constants, are not written)."""
    num_res = len({m.group(1) for k in state if (m := re.match(r"motion_encoder\.res_blocks\.(\d+)\.", k))})
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"face_adapter\.(\d+)\.to_([kv])\.(weight|bias)", key)
        if m is not None:
            if m.group(2) == "k":
                fused = f"face_adapter.{m.group(1)}.to_kv.{m.group(3)}"
                out[fused] = torch.cat([value, state[f"face_adapter.{m.group(1)}.to_v.{m.group(3)}"]])
            continue
        out[key] = value.reshape(1, -1, 1, 1) if re.fullmatch(ANIMATE_FLAT_BIASES, key) else value
    return remap_state_dict(out, animate_original_keys(num_res).to_checkpoint())
