"""CPU benchmark: wanpipe vs diffusers on the same mid-size random checkpoint, same request.

The checkpoint is shaped like the real ones at a smaller scale (issue 5): the Wan 2.1 VAE at a third of
its real width (base_dim 32), a 6-block DiT of dim 256, a small UMT5; the request is 128x128, 17 frames,
8 steps with classifier-free guidance. Each engine runs in its own process (so peak RSS is its own):
one warm-up generation, then the timed one. Prints a table and writes bench/results/<machine>-<date>.json.

    python bench/bench_cpu.py [--steps 8] [--frames 17] [--size 128] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
VAE = dict(
    base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)


def make_checkpoint(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tests import tiny
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = tiny.make_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    )
    vae = AutoencoderKLWan(**VAE)
    transformer = WanTransformer3DModel(**TRANSFORMER)
    tiny.randomize(vae, 1, 0.05)
    tiny.randomize(transformer, 2, 0.05)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    ).save_pretrained(folder)


def run_engine(engine: str, folder: str, request: dict, out: str) -> None:
    """In a child process: warm up, time one generation, save frames and figures."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "0")) or torch.get_num_threads())
    kw = dict(request)
    seed = kw.pop("seed")
    if engine == "diffusers":
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            g = torch.Generator("cpu").manual_seed(seed)
            return np.asarray(pipe(generator=g, output_type="np", **kw).frames[0])
    else:
        from wanpipe import WanPipeline

        pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")

        def generate():
            return pipe.generate(seed=seed, progress=False, **kw).frames

    generate()  # warm-up
    t0 = time.perf_counter()
    frames = generate()
    seconds = time.perf_counter() - t0
    np.save(out + ".npy", frames)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out + ".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--engines", default="diffusers,wanpipe")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    request = dict(
        prompt="a cat walks on the grass",
        negative_prompt="worst quality",
        height=args.size,
        width=args.size,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=5.0,
        seed=0,
    )
    if args.child:
        run_engine(args.child[0], args.child[1], request, args.child[2])
        return

    tmp = Path(tempfile.mkdtemp(prefix="wanpipe-bench-"))
    make_checkpoint(tmp / "ckpt")
    env = {**os.environ, "BENCH_THREADS": str(args.threads), "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    results: dict[str, dict] = {}
    for engine in args.engines.split(","):
        out = str(tmp / engine)
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--frames", str(args.frames)]
        cmd += ["--size", str(args.size), "--child", engine, str(tmp / "ckpt"), out]
        subprocess.run(cmd, check=True, env=env)
        results[engine] = json.loads(Path(out + ".json").read_text())
        results[engine]["frames"] = np.load(out + ".npy")
    figures: dict[str, object] = {}
    for engine, r in results.items():
        figures[engine] = {"seconds": round(r["seconds"], 3), "peak_rss_mb": round(r["peak_rss_mb"], 1)}
    if "diffusers" in results and "wanpipe" in results:
        d, w = results["diffusers"], results["wanpipe"]
        figures["time_ratio"] = round(w["seconds"] / d["seconds"], 3)
        figures["memory_ratio"] = round(w["peak_rss_mb"] / d["peak_rss_mb"], 3)
        figures["max_abs_diff"] = float(np.abs(w["frames"] - d["frames"]).max())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    record = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)",
        "device": "cpu",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "command": "python " + " ".join(sys.argv),
        "config": {"transformer": TRANSFORMER, "vae": VAE, "request": request},
        "results": figures,
    }
    print(json.dumps(record["results"], indent=2))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
