"""Loading TAEHV (the tiny video autoencoder, :mod:`wanpipe.models.taehv`) from its published files.

``taew2_1.pth`` / ``taew2_2.pth`` of https://github.com/madebyollin/taehv (or the ``.safetensors`` of its
``safetensors/`` folder, or a copy on the Hugging Face hub) hold the reference module's state dict,
whose names the model keeps; the config (latent channels, patch size, widths, temporal strides) is
read from the tensor shapes, never from the file name.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from wanpipe.models.taehv import TAEHV, TAEHVConfig, TGrow
from wanpipe.weights.loader import is_hub_id, load_weights
from wanpipe.weights.safetensors_io import CheckpointError
from wanpipe.weights.single_file import open_weights_file

logger = logging.getLogger(__name__)

COMPONENT = "tiny_vae"
HUB_SUFFIXES = (".safetensors", ".pth", ".pt")


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{COMPONENT}: {key} is missing: not a TAEHV (taew2_1 / taew2_2) state dict")
    return tuple(state[key].shape)


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> TAEHVConfig:
    """The :class:`TAEHVConfig` of a TAEHV state dict, from its tensor shapes.

    decoder.1 (the first conv): (n0, latent_channels, 3, 3); the last decoder conv: (3 p^2, n3, 3, 3);
    each decoder stage's TGrow conv: (n stride, n, 1, 1); each encoder TPool conv: (n stride, ...).
    """
    if "decoder.0.weight" in state:
        raise CheckpointError(
            f"{COMPONENT}: this is a TAEHV 'super' decoder (taew2_2_super / taehv1_5_super), which wanpipe "
            "does not implement; use taew2_1 or taew2_2"
        )
    blocks = {int(m.group(1)) for k in state if (m := re.fullmatch(r"decoder\.(\d+)\.conv\.0\.weight", k))}
    if len(blocks) < 3 or len(blocks) % 3:
        raise CheckpointError(
            f"{COMPONENT}: expected 3 decoder stages of MemBlocks, found {len(blocks)} blocks"
        )
    per_stage = len(blocks) // 3
    n0, latent, *_ = _shape(state, "decoder.1.weight")
    widths = [n0]
    time_up = []
    for stage in range(3):
        start = 3 + stage * (per_stage + 3)
        grow = _shape(state, f"decoder.{start + per_stage + 1}.conv.weight")
        time_up.append(grow[0] // grow[1] == 2)
        widths.append(_shape(state, f"decoder.{start + per_stage + 2}.weight")[0])
    out_channels = _shape(state, f"decoder.{3 + 3 * (per_stage + 3) + 1}.weight")[0]
    patch = round((out_channels / 3) ** 0.5)
    if 3 * patch * patch != out_channels:
        raise CheckpointError(f"{COMPONENT}: the decoder outputs {out_channels} channels, not 3 p^2")
    enc_width = _shape(state, "encoder.0.weight")[0]
    time_down = []
    for stage in range(3):
        pool = _shape(state, f"encoder.{2 + stage * (per_stage + 2)}.conv.weight")
        time_down.append(pool[1] // pool[0] == 2)
    return TAEHVConfig(
        latent_channels=latent,
        patch_size=patch,
        encoder_width=enc_width,
        decoder_widths=tuple(widths),  # type: ignore[arg-type]
        encoder_time_downscale=tuple(time_down),  # type: ignore[arg-type]
        decoder_time_upscale=tuple(time_up),  # type: ignore[arg-type]
        blocks_per_stage=per_stage,
    )


def fit_time_upscale(model: TAEHV, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state for a model with some temporal upscaling turned off: each such TGrow keeps
    its last frame's output channels (as the reference's ``patch_tgrow_layers`` does)."""
    out = dict(state)
    for index, layer in enumerate(model.decoder):
        if isinstance(layer, TGrow):
            key = f"decoder.{index}.conv.weight"
            wanted = layer.conv.weight.shape[0]
            if key in out and out[key].shape[0] > wanted:
                out[key] = out[key][-wanted:]
    return out


def resolve_tiny_vae(path_or_id: str | Path, *, download: Callable[..., str] | None = None) -> Path:
    """A local ``.pth``/``.safetensors`` file as it is; ``owner/name/FILE`` on the Hugging Face hub through
    ``huggingface_hub.hf_hub_download`` (``download``, for tests)."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    parts = text.split("/")
    if len(parts) >= 3 and is_hub_id("/".join(parts[:2])) and text.endswith(HUB_SUFFIXES):
        if download is None:
            from huggingface_hub import hf_hub_download

            download = hf_hub_download
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        logger.info("downloading %s from the Hugging Face hub repository %s", filename, repo_id)
        return Path(download(repo_id=repo_id, filename=filename))
    raise CheckpointError(
        f"{COMPONENT}: {text!r} is neither a file nor a hub file 'owner/name/FILE' ending in "
        f"{' / '.join(HUB_SUFFIXES)} (e.g. taew2_1.pth or taew2_2.safetensors)"
    )


def load_taehv(
    path_or_id: str | Path | Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    latent_channels: int | None = None,
    *,
    time_upscale: tuple[bool, bool, bool] | None = None,
    space_upscale: tuple[bool, bool, bool] | None = None,
    download: Callable[..., str] | None = None,
) -> TAEHV:
    """A TAEHV from a file, a hub file (:func:`resolve_tiny_vae`) or a state dict, config from its shapes.

    ``time_upscale`` / ``space_upscale`` turn decoder stages' upscaling off for cheaper previews;
    ``latent_channels``: the VAE's ``z_dim`` it must decode (16: ``taew2_1``, 48: ``taew2_2``)."""
    if isinstance(path_or_id, Mapping):
        state = dict(path_or_id)
    else:
        state = dict(open_weights_file(resolve_tiny_vae(path_or_id, download=download), COMPONENT))
    config = config_from_state_dict(state).with_upscale(time_upscale, space_upscale)
    if latent_channels is not None and config.latent_channels != latent_channels:
        raise CheckpointError(
            f"{COMPONENT}: {path_or_id if not isinstance(path_or_id, Mapping) else 'the state dict'} decodes "
            f"{config.latent_channels}-channel latents but this model's VAE has {latent_channels}: use "
            f"{'taew2_1' if latent_channels == 16 else 'taew2_2' if latent_channels == 48 else 'a matching TAEHV'}"
        )
    with torch.device("meta"):
        model = TAEHV(config)
    return load_weights(
        model,
        state,
        component=COMPONENT,
        dtype=dtype,
        device=device,
        prepare=lambda s: fit_time_upscale(model, s),
    )


def tiny_vae_argument(text: str) -> str:
    """A ``type=`` for ``--tiny-vae``: an existing file, or a hub file ``owner/name/FILE`` (fetched when
    loading)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a TAEHV file, got a folder: {text!r}")
    parts = text.split("/")
    hub_file = len(parts) >= 3 and is_hub_id("/".join(parts[:2])) and text.endswith(HUB_SUFFIXES)
    if not (path.is_file() or hub_file):
        raise argparse.ArgumentTypeError(
            f"no such TAEHV file {text!r}, and it is not a hub file owner/name/FILE ({', '.join(HUB_SUFFIXES)})"
        )
    return text


def add_tiny_vae_argument(p: argparse.ArgumentParser) -> None:
    """``--tiny-vae PATH`` (``generate`` and ``serve``): TAEHV weights for ``decoder="tiny"``."""
    p.add_argument(
        "--tiny-vae",
        type=tiny_vae_argument,
        default=None,
        metavar="PATH",
        help="TAEHV weights for --decoder tiny (and previews): taew2_1 for the 16-channel models, taew2_2 "
        "for TI2V-5B; a .pth/.safetensors file or a hub file owner/name/FILE",
    )


__all__ = ["add_tiny_vae_argument", "config_from_state_dict", "load_taehv", "resolve_tiny_vae"]
