"""Key maps: checkpoint names -> wanpipe module names, kept as data.

A key map is an ordered tuple of ``(pattern, replacement)`` rules. The first rule whose regular
expression matches the *whole* key rewrites it with :func:`re.sub` syntax (``\\1`` for groups).
A key no rule matches keeps its name. Missing and unexpected keys are found later by the loader,
which compares the renamed keys with the module's own state dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

KeyRule = tuple[str, str]
KeyMap = tuple[KeyRule, ...]

T = TypeVar("T")

_COMPILED: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _COMPILED.get(pattern)
    if compiled is None:
        compiled = _COMPILED[pattern] = re.compile(pattern)
    return compiled


def remap_key(key: str, rules: Iterable[KeyRule]) -> str:
    """Rename one checkpoint key with the first rule that matches it whole."""
    for pattern, replacement in rules:
        compiled = _compile(pattern)
        if compiled.fullmatch(key):
            return compiled.sub(replacement, key)
    return key


def remap_state_dict(state_dict: Mapping[str, T], rules: Iterable[KeyRule]) -> dict[str, T]:
    """Rename every key of ``state_dict``; two keys mapping to one name is an error."""
    rules = tuple(rules)
    out: dict[str, T] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = remap_key(key, rules)
        if new_key in out:
            raise ValueError(f"checkpoint keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
        out[new_key] = value
        origin[new_key] = key
    return out
