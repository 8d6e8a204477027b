"""Long videos with context windows on the CPU mid-size checkpoint: DiT time per step and peak memory.

python bench/bench_long.py [--steps 8] [--window 17]

The mid-size random checkpoint of wanpipe.bench (6-block DiT of dim 256), 128x128, classifier-free
guidance (2 rows per DiT call), fp32. For 17, 65 and 129 video frames (5, 17, 33 latent frames) the
denoise step's DiT prediction runs as the loop runs it (``wanpipe.stages.windows.windowed_forward``
around ``DiTRunner.forward``): without windows, and with ``--window``-frame windows (default overlap,
uniform_standard schedule, whose windows move every step: the step time is the mean over ``--steps``
steps). Each configuration runs in a process of its own, so its peak RSS (VmHWM) is its own: the weights
plus that configuration's step. Only the DiT step is measured (the VAE decodes in temporal chunks either
way). Writes ``bench/results/long-<machine>-<date>.json``; the targets (issue 16): the 129-frame windowed
step at most 2.3x the 65-frame one, the windowed peaks at most 1.3x the 17-frame run's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 128
RUNS = [("plain", 17), ("plain", 65), ("plain", 129), ("windows", 65), ("windows", 129)]


def child(folder: str, frames: int, window: int | None, steps: int, out: str) -> None:
    """In a fresh process: load, one warm-up step, then ``steps`` timed steps; write the figures."""
    from functools import partial

    import torch

    from wanpipe import WanPipeline, WanRequest
    from wanpipe.context import ContextWindows
    from wanpipe.runtime.memory import current_rss_mb, peak_rss_mb
    from wanpipe.stages.windows import window_schedule, windowed_forward

    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    options: ContextWindows | None = None
    if window is not None:  # the request path: video frames checked and turned into latent frames
        request = WanRequest(prompt="a", height=SIZE, width=SIZE, num_frames=frames, context_frames=window)
        options = ContextWindows.of(pipe.check(request))
    dit, runner = pipe.executor.experts.get("high"), pipe.executor.runner
    f = (frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, f, SIZE // 8, SIZE // 8, generator=generator)
    text = torch.randn(2, 32, dit.config.text_dim, generator=generator)
    loaded_mb = current_rss_mb()
    seconds, calls = [], []
    with torch.no_grad():
        for step in range(steps + 1):
            t = torch.full((2,), 1000.0 * (1 - step / (steps + 1)))
            call = partial(runner.forward, dit, timestep=t, context=text)
            t0 = time.perf_counter()
            pred = windowed_forward(options, step, x, call)
            if step:  # step 0 is the warm-up
                seconds.append(time.perf_counter() - t0)
                calls.append(1 if options is None else len(window_schedule(options, step, f)))
            assert pred.shape == x.shape and bool(torch.isfinite(pred).all())
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "dit_calls_per_step": calls,
                "rss_after_load_mb": loaded_mb,
                "peak_rss_mb": peak_rss_mb(),
                "windows": None if options is None else vars(options),
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window", type=int, default=17, help="context_frames, video frames (4k+1)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=4, metavar=("FOLDER", "FRAMES", "WINDOW", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        folder, frames, window, out = args.child
        child(folder, int(frames), None if window == "none" else int(window), args.steps, out)
        return 0
    from wanpipe.bench import machine_record, make_cpu_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="wanpipe-bench-long-"))
    folder = make_cpu_checkpoint(tmp / "ckpt")
    results: dict[str, Any] = {}
    for kind, frames in RUNS:
        name, out = f"{kind}-{frames}", str(tmp / f"{kind}-{frames}.json")
        window = str(args.window) if kind == "windows" else "none"
        command = [sys.executable, __file__, "--steps", str(args.steps), "--child", str(folder)]
        subprocess.run([*command, str(frames), window, out], check=True)
        r = json.loads(Path(out).read_text())
        results[name] = {
            "frames": frames,
            "step_seconds_mean": round(statistics.mean(r["seconds"]), 4),
            "step_seconds_median": round(statistics.median(r["seconds"]), 4),
            "step_seconds_min": round(min(r["seconds"]), 4),
            "step_seconds": [round(x, 4) for x in r["seconds"]],
            "dit_calls_per_step_mean": round(statistics.mean(r["dit_calls_per_step"]), 2),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "step_peak_over_load_mb": round(r["peak_rss_mb"] - r["rss_after_load_mb"], 1),
            "windows_latent": r["windows"],
        }
        print(name, results[name], flush=True)

    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)

    summary = {
        "windowed_129_over_65_step_time": ratio("windows-129", "windows-65", "step_seconds_mean"),
        "windowed_129_over_65_step_time_min": ratio("windows-129", "windows-65", "step_seconds_min"),
        "windowed_129_over_65_dit_calls": ratio("windows-129", "windows-65", "dit_calls_per_step_mean"),
        "plain_129_over_65_step_time": ratio("plain-129", "plain-65", "step_seconds_mean"),
        "windowed_65_peak_over_plain_17": ratio("windows-65", "plain-17", "peak_rss_mb"),
        "windowed_129_peak_over_plain_17": ratio("windows-129", "plain-17", "peak_rss_mb"),
        "plain_129_peak_over_plain_17": ratio("plain-129", "plain-17", "peak_rss_mb"),
    }
    summary["targets_met"] = (
        summary["windowed_129_over_65_step_time"] <= 2.3
        and max(summary["windowed_65_peak_over_plain_17"], summary["windowed_129_peak_over_plain_17"]) <= 1.3
    )
    record = {
        **machine_record(),
        "command": "python bench/bench_long.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"size": SIZE, "steps": args.steps, "window_frames": args.window, "guidance_rows": 2},
        "results": results,
        "summary": summary,
    }
    print(json.dumps(summary, indent=1))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"long-{platform.node() or 'cpu'}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
