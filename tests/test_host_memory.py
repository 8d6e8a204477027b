"""``RuntimeOptions.host_memory``: glibc's allocator set up to keep freed host memory ("cache"), to give
it back at once ("lean"), or left alone ("system"); measured by the page faults of a reallocation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from wanpipe.runtime import RuntimeOptions
from wanpipe.runtime.memory import configure_host_memory

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from wanpipe.runtime.memory import configure_host_memory, host_memory_mode

    applied = configure_host_memory(sys.argv[1])
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):  # 16 MiB, written (faulted in): glibc settles where it puts the block
        x = torch.ones(4 << 20)
        del x
    before = faults()
    for _ in range(5):  # the same size again: from the kept heap, or freshly mapped pages
        x = torch.ones(4 << 20)
        del x
    print(json.dumps({"applied": applied, "mode": host_memory_mode(), "faults": faults() - before}))
    """
)


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_cache_mode_reuses_freed_memory_without_page_faults() -> None:
    cache, lean = _probe("cache"), _probe("lean")
    assert cache["applied"] and cache["mode"] == "cache"
    assert lean["applied"] and lean["mode"] == "lean"
    pages = 5 * (16 << 20) // 4096  # what five fresh 16 MiB mappings fault in
    assert lean["faults"] > 0.9 * pages, lean  # each reallocation is a new mapping
    # The freed block is reused: no more than one of the five reallocations lands on new pages.
    assert cache["faults"] <= pages // 5 + 64, cache


def test_bad_host_memory_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="host_memory must be one of"):
        RuntimeOptions(host_memory="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host_memory must be one of"):
        configure_host_memory("fast")


def test_host_memory_flag() -> None:
    import argparse

    from wanpipe.runtime import add_runtime_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    assert options_from_args(parser.parse_args([])).host_memory == "cache"
    assert options_from_args(parser.parse_args(["--host-memory", "lean"])).host_memory == "lean"
    with pytest.raises(SystemExit):
        parser.parse_args(["--host-memory", "fast"])
