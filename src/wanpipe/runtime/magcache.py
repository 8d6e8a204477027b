"""MagCache: skip the DiT blocks while the accumulated change of the residual's magnitude, read from
calibrated per-step ratios, stays small (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware
Cache", 2025; https://github.com/Zehong-Ma/MagCache; diffusers' ``MagCacheConfig`` / ``apply_mag_cache``).

``mag_ratios[s]`` is the mean over tokens of ``|r_s| / |r_(s-1)|``, where ``r_s`` is what the blocks
added to the hidden state at step ``s`` (its norm over the channels). At each step past the retention
window, per stream::

    ratio *= mag_ratios[s];  skipped += 1;  error += |1 - ratio|
    skip (hidden = input + the last computed residual) while error <= threshold and skipped <= max_skip_steps
    else run the blocks and start over (ratio 1, error 0, skipped 0)

The decision reads nothing from the device. The ratios are model data: the MagCache authors publish
them for the Wan models (``magcache_ratios.json``, cited there), and calibration records them for any
other (``calibrate``: every step runs, and the ratios of each stream are written to a file that
``mag_ratios`` takes back). The ratios are indexed by the step of the schedule and resampled (nearest,
as the reference and diffusers do) when a run has another number of steps; ``retention_ratio`` keeps
the first fraction of each expert's steps (of all steps with one model) from skipping.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from wanpipe.runtime.step_cache import StepCache

if TYPE_CHECKING:
    from wanpipe.models.transformer_layers import TransformerConfig

PUBLISHED_FILE = Path(__file__).with_name("magcache_ratios.json")
CALIBRATION_FORMAT = "wanpipe-magcache-ratios-v1"

Ratios = dict[str, tuple[float, ...]]
"""Per-step magnitude ratios per stream: {"cond": (...), "uncond": (...)} ("uncond" optional)."""


# -- the published ratios ---------------------------------------------------------------------------


@functools.cache
def published_sets() -> dict[str, dict[str, Any]]:
    """The MagCache authors' Wan sets: name -> {"steps", "cond", "uncond", "from"}."""
    return json.loads(PUBLISHED_FILE.read_text())["sets"]


def magcache_variant(
    dit: TransformerConfig, *, two_experts: bool, per_token_timesteps: bool, image: bool = False
) -> str:
    """The published set that fits a DiT ("wan2.1-t2v-1.3B", "wan2.2-t2v-A14B", ...; Wan 2.1 I2V 14B
    as "wan2.1-i2v-14B", whose 480P or 720P set :func:`published_mag_ratios` picks by size). ValueError
    for a model with none (FLF2V, other widths such as tiny test models): give ``mag_ratios`` or calibrate."""
    i2v = dit.in_channels != dit.out_channels
    name = None
    if two_experts and dit.dim == 5120:
        name = "wan2.2-i2v-A14B" if i2v else "wan2.2-t2v-A14B"
    elif per_token_timesteps and dit.dim == 3072:
        name = "wan2.2-ti2v-5B-i2v" if image else "wan2.2-ti2v-5B-t2v"
    elif not two_experts and not per_token_timesteps and dit.pos_embed_seq_len is None:
        name = {1536: "wan2.1-t2v-1.3B", 5120: "wan2.1-i2v-14B" if i2v else "wan2.1-t2v-14B"}.get(dit.dim)
    if name is None:
        model = "FLF2V" if dit.pos_embed_seq_len is not None else f"a DiT of width {dit.dim}"
        raise ValueError(
            f"MagCache has no published mag_ratios for {model} (the MagCache authors publish Wan 2.1 T2V "
            "1.3B/14B, I2V 14B 480P/720P, Wan 2.2 T2V/I2V A14B and TI2V-5B): calibrate once with "
            "cache_options calibrate=true, calibration_file=ratios.json, then give mag_ratios=ratios.json"
        )
    return name


def published_mag_ratios(name: str, latent_size: tuple[int, int], patch: Sequence[int]) -> Ratios:
    """The ratios of a :func:`magcache_variant`; Wan 2.1 I2V 14B takes the 480P set up to 480x832
    pixels' worth of tokens and the 720P set above (as TeaCache's coefficients)."""
    if name == "wan2.1-i2v-14B":
        area = (latent_size[0] // patch[1]) * (latent_size[1] // patch[2])
        name += "-480P" if area <= 60 * 104 // 4 else "-720P"
    found = published_sets()[name]
    return {"cond": tuple(found["cond"]), "uncond": tuple(found["uncond"])}


# -- ratios as data ---------------------------------------------------------------------------------


def normalize_ratios(value: Any) -> Ratios:
    """A list of ratios (both streams), {"cond": [...], "uncond": [...]} ("uncond" optional), or a
    calibration file's content ({"mag_ratios": ...}) -> :data:`Ratios`. ValueError when malformed."""
    if isinstance(value, Mapping) and "mag_ratios" in value:
        value = value["mag_ratios"]
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"cond", "uncond"})
        if unknown or "cond" not in value:
            raise ValueError(
                f"mag_ratios as an object needs the key 'cond' (and 'uncond'), got {sorted(value)}"
            )
        return {stream: _ratio_list(ratios) for stream, ratios in value.items()}
    return {"cond": _ratio_list(value)}


def _ratio_list(value: Any) -> tuple[float, ...]:
    ok = isinstance(value, list | tuple) and len(value) > 0
    numbers = []
    for v in value if ok else ():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            ok = False
            break
        numbers.append(float(v))
    if not ok:
        raise ValueError(f"mag_ratios must be a non-empty list of positive numbers, got {_short(value)}")
    return tuple(numbers)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_mag_ratios(path: str | Path) -> Ratios:
    """A JSON file of ratios (what ``calibration_file`` writes, or a list, or {"cond", "uncond"})."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"mag_ratios: cannot read {str(path)!r} as a JSON file of ratios ({e})") from None
    return normalize_ratios(data)


def write_mag_ratios(path: str | Path, ratios: Ratios, **about: Any) -> Path:
    """Write calibrated ratios as JSON (with ``about``: steps, model ...); -> the path written."""
    path = Path(path).expanduser()
    record = {"format": CALIBRATION_FORMAT, **about, "mag_ratios": {k: list(v) for k, v in ratios.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def nearest_resample(ratios: Sequence[float], length: int) -> tuple[float, ...]:
    """``ratios`` resampled to ``length`` steps by the nearest index (diffusers' ``nearest_interp``:
    index round(i * (n - 1) / (length - 1)) in float32, ties to even; the last one when length is 1)."""
    if len(ratios) == length:
        return tuple(ratios)
    if length == 1:
        return (ratios[-1],)
    scale = np.float32((len(ratios) - 1) / (length - 1))
    index = np.round(np.arange(length, dtype=np.float32) * scale).astype(np.int64)
    return tuple(ratios[int(i)] for i in index)


# -- the cache ----------------------------------------------------------------------------------------


class MagCache(StepCache):
    """Per stream: the last computed residual (base ``residuals``) and the accumulated ratio, error
    and skipped steps since it; in calibration mode the ratio of each step to the one before."""

    kind = "magcache"

    def __init__(
        self,
        threshold: float = 0.06,
        max_skip_steps: int = 3,
        retention_ratio: float = 0.2,
        mag_ratios: Mapping[str, Sequence[float]] | None = None,
        calibrate: bool = False,
        calibration_file: str | None = None,
    ) -> None:
        super().__init__(threshold)
        if max_skip_steps < 0 or not 0.0 <= retention_ratio <= 1.0:
            raise ValueError(
                f"MagCache needs max_skip_steps >= 0 and retention_ratio in [0, 1], got {max_skip_steps}, "
                f"{retention_ratio}"
            )
        if mag_ratios is None and not calibrate:
            raise ValueError("MagCache needs mag_ratios, or calibrate=True to record them")
        self.max_skip_steps = max_skip_steps
        self.retention_ratio = retention_ratio
        self.given = None if mag_ratios is None else {k: tuple(v) for k, v in mag_ratios.items()}
        self.ratios: Ratios = dict(self.given or {})
        self.calibrate = calibrate
        self.calibration_file = calibration_file
        self.segments: list[tuple[int, int]] = []
        self.accumulated: dict[str, list[float]] = {}
        self.recorded: dict[str, dict[int, float]] = {}
        self.calibration: Ratios | None = None

    def start(self, experts: list[str]) -> None:
        """Each step's expert segment (its first step, its length); the ratios resampled to the steps."""
        n, first, starts = len(experts), 0, []
        for i in range(n):
            if i > 0 and experts[i] != experts[i - 1]:
                first = i
            starts.append(first)
        self.segments = [(s, starts.count(s)) for s in starts]
        if self.given is not None:
            self.ratios = {k: nearest_resample(v, n) for k, v in self.given.items()}
        self.recorded = {}
        self.calibration = None

    def _reset_indicator(self) -> None:
        self.accumulated.clear()

    def should_compute(self, stream: str, step: int) -> bool:
        """Whether ``stream`` runs its blocks at ``step`` (of the schedule), else reuses its residual."""
        if self.calibrate:
            return True
        first, length = self.segments[step] if step < len(self.segments) else (0, step + 1)
        if step - first < int(self.retention_ratio * length + 0.5):
            return True
        ratios = self.ratios.get(stream, self.ratios["cond"])
        acc = self.accumulated.setdefault(stream, [1.0, 0.0, 0])
        acc[0] *= ratios[step] if step < len(ratios) else 1.0
        acc[2] += 1
        acc[1] += abs(1.0 - acc[0])
        if stream in self.residuals and acc[1] <= self.threshold and acc[2] <= self.max_skip_steps:
            self._count(stream)
            return False
        self.accumulated[stream] = [1.0, 0.0, 0]
        return True

    def store(self, stream: str, step: int, residual: Tensor) -> None:
        """A computed step's residual (blocks' output - input, the stream's rows (b, L, dim))."""
        if self.calibrate:
            previous = self.residuals.get(stream)
            ratio = 1.0
            if previous is not None:
                now = torch.linalg.norm(residual.float(), dim=-1)
                before = torch.linalg.norm(previous.float(), dim=-1)
                ratio = float((now / (before + 1e-8)).mean())
            self.recorded.setdefault(stream, {})[step] = ratio
        self.residuals[stream] = residual

    def finish(self) -> None:
        """Calibration: the ratios of each stream over the schedule (1.0 where a stream did not run or
        an expert started), written to ``calibration_file`` when one is given."""
        if not self.calibrate:
            return
        n = len(self.segments) or 1 + max((max(r) for r in self.recorded.values() if r), default=-1)
        self.calibration = {
            stream: tuple(recorded.get(i, 1.0) for i in range(n))
            for stream, recorded in self.recorded.items()
        }
        if self.calibration_file is not None and self.calibration:
            write_mag_ratios(self.calibration_file, self.calibration, num_inference_steps=n)
