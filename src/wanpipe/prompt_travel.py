"""Prompt travel: a prompt per range of video frames for a request with context windows
(docs/long-video.md, "Prompt travel").

``WanRequest.prompts`` is a list of ``(start, end, prompt)``: inclusive ranges of VIDEO frames that
cover the whole video, in order, without gaps or overlaps. :func:`resolve_prompts` (called by
:meth:`WanTokenizer.resolve <wanpipe.tokenizer.WanTokenizer.resolve>`) checks them; :func:`make_travel`
(called by ``make_context``) tokenizes each distinct prompt once and maps every latent frame to its
prompt. The text stage encodes the distinct prompts (:meth:`~wanpipe.stages.text.TextStage.travel`) and
each window's DiT call takes the embeddings of the prompt of the window's middle frame
(:func:`~wanpipe.stages.windows.windowed_forward`).

The reference, ComfyUI-WanVideoWrapper (``nodes.py`` at commit
721cd65e7b5224c70a3d20446d9d561f1732216b: ``WanVideoTextEncode`` splits its prompt on ``|``,
``WanVideoSampler.process`` picks ``prompt_index = min(int(max(c) / section_size), num_prompts - 1)``
with ``section_size = latent frames / num_prompts``), gives the prompts equal sections and picks by a
window's LAST latent frame; here the ranges are explicit and a window takes the prompt of its middle one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from wanpipe.context import InvalidRequestError, PromptTravel, WanRequest

PromptRange = tuple[int, int, str]
logger = logging.getLogger(__name__)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"prompts: frame numbers must be integers, got {value!r}", "prompts")
    return value


def resolve_prompts(request: WanRequest, num_frames: int) -> dict[str, Any]:
    """{"prompts": the ranges as a tuple of (start, end, prompt) tuples, or None}.

    Raises :class:`InvalidRequestError` (param ``prompts``) for: prompts without ``context_frames``, an
    empty list, an entry that is not (start, end, prompt), an empty prompt, a range with end < start,
    ranges out of order, overlapping or leaving a gap, not starting at frame 0 or not ending at the
    video's last frame ``num_frames - 1``."""
    given = request.prompts
    if given is None:
        return {"prompts": None}
    if request.context_frames is None:
        raise InvalidRequestError(
            "prompts: per-window prompts need context windows: give context_frames too", "prompts"
        )
    if isinstance(given, str | bytes) or not isinstance(given, Sequence) or not given:
        raise InvalidRequestError("prompts must be a non-empty list of (start, end, prompt)", "prompts")
    ranges: list[PromptRange] = []
    for entry in given:
        if isinstance(entry, str | bytes) or not isinstance(entry, Sequence) or len(entry) != 3:
            raise InvalidRequestError(
                f"prompts: each entry is (start, end, prompt), got {entry!r}", "prompts"
            )
        start, end, prompt = _integer(entry[0]), _integer(entry[1]), entry[2]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(
                f"prompts: the prompt of frames {start}-{end} must be non-empty", "prompts"
            )
        if end < start:
            raise InvalidRequestError(f"prompts: range {start}-{end} ends before it starts", "prompts")
        expected = ranges[-1][1] + 1 if ranges else 0
        if start != expected:
            what = "overlaps the one before" if start < expected else "leaves a gap after the one before"
            raise InvalidRequestError(
                f"prompts: range {start}-{end} {what}: the ranges (inclusive video frames, in order) must "
                f"cover frames 0-{num_frames - 1} without gaps or overlaps; this one must start at {expected}",
                "prompts",
            )
        if end > num_frames - 1:
            raise InvalidRequestError(
                f"prompts: range {start}-{end} goes past the video's last frame {num_frames - 1}", "prompts"
            )
        ranges.append((start, end, prompt))
    if ranges[-1][1] != num_frames - 1:
        raise InvalidRequestError(
            f"prompts: the ranges end at frame {ranges[-1][1]}, they must cover the video to its last "
            f"frame {num_frames - 1}",
            "prompts",
        )
    return {"prompts": tuple(ranges)}


def frame_prompts(ranges: Sequence[PromptRange], latent_frames: int, temporal_stride: int) -> tuple[int, ...]:
    """Per latent frame k, the index (into the distinct prompts in order of first use) of the prompt
    of the range holding video frame ``temporal_stride * k`` (latent frame k's last video frame)."""
    distinct = list(dict.fromkeys(p for _, _, p in ranges))
    out = []
    for k in range(latent_frames):
        frame = temporal_stride * k
        prompt = next((p for s, e, p in ranges if s <= frame <= e), ranges[-1][2])
        out.append(distinct.index(prompt))
    return tuple(out)


def make_travel(
    request: WanRequest,
    tokenize: Callable[[list[str]], Any],
    latent_frames: int,
    temporal_stride: int,
) -> PromptTravel | None:
    """A resolved request's :class:`PromptTravel` (None without ``prompts``): ``tokenize(prompts)``
    returns token ids and mask (P, L) (:class:`~wanpipe.models.text_encoder.WanTextTokenizer`)."""
    if request.prompts is None:
        return None
    ranges = [tuple(r) for r in request.prompts]
    distinct = tuple(dict.fromkeys(p for _, _, p in ranges))
    tokens = tokenize(list(distinct))
    for prompt, truncated in zip(distinct, tokens.truncated):
        if truncated:
            logger.warning(
                "prompts: %r is longer than the text encoder's tokens and was truncated", prompt[:60]
            )
    frames = frame_prompts(ranges, latent_frames, temporal_stride)  # type: ignore[arg-type]
    return PromptTravel(distinct, tokens.ids, tokens.mask, frames)
