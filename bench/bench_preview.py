"""What live previews cost on the CPU mid-size case (wanpipe.bench's checkpoint): per step vs per preview.

python bench/bench_preview.py [--repeats 3] [--size 128] [--frames 17] [--steps 8]

The mid-size random checkpoint of wanpipe.bench (6-block DiT of dim 256, the Wan 2.1 VAE at a third of its
width), 128x128, 17 frames, 8 steps, CFG 5, fp32, one process. Timed: a denoising step (the median of
``denoise_s / steps`` over runs without previews), and with a preview at every step (``preview_every=1``)
the time spent in the engine's preview work (x0 = x_t - sigma * v, the mode's fix-up, the linear
decode: ``StepPreview.__call__`` less the callback) and, apart, the animated WebP encode of each preview (what ``--preview`` and the
server add). On a shared machine the denoise time moves by more than the previews cost, so the previews
are timed directly, not as a difference of totals. Writes ``bench/results/preview-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from wanpipe import WanPipeline, WanRequest
    from wanpipe.bench import machine_record, make_cpu_checkpoint
    from wanpipe.context import DEFAULT_PREVIEW_EVERY
    from wanpipe.media import encode_webp
    from wanpipe.stages import preview as preview_stage

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    folder = make_cpu_checkpoint(Path(tempfile.mkdtemp(prefix="wanpipe-preview-bench-")) / "ckpt")
    pipe = WanPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    request = WanRequest(
        prompt="a cat walks on the grass",
        negative_prompt="worst quality",
        height=args.size,
        width=args.size,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=5.0,
        seed=0,
        preview_every=1,
    )
    submit_s: list[float] = []
    encode_s: list[float] = []
    sizes: list[tuple[int, ...]] = []
    step_preview = preview_stage.StepPreview.__call__

    def timed_step_preview(self, *a) -> None:  # x0, its fix-up, the decode and (inline) the callback
        t0 = time.perf_counter()
        step_preview(self, *a)
        submit_s.append(time.perf_counter() - t0)

    def encode(message) -> None:  # the callback: timed apart from the engine's work
        t0 = time.perf_counter()
        encode_webp(message.frames, message.fps)
        encode_s.append(time.perf_counter() - t0)
        sizes.append(message.frames.shape)

    preview_stage.StepPreview.__call__ = timed_step_preview  # type: ignore[method-assign]
    load_before = os.getloadavg()
    pipe.generate_batch([request], progress=False)  # warm-up
    step_s, with_preview_step_s = [], []
    for _ in range(args.repeats):
        plain = pipe.generate_batch([request], progress=False)[0]
        step_s.append(plain.timings["denoise_s"] / args.steps)
        engine_before = len(submit_s)
        shown = pipe.generate_batch([request], progress=False, preview=encode)[0]
        with_preview_step_s.append(shown.timings["denoise_s"] / args.steps)
        assert len(submit_s) - engine_before == args.steps
    # the engine's part alone: submit less the callback's encode (inline on the CPU)
    engine_s = [s - e for s, e in zip(submit_s[-len(encode_s) :], encode_s)]
    step = statistics.median(step_s)
    engine, webp = statistics.median(engine_s), statistics.median(encode_s)
    both = engine + webp
    every = max(1, math.ceil(both / (0.02 * step)))  # the smallest interval under 2% of a step
    record = {
        **machine_record(),
        "case": f"{args.size}x{args.size}, {args.frames} frames, {args.steps} steps, CFG 5, fp32, CPU",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "preview_frames_shape": list(sizes[-1]),
        "step_s": step,
        "step_s_with_previews_every_step": statistics.median(with_preview_step_s),
        "preview_engine_s": engine,
        "preview_webp_encode_s": webp,
        "engine_fraction_of_step_every_1": engine / step,
        "engine_and_webp_fraction_of_step_every_1": both / step,
        "smallest_every_under_2_percent_with_webp": every,
        "default_preview_every": DEFAULT_PREVIEW_EVERY,
        "fraction_at_default_with_webp": both / step / DEFAULT_PREVIEW_EVERY,
        "python": platform.python_version(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    print(json.dumps(record, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"preview-vm-{stamp}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
