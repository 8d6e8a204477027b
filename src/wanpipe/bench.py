"""``wanpipe bench``: wanpipe against diffusers on the same random checkpoint, in the same run.

CPU case (every machine): a mid-size checkpoint shaped like the real ones (issue 5): the Wan 2.1 VAE at
a third of its width (base_dim 32), a 6-block DiT of dim 256, a small UMT5; 128x128, 17 frames, 8 steps,
guidance 5.0, fp32. Each engine runs in a process of its own (so the peak RSS is its own): one warm-up
generation, then ``--repeats`` timed ones (the median is reported), per-stage times for wanpipe (text
encode, per step, VAE decode) and the max abs difference of the frames. Both engines are loaded and warm
before timing starts, and they are timed in turns (round 1: A then B, round 2: B then A, ...), so that a
busy stretch of a shared machine hits both; the JSON has the median, the minimum and the per-round ratio. Writes
``bench/results/<machine>-<date>.json`` and appends a row to ``bench/results/README.md``.

diffusers is a test-only dependency: ``pip install -e .[test]`` first.
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

import numpy as np

from wanpipe import arguments

# The demo checkpoint's DiT and VAE (wanpipe.demo), made mid-size: what the CPU benchmark times.
BENCH_TRANSFORMER: dict[str, Any] = dict(
    attention_head_dim=128, text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=6
)
BENCH_VAE: dict[str, Any] = dict(base_dim=32, dim_mult=[1, 2, 4, 4], num_res_blocks=2)


def bench_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The benchmark checkpoint's DiT and VAE configs (diffusers' config.json keys)."""
    from wanpipe.demo import TRANSFORMER_CONFIG, VAE_CONFIG

    return {**TRANSFORMER_CONFIG, **BENCH_TRANSFORMER}, {**VAE_CONFIG, **BENCH_VAE}


SENTENCES = [
    "a cat walks on the grass",
    "a dog runs in the park under the sun",
    "the quick brown fox jumps over the lazy dog",
    "video of a red car driving on a road at night",
    "bright tones, overexposed, static, blurred details, worst quality",
    "an astronaut rides a horse on the moon, cinematic",
]


def _tokenizer():
    from transformers import T5TokenizerFast

    from wanpipe.demo import train_tokenizer

    return T5TokenizerFast(
        tokenizer_object=train_tokenizer(SENTENCES * 10, vocab_size=96),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
    )


def _randomize(module, seed: int, scale: float) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(
                torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "norm" in name else 0.0)
            )


def make_cpu_checkpoint(folder: Path, vace_layers: list[int] | None = None) -> Path:
    """The mid-size random checkpoint, written with diffusers' own classes; with ``vace_layers``, a VACE
    checkpoint (``WanVACEPipeline``, VACE blocks feeding those layers, 96 control channels)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    )
    transformer_config, vae_config = bench_configs()
    vae = AutoencoderKLWan.from_config(vae_config)
    if vace_layers is None:
        transformer = WanTransformer3DModel.from_config(transformer_config)
        pipeline = WanPipeline
    else:
        vace = {"vace_layers": list(vace_layers), "vace_in_channels": 96}
        transformer = WanVACETransformer3DModel.from_config({**transformer_config, **vace})
        pipeline = WanVACEPipeline
    _randomize(vae, 1, 0.05)
    _randomize(transformer, 2, 0.05)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    ).save_pretrained(folder)
    return folder


def machine_record() -> dict[str, Any]:
    """What every benchmark record starts with: the machine, the device, the commit, the versions, the date."""
    return {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)",
        "device": "cpu",
        "commit": _commit(),
        "versions": _versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _child(engine: str, folder: str, request: dict[str, Any], options: dict[str, Any], out: str) -> None:
    """In a fresh process: load, warm up, then one timed generation per ``go`` line on stdin (the parent
    alternates the engines, so both see the same machine); ``done`` saves frames and figures."""
    # The protocol gets its own copy of stdout; anything the libraries print goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch

    threads = int(os.environ.get("BENCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    kw = dict(request)
    seed = kw.pop("seed")
    stages: list[dict[str, float]] = []
    if engine == "diffusers":
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def generate() -> np.ndarray:
            g = torch.Generator("cpu").manual_seed(seed)
            return np.asarray(pipe(generator=g, output_type="np", **kw).frames[0])
    else:
        from wanpipe import WanPipeline
        from wanpipe.runtime import RuntimeOptions

        pipe = WanPipeline.from_pretrained(
            folder, device="cpu", dtype="float32", runtime=RuntimeOptions(**options)
        )

        def generate() -> np.ndarray:
            video = pipe.generate(seed=seed, progress=False, **kw)
            stages.append(dict(video.timings))
            return video.frames

    from wanpipe.runtime.memory import peak_rss_mb

    frames = generate()  # warm-up
    print("ready", file=proto, flush=True)
    seconds = []
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        frames = generate()
        seconds.append(time.perf_counter() - t0)
        print(f"{seconds[-1]:.6f}", file=proto, flush=True)
    np.save(out + ".npy", frames)
    record: dict[str, Any] = {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    if stages:
        timed = stages[1:]
        steps = request["num_inference_steps"]
        record["stages"] = {
            "text_encode_s": statistics.median(s["text_encode_s"] for s in timed),
            "step_s": statistics.median(s["denoise_s"] for s in timed) / steps,
            "decode_s": statistics.median(s["decode_s"] for s in timed),
            "compile_s": stages[0].get("compile_s", 0.0),
            "skipped_steps": timed[-1].get("skipped_steps", 0),
        }
    Path(out + ".json").write_text(json.dumps(record))


def _start_child(engine: str, payload: list[Any], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wanpipe.bench", "--child", json.dumps(payload)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"the {engine} benchmark process failed to start (said {line!r})")
    return proc


def _run_interleaved(procs: dict[str, subprocess.Popen[str]], repeats: int) -> None:
    """One timed generation per engine per round, engines alternating (first engine swapped each round),
    so that a slow or busy stretch of a shared machine hits both."""
    names = list(procs)
    for r in range(repeats):
        for engine in names if r % 2 == 0 else names[::-1]:
            proc = procs[engine]
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if not proc.stdout.readline().strip():
                raise RuntimeError(f"the {engine} benchmark process stopped")
    for engine, proc in procs.items():
        assert proc.stdin is not None
        proc.stdin.write("done\n")
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"the {engine} benchmark process failed (exit {proc.returncode})")


def _commit() -> str | None:
    """The source tree's git commit (short), "+dirty" when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str | None]:
    """Versions of the packages whose kernels are timed."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_cpu_bench(
    *,
    steps: int = 8,
    frames: int = 17,
    size: int = 128,
    repeats: int = 3,
    threads: int = 0,
    engines: str = "diffusers,wanpipe",
    options: dict[str, Any] | None = None,
    out_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    # No prompt cache: every timed run encodes its prompts, as diffusers does (the runs repeat one request).
    options = {"vae_chunk_frames": 1, "text_cache_size": 0, **(options or {})}
    request = dict(
        prompt="a cat walks on the grass",
        negative_prompt="worst quality",
        height=size,
        width=size,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=5.0,
        seed=0,
    )
    tmp = Path(tempfile.mkdtemp(prefix="wanpipe-bench-"))
    ckpt = checkpoint or make_cpu_checkpoint(tmp / "ckpt")
    src = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "BENCH_THREADS": str(threads),
        "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}",
    }
    # Each engine in a process of its own (its own peak RSS), both loaded and warm, timed in turns.
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for engine in engines.split(","):
            procs[engine] = _start_child(
                engine, [engine, str(ckpt), request, options, str(tmp / engine)], env
            )
        _run_interleaved(procs, repeats)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    results: dict[str, dict[str, Any]] = {}
    for engine in procs:
        out = str(tmp / engine)
        results[engine] = json.loads(Path(out + ".json").read_text())
        results[engine]["frames"] = np.load(out + ".npy")
    figures: dict[str, Any] = {}
    for engine, r in results.items():
        figures[engine] = {
            "seconds_median": round(statistics.median(r["seconds"]), 3),
            "seconds_min": round(min(r["seconds"]), 3),
            "seconds": [round(s, 3) for s in r["seconds"]],
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
        }
        if "stages" in r:
            figures[engine]["stages"] = {k: round(v, 4) for k, v in r["stages"].items()}
    if "diffusers" in results and "wanpipe" in results:
        d, w = figures["diffusers"], figures["wanpipe"]
        figures["time_ratio"] = round(w["seconds_median"] / d["seconds_median"], 3)
        figures["time_ratio_min"] = round(w["seconds_min"] / d["seconds_min"], 3)
        # Per round (the two engines ran back to back): the spread says how noisy the machine was.
        rounds = [a / b for a, b in zip(results["wanpipe"]["seconds"], results["diffusers"]["seconds"])]
        figures["time_ratio_rounds"] = [round(x, 3) for x in rounds]
        figures["memory_ratio"] = round(w["peak_rss_mb"] / d["peak_rss_mb"], 3)
        figures["max_abs_diff"] = float(
            np.abs(results["wanpipe"]["frames"] - results["diffusers"]["frames"]).max()
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        **machine_record(),
        "load_average_after": load,
        "command": "python " + " ".join(sys.argv),
        "method": "both engines loaded and warmed up in their own processes, then timed in alternating turns",
        "config": dict(
            zip(("transformer", "vae"), bench_configs()), request=request, wanpipe_options=options
        ),
        "results": figures,
    }
    out_dir = out_dir or Path.cwd() / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"cpu-{platform.node()}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = str(path)
    return record


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``wanpipe bench``: for cli.py (``add_bench_parser(sub)``, then ``cmd_bench(args)``)."""
    p = subparsers.add_parser("bench", help="benchmark wanpipe against diffusers (CPU mid-size case)")
    _add_arguments(p)
    return p


ENGINES = ("diffusers", "wanpipe")


def _engines(text: str) -> str:
    """``--engines``: a comma-separated subset of ``ENGINES``, each once."""
    names = [n.strip() for n in text.split(",")]
    if not all(n in ENGINES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {' and '.join(ENGINES)}, each once, got {text!r}"
        )
    return ",".join(names)


def _memory(text: str) -> int:
    from wanpipe.runtime.options import _memory as memory

    return memory(text)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    # The checkpoint is fixed (TRANSFORMER, VAE): 16-pixel multiples (VAE stride 8 x patch 2), 4k+1 frames.
    p.add_argument(
        "--steps", type=arguments.integer(1, arguments.MAX_STEPS, what="denoising steps"), default=8
    )
    p.add_argument(
        "--frames",
        type=arguments.integer(1, 4093, what="4k+1 frames: 1, 5, 9, 17 ...", valid=lambda n: n % 4 == 1),
        default=17,
    )
    p.add_argument(
        "--size",
        type=arguments.integer(16, 16384, what="pixels, a multiple of 16", valid=lambda n: n % 16 == 0),
        default=128,
    )
    p.add_argument(
        "--repeats",
        type=arguments.integer(1),
        default=3,
        help="timed generations per engine (median reported)",
    )
    p.add_argument("--threads", type=arguments.integer(0), default=0, help="torch threads (default: torch's)")
    p.add_argument("--engines", type=_engines, default="diffusers,wanpipe")
    p.add_argument(
        "--out-dir",
        type=arguments.output_folder,
        default=None,
        help="where the JSON goes (default: ./bench/results)",
    )
    p.add_argument("--vae-chunk-frames", type=arguments.integer(1), default=1)
    p.add_argument(
        "--vae-memory",
        type=_memory,
        default=None,
        metavar="SIZE",
        help="wanpipe's VAE budget, e.g. 400MB: exact tiled decode when the frame does not fit (default: off)",
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cache", choices=("none", "first-block", "teacache"), default="none")
    p.add_argument("--residual-threshold", type=arguments.number(0), default=0.0)
    p.add_argument("--cfg-truncation", type=arguments.number(0, 1), default=None)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    # The benchmark builds its checkpoint with diffusers' classes and times diffusers beside wanpipe.
    if importlib.util.find_spec("diffusers") is None:
        print(
            "wanpipe: error: wanpipe bench compares against diffusers: pip install 'wanpipe[test]' (or diffusers)",
            file=sys.stderr,
        )
        return 2
    options: dict[str, Any] = {"vae_chunk_frames": args.vae_chunk_frames, "compile": args.compile}
    if args.cache != "none":
        options.update(cache=args.cache, residual_threshold=args.residual_threshold)
    if args.cfg_truncation is not None:
        options["cfg_truncation"] = args.cfg_truncation
    if args.vae_memory is not None:
        options["vae_memory"] = args.vae_memory
    record = run_cpu_bench(
        steps=args.steps,
        frames=args.frames,
        size=args.size,
        repeats=args.repeats,
        threads=args.threads,
        engines=args.engines,
        options=options,
        out_dir=Path(args.out_dir) if args.out_dir else None,
    )
    print(json.dumps(record["results"], indent=2))
    print(f"wrote {record['path']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(*json.loads(argv[1]))
        return 0
    parser = arguments.Parser(prog="wanpipe bench", description=__doc__)
    _add_arguments(parser)
    args = arguments.parse(parser, argv)
    return args if isinstance(args, int) else cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
