"""``wanpipe bench`` end to end at a tiny request: both engines run, in turns, and the record adds up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_cpu_bench_runs_both_engines_in_turns(tmp_path: Path) -> None:
    from wanpipe.bench import run_cpu_bench

    record = run_cpu_bench(steps=1, frames=1, size=32, repeats=2, threads=1, out_dir=tmp_path)
    results = record["results"]
    for engine in ("diffusers", "wanpipe"):
        assert len(results[engine]["seconds"]) == 2
        assert results[engine]["seconds_min"] <= results[engine]["seconds_median"]
        assert results[engine]["peak_rss_mb"] > 100
    assert len(results["time_ratio_rounds"]) == 2
    assert results["time_ratio"] == pytest.approx(
        results["wanpipe"]["seconds_median"] / results["diffusers"]["seconds_median"], rel=0.01
    )
    assert results["max_abs_diff"] < 1e-3  # the same frames
    assert set(results["wanpipe"]["stages"]) >= {"text_encode_s", "step_s", "decode_s"}
    written = json.loads(Path(record["path"]).read_text())
    assert written["results"] == results and "alternating" in written["method"]
    assert written["commit"] and written["versions"]["torch"]  # what was timed: this tree, these kernels
