"""Where the CPU memory goes at bigger pictures: the peak RSS of the VAE decode alone, streamed into a
sink (no output array), above the loaded process, on the mid-size bench checkpoint (wanpipe.bench).

python bench/bench_vae_memory.py [--runs 256:17:cache 256:17:lean 512:17:cache:750MB ...]

Each run (SIZE:FRAMES:HOST_MEMORY[:VAE_MEMORY]) is a fresh process: load, then decode random latents
of SIZE x SIZE x FRAMES into a frame-counting sink; the record has the RSS after loading, the peak, the
tiles and the seconds. The JSON goes to bench/results/vae-memory-<host>-<date>.json.
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
import json, resource, sys, time
import torch
from wanpipe import WanPipeline
from wanpipe.runtime import RuntimeOptions
from wanpipe.stages.decode import vae_tile
from wanpipe.streaming import Discard

ckpt, size, frames, host, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] or None
pipe = WanPipeline.from_pretrained(
    ckpt, device="cpu", dtype="float32", runtime=RuntimeOptions(vae_memory=budget, host_memory=host)
)
ex = pipe.executor

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6

g = torch.Generator().manual_seed(0)
latents = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=g)
sink = Discard()
with torch.inference_mode():
    loaded = rss()
    t0 = time.perf_counter()
    ex.decode_into(latents, [sink], frames)
    seconds = time.perf_counter() - t0
    z = ex.vae.denormalize_latents(latents)
    tile = vae_tile(ex.vae, z, ex.runtime.vae_memory)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
print(json.dumps({
    "size": size, "frames": sink.frames, "host_memory": host, "vae_memory": budget, "tile": tile,
    "loaded_rss_mb": round(loaded, 1), "peak_rss_mb": round(peak, 1), "decode_mb": round(peak - loaded, 1),
    "seconds": round(seconds, 1),
}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["256:17:cache", "256:17:lean", "512:17:cache:750MB"])
    p.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args()
    ckpt = args.checkpoint or make_cpu_checkpoint(Path(tempfile.mkdtemp(prefix="wanpipe-bench-")) / "ckpt")
    record = {**machine_record(), "command": "python bench/bench_vae_memory.py " + " ".join(sys.argv[1:])}
    record["runs"] = []
    env = {"PYTHONPATH": str(ROOT / "src")}
    for run in args.runs:
        size, frames, host, *budget = run.split(":")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ckpt), size, frames, host, budget[0] if budget else ""],
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
