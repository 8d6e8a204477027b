"""``wanpipe generate --extend VIDEO``: continue a video and write the joined result (docs/long-video.md).

The flags (:func:`add_extend_arguments`) and the run (:func:`run_extend`, called by ``wanpipe generate``
once the model is loaded): ``--num-frames N`` is the number of NEW frames; the output holds the given
frames then the new ones, written atomically like every output.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanpipe import arguments as a

if TYPE_CHECKING:
    from wanpipe.pipeline import WanPipeline

EXTEND_FLAGS: dict[str, str] = {
    "video": "--extend",
    "overlap_frames": "--overlap-frames",
    "clip_frames": "--clip-frames",
}
"""``wanpipe.extend`` parameters -> the flags that set them (for messages)."""

_NOT_WITH_EXTEND = ("image", "video", "mask", "strength")
"""Request fields each clip gets from the video (their flags are refused with --extend)."""


def add_extend_arguments(p: argparse.ArgumentParser) -> None:
    """``--extend``, ``--overlap-frames``, ``--clip-frames``, ``--color-match/--no-color-match``."""
    p.add_argument(
        "--extend",
        type=a.existing_file("video"),
        default=None,
        metavar="VIDEO",
        help="continue this video: --num-frames N new frames after it (I2V, FLF2V with --last-image, TI2V, "
        "VACE checkpoints); the output is the joined video (docs/long-video.md)",
    )
    p.add_argument(
        "--overlap-frames",
        "--vace-frames",
        type=a.integer(1, what="frames"),
        default=None,
        metavar="K",
        help="--extend on VACE: the last K frames each clip keeps and continues (default 5)",
    )
    p.add_argument(
        "--clip-frames",
        type=a.integer(5, what="4k+1 frames per clip, e.g. 81", valid=lambda n: n % 4 == 1),
        default=None,
        metavar="N",
        help="--extend: the longest clip, 4k+1 (default: the model's frame count); longer extensions chain clips",
    )
    p.add_argument(
        "--color-match",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--extend: match each new clip's colours (CIELAB mean/std) to the frames it continues (default on)",
    )


def extend_error(error: Exception) -> str:
    """An extension's refusal with the flags named: ``--extend: ...``, ``--overlap-frames must ...``."""
    from wanpipe.context import InvalidRequestError

    param = getattr(error, "param", None)
    text = str(error)
    for name in ("overlap_frames", "clip_frames"):
        text = re.sub(rf"\b{name}\b", EXTEND_FLAGS[name], text)
    if param == "video":
        return "--extend: " + a.request_error(InvalidRequestError(text.removeprefix("video: ")))
    return a.request_error(InvalidRequestError(text, None if param in EXTEND_FLAGS else param))


def run_extend(
    pipe: WanPipeline,
    args: argparse.Namespace,
    params: dict[str, Any],
    output: Path,
    *,
    first: bool,
    load_s: float,
) -> int:
    """Continue ``args.extend`` with the request flags ``params`` and write the joined video to ``output``;
    the exit code (2 for a bad value, with the flag named)."""
    from wanpipe.context import InvalidRequestError
    from wanpipe.media import output_format_for
    from wanpipe.pipeline import WanOutOfMemoryError

    try:
        output_format_for(output, 2)  # the joined video has several frames: not a single .png / .jpg
    except ValueError as e:
        return a.fail("wanpipe", f"--output: {e}", a.EXIT_BAD_INPUT)

    for name in _NOT_WITH_EXTEND:
        if params.get(name) is not None:
            return a.fail(
                "wanpipe",
                f"{a.REQUEST_FLAGS[name]} does not go with --extend: each clip is conditioned on the video's "
                "last frames (--last-image sets an end frame on first-last-frame checkpoints)",
                a.EXIT_BAD_INPUT,
            )
    request = {k: v for k, v in params.items() if v is not None}
    prompt, num_frames = request.pop("prompt"), request.pop("num_frames", None)
    last_image = request.pop("last_image", None)
    try:
        video = pipe.extend(
            args.extend,
            prompt,
            num_frames,
            overlap_frames=args.overlap_frames,
            clip_frames=args.clip_frames,
            last_image=last_image,
            color_match=args.color_match,
            progress=first and not args.no_progress,
            **request,
        )
    except (InvalidRequestError, ValueError) as e:
        return a.fail("wanpipe", extend_error(e), a.EXIT_BAD_INPUT)
    except WanOutOfMemoryError as e:
        return a.fail("wanpipe", str(e), 1)
    if not first:
        return 0
    t0 = time.perf_counter()
    path = video.save(output)
    t = video.timings or {}
    print(
        f"wrote {path} ({video.num_frames} frames: {args.extend} and its continuation, {video.width}x"
        f"{video.height}, {video.fps:g} fps, seed {video.seed})"
    )
    print(
        f"timings: load {load_s:.2f} s, denoise {t.get('denoise_s', 0.0):.2f} s, decode "
        f"{t.get('decode_s', 0.0):.2f} s, save {time.perf_counter() - t0:.2f} s"
    )
    return 0
