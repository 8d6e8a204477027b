"""Where the CPU memory goes at bigger pictures: the peak RSS of the VAE decode alone, streamed into a
sink (no output array), above the loaded process, on the mid-size bench checkpoint (wanpipe.bench).

python bench/bench_vae_memory.py [--runs 256:17:cache 256:17:lean 512:17:cache:750MB ...] [--generate]

Each run (SIZE:FRAMES:HOST_MEMORY[:VAE_MEMORY]) is a fresh process: load, then decode random latents
of SIZE x SIZE x FRAMES into a frame-counting sink; the record has the RSS after loading, the peak, the
tiles, the CPU decode mode and the seconds. ``--generate``: each run is instead a whole ``wanpipe
generate`` (text, 4 steps with CFG, the decode streamed into an mp4) in a fresh process, its peak RSS
and seconds. The JSON goes to bench/results/vae-memory-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wanpipe.bench import machine_record, make_cpu_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
import torch
from wanpipe import WanPipeline
from wanpipe.runtime import RuntimeOptions
from wanpipe.runtime.memory import current_rss_mb, peak_rss_mb
from wanpipe.stages.decode import plan_decode
from wanpipe.streaming import Discard

ckpt, size, frames, host, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] or None
pipe = WanPipeline.from_pretrained(
    ckpt, device="cpu", dtype="float32", runtime=RuntimeOptions(vae_memory=budget, host_memory=host)
)
ex = pipe.executor

g = torch.Generator().manual_seed(0)
latents = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=g)
sink = Discard()
with torch.inference_mode():
    loaded = current_rss_mb()
    t0 = time.perf_counter()
    ex.decode_into(latents, [sink], frames)
    seconds = time.perf_counter() - t0
    z = ex.vae.denormalize_latents(latents)
    plan = plan_decode(ex.vae, z, ex.runtime.vae_memory)
tile = plan.tile
peak = peak_rss_mb()  # VmHWM: this process's own (ru_maxrss would carry the parent's across exec)
grid = None if tile is None else {"rows": list(tile.rows), "cols": list(tile.cols)}
mode = None if plan.mode is None else {"piece_frames": plan.mode.piece_frames, "lean": plan.mode.lean}
print(json.dumps({
    "size": size, "frames": sink.frames, "host_memory": host, "vae_memory": budget, "tile": grid, "mode": mode,
    "loaded_rss_mb": round(loaded, 1), "peak_rss_mb": round(peak, 1), "decode_mb": round(peak - loaded, 1),
    "seconds": round(seconds, 1),
}))
"""

GENERATE = """
import json, sys, tempfile, time
from wanpipe.cli import main
from wanpipe.runtime.memory import peak_rss_mb

ckpt, size, frames, host, budget = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
args = ["generate", "--model", ckpt, "--prompt", "a cat walks on the grass", "--height", size, "--width", size,
        "--num-frames", frames, "--steps", "4", "--seed", "0", "--host-memory", host,
        "--negative-prompt", "worst quality", "--guidance-scale", "5"]
args += ["--vae-memory", budget] if budget else []
out = tempfile.mkdtemp() + "/video.mp4"
t0 = time.perf_counter()
code = main([*args, "--output", out])
seconds = time.perf_counter() - t0
print(json.dumps({"size": int(size), "frames": int(frames), "host_memory": host, "vae_memory": budget or None,
                  "rc": code, "peak_rss_mb": round(peak_rss_mb(), 1), "seconds": round(seconds, 1)}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["256:17:cache", "256:17:lean", "512:17:cache:750MB"])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--generate", action="store_true", help="whole CLI generations, not the decode alone")
    args = p.parse_args()
    ckpt = args.checkpoint or make_cpu_checkpoint(Path(tempfile.mkdtemp(prefix="wanpipe-bench-")) / "ckpt")
    record = {**machine_record(), "command": "python bench/bench_vae_memory.py " + " ".join(sys.argv[1:])}
    record["runs"] = []
    env = {"PYTHONPATH": str(ROOT / "src")}
    for run in args.runs:
        size, frames, host, *budget = run.split(":")
        out = subprocess.run(
            [sys.executable, "-c", GENERATE if args.generate else CHILD, str(ckpt), size, frames, host]
            + [budget[0] if budget else ""],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, **env},
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
        print(json.dumps(result), flush=True)
        record["runs"].append(result)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"vae-memory-vm-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
