"""Context windows: a long video's latent frames denoised in overlapping windows of the model's native
length, one DiT forward per window per step, the window predictions blended (docs/long-video.md).

The schedules follow ComfyUI-WanVideoWrapper's ``context.py`` (kijai/ComfyUI-WanVideoWrapper at commit
721cd65e7b5224c70a3d20446d9d561f1732216b, itself after ComfyUI-AnimateDiff-Evolved by Kosinkadink):
``uniform_standard``, ``uniform_looped`` and ``static_standard``, pure functions of (step, latent frame
count, window, overlap, stride) -> the list of windows (each a list of latent frame indices). Written
here anew; ``tests/test_context_windows.py`` checks the lists against the reference's own functions.

How the reference's sampler (its ``nodes.py``, ``WanVideoSampler.process``) uses them, and what this
module does alike or not:

- each window's latents (and, for image-to-video, the concatenated mask + image latents: here the
  whole DiT input is sliced) go through the DiT alone, with the RoPE positions of a video of the
  window's length (0 .. window - 1 for every window: the DiT sees each window as a native clip);
- the predictions are weighted per frame and normalised by the summed weights. The reference's ramp is
  ``linspace(0, 1, overlap)`` (its edge frame gets weight 0); ours is ``(1 .. overlap) / (overlap + 1)``,
  never 0, so that two windows overlapping by exactly ``overlap`` frames sum to 1 there and no frame
  is ever left without weight. A window touching the video's start has no ramp up, one touching its
  end no ramp down, as in the reference. "pyramid" weights (AnimateDiff-Evolved's option) rise
  linearly from both ends to the window's middle;
- the reference also copies the image condition of frame 0 into every window's first frame; here each
  window sees its own slice of the condition (only the first window holds the image).

The wrapper keeps the loop's single DiT call: :func:`windowed_forward` is given that call as a
function of the window's input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from wanpipe.context import CONTEXT_SCHEDULES, ContextWindows

Windows = list[list[int]]
Schedule = Callable[..., Windows]


def ordered_halving(value: int) -> float:
    """``value``'s 64 bits read in reverse order, as a fraction in [0, 1): 0, 0.5, 0.25, 0.75, ...
    (the offset the uniform schedules move their windows by at each step)."""
    reversed_bits = 0
    for _ in range(64):
        reversed_bits = (reversed_bits << 1) | (value & 1)
        value >>= 1
    return reversed_bits / 2**64


def _levels(num_frames: int, size: int, stride: int) -> int:
    """How many dilation levels (1, 2, 4, ... frames apart inside a window) the uniform schedules use."""
    return min(stride, math.ceil(math.log2(num_frames / size)) + 1)


def _uniform(step: int, num_frames: int, size: int, overlap: int, stride: int, closed_loop: bool) -> Windows:
    """The uniform schedules' windows before any fix-up: at each dilation level, windows ``size``
    frames long, hopping by ``size * dilation - overlap``, shifted by the step's offset, wrapping."""
    windows = []
    offset = ordered_halving(step)
    pad = round(num_frames * offset)
    for level in range(_levels(num_frames, size, stride)):
        dilation = 1 << level
        end = num_frames + pad - (0 if closed_loop else overlap)
        for start in range(int(offset * dilation) + pad, end, size * dilation - overlap):
            windows.append([(start + k * dilation) % num_frames for k in range(size)])
    return windows


def uniform_looped(
    step: int, num_frames: int, size: int, overlap: int, stride: int = 1, closed_loop: bool = True
) -> Windows:
    """Windows that wrap from the video's end to its start (a loop): frame counts in latent frames."""
    if num_frames <= size:
        return [list(range(num_frames))]
    return _uniform(step, num_frames, size, overlap, stride, closed_loop)


def uniform_standard(
    step: int, num_frames: int, size: int, overlap: int, stride: int = 1, closed_loop: bool = True
) -> Windows:
    """The uniform windows, each one that wraps moved back to end at the last frame (and a window added
    where the wrap point would be left uncovered), repeated windows dropped."""
    if num_frames <= size:
        return [list(range(num_frames))]
    windows = _uniform(step, num_frames, size, overlap, stride, closed_loop)
    out: Windows = []
    i = 0
    while i < len(windows):
        window = windows[i]
        wrap = next((k for k in range(1, len(window)) if window[k] < window[k - 1]), None)
        if wrap is not None:
            wrapped_to = window[wrap]
            start = window[0]
            rebased = [(v - start) % num_frames for v in window]
            shift = num_frames - 1 - rebased[-1]
            window = windows[i] = [v + shift for v in rebased]
            if wrapped_to not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(wrapped_to, wrapped_to + size)))
        if window not in out:
            out.append(window)
        i += 1
    return out


def static_standard(
    step: int, num_frames: int, size: int, overlap: int, stride: int = 1, closed_loop: bool = True
) -> Windows:
    """The same windows at every step: hops of ``size - overlap`` from frame 0, the last window moved
    back to end at the last frame."""
    if num_frames <= size:
        return [list(range(num_frames))]
    windows = []
    for start in range(0, num_frames, size - overlap):
        if start + size >= num_frames:
            windows.append(list(range(num_frames - size, num_frames)))
            break
        windows.append(list(range(start, start + size)))
    return windows


SCHEDULES: dict[str, Schedule] = {
    "uniform_standard": uniform_standard,
    "uniform_looped": uniform_looped,
    "static_standard": static_standard,
}
assert tuple(SCHEDULES) == CONTEXT_SCHEDULES


def window_schedule(options: ContextWindows, step: int, num_frames: int) -> Windows:
    """The windows (lists of latent frame indices) of ``step`` for a video of ``num_frames`` latent frames."""
    return SCHEDULES[options.schedule](step, num_frames, options.frames, options.overlap)


def window_weights(window: list[int], num_frames: int, overlap: int, blend: str = "linear") -> Tensor:
    """A window's blend weight per frame (len(window),) float32, all > 0.

    "linear": 1 inside, ramps of ``overlap`` frames ((1 .. overlap) / (overlap + 1)) at the ends that
    meet another window (none at the video's first / last frame); "pyramid": min(k + 1, n - k)."""
    n = len(window)
    if blend == "pyramid":
        k = torch.arange(n, dtype=torch.float32)
        return torch.minimum(k + 1, n - k)
    weights = torch.ones(n)
    ramp = torch.arange(1, overlap + 1, dtype=torch.float32)[:n] / (overlap + 1)
    m = len(ramp)
    if min(window) > 0:
        weights[:m] = torch.minimum(weights[:m], ramp)
    if max(window) < num_frames - 1:
        weights[n - m :] = torch.minimum(weights[n - m :], ramp.flip(0))
    return weights


def _take(x: Tensor, window: list[int]) -> Tensor:
    """x (B, C, f, h, w) -> its frames ``window`` (B, C, len(window), h, w); a view when contiguous."""
    if window == list(range(window[0], window[0] + len(window))):
        return x[:, :, window[0] : window[0] + len(window)]
    return x.index_select(2, torch.tensor(window, device=x.device))


def windowed_forward(
    options: ContextWindows | None,
    step: int,
    model_input: Tensor,
    call: Callable[..., Tensor],
    text_for: Callable[[list[int]], dict[str, Any]] | None = None,
) -> Tensor:
    """One step's DiT prediction through context windows.

    model_input (B, C_in, f, h, w) -> prediction (B, C_out, f, h, w). ``call(x)`` runs the DiT
    on x (B, C_in, len(window), h, w) (the window's frames, RoPE positions 0 .. len(window) - 1) and
    returns (B, C_out, len(window), h, w). Without windows, or when one window covers the whole video,
    it is ``call(model_input)`` unchanged (bit-identical to a plain step); otherwise the
    windows' predictions weighted by :func:`window_weights`, summed in float32 and normalised.
    ``text_for(window)`` (prompt travel): keywords added to that window's call (its prompt's text)."""

    def run(x: Tensor, window: list[int]) -> Tensor:
        return call(x) if text_for is None else call(x, **text_for(window))

    f = model_input.shape[2]
    every = list(range(f))
    windows = [every] if options is None else window_schedule(options, step, f)
    if len(windows) == 1 and windows[0] == every:
        return run(model_input, every)
    assert options is not None
    total = torch.zeros(f, device=model_input.device)
    out: Tensor | None = None
    dtype = model_input.dtype
    for window in windows:
        pred = run(_take(model_input, window), window)
        dtype = pred.dtype
        weights = window_weights(window, f, options.overlap, options.blend).to(model_input.device)
        if out is None:
            out = pred.new_zeros((*pred.shape[:2], f, *pred.shape[3:]), dtype=torch.float32)
        index = torch.tensor(window, device=model_input.device)
        out.index_add_(2, index, pred.float() * weights.view(1, 1, -1, 1, 1))
        total.index_add_(0, index, weights)
    assert out is not None
    return (out / total.view(1, 1, -1, 1, 1)).to(dtype)
