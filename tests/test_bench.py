"""``wanpipe bench`` end to end at a tiny request: both engines run, in turns, and the record adds up."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_cpu_bench_runs_both_engines_in_turns(tmp_path: Path) -> None:
    from wanpipe.bench import run_cpu_bench

    steps = 2
    record = run_cpu_bench(steps=steps, frames=1, size=32, repeats=2, threads=1, out_dir=tmp_path)
    results = record["results"]
    for engine in ("diffusers", "wanpipe"):
        r = results[engine]
        seconds = r["seconds"]
        assert len(seconds) == 2 and all(s > 0 for s in seconds)
        # the summary figures are those of the timed runs (each rounded to 1 ms)
        assert r["seconds_median"] == pytest.approx(statistics.median(seconds), abs=1.5e-3)
        assert r["seconds_min"] == pytest.approx(min(seconds), abs=1.5e-3)
        assert r["peak_rss_mb"] > 100
    w, d = results["wanpipe"], results["diffusers"]
    # per round: the two engines' runs of that round, in order
    assert results["time_ratio_rounds"] == pytest.approx(
        [a / b for a, b in zip(w["seconds"], d["seconds"])], rel=0.05
    )
    assert results["time_ratio"] == pytest.approx(w["seconds_median"] / d["seconds_median"], rel=0.01)
    assert results["time_ratio_min"] == pytest.approx(w["seconds_min"] / d["seconds_min"], rel=0.01)
    assert results["memory_ratio"] == pytest.approx(w["peak_rss_mb"] / d["peak_rss_mb"], rel=0.01)
    # the stages are timed inside each generation: with 2 runs the medians are means, so text encoding,
    # the steps (step_s is per step) and decoding add up to at most the median generation time
    stages = w["stages"]
    assert min(stages["text_encode_s"], stages["step_s"], stages["decode_s"]) > 0
    spent = stages["text_encode_s"] + steps * stages["step_s"] + stages["decode_s"]
    assert spent <= w["seconds_median"] + 2e-3, (spent, w["seconds_median"])
    assert results["max_abs_diff"] < 1e-3  # the same frames
    assert set(results["wanpipe"]["stages"]) >= {"text_encode_s", "step_s", "decode_s"}
    written = json.loads(Path(record["path"]).read_text())
    assert written["results"] == results and "alternating" in written["method"]
    assert written["commit"] and written["versions"]["torch"]  # what was timed: this tree, these kernels
