"""Fast exact 3x3x3 causal convolutions for the VAE on the CPU (fp32, inference).

The Wan VAE spends almost all of its time in ``3 x 3 x 3`` convolutions, and on the CPU oneDNN
already runs them near the machine's fp32 peak: the only way to go faster is to do fewer
multiplications. Along time, a 3-tap convolution producing ``m`` output frames from ``m + 2`` input
frames is a 1-D correlation, so Winograd's minimal filtering applies with whole frames as the
"numbers" and 2-D convolutions as the products:

    y = A^T [ (G w) (*) (B^T x) ]

``B^T x`` are ``m + 2`` linear combinations of input frames (one small matrix product over the frame
axis), ``G w`` are ``m + 2`` linear combinations of the kernel's time taps (computed once per
weight), ``(*)`` is one ``3 x 3`` 2-D convolution per pair, and ``A^T`` folds the ``m + 2`` results
back into ``m`` frames. F(4, 3) makes 4 frames with 6 convolutions instead of 12 (2x fewer
multiplications), F(2, 3) 2 frames with 4 instead of 6. The transforms are exact in real arithmetic;
in fp32 the result differs from the direct convolution by rounding (about 1e-6 relative).

Everything here runs in the channels-last layout ((B, T, H, W, C) in memory), where a frame is one
contiguous block: the frame transforms are then a few frame-wide additions (shared terms, as in
Lavin & Gray's transforms written out) and oneDNN's channels-last kernels are the fastest on this kind
of CPU. Outputs are channels-last 3-D tensors; values do not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

CHANNELS_LAST = torch.channels_last_3d

# Winograd F(m, 3) along time, interpolation points 0, +-1, +-2, infinity (Lavin & Gray, 2016):
# rows of B^T (input transform), G (kernel transform), A^T (output transform).
_F43 = (
    (
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    (
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    (
        (1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 0),
        (0, 1, 1, 4, 4, 0),
        (0, 1, -1, 8, -8, 1),
    ),
)
_F23 = (
    ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    ((1, 1, 1, 0), (0, 1, -1, -1)),
)
_TRANSFORMS = {4: _F43, 2: _F23}


def cpu_fp32_inference(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN is called directly: fp32 inference on a CPU with oneDNN; anything else takes
    torch's own convolutions."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    )


def fast_conv_applies(x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...]) -> bool:
    """Whether :func:`causal_conv3x3x3` handles this convolution: CPU, fp32, no autograd, a
    ``3 x 3 x 3`` kernel with stride 1 and spatial padding 1 (time padding is the caller's)."""
    return (
        cpu_fp32_inference(x, weight)
        and tuple(weight.shape[2:]) == (3, 3, 3)
        and tuple(stride) == (1, 1, 1)
        and tuple(padding[1:]) == (1, 1)
    )


def _weight_key(weight: Tensor) -> tuple[int, int]:
    """Identifies a weight's current values: its memory and, where autograd tracks it, its version
    (in-place loads bump it). Inference tensors (made under ``torch.inference_mode``) have no version."""
    return (weight.data_ptr(), -1 if weight.is_inference() else weight._version)


@dataclass
class ConvWeightCache:
    """The time-transformed kernels of one convolution, made on first use and remade when the weight
    changes (in-place loads bump its version). Not part of the state dict. Single frames use the
    weight's own time taps (views), so nothing else is kept."""

    key: tuple[int, int] | None = None
    kernels: dict[int, list[Tensor]] = field(default_factory=dict)
    """m -> the m + 2 transformed 2-D kernels (K, C, 3, 3), channels-last."""

    def get(self, weight: Tensor, m: int) -> list[Tensor]:
        self._check(weight)
        if m not in self.kernels:
            g = torch.tensor(_TRANSFORMS[m][1], dtype=torch.float64)
            mixed = torch.einsum("pt,kcthw->pkchw", g, weight.double()).to(weight.dtype)
            self.kernels[m] = [k.contiguous(memory_format=torch.channels_last) for k in mixed]
        return self.kernels[m]

    def _check(self, weight: Tensor) -> None:
        key = _weight_key(weight)
        if key != self.key:
            self.key, self.kernels = key, {}


@dataclass
class Scratch:
    """Reusable work buffers for :func:`causal_conv3x3x3` (one per decode, in its causal cache): the
    frame transforms are the largest temporaries of a chunk, and fresh ones for every layer cost page
    faults whenever the allocator has given the memory back to the system in between."""

    buffers: dict[str, Tensor] = field(default_factory=dict)

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of ``shape`` (contiguous, uninitialised) in buffer ``name``, grown as needed."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.buffers[name] = buf
        return buf[:numel].view(shape)


def _conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(N, C, H, W) -> (N, K, H, W), 3x3, padding 1, through oneDNN (channels-last in, out)."""
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)


class _Frames:
    """The input frames of one video, held as (T_i, H W C) row blocks (the cached past, then the chunk):
    in channels-last memory one frame is one contiguous row, so no concatenation is needed."""

    def __init__(self, blocks: list[Tensor], height: int, width: int) -> None:
        self.blocks, self.height, self.width = blocks, height, width

    def image(self, index: int) -> Tensor:
        """Frame ``index`` as a (1, C, H, W) channels-last image (a view)."""
        for block in self.blocks:
            if index < block.shape[0]:
                return block[index].view(1, self.height, self.width, -1).permute(0, 3, 1, 2)
            index -= block.shape[0]
        raise IndexError(index)

    def row(self, index: int) -> Tensor:
        """Frame ``index`` as one flat (H W C) row (a view)."""
        for block in self.blocks:
            if index < block.shape[0]:
                return block[index]
            index -= block.shape[0]
        raise IndexError(index)


def _input_transform(x: list[Tensor], t: Tensor) -> None:
    """``t`` (m + 2, H W C) = B^T ``x`` (the m + 2 input frames, flat rows), for m = 4 or 2.

    Written as a few frame-wide additions (14 for F(4, 3), 4 for F(2, 3)) with shared terms instead of
    one (m + 2) x (m + 2) matrix product: with so small an inner dimension a GEMM runs far below memory
    speed on the CPU, while each addition is one streaming pass. The same sums up to rounding.
    """
    if len(x) == 6:
        x0, x1, x2, x3, x4, x5 = x
        t0, t1, t2, t3, t4, t5 = t
        torch.sub(x4, x2, out=t3)  # u = x4 - x2
        torch.sub(x0, x2, out=t0)
        torch.add(t3, t0, alpha=4, out=t0)  # t0 = 4 x0 - 5 x2 + x4 = u + 4 (x0 - x2)
        torch.add(x1, x2, out=t1)
        torch.add(x3, x4, out=t2)
        torch.add(t2, t1, alpha=-4, out=t1)  # t1 = (x3 + x4) - 4 (x1 + x2)
        torch.sub(x1, x2, out=t2)
        torch.sub(x4, x3, out=t4)
        torch.add(t4, t2, alpha=4, out=t2)  # t2 = (x4 - x3) + 4 (x1 - x2)
        torch.sub(x3, x1, out=t4)  # v = x3 - x1
        torch.sub(x5, x3, out=t5)
        torch.add(t5, t4, alpha=-4, out=t5)  # t5 = 4 x1 - 5 x3 + x5 = (x5 - x3) - 4 v
        torch.add(t3, t4, alpha=2, out=t3)  # t3 = u + 2 v
        torch.add(t3, t4, alpha=-4, out=t4)  # t4 = u - 2 v = t3 - 4 v
    else:
        x0, x1, x2, x3 = x
        t0, t1, t2, t3 = t
        torch.sub(x0, x2, out=t0)
        torch.add(x1, x2, out=t1)
        torch.sub(x2, x1, out=t2)
        torch.sub(x1, x3, out=t3)


def _output_transform(y: list[Tensor], r: Tensor) -> None:
    """``r`` (m, H W K) = A^T ``y`` (the m + 2 products, flat rows, overwritten), for m = 4 or 2."""
    if len(y) == 6:
        y0, y1, y2, y3, y4, y5 = y
        r0, r1, r2, r3 = r
        torch.sub(y3, y4, out=r1)  # d2
        torch.add(y3, y4, out=r2)  # s2
        torch.sub(y1, y2, out=y4)  # d1
        torch.add(y1, y2, out=y3)  # s1
        torch.add(y0, y3, out=r0).add_(r2)  # r0 = y0 + s1 + s2
        torch.add(y3, r2, alpha=4, out=r2)  # r2 = s1 + 4 s2
        torch.add(y4, r1, alpha=8, out=r3).add_(y5)  # r3 = d1 + 8 d2 + y5
        torch.add(y4, r1, alpha=2, out=r1)  # r1 = d1 + 2 d2
    else:
        y0, y1, y2, y3 = y
        r0, r1 = r
        torch.add(y0, y1, out=r0).add_(y2)
        torch.sub(y1, y2, out=r1).sub_(y3)


def causal_conv3x3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cache: ConvWeightCache,
    past: Tensor | None = None,
    leading_zeros: int = 0,
    scratch: Scratch | None = None,
) -> Tensor:
    """A ``3 x 3 x 3`` convolution, stride 1, spatial padding 1, no time padding, by time-Winograd.

    The input frames are ``leading_zeros`` zero frames (the causal padding of a video's start, never
    concatenated), then ``past`` (B, C, P, H, W) (the frames cached from the previous chunk), then x
    (B, C, T, H, W); any layout. weight (K, C, 3, 3, 3); bias (K,) | None -> (B, K, Z + P + T - 2, H, W),
    channels-last. Output frames come four at a time by F(4, 3), two by F(2, 3) (causal zeros enter
    as zero frames), a last single one directly (with only its taps on real frames if it has zeros).
    """
    if not 0 <= leading_zeros <= 2:
        raise ValueError(f"leading_zeros must be 0, 1 or 2, got {leading_zeros}")
    parts = [x] if past is None or past.shape[2] == 0 else [past, x]
    b, c, _, h, w = x.shape
    k = weight.shape[0]
    frames_out = leading_zeros + sum(p.shape[2] for p in parts) - 2
    if frames_out < 1:
        raise ValueError(
            f"{frames_out + 2 - leading_zeros} frames (+{leading_zeros} zeros) are too few for 3 taps"
        )
    parts = [p.contiguous(memory_format=CHANNELS_LAST) for p in parts]
    scratch = scratch if scratch is not None else Scratch()
    out = torch.empty(b, k, frames_out, h, w, dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    for i in range(b):
        frames = _Frames([p[i].permute(1, 2, 3, 0).reshape(p.shape[2], -1) for p in parts], h, w)
        result = out[i].permute(1, 2, 3, 0).reshape(frames_out, -1)  # (T', H W K), a view of out
        o = 0
        while o < frames_out:
            first = o - leading_zeros  # the input frame under tap 0 of output frame o
            m = 4 if frames_out - o >= 4 else 2 if frames_out - o >= 2 else 1
            if m == 2 and first < -1:
                m = 1  # two zero taps: the one real tap alone is cheaper than F(2, 3)
            if first >= 0 and m == 1:
                # One frame, all three taps on real frames: the 3-D convolution of its window, gathered
                # straight into a channels-last buffer.
                window = scratch.take("window", (1, 3, h, w, c), x)
                for tap in range(3):
                    window[0, tap].view(-1).copy_(frames.row(first + tap))
                y = torch.ops.aten.mkldnn_convolution(
                    window.permute(0, 4, 1, 2, 3), weight, bias, (0, 1, 1), (1, 1, 1), (1, 1, 1), 1
                )
                result[o].copy_(y[0, :, 0].permute(1, 2, 0).reshape(-1))
                o += 1
                continue
            if m == 1:
                # The window reaches into the zero frames: only the taps on real frames, as 2-D convolutions.
                acc = None
                for tap in range(-first, 3):
                    y = _conv2d(frames.image(first + tap), weight[:, :, tap], bias if acc is None else None)
                    acc = y if acc is None else acc.add_(y)
                assert acc is not None
                result[o].copy_(acc.permute(0, 2, 3, 1).reshape(-1))
                o += 1
                continue
            # Winograd; input frames before the video's start are zero rows (exact, and fewer
            # convolutions than treating those output frames one by one).
            rows = [frames.row(j) for j in range(max(first, 0), first + m + 2)]
            if first < 0:
                rows = [x.new_zeros(h * w * c)] * -first + rows
            mixed = scratch.take("mixed", (m + 2, h * w * c), x)
            _input_transform(rows, mixed)
            kernels = cache.get(weight, m)
            products = []
            for p in range(m + 2):
                image = mixed[p].view(1, h, w, c).permute(0, 3, 1, 2)
                # Column 1 of A^T is all ones: a bias on product 1 reaches every output frame once.
                y = _conv2d(image, kernels[p], bias if p == 1 else None)  # (1, K, H, W) channels-last
                products.append(y[0].permute(1, 2, 0).view(-1))
            _output_transform(products, result[o : o + m])
            o += m
    return out


# -- 2x nearest upsampling followed by a 3x3 convolution ---------------------------------------


def upsample_conv_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`upsample2x_conv3x3` handles ``conv3x3(nearest_2x(x))``: CPU, fp32, inference."""
    return cpu_fp32_inference(x, weight) and tuple(weight.shape[2:]) == (3, 3)


@dataclass
class PhaseKernels:
    """The four 2x2 kernels of :func:`upsample2x_conv3x3`, remade when the 3x3 weight changes."""

    key: tuple[int, int] | None = None
    kernels: list[Tensor] = field(default_factory=list)

    def get(self, weight: Tensor) -> list[Tensor]:
        key = _weight_key(weight)
        if key != self.key:
            w = weight.double()
            # Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
            # (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two input rows, taps summed.
            rows = [
                torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], dim=2),
                torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], dim=2),
            ]
            kernels = []
            for r in rows:
                for col in (
                    torch.stack([r[..., 0], r[..., 1] + r[..., 2]], dim=-1),
                    torch.stack([r[..., 0] + r[..., 1], r[..., 2]], dim=-1),
                ):
                    kernels.append(col.to(weight.dtype).contiguous(memory_format=torch.channels_last))
            self.key, self.kernels = key, kernels
        return self.kernels


def upsample2x_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, phases: PhaseKernels) -> Tensor:
    """``conv2d(nearest_2x(x), weight, bias, padding=1)`` without making the upsampled image.

    x (N, C, H, W), any layout; weight (K, C, 3, 3) -> (N, K, 2H, 2W), channels-last. Each of the four
    output pixel phases (row parity a, column parity b) is a 2x2 convolution of x with the 3x3 taps
    that land on the same input pixel summed: 4/9 of the multiplications, the same sums up to
    rounding. "nearest" and "nearest-exact" agree for an exact factor of 2.
    """
    n, c, h, w = x.shape
    k = weight.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    out = torch.empty(n, k, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    grid = out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, k)
    kernels = phases.get(weight)
    for a in (0, 1):
        for b in (0, 1):
            window = padded[:, :, a : a + h + 1, b : b + w + 1]
            y = torch.ops.aten.mkldnn_convolution(window, kernels[2 * a + b], bias, (0, 0), (1, 1), (1, 1), 1)
            grid[:, :, a, :, b].copy_(y.permute(0, 2, 3, 1))
    return out
