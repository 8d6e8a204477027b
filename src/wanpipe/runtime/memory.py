"""Host memory on the CPU: glibc's allocator settings and returning freed memory to the system.

Peak RSS on the CPU is mostly freed-but-kept heap: glibc serves large tensors (a VAE activation, a
DiT hidden state) from its heap once its dynamic mmap threshold has grown, and keeps the pages after
they are freed. A fixed mmap threshold makes every allocation above it a private mapping that goes back
to the system at ``free``; ``malloc_trim`` returns what the heap still holds between stages. Neither
changes any computed value. Both are no-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 128 * 1024

_libc: ctypes.CDLL | None = None
_tuned = False


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


def tune_host_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve allocations above ``mmap_threshold`` bytes from their own mappings (returned at free) and
    trim the heap above the same size. Process-wide; returns whether it was applied."""
    global _tuned
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold))) and ok
    _tuned = _tuned or ok
    return ok


def trim_host_memory() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``); whether any were released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
