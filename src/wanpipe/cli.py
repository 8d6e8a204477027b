"""The ``wanpipe`` command: ``wanpipe generate ...``, ``wanpipe convert ...``, ``wanpipe serve ...``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wanpipe import arguments as a
from wanpipe.context import DEFAULT_PREVIEW_EVERY, Preview
from wanpipe.extend_cli import add_extend_arguments
from wanpipe.parallel.options import add_parallel_arguments, parallel_config, vae_halo
from wanpipe.prompt_travel_cli import add_prompt_travel_argument
from wanpipe.weights.taehv import add_tiny_vae_argument

if TYPE_CHECKING:
    import torch

    from wanpipe.context import WanRequest
    from wanpipe.parallel.mesh import ParallelConfig

EXIT_BAD_INPUT = a.EXIT_BAD_INPUT
EXIT_FAILED = 1


class _PresetAction(argparse.Action):
    """``--preset NAME``: a known preset's name, checked while parsing (before any model is loaded);
    ``--preset list`` prints the presets and exits 0. Whether it fits the model is checked once loaded."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from wanpipe.presets import PRESETS, format_presets

        if values == "list":
            print(format_presets())
            parser.exit(0)
        if values not in PRESETS:
            raise argparse.ArgumentError(
                self, f"unknown preset {values!r}; the presets are: {', '.join(PRESETS)} (or list)"
            )
        setattr(namespace, self.dest, values)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from a prompt",
        description="Generate a video with a Wan checkpoint. Without --model, a small built-in demo checkpoint "
        "with random weights is made once in the cache: its video is noise, it shows the tool works.",
    )
    a.add_model_arguments(p)
    add_tiny_vae_argument(p)
    add_prompt_travel_argument(p)
    for field, flag, kind, text in a.REQUEST_ARGUMENTS:
        p.add_argument(
            flag,
            *a.REQUEST_ALIASES.get(field, ()),
            type=kind,
            default=None,
            required=field == "prompt",
            help=text,
            action="append" if field in a.REQUEST_REPEATED else "store",
        )
    p.add_argument(
        "--preset",
        action=_PresetAction,
        default=None,
        metavar="NAME",
        help="a published few-step setting (steps, sampler, step list, shift, guidance) for distilled "
        "weights; explicit flags override it; --preset list prints them",
    )
    p.add_argument(
        "--preprocessed",
        type=a.existing_folder("preprocessed"),
        default=None,
        metavar="DIR",
        help="Animate: the --save_path folder of Wan2.2's preprocessing script (src_ref.png, src_pose.mp4, "
        "src_face.mp4; src_bg.mp4 and src_mask.mp4 select --mode replace); flags given win",
    )
    p.add_argument(
        "--experts",
        choices=("resident", "swap"),
        default="resident",
        help="Wan 2.2 A14B: keep both experts loaded, or swap one set of weights in place (less memory)",
    )
    p.add_argument(
        "--output",
        type=a.non_empty("a file or folder"),
        default="output.mp4",
        help="output file: .mp4, .webp, .gif, a folder for PNG frames, or .png/.jpg for one frame",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--preview",
        type=_webp_file,
        default=None,
        metavar="FILE.webp",
        help="write a live preview of the video as it forms (animated WebP, rewritten atomically)",
    )
    p.add_argument(
        "--preview-every",
        type=a.integer(1, what="denoising steps"),
        default=None,
        metavar="N",
        help=f"steps between live previews, and the last step (default {DEFAULT_PREVIEW_EVERY})",
    )
    add_extend_arguments(p)
    add_parallel_arguments(p)
    from wanpipe.runtime.options import add_runtime_arguments

    add_runtime_arguments(p)
    _add_weight_sources(p)
    p.add_argument(
        "--lora",
        action="append",
        type=a.lora_spec,
        default=[],
        metavar="FILE[:SCALE][@high|low|both]",
        help="merge a LoRA adapter (diffusers/peft, original-Wan or kohya names); repeatable",
    )
    p.add_argument(
        "--fp8",
        choices=("upcast", "dequantize", "quantize", "scaled_mm"),
        default=None,
        help="how fp8 weights run: upcast per layer (default for fp8 files), dequantize at load, quantize "
        "a bf16 DiT to fp8, or fp8 matmuls (scaled_mm, CUDA capability >= 8.9)",
    )
    p.add_argument(
        "--sigma-grid",
        choices=("diffusers", "original"),
        default=None,
        help="sigma grid: diffusers' or the original Wan repositories' (default: the checkpoint layout's)",
    )


WEIGHT_FILES: tuple[tuple[str, Callable[[str], str], bool, str], ...] = (
    ("--transformer", a.file_or_folder("DiT"), True, "the DiT (file(s) or folder)"),
    ("--transformer-2", a.file_or_folder("DiT"), True, "Wan 2.2 A14B low-noise DiT"),
    ("--vae", a.existing_file("VAE"), False, "the VAE file"),
    ("--text-encoder", a.existing_file("text encoder"), False, "the UMT5 encoder file"),
    ("--image-encoder", a.existing_file("image encoder"), False, "CLIP vision file (Wan 2.1 I2V)"),
)
"""The single-file flags: (flag, ``type=``, several files allowed, help)."""


def _webp_file(text: str) -> str:
    if Path(text).suffix.lower() != ".webp":
        raise argparse.ArgumentTypeError(f"a .webp file name, got {text!r}")
    return text


def _add_weight_sources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("single files (instead of --model: ComfyUI or original files, any naming)")
    for flag, kind, several, text in WEIGHT_FILES:
        g.add_argument(
            flag, nargs="+" if several else None, type=kind, default=None, metavar="FILE", help=text
        )
    g.add_argument(
        "--tokenizer",
        type=a.folder_or_hub_id("a tokenizer"),
        default=None,
        help="tokenizer folder or hub id (default: google/umt5-xxl)",
    )


def _single_files(args: argparse.Namespace) -> dict[str, object]:
    return {
        "transformer": args.transformer,
        "transformer_2": args.transformer_2,
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "image_encoder": args.image_encoder,
        "tokenizer": args.tokenizer,
    }


def _byte_size(text: str) -> int:
    """``--max-shard-size``'s ``type=``: ``5GB``, ``200MB``, ``64KB`` or bytes (``parse_size``)."""
    from wanpipe.weights.convert import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="write a checkpoint in the diffusers or the original Wan layout",
        description="Read a checkpoint in any layout wanpipe reads (diffusers folder, original Wan folder, "
        "single files) and write it as a diffusers-layout folder (sharded safetensors) or an original one.",
    )
    p.add_argument(
        "model",
        nargs="?",
        type=a.folder_or_hub_id("a checkpoint"),
        default=None,
        help="checkpoint folder or hub id (or use the file flags)",
    )
    _add_weight_sources(p)
    p.add_argument("--to", choices=("diffusers", "original"), default="diffusers", help="the layout to write")
    p.add_argument("--output", required=True, type=a.output_folder, help="the folder to write")
    p.add_argument(
        "--dtype", type=a.dtype, default=None, help="cast weights (default: keep; fp8 becomes bfloat16)"
    )
    p.add_argument(
        "--max-shard-size",
        type=_byte_size,
        default="5GB",
        help="largest safetensors shard (e.g. 5GB, 200MB)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = a.Parser(prog="wanpipe", description="Wan video generation in PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    from wanpipe.bench import add_bench_parser
    from wanpipe.serving.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    return parser


def _fail(message: str, code: int) -> int:
    return a.fail("wanpipe", message, code)


_COMPONENT = re.compile(r"^(transformer_2|transformer|vae|text_encoder|image_encoder|tokenizer|tiny_vae): ")


def _load_error(error: Exception, model: str | None, flag: str = "--model") -> str:
    """A checkpoint that does not load, with the flag that named it: ``--model: ...``, ``--vae: ...``."""
    text = str(error)
    if model is not None and not text.startswith("tiny_vae: "):
        return f"{flag}: {text}"
    return _COMPONENT.sub(lambda m: f"--{m[1].replace('_', '-')}: ", text)


def _check_generate(args: argparse.Namespace) -> str | None:
    """What is wrong with a ``generate`` command line as a whole (flags that do not go together, or
    not on this device), before anything is loaded; None when nothing is."""
    files = [f"--{k.replace('_', '-')}" for k, v in _single_files(args).items() if v is not None]
    if args.model is not None and files:
        return f"give --model or single files ({', '.join(files)}), not both"
    if args.preview_decoder == "tiny" and args.tiny_vae is None:
        return "--preview-decoder tiny needs the tiny VAE: --tiny-vae PATH (or use linear / auto)"
    from wanpipe.runtime.options import cache_arguments_problem

    problem = cache_arguments_problem(args)
    if problem is not None:
        return problem
    import torch

    device = torch.device(args.device) if args.device is not None else None
    if device is None and not torch.cuda.is_available():
        device = torch.device("cpu")
    if device is None or device.type != "cpu":
        return None  # a GPU: its kernels are checked for the model's shapes at the first request
    backend = args.attention_backend
    if backend not in ("auto", "math"):
        from wanpipe.runtime.attention import cpu_attention_backends

        usable = cpu_attention_backends()
        if backend not in usable:
            return (
                f"--attention-backend {backend}: PyTorch has no {backend} attention kernel on the CPU; use "
                f"{', '.join(usable)} there ({backend} is a CUDA kernel)"
            )
    if args.fp8 == "scaled_mm":
        return (
            "--fp8 scaled_mm: fp8 matmuls need a CUDA GPU of compute capability >= 8.9; on the CPU use "
            "--fp8 upcast or dequantize"
        )
    return None


def _grid_problem(arch, request) -> str | None:
    """A size or frame count beyond the DiT's position table (``rope_max_seq_len`` tokens per axis),
    which the model would refuse mid-run; None when the request fits."""
    limit, pt = arch.transformer.rope_max_seq_len, arch.transformer.patch_size[0]
    largest = {
        "--height": limit * arch.spatial_multiple,
        "--width": limit * arch.spatial_multiple,
        "--num-frames": (limit * pt - 1) * arch.temporal_stride + 1,
    }
    for flag, value in zip(largest, (request.height, request.width, request.num_frames)):
        if value > largest[flag]:
            return (
                f"{flag} must be at most {largest[flag]} for this model (its position table covers {limit} "
                f"tokens per axis), got {value}"
            )
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    """``wanpipe generate``; under torchrun (WORLD_SIZE > 1) every rank runs it, with the DiT split
    across the ranks (``--ulysses/--ring/--cfg-parallel``) and rank 0 alone printing and writing."""
    problem = _check_generate(args)
    if problem is not None:
        return _fail(problem, EXIT_BAD_INPUT)
    try:
        config = parallel_config(args)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    if config is None:
        return _generate(args, None)

    import torch.distributed as dist

    from wanpipe.parallel.mesh import init_distributed

    owned = not dist.is_initialized()  # destroy the process group only if this call made it
    try:
        device = init_distributed()
        return _generate(args, config, device)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _generate(
    args: argparse.Namespace, parallel: ParallelConfig | None = None, rank_device: torch.device | None = None
) -> int:
    """The generation itself, through ``WanPipeline.generate`` as from Python; ``parallel``: the layout
    of a torch.distributed run (or None), ``rank_device``: this rank's device from ``init_distributed``
    (used unless --device is given)."""
    import torch.distributed as dist

    from wanpipe.context import InvalidRequestError, WanRequest
    from wanpipe.media import output_format_for
    from wanpipe.pipeline import WanOutOfMemoryError, WanPipeline
    from wanpipe.runtime.attention import AttentionBackendError
    from wanpipe.weights.safetensors_io import CheckpointError

    first = parallel is None or not dist.is_initialized() or dist.get_rank() == 0  # prints and writes

    output = Path(args.output)
    # Refuse a bad output path before spending minutes on loading and generating.
    try:
        fmt = output_format_for(output, args.num_frames if args.num_frames is not None else 2)
    except ValueError as e:
        return _fail(f"--output: {e}", EXIT_BAD_INPUT)
    problem = a.output_problem(output, folder=fmt == "png-folder")
    if problem is not None:
        return _fail(f"--output: {problem}", EXIT_BAD_INPUT)
    problem = args.preview and a.output_problem(Path(args.preview), folder=False)
    if problem:
        return _fail(f"--preview: {problem}", EXIT_BAD_INPUT)

    model = args.model
    files = _single_files(args)
    use_files = model is None and any(v is not None for k, v in files.items() if k != "tokenizer")
    if model is None and not use_files:
        from wanpipe.demo import ensure_demo_checkpoint

        model = ensure_demo_checkpoint()
        if first:
            print(
                f"no --model given: using the demo checkpoint at {model} (random weights: the video is noise)"
            )

    import torch

    from wanpipe.pipeline import default_device
    from wanpipe.runtime.options import options_from_args

    t0 = time.perf_counter()
    try:
        if args.device is not None:
            device = torch.device(args.device)
        else:
            device = rank_device if rank_device is not None else default_device()
        # Under torchrun rank 0 alone encodes the prompts (and broadcasts them): the others skip UMT5.
        options = dict(
            device=device,
            dtype=args.dtype,
            experts=args.experts,
            fp8=args.fp8,
            load_text_encoder=first,
            runtime=options_from_args(args),
            parallel=parallel,
            vae_halo=vae_halo(args) if parallel is not None else None,
            tiny_vae=args.tiny_vae,
        )
        if model is None:
            if args.sigma_grid is not None:
                options["sigma_grid"] = args.sigma_grid
            single = {k: v for k, v in files.items() if k != "tokenizer"}
            missing = [
                f"--{k.replace('_', '-')}" for k in ("transformer", "vae", "text_encoder") if not single[k]
            ]
            if missing:
                return _fail(f"single files need {', '.join(missing)} too", EXIT_BAD_INPUT)
            pipe = WanPipeline.from_single_files(**files, **options)
        else:
            pipe = WanPipeline.from_pretrained(model, sigma_grid=args.sigma_grid, **options)
    except (CheckpointError, FileNotFoundError) as e:
        return _fail(_load_error(e, model), EXIT_BAD_INPUT)
    except InvalidRequestError as e:  # the runtime's step cache (--cache, --cache-option) on this model
        flag = "--cache-option" if e.param == "cache_options" else "--cache"
        return _fail(f"{flag}: {str(e).removeprefix('cache_options: ')}", EXIT_BAD_INPUT)
    except (NotImplementedError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    for spec in args.lora:
        try:
            path, scale, expert = a.parse_lora_arg(spec)
            report = pipe.load_lora(path, scale, expert)
        except (CheckpointError, FileNotFoundError, NotImplementedError, ValueError) as e:
            return _fail(f"--lora {spec}: {str(e).removeprefix('lora: ')}", EXIT_BAD_INPUT)
        if not first:
            continue
        print(f"LoRA {report.name}: {len(report.layers)} layers x {scale:g} ({'+'.join(report.experts)})")
        if report.unmatched:
            print(
                f"LoRA {report.name}: {len(report.unmatched)} keys matched no layer: {report.unmatched[:10]}"
            )
    load_s = time.perf_counter() - t0

    # The request, field by field from the flags that set it (the table also names flags in errors).
    params = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in a.REQUEST_FLAGS.items()}
    if args.preprocessed is not None:  # Animate: the preprocessing script's files, unless flags name others
        from wanpipe.animate_request import preprocessed_inputs

        try:
            found = preprocessed_inputs(args.preprocessed)
        except FileNotFoundError as e:
            return _fail(f"--preprocessed: {e}", EXIT_BAD_INPUT)
        if params["mode"] == "animate":  # the folder's background and mask are for replace mode
            found = {k: v for k, v in found.items() if k not in ("background_video", "mask_video", "mode")}
        params.update({k: v for k, v in found.items() if params[k] is None})
    if args.extend is not None:  # continue a video (wanpipe.extend_cli): the joined video is written
        from wanpipe.extend_cli import run_extend

        return run_extend(pipe, args, params, output, first=first, load_s=load_s)
    try:
        resolved = pipe.check(WanRequest(**params))
    except (InvalidRequestError, ValueError) as e:
        return _fail(a.request_error(e), EXIT_BAD_INPUT)
    problem = _grid_problem(pipe.arch, resolved)
    if problem is not None:
        return _fail(problem, EXIT_BAD_INPUT)
    try:
        output_format_for(output, resolved.num_frames)
    except ValueError as e:
        return _fail(f"--output: {e}", EXIT_BAD_INPUT)
    from wanpipe.streaming import generate_to_file

    try:  # the frames go into the file as they are decoded; rank 0 writes, the others drop them
        preview = _preview_writer(Path(args.preview)) if args.preview and first else None
        video = generate_to_file(
            pipe,
            WanRequest(**params),
            output if first else None,
            progress=first and not args.no_progress,
            preview=preview,
        )
    except WanOutOfMemoryError as e:
        return _fail(str(e), EXIT_FAILED)
    except AttentionBackendError as e:  # the kernel cannot run this model's shapes on this device
        return _fail(f"--attention-backend {args.attention_backend}: {e}", EXIT_BAD_INPUT)
    if not first:
        return 0  # rank 0 writes the video; every rank decodes the same frames
    t = video.timings
    print(
        f"wrote {video.path} ({video.num_frames} frames, {video.width}x{video.height}, {video.fps:g} fps, "
        f"seed {video.seed}{', decoder tiny' if video.decoder == 'tiny' else ''})"
    )
    print(
        f"timings: load {load_s:.2f} s, text encode {t['text_encode_s']:.2f} s, "
        f"condition {t['condition_s']:.2f} s, denoise {t['denoise_s']:.2f} s "
        f"({t['denoise_s'] / (resolved.num_inference_steps * _segments(resolved)):.3f} s/step), "
        f"decode {t['decode_s']:.2f} s (written as decoded), save {t['save_s']:.2f} s"
        + (f", compile {t['compile_s']:.2f} s" if t["compile_s"] else "")
        + (f"; {t['skipped_steps']} steps skipped by the step cache" if t["skipped_steps"] else "")
        + (f"; attention {t['attention']}" if t["attention"] else "")
    )
    if t.get("cache_calibration"):
        target = (pipe.executor.runtime.cache_options or {}).get("calibration_file")
        ratios = json.dumps(t["cache_calibration"])
        print(f"MagCache calibration: mag_ratios written to {target}" if target else f"mag_ratios: {ratios}")
    return 0


def _preview_writer(path: Path) -> Callable[[Preview], None]:
    """``--preview``: each preview rewrites ``path`` (temporary file + rename: never half written)."""
    from wanpipe.media import encode_webp, write_atomic

    def write(preview: Preview) -> None:
        write_atomic(path, encode_webp(preview.frames, preview.fps))

    return write


def _segments(request: WanRequest) -> int:
    """How many segments a resolved request is made in (Animate's long driving videos; else 1)."""
    if request.segment_frame_length is None or request.prev_segment_conditioning_frames is None:
        return 1
    from wanpipe.animate_request import segment_plan

    length, prev = request.segment_frame_length, request.prev_segment_conditioning_frames
    return segment_plan(request.num_frames or 1, length, prev)[1]


def cmd_convert(args: argparse.Namespace) -> int:
    from wanpipe.pipeline import parse_dtype
    from wanpipe.weights.components import open_checkpoint
    from wanpipe.weights.convert import write_diffusers, write_original
    from wanpipe.weights.safetensors_io import CheckpointError

    files = _single_files(args)
    given = [f"--{k.replace('_', '-')}" for k, v in files.items() if v is not None]
    if args.model is not None and given:
        return _fail(
            f"give a checkpoint (MODEL) or single files ({', '.join(given)}), not both", EXIT_BAD_INPUT
        )
    missing = [f"--{k.replace('_', '-')}" for k in ("transformer", "vae", "text_encoder") if files[k] is None]
    if args.model is None and missing:
        return _fail(
            f"give a checkpoint (MODEL), or single files --transformer, --vae and --text-encoder "
            f"(missing: {', '.join(missing)})",
            EXIT_BAD_INPUT,
        )
    t0 = time.perf_counter()
    try:
        if args.model is None:
            files = {**files, "transformer": args.transformer, "transformer_2": args.transformer_2}
        arch, weights = open_checkpoint(args.model, **files)
        dtype = parse_dtype(args.dtype, __import__("torch").device("cpu")) if args.dtype else None
        write = write_diffusers if args.to == "diffusers" else write_original
        out = write(arch, weights, args.output, dtype=dtype, max_shard_size=args.max_shard_size)
    except (CheckpointError, FileNotFoundError) as e:
        return _fail(_load_error(e, args.model, "model"), EXIT_BAD_INPUT)
    except (NotImplementedError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    print(f"wrote {out} ({args.to} layout, {arch.variant.name}) in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = a.parse(build_parser(), argv)
    if isinstance(args, int):
        return args  # a bad command line, already said in one line
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "convert":
        return cmd_convert(args)
    if args.command == "serve":
        from wanpipe.serving.cli import cmd_serve

        return cmd_serve(args)
    if args.command == "bench":
        from wanpipe.bench import cmd_bench

        return cmd_bench(args)
    return _fail(
        f"unknown command {args.command}", EXIT_BAD_INPUT
    )  # pragma: no cover - argparse refuses first


if __name__ == "__main__":
    sys.exit(main())
