"""The tiny decoder (TAEHV, ``--decoder tiny``) against the full Wan VAE on the CPU: decode time and memory.

python bench/bench_tiny_decoder.py [--repeats 5] [--frames 17] [--size 128] [--real-vae]

The same normalized latent (seeded, 16 channels: ``(frames - 1) / 4 + 1`` latent frames of size / 8)
decoded by each decoder through the decode stage the pipeline runs (``stages.decode.decode`` /
``decode_tiny``), fp32: the Wan 2.1 VAE at the width of the mid-size benchmark checkpoint (wanpipe.bench:
base_dim 32, a third of the real one), with ``--real-vae`` also at the real width (base_dim 96), and
TAEHV at the published ``taew2_1`` size. Weights are random (the cost does not depend on them). Each
decoder runs in a process of its own: load, one warm-up decode, then ``--repeats`` timed ones (median,
minimum); memory is the process's peak RSS (``VmHWM``) and the peak's rise during the decodes over the
RSS after loading (the peak is reset first through ``/proc/self/clear_refs``). ``tiny-stream`` is TAEHV
one latent frame at a time (``--vae-chunk-frames 1``). Writes
``bench/results/tiny-decoder-<machine>-<date>.json`` (machine, commit, command, numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
REAL_VAE = dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2)  # Wan 2.1's own VAE


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(decoder: str, frames: int, size: int, repeats: int) -> dict[str, Any]:
    """In a fresh process: build one decoder, decode the latent ``repeats + 1`` times, report."""
    import torch

    from wanpipe.bench import bench_configs
    from wanpipe.models.taehv import TAEHV, TAEHVConfig
    from wanpipe.models.vae import VAEConfig, WanVAE
    from wanpipe.runtime.memory import current_rss_mb, peak_rss_mb
    from wanpipe.stages.decode import decode, decode_tiny
    from wanpipe.stages.placement import Placement

    torch.manual_seed(0)
    placement = Placement(torch.device("cpu"), torch.float32)
    if decoder.startswith("tiny"):
        model: torch.nn.Module = TAEHV(TAEHVConfig.taew2_1()).eval()
    else:
        _, vae_config = bench_configs()
        if decoder == "vae-real":
            vae_config = {**vae_config, **REAL_VAE}
        model = WanVAE(VAEConfig.from_dict(vae_config)).eval()
    model.requires_grad_(False)
    for p in model.parameters():  # small weights: no overflow through the random layers
        p.data.mul_(0.5)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=g)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            if decoder.startswith("tiny"):  # tiny-stream: one latent frame at a time
                chunk = 1 if decoder == "tiny-stream" else None
                return decode_tiny(model, latents, placement, chunk)  # type: ignore[arg-type]
            return decode(model, latents, placement, vae_dtype=torch.float32)  # type: ignore[arg-type]

    params = sum(p.numel() for p in model.parameters())
    loaded_rss = current_rss_mb()
    reset = _reset_peak()
    out = run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    return {
        "decoder": decoder,
        "parameters": params,
        "output_shape": list(out.shape),
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "rss_after_load_mb": loaded_rss,
        "peak_rss_mb": peak,
        "decode_peak_rise_mb": peak - loaded_rss if reset else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--real-vae", action="store_true", help="also the VAE at its real width (base_dim 96)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.frames, args.size, args.repeats)))
        return 0

    from wanpipe.bench import machine_record

    decoders = ["vae-mid", *(["vae-real"] if args.real_vae else []), "tiny", "tiny-stream"]
    fulls = [d for d in decoders if d.startswith("vae")]
    results = {}
    for decoder in decoders:
        cmd = [sys.executable, __file__, "--child", decoder, "--repeats", str(args.repeats)]
        cmd += ["--frames", str(args.frames), "--size", str(args.size), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[decoder] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[decoder]
        print(
            f"{decoder:9s} {r['parameters'] / 1e6:6.2f} M params  median {r['median_s']:.3f} s  "
            f"(min {r['min_s']:.3f})  peak RSS {r['peak_rss_mb']:.0f} MB  decode rise "
            f"{r['decode_peak_rise_mb'] if r['decode_peak_rise_mb'] is None else round(r['decode_peak_rise_mb'])} MB"
        )
    ratios = {}
    for tiny_name, decoder in [(t, d) for t in ("tiny", "tiny-stream") for d in fulls]:
        tiny, full = results[tiny_name], results[decoder]
        ratios[f"{tiny_name} vs {decoder}"] = {
            "time_tiny_over_vae": tiny["median_s"] / full["median_s"],
            "speedup": full["median_s"] / tiny["median_s"],
            "peak_rss_tiny_over_vae": tiny["peak_rss_mb"] / full["peak_rss_mb"],
            "decode_rise_tiny_over_vae": None
            if not (tiny["decode_peak_rise_mb"] and full["decode_peak_rise_mb"])
            else tiny["decode_peak_rise_mb"] / full["decode_peak_rise_mb"],
        }
        r = ratios[f"{tiny_name} vs {decoder}"]
        print(
            f"{tiny_name} vs {decoder}: {r['speedup']:.1f}x faster (time ratio {r['time_tiny_over_vae']:.3f}), "
            f"peak RSS ratio {r['peak_rss_tiny_over_vae']:.2f}"
            + (
                ""
                if r["decode_rise_tiny_over_vae"] is None
                else f", decode rise ratio {r['decode_rise_tiny_over_vae']:.2f}"
            )
        )
    record = {
        **machine_record(),
        "command": " ".join(
            ["python", "bench/bench_tiny_decoder.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "case": {
            "latent": [1, 16, (args.frames - 1) // 4 + 1, args.size // 8, args.size // 8],
            "frames": args.frames,
            "size": args.size,
            "dtype": "float32",
            "repeats": args.repeats,
            "vae-mid": "Wan 2.1 VAE, base_dim 32 (the mid-size benchmark checkpoint's)",
            "vae-real": "Wan 2.1 VAE, base_dim 96 (the released width)",
            "tiny": "TAEHV taew2_1 (the published size), all latent frames at once",
            "tiny-stream": "the same TAEHV, one latent frame at a time (chunk_frames=1)",
        },
        "results": results,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"tiny-decoder-{platform.node().split('.')[0] or 'machine'}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
