"""The ``wanpipe`` command: ``wanpipe generate ...``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a prompt",
        description="Generate a video with a Wan checkpoint. Without --model, a small built-in demo checkpoint "
        "with random weights is made once in the cache: its video is noise, it shows the tool works.",
    )
    p.add_argument(
        "--model", help="checkpoint folder or Hugging Face hub id (diffusers layout); default: demo"
    )
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: empty)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's)")
    p.add_argument("--num-frames", type=int, default=None, help="4k+1 frames, e.g. 81 (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument(
        "--guidance-scale-2", type=float, default=None, help="the low-noise expert's guidance (Wan 2.2 A14B)"
    )
    p.add_argument(
        "--image", default=None, help="first frame for image-to-video checkpoints (I2V, FLF2V, TI2V)"
    )
    p.add_argument(
        "--last-image", default=None, help="last frame (first-last-frame: FLF2V, Wan 2.2 I2V-A14B)"
    )
    p.add_argument("--video", default=None, help="input video for video-to-video")
    p.add_argument("--strength", type=float, default=None, help="video-to-video: how much to re-noise (0, 1]")
    p.add_argument(
        "--experts",
        choices=("resident", "swap"),
        default="resident",
        help="Wan 2.2 A14B: keep both experts loaded, or swap one set of weights in place (less memory)",
    )
    p.add_argument(
        "--flow-shift", type=float, default=None, help="schedule shift (default: the checkpoint's)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument(
        "--output",
        default="output.mp4",
        help="output file: .mp4, .webp, .gif, a folder for PNG frames, or .png/.jpg for one frame",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanpipe", description="Wan video generation in PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from wanpipe.serving.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"wanpipe: error: {message}", file=sys.stderr)
    return code


def cmd_generate(args: argparse.Namespace) -> int:
    from wanpipe.context import InvalidRequestError, WanRequest
    from wanpipe.media import Video, output_format_for
    from wanpipe.pipeline import WanOutOfMemoryError, WanPipeline
    from wanpipe.weights.safetensors_io import CheckpointError

    output = Path(args.output)
    # Refuse a bad output path before spending minutes on loading and generating.
    try:
        output_format_for(output, args.num_frames if args.num_frames is not None else 2)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)

    model = args.model
    if model is None:
        from wanpipe.demo import ensure_demo_checkpoint

        model = ensure_demo_checkpoint()
        print(f"no --model given: using the demo checkpoint at {model} (random weights: the video is noise)")

    t0 = time.perf_counter()
    try:
        pipe = WanPipeline.from_pretrained(model, device=args.device, dtype=args.dtype, experts=args.experts)
    except (CheckpointError, FileNotFoundError, NotImplementedError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    load_s = time.perf_counter() - t0

    request = WanRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        flow_shift=args.flow_shift,
        seed=args.seed,
        guidance_scale_2=args.guidance_scale_2,
        image=args.image,
        last_image=args.last_image,
        video=args.video,
        strength=args.strength,
    )
    try:
        context = pipe.tokenizer.make_context(request)
        output_format_for(output, context.num_frames)
    except (InvalidRequestError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    try:
        frames, timings = pipe.run_contexts([context], progress=not args.no_progress)
    except WanOutOfMemoryError as e:
        return _fail(str(e), EXIT_FAILED)
    video = Video(frames=frames[0], fps=context.fps, seed=context.seed)
    t1 = time.perf_counter()
    path = video.save(output)
    save_s = time.perf_counter() - t1
    print(
        f"wrote {path} ({video.num_frames} frames, {video.width}x{video.height}, {video.fps:g} fps, "
        f"seed {context.seed})"
    )
    print(
        f"timings: load {load_s:.2f} s, text encode {timings.text_encode_s:.2f} s, "
        f"denoise {timings.denoise_s:.2f} s ({timings.denoise_s / context.num_inference_steps:.3f} s/step), "
        f"decode {timings.decode_s:.2f} s, save {save_s:.2f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "serve":
        from wanpipe.serving.cli import cmd_serve

        return cmd_serve(args)
    return _fail(
        f"unknown command {args.command}", EXIT_BAD_INPUT
    )  # pragma: no cover - argparse refuses first


if __name__ == "__main__":
    sys.exit(main())
