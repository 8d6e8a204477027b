"""VACE on the CPU mid-size checkpoint: wanpipe vs diffusers' WanVACEPipeline, peak memory and time.

python bench/bench_vace.py [--repeats 3] [--steps 8]

The mid-size random checkpoint of wanpipe.bench (6-block DiT of dim 256, the Wan 2.1 VAE at a third of its
width) with VACE blocks after layers 0, 2 and 4, written with diffusers' classes; 128x128, 17 frames,
CFG 5, fp32. The request is the heaviest VACE case: a control video, a per-frame mask and a reference
image. Each engine runs in a process of its own (its own peak RSS): one warm-up, then ``--repeats``
timed runs, engines one after the other. Also the same engine on the plain checkpoint (no VACE blocks,
text-to-video) so the VACE cost is visible. Writes ``bench/results/vace-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZE, FRAMES = 128, 17
VACE_LAYERS = [0, 2, 4]


def inputs() -> dict[str, Any]:
    """The control video (F, H, W, 3) uint8, a mask per frame (white = generate: a centre square) and a
    reference image, deterministic."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    mask[:, SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4] = 255
    reference = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    return {"video": video, "mask": mask, "reference": reference}


def child(engine: str, folder: str, steps: int, repeats: int, out: str) -> None:
    import torch
    from PIL import Image

    from wanpipe.runtime.memory import peak_rss_mb

    data = inputs()
    prompt = dict(prompt="a cat walks on the grass", negative_prompt="worst quality")
    size = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=5.0)
    if engine == "diffusers":
        from diffusers import WanVACEPipeline

        pipe = WanVACEPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        video = [Image.fromarray(f) for f in data["video"]]
        mask = [Image.fromarray(f) for f in data["mask"]]
        reference = [Image.fromarray(data["reference"])]

        def run() -> np.ndarray:
            g = torch.Generator("cpu").manual_seed(0)
            out = pipe(
                **prompt,
                **size,
                video=video,
                mask=mask,
                reference_images=reference,
                generator=g,
                output_type="np",
            )
            return np.asarray(out.frames[0])
    else:
        from wanpipe import WanPipeline
        from wanpipe.runtime import RuntimeOptions

        pipe = WanPipeline.from_pretrained(
            folder, device="cpu", dtype="float32", runtime=RuntimeOptions(text_cache_size=0)
        )
        kw: dict[str, Any] = {}
        if engine == "wanpipe":
            kw = dict(video=data["video"], mask=data["mask"], reference_images=[data["reference"]])

        def run() -> np.ndarray:
            return pipe.generate(**prompt, **size, seed=0, progress=False, **kw).frames

    frames = run()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = run()
        seconds.append(time.perf_counter() - t0)
    np.save(out + ".npy", frames)
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=4, metavar=("ENGINE", "FOLDER", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        engine, folder, steps, out = args.child
        child(engine, folder, int(steps), args.repeats, out)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="wanpipe-bench-vace-"))
    from wanpipe.bench import machine_record, make_cpu_checkpoint

    vace = make_cpu_checkpoint(tmp / "vace", vace_layers=VACE_LAYERS)
    plain = make_cpu_checkpoint(tmp / "plain")
    runs = {"diffusers": vace, "wanpipe": vace, "wanpipe-plain-t2v": plain}
    results: dict[str, Any] = {}
    for engine, folder in runs.items():
        out = str(tmp / engine)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--repeats",
                str(args.repeats),
                "--child",
                engine,
                str(folder),
                str(args.steps),
                out,
            ],
            check=True,
        )
        r = json.loads(Path(out + ".json").read_text())
        results[engine] = {
            "seconds_median": round(statistics.median(r["seconds"]), 3),
            "seconds": [round(s, 3) for s in r["seconds"]],
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
        }
        print(engine, results[engine], flush=True)
    ours, theirs = (np.load(str(tmp / e) + ".npy") for e in ("wanpipe", "diffusers"))
    summary = {
        "time_ratio": round(results["wanpipe"]["seconds_median"] / results["diffusers"]["seconds_median"], 3),
        "memory_ratio": round(results["wanpipe"]["peak_rss_mb"] / results["diffusers"]["peak_rss_mb"], 3),
        "vace_over_plain_mb": round(
            results["wanpipe"]["peak_rss_mb"] - results["wanpipe-plain-t2v"]["peak_rss_mb"], 1
        ),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
    }
    print(json.dumps(summary, indent=2))
    record = {
        **machine_record(),
        "load_average_after": os.getloadavg(),
        "command": "python bench/bench_vace.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "method": "each engine in its own process, one warm-up then --repeats timed runs, engines in turn",
        "request": {
            "size": SIZE,
            "frames": FRAMES,
            "steps": args.steps,
            "guidance_scale": 5.0,
            "inputs": "control video, per-frame mask (centre square), one reference image",
        },
        "vace_layers": VACE_LAYERS,
        "results": results,
        "summary": summary,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"vace-{platform.node()}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
