"""The server's scalar fields: numbers as JSON values or as text (form fields), sizes, the schedule's
lists, samplers, presets, step-cache options, seconds <-> frames. Each ``parse_*`` checks one value and
raises :class:`~wanpipe.serving.errors.APIError` (400, ``param`` = the field) saying what is allowed.
The OpenAPI document (:mod:`wanpipe.serving.openapi`) states the same text patterns."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from wanpipe.presets import PRESETS
from wanpipe.serving.errors import invalid, shown

# The text forms of numbers (form fields, and JSON strings where a number is expected), ASCII only. The
# OpenAPI document states the same patterns (wanpipe.serving.openapi), so what it calls valid is what
# the parser accepts. At most MAX_NUMBER_TEXT characters; an exponent has at most two digits (every
# such float is finite).
MAX_NUMBER_TEXT = 64
SPACE = r"[ \t\n\r\f\v]*"
INT_TEXT = rf"{SPACE}[+-]?[0-9]+{SPACE}"
MANTISSA = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
EXPONENT = r"(?:[eE][+-]?[0-9]{1,2})?"
FLOAT_TEXT = rf"{SPACE}[+-]?{MANTISSA}{EXPONENT}{SPACE}"
SIZE_TEXT = rf"{SPACE}([0-9]{{1,6}}){SPACE}[xX]{SPACE}([0-9]{{1,6}}){SPACE}"


def _number_text(value: Any, pattern: str) -> bool:
    return (
        isinstance(value, str) and len(value) <= MAX_NUMBER_TEXT and re.fullmatch(pattern, value) is not None
    )


def parse_int(value: Any, name: str, minimum: int | None = None) -> int:
    """An integer from JSON (int, integral float) or a form field (decimal string, :data:`INT_TEXT`)."""
    integral = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    number = int(value) if integral or _number_text(value, INT_TEXT) else None
    if number is None:
        raise invalid(f"{name} must be an integer, got {shown(value)}", name)
    if minimum is not None and number < minimum:
        raise invalid(f"{name} must be at least {minimum}, got {number}", name)
    return number


BOOL_TEXTS = {"true": True, "false": False}
"""A boolean as text (form fields; JSON may send these too): exactly these words."""


def parse_bool(value: Any, name: str) -> bool:
    """A boolean from JSON (true / false) or a form field (``true`` / ``false``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in BOOL_TEXTS:
        return BOOL_TEXTS[value]
    raise invalid(f"{name} must be true or false, got {shown(value)}", name)


def parse_float(value: Any, name: str) -> float:
    """A finite number from JSON or a form field (:data:`FLOAT_TEXT`)."""
    number: float | None = None
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric or _number_text(value, FLOAT_TEXT):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = None
    if number is None or not math.isfinite(number):
        raise invalid(f"{name} must be a finite number, got {shown(value)}", name)
    return number


def parse_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string, got {shown(value)}", name)
    return value


# Guidance scales and the schedule shift the server takes: the engine takes any guidance >= 0 and any
# shift > 0, but far outside these ranges its frames come out NaN (guidance 1e30, shift 1e-30 or 1e30)
# and the job would fail after running. No checkpoint is used outside them.
GUIDANCE_RANGE = (0.0, 100.0)
FLOW_SHIFT_RANGE = (0.01, 100.0)


def parse_in_range(value: Any, name: str, bounds: tuple[float, float]) -> float:
    """A finite number in ``[low, high]``."""
    number, (low, high) = parse_float(value, name), bounds
    if not low <= number <= high:
        raise invalid(f"{name} must be in [{low:g}, {high:g}], got {number:g}", name)
    return number


def parse_guidance(value: Any, name: str) -> float:
    return parse_in_range(value, name, GUIDANCE_RANGE)


def parse_flow_shift(value: Any, name: str) -> float:
    return parse_in_range(value, name, FLOW_SHIFT_RANGE)


def parse_fps(value: Any, name: str) -> float:
    """A playback rate in (0, 240] frames per second."""
    fps = parse_float(value, name)
    if not 0 < fps <= 240:
        raise invalid(f"{name} must be in (0, 240], got {fps:g}", name)
    return fps


SAMPLERS = ("unipc", "euler", "lcm", "dmd")  # wanpipe.schedulers.SAMPLERS (tests/test_samplers.py)


def parse_sampler(value: Any, name: str) -> str:
    if value not in SAMPLERS:
        raise invalid(f"{name} must be one of {', '.join(SAMPLERS)}, got {shown(value)}", name)
    return value


def parse_number_list(value: Any, name: str) -> tuple[float, ...]:
    """A schedule's list: a JSON array of numbers, or text of numbers separated by commas
    (:data:`FLOAT_TEXT` each, e.g. ``"0.9,0.6,0.3"``: a form field). Range and order are the engine's."""
    if isinstance(value, str):
        parts: list[Any] = value.split(",")
    elif isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        parts = value
    else:
        raise invalid(
            f"{name} must be a list of numbers, or numbers separated by commas, got {shown(value)}", name
        )
    if not parts:
        raise invalid(f"{name} must hold at least one number (one per step)", name)
    return tuple(parse_float(part, name) for part in parts)


def parse_preset(value: Any, name: str = "preset") -> str:
    """A known preset's name (``wanpipe.presets.PRESETS``); whether it fits the model, the engine checks."""
    if not isinstance(value, str) or value not in PRESETS:
        raise invalid(f"{name} must be one of {', '.join(PRESETS)}, got {shown(value)}", name)
    return value


def parse_size(value: Any, name: str = "size") -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> (width, height)."""
    match = re.fullmatch(SIZE_TEXT, value) if isinstance(value, str) else None
    if match is None:
        raise invalid(f"{name} must be WIDTHxHEIGHT in pixels, e.g. 832x480, got {shown(value)}", name)
    return int(match.group(1)), int(match.group(2))


_OFF = ("false", "0", "no", "off")


def parse_cache_options(value: Any, name: str) -> dict[str, Any]:
    """``cache_options``: an object (JSON, or ``cache_options[KEY]`` form fields) or its JSON text; no
    file paths (``mag_ratios`` as numbers, no ``calibrate`` / ``calibration_file``). The values are
    checked against the cache by the engine."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise invalid(f"{name} must be an object (or its JSON text), got {shown(value)}", name) from None
    if not isinstance(value, Mapping):
        raise invalid(f"{name} must be an object of option names and values, got {shown(value)}", name)
    for key in ("calibrate", "calibration_file"):
        given = value.get(key)
        off = given is None or given is False or (key == "calibrate" and str(given).strip().lower() in _OFF)
        if not off:
            raise invalid(
                f"{name}: {key} writes a file on the server; calibrate MagCache from Python or the command "
                "line (wanpipe generate --cache magcache --cache-option calibrate=true ...)",
                name,
            )
    ratios = value.get("mag_ratios")
    if isinstance(ratios, str) and not re.fullmatch(rf"{FLOAT_TEXT}(?:,{FLOAT_TEXT})*", ratios):
        raise invalid(
            f"{name}: mag_ratios must be numbers (a list, or {{cond: [...], uncond: [...]}}); the server "
            "reads no file",
            name,
        )
    return dict(value)


def optional_reader(values: Mapping[str, Any], prefix: str = "") -> Callable[..., Any]:
    """``opt(name, parse, *args)``: ``values[name]`` parsed as ``prefix + name``, or None if absent or null."""

    def opt(name: str, parse: Callable[..., Any], *args: Any) -> Any:
        value = values.get(name)
        return None if value is None else parse(value, prefix + name, *args)

    return opt


def frames_for_seconds(seconds: float, fps: float, stride: int = 4) -> int:
    """``stride*round(seconds*fps/stride)+1`` frames: the first and last frame ``seconds`` apart."""
    return stride * round(seconds * fps / stride) + 1


def format_seconds(num_frames: int, fps: float) -> str:
    return f"{(num_frames - 1) / fps:g}"


MAX_LORAS = 8
"""The most LoRA adapters one request may name."""
MAX_LORA_SCALE = 10.0
"""A request's LoRA scale is a finite number in [-MAX_LORA_SCALE, MAX_LORA_SCALE]."""


def parse_loras(value: Any, param: str = "loras") -> tuple[tuple[str, float], ...]:
    """``loras`` as a client sends it -> (name, scale) pairs sorted by name: a list of ``{"name": str, "scale":
    number}`` (scale 1 when left out); in a form, the same list as JSON text. Names are checked against
    the server's folder later (``LoraLibrary.check``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise invalid(
                f'{param} must be a JSON list of {{"name": ..., "scale": ...}} objects', param
            ) from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise invalid(f'{param} must be a list of {{"name": ..., "scale": ...}} objects', param)
    if len(value) > MAX_LORAS:
        raise invalid(f"{param}: {len(value)} adapters; at most {MAX_LORAS} per request", param)
    out: dict[str, float] = {}
    for item in value:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            raise invalid(
                f'{param}: each item must be an object {{"name": str, "scale": number}}, got {shown(item)}',
                param,
            )
        extra = sorted(set(item) - {"name", "scale"})
        if extra:
            raise invalid(f"{param}: unknown key {extra[0]!r} (accepted: name, scale)", param)
        name = item["name"]
        scale = item.get("scale", 1.0)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or abs(scale) > MAX_LORA_SCALE
        ):
            raise invalid(
                f"{param}: the scale of {name!r} must be a number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got "
                f"{shown(item.get('scale'))}",
                param,
            )
        if name in out:
            raise invalid(f"{param}: {name!r} is given twice", param)
        out[name] = float(scale)
    return tuple(sorted(out.items()))


def parse_prompts(value: Any, name: str = "prompts") -> tuple[tuple[int, int, str], ...]:
    """``prompts`` (prompt travel, docs/long-video.md): a list of ``{"start": int, "end": int, "prompt":
    str}`` (inclusive video frames), or in a form its JSON text -> (start, end, prompt) tuples. The
    engine checks that they cover the video (``wanpipe.prompt_travel.resolve_prompts``)."""
    shape = '{"start": int, "end": int, "prompt": str}'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise invalid(f"{name} must be a JSON list of {shape} objects", name) from None
    if not isinstance(value, list) or not value:
        raise invalid(f"{name} must be a non-empty list of {shape} objects, got {shown(value)}", name)
    out = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) != {"start", "end", "prompt"}:
            raise invalid(f"{name}: each item must be an object {shape}, got {shown(item)}", name)
        start, end = (parse_int(item[key], name, 0) for key in ("start", "end"))
        out.append((start, end, parse_str(item["prompt"], name)))
    return tuple(out)
