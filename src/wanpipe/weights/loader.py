"""Checkpoint resolution and loading of weights into modules built on the meta device.

Modules are constructed under ``torch.device("meta")`` (no memory), their checkpoint tensors are
renamed through the component's key map, checked against the module's own state dict (missing,
unexpected and mis-shaped tensors are errors naming component, key and shapes) and assigned in place
(``load_state_dict(assign=True)``). Tensors whose dtype already matches stay views of the
memory-mapped file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wanpipe.weights.original import (
    ORIGINAL_CLIP_FILE,
    ORIGINAL_T5_FILES,
    ORIGINAL_TOKENIZER_DIRS,
    ORIGINAL_VAE_FILES,
)
from wanpipe.weights.safetensors_io import CheckpointError, SafetensorsIndex

logger = logging.getLogger(__name__)

# What a Wan checkpoint needs. The diffusers layout: configs, safetensors weights and the tokenizer.
# An original Wan repository: its DiT config and safetensors at the top (or in the expert folders), the
# UMT5 and VAE files (``.pth`` ones are read with ``weights_only=True``) and the tokenizer folder.
HUB_ALLOW_PATTERNS: tuple[str, ...] = (
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.safetensors.index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "image_processor/*",
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    *ORIGINAL_T5_FILES,
    *ORIGINAL_VAE_FILES,
    "models_clip_*.safetensors",
    ORIGINAL_CLIP_FILE,
    *(f"{folder}/*" for folder in ORIGINAL_TOKENIZER_DIRS),
)


def is_hub_id(path_or_id: str) -> bool:
    """True for ``owner/name`` strings that are not an existing local path."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path_or_id)) and not Path(path_or_id).exists()


def resolve_checkpoint(
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    download: Callable[..., str] | None = None,
) -> Path:
    """Return the local folder of a checkpoint: a local folder as it is, a hub id through
    ``huggingface_hub.snapshot_download`` (only the files a Wan pipeline needs; ``.bin`` and
    ``.pth`` pickles are never fetched)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{path} is a file; pass the checkpoint folder (the one holding model_index.json)"
        )
    if not is_hub_id(text):
        raise CheckpointError(
            f"{text!r} is neither an existing folder nor a Hugging Face hub id of the form 'owner/name'"
        )
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    logger.info("downloading %s from the Hugging Face hub", text)
    folder = download(
        repo_id=text,
        revision=revision,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        allow_patterns=list(HUB_ALLOW_PATTERNS),
    )
    return Path(folder)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with an error naming the file when it is missing or damaged."""
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} does not hold a JSON object")
    return data


def _fp32_names(names: Iterable[str], keep_in_fp32: Iterable[str]) -> set[str]:
    patterns = [re.compile(p) for p in keep_in_fp32]
    return {n for n in names if any(p.fullmatch(n) for p in patterns)}


def load_weights(
    module: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    *,
    component: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    prepare: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
    keep_in_fp32: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    ignore_unexpected: Iterable[str] = (),
    materialize: Callable[[nn.Module], None] | None = None,
    keep_dtype: Iterable[str] = (),
) -> nn.Module:
    """Assign ``checkpoint``'s tensors to ``module`` (built on the meta device) in place.

    - ``prepare`` renames checkpoint keys to the module's (a key map kept as data);
    - floating tensors are cast to ``dtype``, except names that a ``keep_in_fp32`` regex matches whole;
    - ``aliases`` maps a module key to another key whose tensor it shares (tied weights);
    - ``ignore_unexpected`` are regexes of checkpoint keys the reference also ignores;
    - ``materialize(module)`` recreates buffers that are not saved in checkpoints (non-persistent);
    - ``keep_dtype`` are regexes of names whose tensors keep the checkpoint's dtype (fp8 weights).
    Returns the module, on ``device``, in eval mode, without gradients.
    """
    state = dict(prepare(checkpoint) if prepare is not None else checkpoint)
    expected = module.state_dict(keep_vars=True)
    aliases = dict(aliases or {})
    for target, source in aliases.items():
        if target in expected and target not in state and source in state:
            state[target] = state[source]
    ignore = [re.compile(p) for p in ignore_unexpected]
    state = {k: v for k, v in state.items() if k in expected or not any(p.fullmatch(k) for p in ignore)}
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    problems = []
    if missing:
        problems.append(
            f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
        )
    if unexpected:
        problems.append(
            f"unexpected tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)} in all)"
        )
    mis_shaped = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {mis_shaped[:8]}")
    if problems:
        raise CheckpointError(f"{component}: the checkpoint does not match the model: " + "; ".join(problems))

    fp32 = _fp32_names(expected, keep_in_fp32)
    as_is = _fp32_names(expected, keep_dtype)
    device = torch.device(device)
    loaded: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        tensor = state[name]
        target_dtype = tensor.dtype
        if tensor.is_floating_point() and ref.is_floating_point() and name not in as_is:
            target_dtype = torch.float32 if name in fp32 else dtype
        loaded[name] = tensor.to(device=device, dtype=target_dtype)
    module.load_state_dict(loaded, strict=True, assign=True)
    if materialize is not None:
        materialize(module)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{component}: tensors left unloaded after loading: {still_meta[:8]}")
    module.requires_grad_(False)
    return module.eval()


def open_component_weights(folder: Path, component: str) -> SafetensorsIndex:
    """The memory-mapped weights of one component sub-folder (``transformer``, ``vae``...)."""
    sub = folder / component
    if not sub.is_dir():
        raise CheckpointError(f"{component}: folder {sub} is missing from the checkpoint")
    return SafetensorsIndex.from_folder(sub, component)


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.bin``/``.pth`` state dict without executing code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe pickle
        raise CheckpointError(f"{path}: cannot be read safely with weights_only=True ({e})") from None
