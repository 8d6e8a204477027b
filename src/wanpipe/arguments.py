"""The command line's argparse pieces, shared by ``generate``, ``serve``, ``convert`` and ``bench``.

A bad value is refused while the command line is parsed, before any model is loaded, in one line that
names the flag and says what is allowed::

    wanpipe serve: error: argument --port: expected a whole number, at least 0 and at most 65535, got '70000'

:class:`Parser` is argparse with that one-line error (no usage block); the ``type=`` functions below
check one value each and raise :class:`argparse.ArgumentTypeError` with the allowed values. Checks that
need two flags (the device and the attention kernel) are in the commands. Nothing here imports torch
until a device is checked.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2
"""Exit code for bad input (argparse's own); 1 is for failures at run time (out of memory, ...)."""

MAX_SEED = 2**63 - 1
"""The largest seed (``torch.Generator.manual_seed`` takes a signed 64-bit integer)."""

MAX_STEPS = 1000
"""The most denoising steps: the 1000 training timesteps (UniPC's integer timesteps repeat beyond)."""

SAMPLER_NAMES = ("unipc", "euler", "lcm", "dmd")
"""``--sampler`` values (``wanpipe.schedulers.SAMPLERS``; this floor imports nothing of wanpipe)."""

DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
"""``--dtype`` values (``wanpipe.pipeline.DTYPES``)."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr, ``PROG: error: MESSAGE``, with
    exit code 2 (no usage block: the message names the flag and what it allows; ``--help`` shows all)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code (2) of a bad command line, its one line printed:
    ``main()`` returns it rather than raising SystemExit. ``--help`` still exits (code 0)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        if not e.code:
            raise
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT


def one_line(message: str) -> str:
    """``message`` on one line: line breaks (tracebacks of libraries, hub errors) become ``"; "``."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``PROG: error: MESSAGE`` (one line) on stderr; returns ``code`` for ``sys.exit``."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return code


# -- numbers ---------------------------------------------------------------------------------------------


def integer(
    minimum: int | None = None,
    maximum: int | None = None,
    what: str = "",
    valid: Callable[[int], bool] | None = None,
) -> Callable[[str], int]:
    """A ``type=`` for whole numbers in [minimum, maximum] for which ``valid`` (if given) is true;
    ``what`` says what the number is (and the rule ``valid`` checks)."""
    allowed = _range_text("a whole number", minimum, maximum) + (f" ({what})" if what else "")

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if (
            (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
            or (valid is not None and not valid(value))
        ):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: float | None = None,
    what: str = "",
) -> Callable[[str], float]:
    """A ``type=`` for finite numbers in [minimum, maximum] (``above``: strictly greater than it)."""
    if above is not None:
        allowed = f"a number above {_num(above)}" + (
            f", at most {_num(maximum)}" if maximum is not None else ""
        )
    else:
        allowed = _range_text("a finite number", minimum, maximum)
    allowed += f" ({what})" if what else ""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
            or (above is not None and value <= above)
        ):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind}, at least {_num(minimum)} and at most {_num(maximum)}"
    if minimum is not None:
        return f"{kind}, at least {_num(minimum)}"
    if maximum is not None:
        return f"{kind}, at most {_num(maximum)}"
    return kind


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def finite_numbers(text: str) -> list[float] | None:
    """Comma-separated finite numbers (``1.5,-2,3e2``) -> the list; None when any part is not one."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def number_list(maximum: float, what: str) -> Callable[[str], list[float]]:
    """A ``type=`` for comma-separated numbers, e.g. ``0.9,0.6,0.3``: each finite and in (0, maximum],
    strictly decreasing (a schedule's sigmas or timesteps); ``what`` says what they are."""
    allowed = f"comma-separated numbers in (0, {_num(maximum)}], strictly decreasing ({what})"

    def parse(text: str) -> list[float]:
        values = finite_numbers(text)
        if (
            values is None
            or not all(0 < v <= maximum for v in values)
            or any(b >= a for a, b in zip(values, values[1:]))
        ):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return values

    parse.__name__ = "list"
    return parse


# -- text ------------------------------------------------------------------------------------------------


def choice(values: tuple[str, ...], what: str) -> Callable[[str], str]:
    """A ``type=`` for one of ``values`` (``what``: what they are)."""

    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"expected a {what}: {', '.join(values)}; got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


def non_empty(what: str) -> Callable[[str], str]:
    """A ``type=`` for text that must not be empty or blank."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty value")
        return text

    parse.__name__ = "text"
    return parse


def api_key(text: str) -> str:
    """``--api-key``: printable ASCII without spaces (what an ``Authorization: Bearer`` header carries)."""
    if not text:
        raise argparse.ArgumentTypeError(
            "the key is empty; give a key, or leave --api-key out to serve without one"
        )
    if not re.fullmatch(r"[\x21-\x7e]+", text):
        raise argparse.ArgumentTypeError(
            "expected printable ASCII without spaces (it is sent as 'Authorization: Bearer KEY')"
        )
    return text


def dtype(text: str) -> str:
    """``--dtype``: one of ``DTYPE_NAMES`` (any case); returned as given."""
    if text.lower() not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(
            f"expected float32, bfloat16 or float16 (or fp32, bf16, fp16), got {text!r}"
        )
    return text


LORA_SYNTAX = "FILE[:SCALE][@high|low|both]"


def parse_lora_arg(text: str) -> tuple[str, float, str]:
    """``FILE[:SCALE][@high|low|both]`` -> (file, scale, expert). ValueError, naming the syntax, for a
    SCALE that is not a finite number or an expert other than high, low or both. An existing file is
    taken whole (its name may hold ':' or '@'); a tail holding '/' is part of the path."""
    if Path(text).expanduser().is_file():
        return text, 1.0, "both"
    rest, expert = text, "both"
    if "@" in rest:
        head, tail = rest.rsplit("@", 1)
        if tail in ("high", "low", "both"):
            rest, expert = head, tail
        elif "/" not in tail:
            raise ValueError(f"'@{tail}' is not @high, @low or @both (expected {LORA_SYNTAX}), in {text!r}")
    scale = 1.0
    if ":" in rest and not Path(rest).expanduser().is_file():
        head, tail = rest.rsplit(":", 1)
        if "/" not in tail:
            try:
                scale = float(tail)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise ValueError(
                    f"SCALE {tail!r} is not a finite number (expected {LORA_SYNTAX}, e.g. "
                    f"style.safetensors:0.8@high), in {text!r}"
                )
            rest = head
    return rest, scale, expert


def lora_spec(text: str) -> str:
    """``--lora``'s ``type=``: the syntax and the file checked; the text returned as given."""
    try:
        path, _, _ = parse_lora_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"no such LoRA file: {path!r} (expected {LORA_SYNTAX})")
    return text


# -- the engine's messages -------------------------------------------------------------------------------


def request_error(error: Exception) -> str:
    """The engine's message for a refused request with the flags named instead of the request fields:
    ``num_frames must be 4k+1 ...`` -> ``--num-frames must be 4k+1 ...``."""
    text = _field_names().sub(lambda m: REQUEST_FLAGS[m[1]], str(error))
    text = re.sub(r"\b(pass|needs) (image|video)\b", lambda m: f"{m[1]} {REQUEST_FLAGS[m[2]]}", text)
    param = getattr(error, "param", None)
    flag = REQUEST_FLAGS.get(param or "")
    if flag is None or text.startswith(flag):
        return text
    if text.startswith((f"{param} ", f"{param}:")):
        return flag + text[len(param) :]
    return f"{flag}: {text}"


# -- files -----------------------------------------------------------------------------------------------


def existing_file(what: str) -> Callable[[str], str]:
    """A ``type=`` for a file that must exist (``what``: "image", "VAE" ...); returned as given."""

    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if path.is_dir():
            article = "an" if what[0] in "aeiou" else "a"
            raise argparse.ArgumentTypeError(f"expected {article} {what} file, got a folder: {text!r}")
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no such {what} file: {text!r}")
        return text

    parse.__name__ = "file"
    return parse


def file_or_folder(what: str) -> Callable[[str], str]:
    """A ``type=`` for a file or folder that must exist."""

    def parse(text: str) -> str:
        if not Path(text).expanduser().exists():
            raise argparse.ArgumentTypeError(f"no such {what} file or folder: {text!r}")
        return text

    parse.__name__ = "path"
    return parse


def animate_mode(text: str) -> str:
    """A ``type=`` for Animate's ``--mode``: animate or replace."""
    if text.strip() not in ("animate", "replace"):
        raise argparse.ArgumentTypeError(f"expected animate or replace, got {text!r}")
    return text.strip()


def existing_folder(what: str) -> Callable[[str], str]:
    """A ``type=`` for a folder that must exist; returned as given."""

    def parse(text: str) -> str:
        if not Path(text).expanduser().is_dir():
            raise argparse.ArgumentTypeError(f"no such {what} folder: {text!r}")
        return text

    parse.__name__ = "folder"
    return parse


def folder_or_hub_id(what: str) -> Callable[[str], str]:
    """A ``type=`` for a local folder or a Hugging Face hub id ``owner/name`` (checked when loading)."""

    def parse(text: str) -> str:
        path = Path(text).expanduser()
        if path.is_dir():
            return text
        if path.exists():
            raise argparse.ArgumentTypeError(f"{text!r} is a file; expected {what} folder or a hub id")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
            raise argparse.ArgumentTypeError(
                f"no such folder {text!r}, and it is not a Hugging Face hub id ('owner/name'); "
                f"expected {what} folder or a hub id"
            )
        return text

    parse.__name__ = "path"
    return parse


def output_folder(text: str) -> str:
    """A ``type=`` for a folder to write into: an existing folder, or a path that can be made one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty value")
    problem = output_problem(Path(text), folder=True)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_problem(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written (a folder when ``folder``, else a file), or None: an existing
    path of the wrong kind, a parent that is a file, or a folder this process may not write to."""
    path = path.expanduser()
    if path.exists():
        if folder and not path.is_dir():
            return f"{str(path)!r} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{str(path)!r} is a folder, not a file"
        if not os.access(path, os.W_OK):
            return f"{str(path)!r} is not writable"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {str(path)!r}: {str(parent)!r} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(path)!r}: the folder {str(parent)!r} is not writable"
    return None


# -- devices ---------------------------------------------------------------------------------------------


def device(text: str) -> str:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` (or ``mps``, ``xpu``) that this machine and this
    build of torch have; returned as given."""
    import torch

    allowed = "use cpu, cuda or cuda:N (mps, xpu where available)"
    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; {allowed}") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(
                f"{text}: this build of torch has no CUDA (torch {torch.__version__}); use --device cpu, "
                "or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if count == 0 or not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: no CUDA device is visible (torch {torch.__version__}, CUDA {torch.version.cuda}; "
                "check the driver and CUDA_VISIBLE_DEVICES); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        return text
    backend = {"mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}.get(dev.type)
    if backend is None:
        raise argparse.ArgumentTypeError(f"wanpipe does not run on {text!r}; {allowed}")
    if not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no {dev.type} device here; use --device cpu")
    return text


# -- the request's flags ---------------------------------------------------------------------------------


def scales(text: str) -> float | list[float]:
    """``--conditioning-scale``: ``X`` (every VACE layer) or ``X,Y,...`` (one per VACE layer)."""
    values = finite_numbers(text)
    if values is None:
        raise argparse.ArgumentTypeError(
            f"expected a finite number X, or X,Y,... one per VACE layer, got {text!r}"
        )
    return values[0] if len(values) == 1 else values


_PIXELS = integer(1, what="pixels; a multiple of 16, of 32 for Wan 2.2 TI2V-5B")

REQUEST_ARGUMENTS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("prompt", "--prompt", non_empty("a prompt"), "what the video shows"),
    (
        "negative_prompt",
        "--negative-prompt",
        str,
        "what to steer away from (default: empty; original folders: the original config's)",
    ),
    ("height", "--height", _PIXELS, "pixels, a multiple of 16 (default: the model's)"),
    ("width", "--width", _PIXELS, "pixels, a multiple of 16 (default: the model's)"),
    (
        "num_frames",
        "--num-frames",
        integer(1, what="4k+1 frames: 1, 5, 9, ..., 81"),
        "4k+1 frames, e.g. 81 (default: the model's)",
    ),
    (
        "num_inference_steps",
        "--steps",
        integer(1, MAX_STEPS, what="denoising steps"),
        "denoising steps (default: the model's)",
    ),
    ("guidance_scale", "--guidance-scale", number(0), "classifier-free guidance scale"),
    ("guidance_scale_2", "--guidance-scale-2", number(0), "the low-noise expert's guidance (Wan 2.2 A14B)"),
    (
        "image",
        "--image",
        existing_file("image"),
        "first frame for image-to-video checkpoints (I2V, FLF2V, TI2V)",
    ),
    (
        "last_image",
        "--last-image",
        existing_file("image"),
        "last frame (first-last-frame: FLF2V, Wan 2.2 I2V-A14B)",
    ),
    (
        "video",
        "--video",
        existing_file("video"),
        "input video for video-to-video; on VACE checkpoints the control / source video",
    ),
    ("strength", "--strength", number(above=0, maximum=1), "video-to-video: how much to re-noise (0, 1]"),
    ("flow_shift", "--flow-shift", number(above=0), "schedule shift (default: the checkpoint's)"),
    ("seed", "--seed", integer(0, MAX_SEED), "random seed (default: random, printed)"),
    (
        "sampler",
        "--sampler",
        choice(SAMPLER_NAMES, "sampler"),
        "unipc, euler, lcm or dmd (default: the checkpoint's scheduler; docs/fast-sampling.md)",
    ),
    (
        "sigmas",
        "--sigmas",
        number_list(1, "one sigma per step"),
        "the schedule's own sigmas, e.g. 0.9,0.6,0.3 (used as given, not shifted; sets the step count)",
    ),
    (
        "timesteps",
        "--timesteps",
        number_list(1000, "one timestep per step, sigma = t/1000"),
        "the schedule's own timesteps, e.g. 1000,750,500,250 (sigma = t/1000, not shifted)",
    ),
    (
        "mask",
        "--mask",
        existing_file("mask"),
        "VACE: an image (every frame) or a video, white = generate, black = keep (docs/vace.md)",
    ),
    (
        "reference_images",
        "--reference-image",
        existing_file("image"),
        "VACE: a reference image (a subject, face or object to show); repeatable",
    ),
    (
        "conditioning_scale",
        "--conditioning-scale",
        scales,
        "VACE: the control's strength, X or X,Y,... one per VACE layer (default 1)",
    ),
    # Wan2.2-Animate (docs/animate.md): --image is the character; --preprocessed DIR fills these in
    ("pose_video", "--pose-video", existing_file("video"), "Animate: the driving pose video (src_pose.mp4)"),
    ("face_video", "--face-video", existing_file("video"), "Animate: the driving face video (src_face.mp4)"),
    (
        "background_video",
        "--background-video",
        existing_file("video"),
        "Animate, --mode replace: the driving video without its person (src_bg.mp4)",
    ),
    (
        "mask_video",
        "--mask-video",
        existing_file("video"),
        "Animate, --mode replace: white where the character goes (src_mask.mp4)",
    ),
    ("mode", "--mode", animate_mode, "Animate: animate (default) the character, or replace the person"),
    (
        "segment_frame_length",
        "--segment-frame-length",
        integer(5, what="4k+1 frames per segment, e.g. 77", valid=lambda n: n % 4 == 1),
        "Animate: frames per generated segment, 4k+1 (default 77)",
    ),
    (
        "prev_segment_conditioning_frames",
        "--prev-segment-frames",
        integer(1, what="1 or 5", valid=lambda n: n in (1, 5)),
        "Animate: frames each segment continues from, 1 or 5 (default 1)",
    ),
    ("context_frames", "--context-frames", integer(1), "long videos: window length, 4k+1 video frames"),
    ("context_overlap", "--context-overlap", integer(1), "long videos: frames windows share, 4k"),
    ("context_schedule", "--context-schedule", str, "uniform_standard, uniform_looped or static_standard"),
    ("context_blend", "--context-blend", str, "long videos: window weights, linear (default) or pyramid"),
    ("decoder", "--decoder", choice(("vae", "tiny"), "decoder"), "vae, or tiny: TAEHV (needs --tiny-vae)"),
)
"""``generate``'s request flags: (WanRequest field, flag, type=, help), default None (``--prompt`` required)."""

REQUEST_ALIASES: dict[str, tuple[str, ...]] = {"video": ("--control-video",)}
"""More flags for a request field (the first flag of ``REQUEST_ARGUMENTS`` names it in messages)."""

REQUEST_REPEATED = ("reference_images",)  # request fields whose flag may be given several times (a list)

REQUEST_FLAGS: dict[str, str] = {
    **{field: flag for field, flag, _, _ in REQUEST_ARGUMENTS},
    # the approximations, also runtime options (wanpipe.runtime.options.add_runtime_arguments)
    "residual_threshold": "--residual-threshold",
    "cfg_truncation": "--cfg-truncation",
    "preset": "--preset",  # a few-step setting (wanpipe.presets), added by the generate command (--preset list)
    "preview_every": "--preview-every",  # added by the generate command, next to --preview
    "prompts": "--prompt-at",  # prompt travel, added by the generate command (wanpipe.prompt_travel_cli)
}
"""``WanRequest`` fields -> the ``generate`` flags that set them: ``wanpipe generate`` builds its request
from this table, and names the flag in the engine's error messages."""


def _field_names() -> re.Pattern[str]:
    """The request fields as words, longest first (``guidance_scale_2`` before ``guidance_scale``)."""
    names = sorted((k for k in REQUEST_FLAGS if "_" in k), key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(names) + r")\b")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``: which checkpoint runs where (``generate`` and ``serve``)."""
    p.add_argument(
        "--model",
        type=folder_or_hub_id("a checkpoint"),
        help="checkpoint folder or Hugging Face hub id (diffusers layout); default: demo",
    )
    p.add_argument(
        "--device", type=device, default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)"
    )
    p.add_argument(
        "--dtype",
        type=dtype,
        default=None,
        help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)",
    )
