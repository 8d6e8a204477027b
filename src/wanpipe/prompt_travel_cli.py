"""``wanpipe generate --prompt-at START-END:TEXT`` (repeatable): prompt travel, a prompt per range of
video frames for a video made in context windows (docs/long-video.md, "Prompt travel").

Each flag is one inclusive range of video frames; together they set ``WanRequest.prompts`` (the engine
checks that they cover the video without gaps or overlaps, and names ``--prompt-at`` when they do not).
"""

from __future__ import annotations

import argparse
import re

PROMPT_AT_SYNTAX = "START-END:TEXT"
_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*:(.*)", re.DOTALL)


def prompt_at(text: str) -> tuple[int, int, str]:
    """``START-END:TEXT`` -> (start, end, text): whole video frame numbers (inclusive), a non-empty
    prompt after the first ':'. ArgumentTypeError, with the syntax, otherwise."""
    match = _RANGE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected {PROMPT_AT_SYNTAX} (video frames, inclusive, e.g. '0-40:a cat sleeps'), got {text!r}"
        )
    start, end, prompt = int(match[1]), int(match[2]), match[3].strip()
    if end < start:
        raise argparse.ArgumentTypeError(f"the range {start}-{end} ends before it starts, in {text!r}")
    if not prompt:
        raise argparse.ArgumentTypeError(f"the prompt after ':' is empty, in {text!r}")
    return start, end, prompt


def add_prompt_travel_argument(p: argparse.ArgumentParser) -> None:
    """``--prompt-at START-END:TEXT``, repeatable (``args.prompt_at``: a list of (start, end, text))."""
    p.add_argument(
        "--prompt-at",
        type=prompt_at,
        action="append",
        default=None,
        metavar=PROMPT_AT_SYNTAX,
        help="long videos (with --context-frames): the prompt of video frames START..END (inclusive); "
        "repeat it to cover the whole video, each window takes the prompt of its middle frame",
    )
