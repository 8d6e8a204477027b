"""LoRA adapters for the Wan DiT, merged into the weights and unmergeable bit for bit.

Formats (the key tables below):

- diffusers / peft: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``),
  the scale ``lora_alpha / r`` from the file's ``lora_adapter_metadata`` (1 without it);
- original Wan names: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` (or ``lora_A``),
  ``lora_up.weight`` (``lora_B``), ``.alpha``, and full deltas ``.diff`` / ``.diff_b`` (the
  step-distillation LoRAs);
- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``lora_up.weight``, ``.alpha``.

A low-rank update adds ``scale * (alpha / rank) * up @ down`` to the layer's weight (``diff`` and
``diff_b`` add ``scale * diff`` to the weight and bias). Merging is done in float32 from the *base*
tensors, which are kept: unmerging puts the very same tensors back, so the base weights come back
exactly, and several adapters are always merged afresh from the base.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from wanpipe.weights.fp8 import Fp8Linear, dequantize, is_fp8
from wanpipe.weights.gguf_quants import GGUFLinear
from wanpipe.weights.gguf_quants import dequantize as gguf_dequantize
from wanpipe.weights.keymap import KeyMap, remap_key
from wanpipe.weights.safetensors_io import CheckpointError
from wanpipe.weights.single_file import open_weights_file
from wanpipe.weights.transformer_keys import TRANSFORMER_DIFFUSERS_KEYS

logger = logging.getLogger(__name__)

LORA_PREFIXES: tuple[str, ...] = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
)
"""Stripped from the front of every adapter key (one of them)."""

LORA_PARTS: KeyMap = (
    (r"(.+)\.(?:lora_A|lora_down)(?:\.default)?\.weight", r"down"),
    (r"(.+)\.(?:lora_B|lora_up)(?:\.default)?\.weight", r"up"),
    (r"(.+)\.(?:lora_B|lora_up)(?:\.default)?\.bias", r"diff_b"),
    (r"(.+)\.alpha", r"alpha"),
    (r"(.+)\.diff", r"diff"),
    (r"(.+)\.diff_b", r"diff_b"),
    (r"(.+)\.diff_m", r"diff_m"),
)
"""``(pattern, part)``: the layer name is group 1, the part the replacement. Tried in order."""

EXPERTS = ("high", "low", "both")

LORA_PARAMS: dict[str, tuple[str, ...]] = {
    "weight": ("down", "up", "diff"),
    "bias": ("diff_b",),
    "modulation": ("diff_m",),
}
"""A layer's parameters an adapter changes, and the parts of :class:`LoraUpdate` that change each."""


@dataclass
class LoraUpdate:
    """One layer's update: a low-rank pair with its alpha, and/or full weight and bias deltas."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    diff: Tensor | None = None
    diff_b: Tensor | None = None
    diff_m: Tensor | None = None  # a block's (or the head's) modulation table: lightx2v's ``.diff_m``

    def delta(self, param: str, shape: torch.Size, layer: str) -> Tensor | None:
        """The float32 delta of the layer's ``param`` ("weight", "bias" or "modulation"), unscaled."""
        if param == "weight":
            return self.weight_delta(shape, layer)
        full = self.diff_b if param == "bias" else self.diff_m if param == "modulation" else None
        if full is None:
            return None
        if full.numel() != shape.numel():
            raise CheckpointError(
                f"LoRA layer {layer}: the {param} delta {list(full.shape)} does not fit {list(shape)}"
            )
        return full.float().reshape(shape)

    def weight_delta(self, shape: torch.Size, layer: str) -> Tensor | None:
        """The float32 delta of the weight (unscaled by the adapter's strength)."""
        delta = None
        if (self.down is None) != (self.up is None):
            raise CheckpointError(f"LoRA layer {layer}: has only one of lora_down/lora_A and lora_up/lora_B")
        if self.down is not None and self.up is not None:
            rank = self.down.shape[0]
            if self.up.shape[1] != rank:
                raise CheckpointError(
                    f"LoRA layer {layer}: lora_up {list(self.up.shape)} does not fit lora_down {list(self.down.shape)}"
                )
            low = self.up.float().flatten(1) @ self.down.float().flatten(1)
            if self.alpha is not None:
                low = low * (self.alpha / rank)
            if low.numel() != shape.numel():
                raise CheckpointError(
                    f"LoRA layer {layer}: the update is {list(low.shape)}, the weight {list(shape)}"
                )
            delta = low.reshape(shape)
        if self.diff is not None:
            if self.diff.numel() != shape.numel():
                raise CheckpointError(
                    f"LoRA layer {layer}: diff {list(self.diff.shape)} vs weight {list(shape)}"
                )
            diff = self.diff.float().reshape(shape)
            delta = diff if delta is None else delta + diff
        return delta


@dataclass
class LoraReport:
    """What loading an adapter did: the layers it changed and the keys it could not place."""

    name: str
    layers: list[str]
    unmatched: list[str]
    experts: tuple[str, ...]


@dataclass
class _Adapter:
    name: str
    updates: dict[str, LoraUpdate]
    scale: float
    experts: tuple[str, ...]
    report: LoraReport = field(repr=False, default=None)  # type: ignore[assignment]
    group: str | None = None  # set by LoraManager.switch (the server's per-request adapters)


@dataclass
class ParsedLora:
    """An adapter file read and grouped by layer, every shape checked, not merged: what a server keeps
    in its cache to merge it again cheaply (the low-rank factors, not the full deltas)."""

    name: str
    updates: dict[str, LoraUpdate]
    unmatched: list[str]
    num_keys: int

    def to(self, device: torch.device | str) -> ParsedLora:
        """The same adapter with its tensors on ``device`` (where the merge runs)."""
        moved = {
            layer: LoraUpdate(
                **{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(update).items()}
            )
            for layer, update in self.updates.items()
        }
        return ParsedLora(self.name, moved, self.unmatched, self.num_keys)

    @property
    def nbytes(self) -> int:
        return sum(
            v.numel() * v.element_size()
            for update in self.updates.values()
            for v in vars(update).values()
            if isinstance(v, Tensor)
        )


def unmatched_message(name: str, unmatched: list[str], num_keys: int) -> str:
    """The report of an adapter's keys that match no DiT layer: how many, and the first names."""
    shown = ", ".join(unmatched[:8]) + (", ..." if len(unmatched) > 8 else "")
    return f"LoRA {name}: {len(unmatched)} of its {num_keys} keys match no DiT layer and are ignored: {shown}"


def read_lora(
    source: str | Path | Mapping[str, Tensor], targets: Mapping[str, nn.Module], *, name: str | None = None
) -> ParsedLora:
    """Read an adapter (a file or a state dict) against the DiT's layers (:func:`lora_targets`): every
    update's shape checked; CheckpointError when no key matches any layer."""
    default_alpha = None
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        state = open_weights_file(path, "lora")
        default_alpha = _metadata_alpha(path)
        name = name or path.stem
    else:
        state = source
        name = name or "lora"
    updates, unmatched = parse_lora(state, targets, default_alpha=default_alpha)
    if not updates:
        raise CheckpointError(
            f"LoRA {name}: none of its {len(state)} keys matches a DiT layer (first keys: {sorted(state)[:6]})"
        )
    for layer, update in updates.items():  # check every shape before changing anything
        module = targets[layer]
        for param, given in LORA_PARAMS.items():
            if any(getattr(update, part) is not None for part in given):
                if not isinstance(getattr(module, param, None), Tensor):
                    raise CheckpointError(
                        f"LoRA layer {layer}: has a {param} delta but the layer has no {param}"
                    )
                update.delta(param, param_shape(module, param), layer)
    return ParsedLora(name, updates, unmatched, len(state))


def _metadata_alpha(path: Path) -> float | None:
    """peft's ``lora_alpha / r`` from a diffusers-saved adapter's ``lora_adapter_metadata``, as alpha = lora_alpha."""
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        raw = meta.get("lora_adapter_metadata") or meta.get("transformer_lora_adapter_metadata")
        if raw is None:
            return None
        info = json.loads(raw)
        info = info.get("transformer", info) if isinstance(info, dict) else {}
        return float(info["lora_alpha"]) if "lora_alpha" in info else None
    except Exception:  # noqa: BLE001 - metadata is optional; a bad one is ignored
        return None


def _layer_lookup(targets: Mapping[str, nn.Module]) -> dict[str, str]:
    """kohya's underscored names -> our dotted layer names."""
    return {name.replace(".", "_"): name for name in targets}


def parse_lora(
    state: Mapping[str, Tensor], targets: Mapping[str, nn.Module], *, default_alpha: float | None = None
) -> tuple[dict[str, LoraUpdate], list[str]]:
    """Group an adapter's keys by the DiT layer they change -> ({layer: update}, unmatched keys)."""
    underscored = _layer_lookup(targets)
    updates: dict[str, LoraUpdate] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        name = key
        for prefix in LORA_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        part = layer = None
        for pattern, which in LORA_PARTS:
            m = re.fullmatch(pattern, name)
            if m:
                layer, part = m.group(1), which
                break
        resolved = _resolve_layer(layer, targets, underscored) if layer is not None else None
        if resolved is None:
            unmatched.append(key)
            continue
        update = updates.setdefault(resolved, LoraUpdate())
        if part == "alpha":
            update.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(update, part, value)
    if default_alpha is not None:
        for update in updates.values():
            if update.alpha is None and update.down is not None:
                update.alpha = default_alpha
    return updates, sorted(unmatched)


def _resolve_layer(
    layer: str, targets: Mapping[str, nn.Module], underscored: Mapping[str, str]
) -> str | None:
    if layer in targets:
        return layer  # original / wanpipe names
    ours = remap_key(layer + ".weight", TRANSFORMER_DIFFUSERS_KEYS).removesuffix(".weight")
    if ours in targets:
        return ours  # diffusers / peft names
    return underscored.get(layer)  # kohya / musubi


def param_shape(module: nn.Module, param: str) -> torch.Size:
    """The logical shape of ``module.param``: a GGUF layer's weight is (out, in), not its raw blocks'."""
    if isinstance(module, GGUFLinear) and param == "weight":
        return torch.Size((module.out_features, module.in_features))
    return getattr(module, param).shape


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The DiT's layers with a weight (linears, the patch embedding conv, affine norms) or a
    modulation table (the blocks and the head)."""
    return {
        name: m
        for name, m in model.named_modules()
        if name
        and not isinstance(m, nn.Embedding)
        and any(isinstance(getattr(m, p, None), torch.Tensor) for p in ("weight", "modulation"))
    }


class LoraManager:
    """The adapters merged into an :class:`~wanpipe.executor.Experts`' DiT(s), and their base tensors."""

    def __init__(self, experts, dtype: torch.dtype):
        self.experts = experts
        self.dtype = dtype
        self.adapters: list[_Adapter] = []
        self._base: dict[tuple[str, str], Tensor] = {}  # (expert, parameter name) -> base tensor

    @property
    def names(self) -> list[str]:
        """The adapters loaded with :meth:`load` (not those of a :meth:`switch` group)."""
        return [a.name for a in self.adapters if a.group is None]

    # -- public -----------------------------------------------------------------------------------
    def load(
        self,
        source: str | Path | Mapping[str, Tensor],
        scale: float,
        expert: str,
        *,
        name: str | None = None,
        strict: bool = False,
    ) -> LoraReport:
        which = self.expert_names(expert)
        if not isinstance(source, (str, Path)):
            name = name or f"lora{len(self.adapters)}"
        elif name is None:
            name = Path(source).expanduser().stem
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already loaded (pass another name=)")
        parsed = read_lora(source, lora_targets(self.experts.high), name=name)
        if parsed.unmatched:
            message = unmatched_message(name, parsed.unmatched, parsed.num_keys)
            if strict:
                raise CheckpointError(message)
            logger.warning(message)
        report = LoraReport(
            name=name, layers=sorted(parsed.updates), unmatched=parsed.unmatched, experts=which
        )
        self.adapters.append(_Adapter(name, parsed.updates, float(scale), which, report))
        self._apply({(e, layer) for e in which for layer in parsed.updates})
        return report

    def expert_names(self, expert: str) -> tuple[str, ...]:
        """ "high", "low" or "both" -> the experts an adapter goes to (one DiT: "high" alone)."""
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        if not self.experts.two and expert == "low":
            raise ValueError("this checkpoint has one DiT: expert='low' needs a Wan 2.2 A14B checkpoint")
        return ("high",) if not self.experts.two else (("high", "low") if expert == "both" else (expert,))

    def switch(self, group: str, adapters: list[tuple[ParsedLora, float, str]]) -> None:
        """Replace the adapters of ``group`` by ``adapters`` ((parsed, scale, expert) each, merged in this
        order after the others), re-merging every touched layer once from its base. The same list as
        before changes nothing; an empty list restores those layers to what they were without the
        group (the base tensors themselves when no other adapter is loaded)."""
        wanted = [(p.name, float(scale), self.expert_names(expert)) for p, scale, expert in adapters]
        current = [(a.name, a.scale, a.experts) for a in self.adapters if a.group == group]
        if wanted == current:
            return
        touched = {
            (e, layer) for a in self.adapters if a.group == group for e in a.experts for layer in a.updates
        }
        self.adapters = [a for a in self.adapters if a.group != group]
        for (parsed, _, _), (name, scale, which) in zip(adapters, wanted):
            report = LoraReport(
                name=name, layers=sorted(parsed.updates), unmatched=parsed.unmatched, experts=which
            )
            self.adapters.append(_Adapter(name, parsed.updates, scale, which, report, group))
            touched |= {(e, layer) for e in which for layer in parsed.updates}
        self._apply(touched)

    def unload(self, name: str | None = None) -> None:
        if name is None:
            mine = [a for a in self.adapters if a.group is None]
            touched = {(e, layer) for a in mine for e in a.experts for layer in a.updates}
            self.adapters = [a for a in self.adapters if a.group is not None]
        else:
            found = [a for a in self.adapters if a.name == name and a.group is None]
            if not found:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {self.names})")
            touched = {(e, layer) for e in found[0].experts for layer in found[0].updates}
            self.adapters.remove(found[0])
        self._apply(touched)

    # -- merging ----------------------------------------------------------------------------------
    def _module(self, expert: str) -> nn.Module:
        if expert == "high" or self.experts.swap_states is not None:
            return self.experts.high
        return self.experts.low

    def _apply(self, touched: set[tuple[str, str]]) -> None:
        swapped = set()
        for expert, layer in sorted(touched):
            module = dict(self._module(expert).named_modules())[layer]
            for param in LORA_PARAMS:
                if getattr(module, param, None) is None:
                    continue
                merged = self._merged(expert, layer, module, param)
                self._assign(expert, f"{layer}.{param}", module, param, merged)
                if self.experts.swap_states is not None:
                    swapped.add(expert)
        for expert in swapped:
            if self.experts.active == expert:
                self.experts.high.reload_model_weights(self.experts.swap_states[expert])

    def _base_tensor(self, expert: str, key: str, module: nn.Module, param: str) -> Tensor:
        base = self._base.get((expert, key))
        if base is not None:
            return base
        if self.experts.swap_states is not None:
            return self.experts.swap_states[expert][key]
        return getattr(module, param).data

    def _merged(self, expert: str, layer: str, module: nn.Module, param: str) -> Tensor | None:
        """The parameter merged from its base with every adapter that touches it; None: the base itself."""
        key = f"{layer}.{param}"
        base = self._base_tensor(expert, key, module, param)
        # A GGUF layer's weight is its raw blocks (uint8): the delta has the layer's logical shape.
        gguf = isinstance(module, GGUFLinear) and param == "weight" and not base.is_floating_point()
        shape = param_shape(module, param) if gguf else base.shape
        delta = None
        for adapter in self.adapters:
            update = adapter.updates.get(layer) if expert in adapter.experts else None
            if update is None:
                continue
            d = update.delta(param, shape, layer)
            if d is not None:
                delta = adapter.scale * d if delta is None else delta + adapter.scale * d
        if delta is None:
            return None
        target_dtype = getattr(module, param).dtype
        if gguf:  # merged in float: the layer runs the float weight as a plain linear until unloaded
            if self.experts.swap_states is not None:
                raise CheckpointError(
                    "LoRA on GGUF layers with experts='swap' is not supported: use experts='resident'"
                )
            full = gguf_dequantize(base, module.qtype, torch.float32).to(delta.device)
            target_dtype = self.dtype
        elif is_fp8(base):
            if self.experts.swap_states is not None:
                raise CheckpointError(
                    "LoRA on fp8 layers with experts='swap' is not supported: use experts='resident' or fp8='dequantize'"
                )
            scale = module.weight_scale if isinstance(module, Fp8Linear) else None
            full = dequantize(base, scale).to(delta.device)
            target_dtype = self.dtype
        else:
            full = base.to(device=delta.device, dtype=torch.float32)
        return (full + delta.to(full.device)).to(device=getattr(module, param).device, dtype=target_dtype)

    def _assign(self, expert: str, key: str, module: nn.Module, param: str, merged: Tensor | None) -> None:
        states = self.experts.swap_states
        if merged is None:  # back to the base tensor, the very same one
            base = self._base.pop((expert, key), None)
            if base is None:
                return
            if states is not None:
                states[expert][key] = base
            else:
                getattr(module, param).data = base
            return
        if (expert, key) not in self._base:
            self._base[(expert, key)] = (
                states[expert][key] if states is not None else getattr(module, param).data
            )
        if states is not None:
            states[expert][key] = merged
        else:
            getattr(module, param).data = merged
