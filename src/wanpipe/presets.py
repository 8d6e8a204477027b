"""Presets: the sampling settings published with the few-step (distilled) Wan weights, as data.

A preset names the steps, sampler, step list, shift and guidance that a distilled model or a
distillation LoRA was made for (``docs/fast-sampling.md`` cites the source of every figure).
:func:`apply_preset` fills the values a request left ``None`` from the preset it names; what the
request gives itself wins. The schedule is one unit: a request that gives its own
``num_inference_steps``, ``sigmas`` or ``timesteps`` keeps its schedule and takes none of the preset's
(its ``flow_shift`` still fills an unset shift). A preset fits some checkpoint kinds only (a task and one
or two experts); on another it is refused, as is an unknown name, with
:class:`~wanpipe.context.InvalidRequestError` naming ``preset``.

A preset sets no LoRA: load the weights it is meant for (``Preset.weights``) yourself.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from wanpipe.context import InvalidRequestError, WanRequest
from wanpipe.schedulers import SAMPLERS, TIMESTEP_SCALE, shift_sigmas

if TYPE_CHECKING:
    from wanpipe.config import WanArchConfig

KIND_NAMES: dict[tuple[str, int], str] = {
    ("t2v", 1): "Wan 2.1 T2V",
    ("i2v", 1): "Wan 2.1 I2V",
    ("flf2v", 1): "Wan 2.1 FLF2V",
    ("ti2v", 1): "Wan 2.2 TI2V-5B",
    ("t2v", 2): "Wan 2.2 T2V-A14B",
    ("i2v", 2): "Wan 2.2 I2V-A14B",
}
"""A checkpoint kind (its variant's task, its number of experts) -> how the docs name it."""


def checkpoint_kind(arch: WanArchConfig) -> tuple[str, int]:
    """(task, experts) of a checkpoint: ``("t2v", 1)`` for Wan 2.1 T2V, ``("i2v", 2)`` for Wan 2.2 I2V-A14B."""
    return arch.variant.task, 2 if arch.has_second_expert else 1


def shifted_timesteps(step_list: tuple[float, ...], shift: float) -> tuple[float, ...]:
    """A distillation's step list (0-1000, unshifted) -> the final timesteps its sampler runs:
    t -> 1000 * shift(t / 1000), as LightX2V's ``WanStepDistillScheduler`` and Wan2.2-Lightning's
    ``EulerScheduler`` apply ``sample_shift`` to ``denoising_step_list`` / ``linspace(1000, 0, N + 1)``.
    (1000, 750, 500, 250) at shift 5 -> (1000, 937.5, 833.33..., 625)."""
    sigmas = shift_sigmas(np.asarray(step_list, np.float64) / TIMESTEP_SCALE, shift)
    return tuple(float(s) * TIMESTEP_SCALE for s in sigmas)


@dataclass(frozen=True)
class Preset:
    """One published few-step setting.

    kinds: the checkpoint kinds (task, experts) it fits. timesteps: the final timesteps on the 0-1000
    scale (sigma = t / 1000, not shifted again), one per step. flow_shift: the distillation's shift, which
    the timesteps already hold; it applies only to a request that gives its own step count.
    guidance_scale_2: the low-noise expert's (two-expert kinds only). weights: what the settings are
    for (hub ids, files); sources: where the figures come from (docs/fast-sampling.md cites each)."""

    name: str
    summary: str
    kinds: tuple[tuple[str, int], ...]
    num_inference_steps: int
    sampler: str
    timesteps: tuple[float, ...]
    guidance_scale: float
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    weights: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"preset {self.name}: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if len(self.timesteps) != self.num_inference_steps:
            raise ValueError(
                f"preset {self.name}: {len(self.timesteps)} timesteps for {self.num_inference_steps} steps"
            )
        if any(b >= a for a, b in zip(self.timesteps, self.timesteps[1:])) or not (
            self.timesteps[-1] > 0 and self.timesteps[0] <= TIMESTEP_SCALE
        ):
            raise ValueError(
                f"preset {self.name}: timesteps must decrease within (0, 1000]: {self.timesteps}"
            )
        unknown = [k for k in self.kinds if k not in KIND_NAMES]
        if unknown or not self.kinds:
            raise ValueError(f"preset {self.name}: unknown checkpoint kinds {unknown or self.kinds}")
        if self.guidance_scale_2 is not None and any(experts != 2 for _, experts in self.kinds):
            raise ValueError(f"preset {self.name}: guidance_scale_2 is for two-expert kinds only")

    @property
    def fits(self) -> tuple[str, ...]:
        """The checkpoint kinds it fits, by name ("Wan 2.1 T2V", ...)."""
        return tuple(KIND_NAMES[k] for k in self.kinds)

    def fits_checkpoint(self, arch: WanArchConfig) -> bool:
        return checkpoint_kind(arch) in self.kinds

    def request_values(self) -> dict[str, Any]:
        """The request fields the preset sets: ``WanRequest`` field -> value."""
        values: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps,
            "timesteps": list(self.timesteps),
            "sampler": self.sampler,
            "guidance_scale": self.guidance_scale,
            "guidance_scale_2": self.guidance_scale_2,
            "flow_shift": self.flow_shift,
        }
        return {k: v for k, v in values.items() if v is not None}

    def card(self) -> dict[str, Any]:
        """The preset as JSON data (``GET /v1/models``; ``wanpipe generate --preset list``)."""
        return {
            "name": self.name,
            "summary": self.summary,
            "fits": list(self.fits),
            "num_inference_steps": self.num_inference_steps,
            "sampler": self.sampler,
            "timesteps": [round(t, 4) for t in self.timesteps],
            "flow_shift": self.flow_shift,
            "guidance_scale": self.guidance_scale,
            "guidance_scale_2": self.guidance_scale_2,
            "weights": list(self.weights),
            "sources": list(self.sources),
        }


SCHEDULE_FIELDS = ("num_inference_steps", "sigmas", "timesteps")
"""The request fields that make up its schedule: a request that gives any of them takes none of a
preset's."""

_LIGHTX2V = "https://github.com/ModelTC/LightX2V/blob/main/"
_LIGHTNING = "https://github.com/ModelTC/Wan2.2-Lightning/blob/main/"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="lightx2v-4step",
            summary="lightx2v Wan 2.1 4-step step/CFG-distilled models and LoRAs",
            kinds=(("t2v", 1), ("i2v", 1)),
            num_inference_steps=4,
            sampler="euler",
            timesteps=shifted_timesteps((1000, 750, 500, 250), 5.0),
            guidance_scale=1.0,
            flow_shift=5.0,
            weights=(
                "lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v",
                "lightx2v/Wan2.1-I2V-14B-480P-StepDistill-CfgDistill-Lightx2v",
                "lightx2v/Wan2.1-Distill-Loras",
                "lightx2v/Wan2.1-Distill-Models",
            ),
            sources=(
                _LIGHTX2V + "configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json",
                _LIGHTX2V + "configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json",
                _LIGHTX2V + "lightx2v/models/schedulers/wan/step_distill/scheduler.py",
            ),
        ),
        Preset(
            name="lightning-a14b",
            summary="Wan2.2-Lightning (and lightx2v Wan 2.2 distill) A14B: 2 high-noise + 2 low-noise steps",
            kinds=(("t2v", 2), ("i2v", 2)),
            num_inference_steps=4,
            sampler="euler",
            timesteps=shifted_timesteps((1000, 750, 500, 250), 5.0),
            guidance_scale=1.0,
            guidance_scale_2=1.0,
            flow_shift=5.0,
            weights=(
                "lightx2v/Wan2.2-Lightning",
                "lightx2v/Wan2.2-Distill-Loras",
                "lightx2v/Wan2.2-Distill-Models",
            ),
            sources=(
                _LIGHTNING + "wan/configs/wan_t2v_A14B.py",
                _LIGHTNING + "wan/configs/wan_i2v_A14B.py",
                _LIGHTNING + "wan/utils/fm_solvers_euler.py",
                _LIGHTX2V + "configs/distill/wan22/wan_moe_t2v_distill_lora.json",
            ),
        ),
        Preset(
            name="fastwan",
            summary="FastVideo FastWan2.2-TI2V-5B: 3-step DMD (x0, then fresh noise to the next step)",
            kinds=(("ti2v", 1),),
            num_inference_steps=3,
            sampler="dmd",
            timesteps=(1000.0, 757.0, 522.0),
            guidance_scale=1.0,
            flow_shift=5.0,
            weights=(
                "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers",
                "FastVideo/FastWan2.2-TI2V-5B-Diffusers",
            ),
            sources=(
                "https://github.com/hao-ai-lab/FastVideo/blob/main/fastvideo/configs/pipelines/wan.py",
                "https://github.com/hao-ai-lab/FastVideo/blob/main/fastvideo/pipelines/stages/denoising.py",
            ),
        ),
        Preset(
            name="causvid",
            summary="Kijai's CausVid LoRA on bidirectional Wan 2.1 (14B list of flowmatch_causvid)",
            kinds=(("t2v", 1), ("i2v", 1)),
            num_inference_steps=9,
            sampler="euler",
            timesteps=(999.0, 934.0, 862.0, 756.0, 603.0, 410.0, 250.0, 140.0, 74.0),
            guidance_scale=1.0,
            flow_shift=8.0,
            weights=("Kijai/WanVideo_comfy: Wan21_CausVid_14B_T2V_lora_rank32.safetensors",),
            sources=(
                "https://github.com/kijai/ComfyUI-WanVideoWrapper/blob/main/wanvideo/schedulers/__init__.py",
                _LIGHTX2V + "configs/causvid/wan_t2v_causvid.json",
                "https://github.com/kijai/ComfyUI-WanVideoWrapper/issues/576",
            ),
        ),
    )
}
"""The known presets by name (``wanpipe generate --preset list`` prints them)."""


def get_preset(name: Any) -> Preset:
    """The preset called ``name``; InvalidRequestError naming ``preset`` (and the known ones) if none is."""
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise InvalidRequestError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}", "preset")
    return preset


def presets_for(arch: WanArchConfig) -> list[str]:
    """The names of the presets that fit ``arch``'s kind."""
    return [name for name, p in PRESETS.items() if p.fits_checkpoint(arch)]


def apply_preset(request: WanRequest, arch: WanArchConfig) -> WanRequest:
    """``request`` with the values it left ``None`` taken from its ``preset`` (unchanged without one).

    The schedule (``num_inference_steps``, ``timesteps``) is taken only when the request gives none of
    ``SCHEDULE_FIELDS``. Raises InvalidRequestError naming ``preset`` for an unknown name or a preset
    that does not fit this checkpoint's kind. Applying it twice gives the same request."""
    if request.preset is None:
        return request
    preset = get_preset(request.preset)
    if not preset.fits_checkpoint(arch):
        kind = KIND_NAMES.get(checkpoint_kind(arch), "/".join(map(str, checkpoint_kind(arch))))
        fitting = presets_for(arch)
        raise InvalidRequestError(
            f"preset {preset.name!r} is for {' or '.join(preset.fits)} checkpoints; this one is "
            f"{arch.variant.name} ({kind}): "
            + (f"use {', '.join(fitting)}" if fitting else "no preset fits it"),
            "preset",
        )
    values = preset.request_values()
    if any(getattr(request, name) is not None for name in SCHEDULE_FIELDS):
        values = {k: v for k, v in values.items() if k not in ("num_inference_steps", "timesteps")}
    names = {f.name for f in fields(WanRequest)}
    fill = {k: v for k, v in values.items() if k in names and getattr(request, k) is None}
    return replace(request, **fill) if fill else request


def format_presets() -> str:
    """The presets as a text table: name, the checkpoints it fits, steps, sampler, timesteps, shift,
    guidance, and the weights it is meant for (``wanpipe generate --preset list``)."""
    rows = [("preset", "fits", "steps", "sampler", "timesteps", "shift", "guidance")]
    for p in PRESETS.values():
        guidance = f"{p.guidance_scale:g}" + (
            "" if p.guidance_scale_2 is None else f" / {p.guidance_scale_2:g}"
        )
        rows.append(
            (
                p.name,
                ", ".join(p.fits),
                str(p.num_inference_steps),
                p.sampler,
                ",".join(f"{t:.6g}" for t in p.timesteps),
                "-" if p.flow_shift is None else f"{p.flow_shift:g}",
                guidance,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    for p in PRESETS.values():
        lines.append(f"{p.name}: {p.summary}; for {', '.join(p.weights)}")
    lines.append(
        "A preset fills what the request leaves out; --steps, --sigmas or --timesteps replace its schedule. "
        "Sources: docs/fast-sampling.md. Quality on real weights was not measured by wanpipe."
    )
    return "\n".join(lines)
