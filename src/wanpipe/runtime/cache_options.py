"""One interface to the step caches: a name and its options, the same from Python
(``WanRequest(cache=..., cache_options={...})``, ``RuntimeOptions(cache=..., cache_options=...)``), the
CLI (``--cache NAME --cache-option KEY=VALUE``) and the server (``cache``, ``cache_options``).

:data:`CACHE_OPTIONS` is the table of every cache's options (names, kinds, defaults, ranges), as data;
:func:`resolve_cache_options` checks a given set against it and fills in the defaults, converting the
text forms the CLI and form bodies send ("5", "0.1", "true", "1.0,0.98,...") and reading a
``mag_ratios`` file; :func:`complete_cache_options` adds what depends on the model (MagCache's
published ratios); :func:`build_step_cache` makes the cache object for one batch. A bad name or value
is an :class:`~wanpipe.context.InvalidRequestError` naming ``cache`` or ``cache_options`` that says
what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanpipe.context import InvalidRequestError
from wanpipe.runtime.magcache import (
    MagCache,
    magcache_variant,
    normalize_ratios,
    published_mag_ratios,
    read_mag_ratios,
)
from wanpipe.runtime.step_cache import FirstBlockCache, StepCache, TeaCache
from wanpipe.runtime.taylorseer import TaylorSeerCache

if TYPE_CHECKING:
    from wanpipe.models.transformer_layers import TransformerConfig

CACHE_NAMES = ("first-block", "teacache", "taylorseer", "magcache")
"""The step caches; "none" turns a runtime default off for one request."""


@dataclass(frozen=True)
class CacheOption:
    """One option of a cache: ``kind`` is "int", "optional int" (None allowed), "float", "bool",
    "numbers" (a list), "ratios" (MagCache's per-step ratios) or "file" (a path to write)."""

    name: str
    kind: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""


CACHE_OPTIONS: dict[str, tuple[CacheOption, ...]] = {
    "first-block": (
        CacheOption(
            "threshold",
            "float",
            0.05,
            0.0,
            help="skip the blocks after the first while the first block's residual changes less than this "
            "(relative mean absolute change); 0 never skips",
        ),
    ),
    "teacache": (
        CacheOption(
            "threshold",
            "float",
            0.08,
            0.0,
            help="skip while the accumulated rescaled change of the timestep embedding stays under this",
        ),
        CacheOption(
            "coefficients",
            "numbers",
            None,
            help="the rescaling polynomial, highest degree first (default: the published TeaCache4Wan2.1 "
            "set of the model)",
        ),
    ),
    "taylorseer": (
        CacheOption("cache_interval", "int", 5, 1, help="after the warm-up, one full step every this many"),
        CacheOption(
            "disable_cache_before_step", "int", 3, 1, help="the first steps all run (they fit the series)"
        ),
        CacheOption(
            "disable_cache_after_step", "optional int", None, 0, help="every step from this one on runs"
        ),
        CacheOption("max_order", "int", 1, 0, help="the Taylor series' order (0: repeat the last output)"),
        CacheOption(
            "use_lite_mode",
            "bool",
            True,
            help="predict the whole transformer output (MAX's form, diffusers' lite mode; the only form here)",
        ),
    ),
    "magcache": (
        CacheOption(
            "threshold",
            "float",
            0.06,
            0.0,
            help="skip while the accumulated magnitude error stays under this",
        ),
        CacheOption("max_skip_steps", "int", 3, 0, help="at most this many skipped steps in a row"),
        CacheOption(
            "retention_ratio",
            "float",
            0.2,
            0.0,
            1.0,
            help="the first fraction of each expert's steps never skips",
        ),
        CacheOption(
            "mag_ratios",
            "ratios",
            None,
            help="per-step ratios: a list, {cond: [...], uncond: [...]}, or a file from calibrate "
            "(default: the published set of the model)",
        ),
        CacheOption(
            "calibrate", "bool", False, help="run every step and record the ratios instead of skipping"
        ),
        CacheOption("calibration_file", "file", None, help="where calibrate writes the ratios (JSON)"),
    ),
}
"""Every cache's options, in diffusers' names (``TaylorSeerCacheConfig``, ``MagCacheConfig``)."""


def allowed_options(name: str) -> str:
    """``"taylorseer options: cache_interval (default 5), ..."`` for error messages."""
    return f"{name} options: " + ", ".join(
        f"{o.name} (default {_text(o.default)})" for o in CACHE_OPTIONS[name]
    )


def _text(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def cache_name(value: Any, param: str = "cache") -> str | None:
    """None (the runtime's cache), "none" (off) or one of :data:`CACHE_NAMES`; else InvalidRequestError."""
    if value is None:
        return None
    if isinstance(value, str) and value in (*CACHE_NAMES, "none"):
        return value
    raise InvalidRequestError(
        f"{param} must be one of {', '.join(CACHE_NAMES)} or none, got {value!r}", param
    )


def resolve_cache_options(
    name: str, given: Mapping[str, Any] | None, *, param: str = "cache_options"
) -> dict[str, Any]:
    """Check ``given`` against ``name``'s options and fill in the defaults: -> every option's value
    (ratios as {"cond": (...), "uncond": (...)}, lists as tuples). Values may be text, as the CLI and
    form bodies send them. Resolving a resolved set gives it back."""
    if given is not None and not isinstance(given, Mapping):
        raise InvalidRequestError(
            f"{param} must be an object of option names and values, got {given!r}", param
        )
    given = dict(given or {})
    specs = {o.name: o for o in CACHE_OPTIONS[name]}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise InvalidRequestError(
            f"{param}: {name} has no option {unknown[0]!r}; {allowed_options(name)}", param
        )
    out = {}
    for option in CACHE_OPTIONS[name]:
        value = given.get(option.name, option.default)
        out[option.name] = None if value is None else _value(name, option, value, param)
    if name == "taylorseer" and not out["use_lite_mode"]:
        raise InvalidRequestError(
            f"{param}: use_lite_mode=false (diffusers' per-module TaylorSeer) is not available: its default "
            "module patterns match no module of a Wan transformer, so it would cache nothing; wanpipe "
            "predicts the whole transformer output (use_lite_mode=true, Modular MAX's form)",
            param,
        )
    return out


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _value(cache: str, option: CacheOption, value: Any, param: str) -> Any:
    """One option's value, checked and converted (text accepted)."""
    kind, where = option.kind, f"{param}: {cache} {option.name}"
    text = value.strip() if isinstance(value, str) else None
    if kind in ("int", "optional int"):
        if kind == "optional int" and text is not None and text.lower() in ("none", "null", ""):
            return None
        number = _number(value, integral=True)
        if number is None:
            raise InvalidRequestError(f"{where} must be a whole number, got {value!r}", param)
        return _in_range(int(number), option, where, param)
    if kind == "float":
        number = _number(value, integral=False)
        if number is None:
            raise InvalidRequestError(f"{where} must be a finite number, got {value!r}", param)
        return _in_range(number, option, where, param)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in (*_TRUE, *_FALSE):
            return text.lower() in _TRUE
        raise InvalidRequestError(f"{where} must be true or false, got {value!r}", param)
    if kind == "numbers":
        numbers = _numbers(value)
        if numbers is None:
            raise InvalidRequestError(
                f"{where} must be a list of finite numbers (text: comma-separated), got {value!r}", param
            )
        return numbers
    if kind == "ratios":
        try:
            if text is not None:
                numbers = _numbers(text)
                return normalize_ratios(numbers) if numbers is not None else read_mag_ratios(text)
            return normalize_ratios(value)
        except ValueError as e:
            raise InvalidRequestError(f"{param}: {cache} {e}", param) from None
    if kind == "file":
        if text is None or not text:
            raise InvalidRequestError(f"{where} must be a file path, got {value!r}", param)
        path = Path(text).expanduser()
        if path.is_dir() or not path.parent.is_dir():
            raise InvalidRequestError(f"{where} must be a file in an existing folder, got {text!r}", param)
        return text
    raise AssertionError(kind)


def _number(value: Any, *, integral: bool) -> float | None:
    """A finite number from a number or its text; None if it is neither (or not whole when ``integral``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        pattern = r"[+-]?[0-9]+" if integral else r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
        if re.fullmatch(pattern, value.strip()) is None:
            return None
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if integral and not float(value).is_integer():
        return None
    return value


def _numbers(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not value:
        return None
    numbers = [_number(v, integral=False) for v in value]
    return None if any(n is None for n in numbers) else tuple(float(n) for n in numbers)  # type: ignore[arg-type]


def _in_range(number: float, option: CacheOption, where: str, param: str) -> Any:
    low, high = option.minimum, option.maximum
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = " and ".join(
            part
            for part in (
                None if low is None else f"at least {low:g}",
                None if high is None else f"at most {high:g}",
            )
            if part
        )
        raise InvalidRequestError(f"{where} must be {bounds}, got {number:g}", param)
    return number


def complete_cache_options(
    name: str,
    options: Mapping[str, Any],
    *,
    dit: TransformerConfig,
    two_experts: bool,
    per_token_timesteps: bool,
    image: bool,
    latent_size: tuple[int, int],
    param: str = "cache_options",
) -> dict[str, Any]:
    """Resolved options plus what depends on the model: MagCache's published ratios when none are
    given (InvalidRequestError for a model without them)."""
    out = dict(options)
    if name == "magcache" and out.get("mag_ratios") is None and not out.get("calibrate"):
        try:
            variant = magcache_variant(
                dit, two_experts=two_experts, per_token_timesteps=per_token_timesteps, image=image
            )
        except ValueError as e:
            raise InvalidRequestError(f"{param}: {e}", param) from None
        out["mag_ratios"] = published_mag_ratios(variant, latent_size, dit.patch_size)
    return out


def build_step_cache(name: str, options: Mapping[str, Any]) -> StepCache:
    """The cache object for one batch from complete options (TeaCache: with its coefficients)."""
    o = options
    if name == "first-block":
        return FirstBlockCache(o["threshold"])
    if name == "teacache":
        return TeaCache(o["threshold"], o["coefficients"])
    if name == "taylorseer":
        return TaylorSeerCache(
            o["cache_interval"], o["disable_cache_before_step"], o["disable_cache_after_step"], o["max_order"]
        )
    if name == "magcache":
        return MagCache(
            o["threshold"],
            o["max_skip_steps"],
            o["retention_ratio"],
            o["mag_ratios"],
            o["calibrate"],
            o["calibration_file"],
        )
    raise ValueError(f"cache must be one of {', '.join(CACHE_NAMES)}, got {name!r}")


def option_pairs(
    items: Sequence[str] | Mapping[str, Any] | None, param: str = "cache_options"
) -> dict[str, Any]:
    """``["max_order=2", "cache_interval=4"]`` (the CLI's repeated ``--cache-option``) -> a dict of texts."""
    if items is None or isinstance(items, Mapping):
        return dict(items or {})
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequestError(f"{param}: expected KEY=VALUE, got {item!r}", param)
        if key.strip() in out:
            raise InvalidRequestError(f"{param}: {key.strip()} is given more than once", param)
        out[key.strip()] = value.strip()
    return out
