"""Host memory on the CPU: glibc's allocator settings and returning freed memory to the system.

glibc serves an allocation above its mmap threshold from a private mapping that goes back to the
system at ``free``, and shrinks its heap whenever more than the trim threshold is free at the top. Both
give memory back, and both make the next allocation fault its pages in again (zeroed by the kernel):
on the benchmark machine a warm CPU generation faulted ~65,000 pages (~250 MB) per run, 10-15% of its
time. :func:`configure_host_memory` picks one of three behaviours (``RuntimeOptions.host_memory``):

- ``"cache"`` (default): allocations up to 32 MiB come from the heap and the heap is never shrunk
  automatically, so freed memory is reused with no page faults; peak RSS stays about the same (the
  peak is one stage's working set either way), but the process keeps it between requests.
- ``"lean"``: every allocation above 128 KiB gets its own mapping, returned at free, and the heap is
  trimmed at 128 KiB: the lowest RSS between and within stages, about 2x slower here.
- ``"system"``: glibc's own (dynamic) thresholds, untouched.

None of this changes a computed value. Everything is a no-op where glibc is not the allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 * 1024

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt, lib.malloc_trim  # noqa: B018 - glibc only
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


HOST_MEMORY_MODES = ("cache", "lean", "system")
CACHE_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed on 64-bit systems
CACHE_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB free at the top before glibc shrinks it


def tune_host_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int | None = None
) -> bool:
    """Serve allocations above ``mmap_threshold`` bytes from their own mappings (returned at free) and
    shrink the heap when more than ``trim_threshold`` (default: the same) is free at its top.
    Process-wide (and it ends glibc's dynamic threshold); returns whether it was applied."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    trim = mmap_threshold if trim_threshold is None else trim_threshold
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim))) and ok
    return ok


_mode: str | None = None


def configure_host_memory(mode: str) -> bool:
    """Apply a ``host_memory`` mode (see the module docstring) to this process; returns whether glibc
    was retuned. Idempotent per mode. "system" after another mode leaves the last settings (glibc has
    no way back to its dynamic thresholds)."""
    global _mode
    if mode not in HOST_MEMORY_MODES:
        raise ValueError(f"host_memory must be one of {HOST_MEMORY_MODES}, got {mode!r}")
    if mode == _mode or mode == "system":
        return False
    if mode == "cache":
        ok = tune_host_allocator(CACHE_MMAP_THRESHOLD, CACHE_TRIM_THRESHOLD)
    else:
        ok = tune_host_allocator(DEFAULT_MMAP_THRESHOLD)
    if ok:
        _mode = mode
    return ok


@contextlib.contextmanager
def lean_while(active: bool = True) -> Iterator[None]:
    """Inside the block, glibc as in ``"lean"`` (large blocks mapped and returned at free, the heap
    trimmed), with the heap trimmed on entry and on exit; after it, the mode applied before (``"cache"``'s
    thresholds again). For one stage whose working set changes shape from layer to layer (the CPU VAE
    decode: in ``"cache"`` mode the heap keeps ~250 MB of freed blocks of the wrong sizes at 256 x 256),
    without paying ``"lean"``'s page faults in the other stages. A no-op unless ``active`` and the
    process is in ``"cache"`` mode on glibc."""
    if not active or _mode != "cache" or _glibc() is None:
        yield
        return
    trim_host_memory()
    tune_host_allocator(DEFAULT_MMAP_THRESHOLD)
    try:
        yield
    finally:
        trim_host_memory()
        tune_host_allocator(CACHE_MMAP_THRESHOLD, CACHE_TRIM_THRESHOLD)


def host_memory_mode() -> str | None:
    """The mode :func:`configure_host_memory` last applied in this process (None: glibc's own)."""
    return _mode


def trim_host_memory() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``); whether any were released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status in MB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (0 where /proc is missing)."""
    return _proc_status_mb("VmRSS") or 0.0


MEMORY_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_memory(text: str | int) -> int:
    """A memory size: bytes as an int, or text such as ``"2GB"``, ``"512MB"``, ``"1.5G"``, ``"2GiB"``
    (decimal K/M/G/T, binary with ``i``) -> bytes (> 0). ValueError says what is allowed."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a memory size must be positive, got {text}")
        return text
    s = str(text).strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    binary = unit.endswith("IB") or (unit.endswith("I"))
    letter = unit[:1] if unit not in ("", "B") else ""
    allowed = unit in ("", "B") or (letter in "KMGT" and unit[1:] in ("", "B", "I", "IB"))
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not allowed or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a memory size such as 2GB, 512MB or 1.5GiB, got {text!r}")
    scale = 1024 ** "KMGT".index(letter) * 1024 if binary and letter else MEMORY_UNITS[letter]
    return int(value * scale)


def available_memory() -> int | None:
    """Bytes the system can give this process now without swapping (``MemAvailable`` of
    /proc/meminfo), or None where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
