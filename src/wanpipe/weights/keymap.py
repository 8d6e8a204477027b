"""Key maps: checkpoint names <-> wanpipe module names, kept as data.

A rename table (:class:`KeyTable`) is written once, as ``(checkpoint, runtime)`` pairs of name
templates with named placeholders::

    ("blocks.{n}.attn1.to_{qkv}.{param}", "blocks.{n}.self_attn.{qkv}.{param}")

Each placeholder stands for a regular expression (:data:`FIELDS`, or the table's own ``fields``:
``qkv="q|k|v"``); the rest of a template is literal text. Both directions are derived from the one
table: :meth:`KeyTable.to_runtime` (reading a checkpoint) and :meth:`KeyTable.to_checkpoint` (writing
one), each a :data:`KeyMap`.

A key map is an ordered tuple of ``(pattern, replacement)`` rules. The first rule whose regular
expression matches the *whole* key rewrites it with :func:`re.sub` syntax (``\\g<name>`` or ``\\1``
for groups). A key no rule matches keeps its name. Missing and unexpected keys are found later by the
loader, which compares the renamed keys with the module's own state dict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

KeyRule = tuple[str, str]
KeyMap = tuple[KeyRule, ...]

T = TypeVar("T")

FIELDS: dict[str, str] = {
    "n": r"\d+",  # a block or layer index
    "param": r"\w+",  # the last part of a name: weight, bias, gamma...
    "wb": r"weight|bias",
    "rest": r".+",  # any (dotted) rest of a name
}
"""The placeholders every table may use; a table's ``fields`` add more or override these."""

_FIELD = re.compile(r"\{(\w+)\}")

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


# -- rename tables written once ----------------------------------------------------------------------


def _fields_of(template: str) -> list[str]:
    return _FIELD.findall(template)


def _pattern(template: str, fields: Mapping[str, str]) -> str:
    """``"blocks.{n}.norm3.{param}"`` -> ``r"blocks\\.(?P<n>\\d+)\\.norm3\\.(?P<param>\\w+)"``."""
    parts: list[str] = []
    end = 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[end : m.start()]))
        parts.append(f"(?P<{m.group(1)}>{fields[m.group(1)]})")
        end = m.end()
    parts.append(re.escape(template[end:]))
    return "".join(parts)


def _replacement(template: str) -> str:
    """``"blocks.{n}.norm2.{param}"`` -> ``r"blocks.\\g<n>.norm2.\\g<param>"``."""
    return _FIELD.sub(lambda m: rf"\g<{m.group(1)}>", template.replace("\\", "\\\\"))


@dataclass(frozen=True)
class KeyTable:
    """Ordered ``(checkpoint template, runtime template)`` rules, from which both key maps derive.

    Each rule uses the same placeholders on both sides, each once, so that it can be read both ways.
    The order is kept in both directions (the first rule that matches a whole key wins); that the two
    derived maps are exact inverses on real key sets is what the tests check.
    """

    rules: tuple[KeyRule, ...]
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {**FIELDS, **self.fields}
        for checkpoint, runtime in self.rules:
            names = _fields_of(checkpoint)
            if len(set(names)) != len(names) or sorted(names) != sorted(_fields_of(runtime)):
                raise ValueError(
                    f"key rule {checkpoint!r} <-> {runtime!r}: each placeholder must stand once on each side"
                )
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ValueError(f"key rule {checkpoint!r}: unknown placeholders {unknown}")

    def __add__(self, other: KeyTable) -> KeyTable:
        """The rules of ``self`` then those of ``other`` (placeholders of both)."""
        return KeyTable(self.rules + other.rules, {**self.fields, **other.fields})

    def _map(self, source: int) -> KeyMap:
        fields = {**FIELDS, **self.fields}
        return tuple((_pattern(rule[source], fields), _replacement(rule[1 - source])) for rule in self.rules)

    def to_runtime(self) -> KeyMap:
        """Checkpoint names -> runtime names (reading)."""
        return self._map(0)

    def to_checkpoint(self) -> KeyMap:
        """Runtime names -> checkpoint names (writing)."""
        return self._map(1)
