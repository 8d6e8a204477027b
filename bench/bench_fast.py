"""Fast sampling on the CPU mid-size checkpoint (wanpipe.bench): a few-step preset against the 50-step
default, and each step cache on the 50-step run, with diffusers run on the same requests for the ratio.

python bench/bench_fast.py [--repeats 3] [--steps 50] [--preset lightx2v-4step]

For every case: the median seconds per video (one warm-up first), the DiT steps computed and skipped,
and the max abs difference of the frames to the uncached 50-step frames (for the caches: what the
approximation costs on these random weights; quality on real weights is NOT measured here). diffusers
runs the 50-step default (its UniPC) and the preset's schedule (its FlowMatchEulerDiscreteScheduler,
shift 1, given the preset's sigmas, guidance 1), so each wanpipe figure has a diffusers one beside it.
Cases run one after another in this process (not interleaved): read the ratios with that in mind.
Writes ``bench/results/fast-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wanpipe.bench import machine_record, make_cpu_checkpoint  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REQUEST = dict(
    prompt="a cat walks on the grass", negative_prompt="worst quality", height=128, width=128, num_frames=17
)


def _time(run: Any, repeats: int) -> tuple[float, Any]:
    out = run()  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--preset", default="lightx2v-4step")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import WanPipeline as DiffusersPipeline

    from wanpipe import WanPipeline
    from wanpipe.presets import get_preset
    from wanpipe.runtime import RuntimeOptions
    from wanpipe.runtime.step_cache import TEACACHE_WAN_COEFFICIENTS

    tmp = Path(tempfile.mkdtemp(prefix="wanpipe-bench-fast-"))
    folder = make_cpu_checkpoint(tmp / "ckpt")
    pipe = WanPipeline.from_pretrained(
        folder, device="cpu", dtype="float32", runtime=RuntimeOptions(text_cache_size=0)
    )
    preset = get_preset(args.preset)
    seed = 0

    def ours(**kw: Any) -> Any:
        return lambda: pipe.generate(**REQUEST, seed=seed, progress=False, **kw)

    cases: dict[str, dict[str, Any]] = {
        f"default {args.steps} steps": {"num_inference_steps": args.steps},
        f"preset {preset.name}": {"preset": preset.name},
    }
    # MagCache has no published ratios for this random model: calibrate once, then use them.
    calibration = tmp / "mag_ratios.json"
    pipe.generate(
        **REQUEST,
        seed=seed,
        progress=False,
        num_inference_steps=args.steps,
        cache="magcache",
        cache_options={"calibrate": True, "calibration_file": str(calibration)},
    )
    cache_cases = {
        "first-block": {},
        # TeaCache has no published coefficients for a DiT of this width: the Wan2.1 1.3B set, given.
        "teacache": {"coefficients": list(TEACACHE_WAN_COEFFICIENTS["t2v-1.3B"])},
        "taylorseer": {},
        "magcache": {"mag_ratios": str(calibration)},
    }
    for name, options in cache_cases.items():
        cases[f"cache {name} ({args.steps} steps)"] = {
            "num_inference_steps": args.steps,
            "cache": name,
            "cache_options": options,
        }

    figures: dict[str, dict[str, Any]] = {}
    reference: np.ndarray | None = None
    for label, kw in cases.items():
        seconds, video = _time(ours(**kw), args.repeats)
        frames = np.asarray(video.frames)
        if reference is None:
            reference = frames
        t = video.timings
        figures[label] = {
            "seconds_median": round(seconds, 3),
            "computed_steps": t.get("computed_steps"),
            "skipped_steps": t.get("skipped_steps", 0),
            "skipped_uncond_steps": t.get("skipped_uncond_steps", 0),
            "max_abs_diff_to_default": float(np.abs(frames - reference).max()),
            "request": kw,
        }
        print(f"wanpipe  {label:34s} {seconds:7.3f} s  {figures[label]}", flush=True)

    # diffusers on the same checkpoint: its default, and the preset's schedule with Euler at shift 1.
    ref = DiffusersPipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)

    def theirs(**kw: Any) -> Any:
        def run() -> np.ndarray:
            g = torch.Generator("cpu").manual_seed(seed)
            return np.asarray(ref(**REQUEST, generator=g, output_type="np", **kw).frames[0])

        return run

    default_s, default_frames = _time(
        theirs(num_inference_steps=args.steps, guidance_scale=5.0), args.repeats
    )
    unipc = ref.scheduler
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0, num_train_timesteps=1000)
    sigmas = [t / 1000 for t in preset.timesteps]
    grid = euler.set_timesteps
    # WanPipeline asks set_timesteps(num_inference_steps); the preset's list goes in as sigmas (shift 1).
    euler.set_timesteps = lambda n=None, device=None, **_: grid(sigmas=sigmas, device=device)  # type: ignore[method-assign]
    ref.scheduler = euler
    fast_s, fast_frames = _time(
        theirs(num_inference_steps=len(sigmas), guidance_scale=preset.guidance_scale), args.repeats
    )
    ref.scheduler = unipc
    ours_default = figures[f"default {args.steps} steps"]
    ours_fast = figures[f"preset {preset.name}"]
    fast_frames_ours = np.asarray(
        pipe.generate(**REQUEST, seed=seed, progress=False, preset=preset.name).frames
    )
    diffusers = {
        f"default {args.steps} steps": {
            "seconds_median": round(default_s, 3),
            "max_abs_diff_wanpipe": float(np.abs(default_frames - reference).max()),
        },
        f"preset {preset.name} (Euler, its sigmas)": {
            "seconds_median": round(fast_s, 3),
            "max_abs_diff_wanpipe": float(np.abs(fast_frames - fast_frames_ours).max()),
        },
    }
    summary = {
        "preset_speedup_wanpipe": round(ours_default["seconds_median"] / ours_fast["seconds_median"], 2),
        "preset_speedup_diffusers": round(default_s / fast_s, 2),
        "time_ratio_default": round(ours_default["seconds_median"] / default_s, 3),
        "time_ratio_preset": round(ours_fast["seconds_median"] / fast_s, 3),
    }
    for label, f in figures.items():
        if label.startswith("cache"):
            summary[f"{label}: speedup"] = round(ours_default["seconds_median"] / f["seconds_median"], 2)
    print(json.dumps({"diffusers": diffusers, "summary": summary}, indent=2))

    record = {
        **machine_record(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "method": "one process, cases one after another, one warm-up each, median of --repeats; "
        "the mid-size random checkpoint of wanpipe.bench, 128x128, 17 frames, fp32",
        "request": REQUEST,
        "wanpipe": figures,
        "diffusers": diffusers,
        "summary": summary,
        "note": "random weights: the diffs say what each approximation changes here, not video quality",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"fast-{platform.node()}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
