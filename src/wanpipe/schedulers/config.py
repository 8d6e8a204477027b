"""SchedulerConfig: the sampler settings read from a checkpoint's ``scheduler/scheduler_config.json``.

Two diffusers classes are understood, in the subset that flow-matching Wan checkpoints use:

* ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True`` and ``prediction_type="flow_prediction"``
  (the Wan 2.1 / 2.2 diffusers checkpoints; the shift is ``flow_shift``), and
* ``FlowMatchEulerDiscreteScheduler`` without dynamic shifting (the shift is ``shift``), and
* ``FlowMatchLCMScheduler`` without dynamic shifting or scale-wise generation (the shift is ``shift``;
  the distilled checkpoints' few-step sampler: predict x0, re-noise to the next sigma).

Keys that have no effect on these paths (beta schedule, timestep spacing, thresholding ratio, ...)
are ignored, as are unknown keys. Settings that would change the math in a way we do not implement
raise ``ValueError`` naming the key and what is supported.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

SchedulerKind = Literal["unipc", "euler", "lcm", "dmd"]
SAMPLERS: tuple[str, ...] = ("unipc", "euler", "lcm", "dmd")
"""The samplers a request may name (``WanRequest.sampler``); a config's ``kind`` is one of them."""
TIMESTEP_SCALE = 1000.0
"""A request's ``timesteps`` are on this scale: sigma = t / 1000 (1000 allowed)."""
SigmaGrid = Literal["diffusers", "original"]
SIGMA_GRIDS: tuple[str, ...] = ("diffusers", "original")

CLASS_KINDS: dict[str, SchedulerKind] = {
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "euler",
    "FlowMatchLCMScheduler": "lcm",
}

# diffusers maps these UniPC solver types to "bh2" when the scheduler is built.
_BH2_ALIASES = ("bh2", "midpoint", "heun", "logrho")
MAX_SOLVER_ORDER = 3


@dataclass(frozen=True)
class SchedulerConfig:
    """Typed, validated scheduler settings.

    kind: the default sampler: "unipc" (multistep UniPC, predictor UniP + corrector UniC), "euler"
        (flow-matching Euler), "lcm" (flow-matching LCM) or "dmd" (the denoising-step-list sampler; no
        diffusers class names it, a request or a preset does). A request's ``sampler`` overrides it.
    num_train_timesteps: the training grid size T; timesteps are sigma * T.
    flow_shift: the default schedule shift s (sigma -> s*sigma / (1 + (s-1)*sigma)); a request may
        override it. Read from ``flow_shift`` (UniPC) or ``shift`` (Euler, LCM).
    shift_terminal: if set, the shifted sigmas are stretched so that the last one equals it.
    solver_order, solver_type, lower_order_final, final_sigmas_type, disable_corrector: UniPC only.
    """

    kind: SchedulerKind
    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    shift_terminal: float | None = None
    solver_order: int = 2
    solver_type: Literal["bh1", "bh2"] = "bh2"
    lower_order_final: bool = True
    final_sigmas_type: Literal["zero", "sigma_min"] = "zero"
    disable_corrector: tuple[int, ...] = ()
    sigma_grid: SigmaGrid = "diffusers"

    def __post_init__(self) -> None:
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {self.sigma_grid!r}")
        if self.kind not in SAMPLERS:
            raise ValueError(f"scheduler kind must be one of {', '.join(SAMPLERS)}, got {self.kind!r}")
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ValueError(f"num_train_timesteps must be an int, got {self.num_train_timesteps!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        check_flow_shift(self.flow_shift)
        if self.shift_terminal is not None and not 0.0 < self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in (0, 1) or None, got {self.shift_terminal!r}")
        if isinstance(self.solver_order, bool) or not isinstance(self.solver_order, int):
            raise ValueError(f"solver_order must be an int, got {self.solver_order!r}")
        if not 1 <= self.solver_order <= MAX_SOLVER_ORDER:
            raise ValueError(
                f"solver_order={self.solver_order} is not supported: UniPC orders 1 to {MAX_SOLVER_ORDER} are"
            )
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {self.solver_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}"
            )
        if (
            self.kind == "unipc"
            and not self.lower_order_final
            and self.final_sigmas_type == "zero"
            and self.solver_order > 1
        ):
            raise ValueError(
                "lower_order_final=False with final_sigmas_type='zero' is not supported: a multistep update "
                "into sigma=0 is singular (diffusers returns inf/NaN there); use lower_order_final=True"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Parse the contents of a diffusers ``scheduler_config.json`` (``_class_name`` picks the kind)."""
        class_name = d.get("_class_name")
        if class_name not in CLASS_KINDS:
            raise ValueError(
                f"unsupported scheduler class {class_name!r}; supported: {', '.join(CLASS_KINDS)} "
                "(the scheduler_config.json '_class_name')"
            )
        kind = CLASS_KINDS[class_name]
        shift_terminal = d.get("shift_terminal") or None  # diffusers treats 0 like None
        if kind == "lcm":
            _reject(
                d,
                class_name,
                {
                    "use_dynamic_shifting": "dynamic (resolution-dependent) shifting; use a fixed `shift`",
                    "invert_sigmas": "inverted sigmas",
                    "use_karras_sigmas": "Karras sigmas; only the shifted linear flow grid is supported",
                    "use_exponential_sigmas": "exponential sigmas; only the shifted linear flow grid is supported",
                    "use_beta_sigmas": "beta sigmas; only the shifted linear flow grid is supported",
                    "scale_factors": "scale-wise generation (x0 resized between steps)",
                },
            )
            return cls(
                kind="lcm",
                num_train_timesteps=d.get("num_train_timesteps", 1000),
                flow_shift=d.get("shift", 1.0),
                shift_terminal=shift_terminal,
            )
        if kind == "euler":
            _reject(
                d,
                class_name,
                {
                    "use_dynamic_shifting": "dynamic (resolution-dependent) shifting; use a fixed `shift`",
                    "invert_sigmas": "inverted sigmas",
                    "stochastic_sampling": "stochastic sampling",
                    "use_karras_sigmas": "Karras sigmas; only the shifted linear flow grid is supported",
                    "use_exponential_sigmas": "exponential sigmas; only the shifted linear flow grid is supported",
                    "use_beta_sigmas": "beta sigmas; only the shifted linear flow grid is supported",
                },
            )
            return cls(
                kind="euler",
                num_train_timesteps=d.get("num_train_timesteps", 1000),
                flow_shift=d.get("shift", 1.0),
                shift_terminal=shift_terminal,
            )
        if d.get("prediction_type", "epsilon") != "flow_prediction":
            raise ValueError(
                f"UniPCMultistepScheduler with prediction_type={d.get('prediction_type', 'epsilon')!r} is not "
                "supported: only 'flow_prediction' (with use_flow_sigmas=True) is"
            )
        if not d.get("use_flow_sigmas", False):
            raise ValueError(
                "UniPCMultistepScheduler without use_flow_sigmas=True is not supported: only the flow-matching "
                "sigma grid (prediction_type='flow_prediction', use_flow_sigmas=True) is"
            )
        if not d.get("predict_x0", True):
            raise ValueError(
                "UniPCMultistepScheduler with predict_x0=False is not supported (flow prediction needs x0)"
            )
        if d.get("solver_p") is not None:
            raise ValueError("UniPCMultistepScheduler with a custom solver_p is not supported")
        _reject(
            d,
            class_name,
            {
                "use_dynamic_shifting": "dynamic (resolution-dependent) shifting; use a fixed `flow_shift`",
                "thresholding": "dynamic thresholding (nonlinear in the sample)",
                "use_karras_sigmas": "Karras sigmas; only the shifted linear flow grid is supported",
                "use_exponential_sigmas": "exponential sigmas; only the shifted linear flow grid is supported",
                "use_beta_sigmas": "beta sigmas; only the shifted linear flow grid is supported",
            },
        )
        solver_type = d.get("solver_type", "bh2")
        if solver_type in _BH2_ALIASES:
            solver_type = "bh2"
        elif solver_type != "bh1":
            raise ValueError(f"UniPC solver_type {solver_type!r} is not supported: 'bh1' or 'bh2'")
        disable = d.get("disable_corrector") or ()
        return cls(
            kind="unipc",
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            flow_shift=d.get("flow_shift", 1.0),
            shift_terminal=shift_terminal,
            solver_order=d.get("solver_order", 2),
            solver_type=solver_type,
            lower_order_final=bool(d.get("lower_order_final", True)),
            final_sigmas_type=d.get("final_sigmas_type", "zero"),
            disable_corrector=tuple(int(i) for i in disable),
        )


def check_flow_shift(flow_shift: float) -> float:
    """A flow shift must be a finite number > 0; returns it as a float."""
    if isinstance(flow_shift, bool) or not isinstance(flow_shift, numbers.Real):
        raise ValueError(f"flow_shift must be a number, got {flow_shift!r}")
    if not math.isfinite(flow_shift) or flow_shift <= 0:
        raise ValueError(f"flow_shift must be a finite number > 0, got {flow_shift!r}")
    return float(flow_shift)


def _reject(d: Mapping[str, Any], class_name: str, flags: Mapping[str, str]) -> None:
    for key, what in flags.items():
        if d.get(key):
            raise ValueError(f"{class_name} with {key}={d[key]!r} is not supported ({what})")
