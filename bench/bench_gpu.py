"""GPU benchmark (issue 5), prepared for a session that is lent an H100/H200: not yet run.

Random weights at the real shapes, bf16 with the reference's fp32 islands, 480p x 81 frames
(21 x 60 x 104 latents, 32,760 tokens). For each case wanpipe and diffusers run on the same weights in
the same process, one after the other:

- DiT step with classifier-free guidance: wanpipe runs cond + uncond as one batch of 2, diffusers as two
  forwards (what its pipeline does); seconds per step (median of --repeats after a warm-up) and the
  largest difference between the two engines' guided predictions;
- VAE decode of 81 frames at 480p (Wan 2.1 VAE, real width): seconds and peak memory;
- ``vae720``: the exact tiled decode of 81 frames at 1280 x 720 within 6 GiB against the untiled one
  (issue 21), bf16, and fp32 without TF32 on 5 frames for exactness.

Issue 19's runtime options, each against the plain bf16 step in the same run (not in the default
``--cases``: ``bash bench/gpu_session.sh runtime`` runs them):

- ``offload``: block offload against resident blocks (1.3B), and the 14B I2V step with block offload;
- ``compile``: the compile time apart, the compiled step, its difference from eager (1.3B);
- ``fp8``: ``scaled_mm`` fp8 matmuls against bf16 (1.3B; CUDA capability >= 8.9, else skipped).

Every DiT figure comes with its model FLOP utilisation (:func:`dit_step_flops` over the time, over the
chip's bf16 matmul throughput measured at the start of the run: ``bf16_matmul_tflops``).

    python bench/bench_gpu.py [--cases 1.3b,14b-i2v,vae,vae720,offload,compile,fp8] [--repeats 3]

Writes bench/results/gpu-<device>-<date>.json (again after every case) and prints it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wanpipe.models.transformer import WanTransformerModel
    from wanpipe.runtime.options import RuntimeOptions
    from wanpipe.runtime.runner import DiTRunner

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16),
    "14b-i2v": dict(
        num_attention_heads=40,
        ffn_dim=13824,
        num_layers=40,
        in_channels=36,
        image_dim=1280,
        added_kv_proj_dim=5120,
    ),
}
COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, out_channels=16, text_dim=4096, freq_dim=256)
LATENT = (21, 60, 104)
PROMPT_TOKENS = (120, 80)  # cond, uncond: the rest of the 512 text rows are zeros, as the encoder pads them

# BENCH_GPU_SMOKE=1: the same code at tiny shapes on the CPU (checks the script, measures nothing).
SMOKE = os.environ.get("BENCH_GPU_SMOKE") == "1"
if SMOKE:
    CASES = {
        "1.3b": dict(num_attention_heads=2, ffn_dim=64, num_layers=2, in_channels=16),
        "14b-i2v": dict(
            num_attention_heads=2,
            ffn_dim=64,
            num_layers=2,
            in_channels=36,
            image_dim=32,
            added_kv_proj_dim=32,
        ),
    }
    COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=16, out_channels=16, text_dim=32, freq_dim=32)
    LATENT = (3, 4, 6)
DEVICE = torch.device("cpu" if SMOKE else "cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")


def _timed(fn, repeats: int, after_warmup=None) -> tuple[list[float], object]:
    """A warm-up call (then ``after_warmup()``), then ``repeats`` timed calls -> their seconds, the last output."""
    out = fn()
    _sync()
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times, out


GUIDANCE = 5.0
IMAGE_TOKENS = 257  # CLIP tokens of an I2V image


def dit_step_flops(
    kw: dict, latent: tuple[int, int, int], text_tokens: Sequence[int], image_tokens: int
) -> float:
    """Model FLOPs of one guided DiT step: one forward per entry of ``text_tokens`` (cond, uncond: the
    batch of 2), 2 FLOPs per multiply-add, counted from the config ``kw`` and the real token counts.

    Per forward, with L = f * (h / 2) * (w / 2) video tokens (``latent`` (f, h, w), patch 1 x 2 x 2),
    Lt the prompt's real text tokens, Li the image tokens (I2V; 0 for T2V), d = heads * head_dim,
    F = ffn_dim, these multiply-adds per block (times num_layers):

    - self-attention projections q, k, v, o: 4 L d^2; cross-attention q, o: 2 L d^2, k, v on the text:
      2 Lt d^2, I2V's k_img, v_img on the image tokens: 2 Li d^2; feed-forward: 2 L d F;
    - attention matmuls QK^T and PV: self 2 L^2 d, cross 2 L (Lt + Li) d.

    Left out (under 1% at 480p): patch embedding, the text/time/image embedders, norms, modulation,
    RoPE, softmax and the head. Padding is not counted: the figure is the work the model needs."""
    f, h, w = latent
    pt, ph, pw = kw["patch_size"]
    length = (f // pt) * (h // ph) * (w // pw)
    d = kw["num_attention_heads"] * kw["attention_head_dim"]
    total = 0
    for lt in text_tokens:
        projections = 6 * length * d * d + 2 * (lt + image_tokens) * d * d + 2 * length * d * kw["ffn_dim"]
        attention = 2 * length * length * d + 2 * length * (lt + image_tokens) * d
        total += kw["num_layers"] * (projections + attention)
    return 2.0 * total


@functools.cache
def matmul_tflops(repeats: int = 5) -> float:
    """The chip's bf16 matmul throughput, measured now: TFLOP/s of ten n x n @ n x n products (n = 8192;
    256 in smoke mode), the median of ``repeats`` timed calls after a warm-up."""
    n = 256 if SMOKE else 8192
    a, b, c = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))

    def products() -> None:
        for _ in range(10):
            torch.matmul(a, b, out=c)

    times, _ = _timed(products, repeats)
    return 10 * 2 * n**3 / statistics.median(times) / 1e12


def mfu(flops: float, seconds: float) -> float:
    """Model FLOP utilisation: ``flops`` in ``seconds`` over the measured bf16 matmul throughput."""
    return round(flops / seconds / (matmul_tflops() * 1e12), 3)


@dataclass
class DiTSetup:
    """A DiT case's model (random weights, bf16 with the reference's fp32 islands, on the device) and its
    inputs at the real shapes: latents (1, C_in, f, h, w), text (2, 512, text_dim) as the encoder pads it
    (cond, uncond rows), image (2, 257, image_dim) | None, t (2,), and what the executor makes of the
    text once per request (``compress_text``, on by default): short_text (2, Ls, text_dim), text_bias."""

    kw: dict
    model: WanTransformerModel
    latents: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor | None
    t: torch.Tensor
    short_text: torch.Tensor
    text_bias: torch.Tensor | None

    @property
    def flops(self) -> float:
        """Model FLOPs of one guided step (:func:`dit_step_flops`)."""
        image_tokens = IMAGE_TOKENS if self.image is not None else 0
        return dit_step_flops(self.kw, LATENT, PROMPT_TOKENS, image_tokens)

    def guided(self, forward=None, full_text: bool = False) -> torch.Tensor:
        """cond + uncond as one batch of 2 through ``forward`` (default: the model; or a runner's forward
        with the model bound) -> the guided prediction (C_out, f, h, w)."""
        forward = forward or self.model
        latents = self.latents.expand(2, -1, -1, -1, -1)
        if full_text:
            pred = forward(latents, self.t, self.text, self.image)
        else:
            pred = forward(latents, self.t, self.short_text, self.image, text_bias=self.text_bias)
        return pred[1] + GUIDANCE * (pred[0] - pred[1])


def dit_setup(name: str) -> DiTSetup:
    """Build case ``name``'s model and inputs (:class:`DiTSetup`), seeded."""
    from wanpipe.models.transformer import WanTransformerModel
    from wanpipe.models.transformer_layers import TransformerConfig, compress_text_padding

    kw = {**COMMON, **CASES[name]}
    dev = DEVICE
    torch.manual_seed(0)
    with dev:
        model = WanTransformerModel(TransformerConfig.from_dict(kw))
    for n, p in model.named_parameters():
        p.data = (p.data.normal_(0, 0.02) if p.ndim >= 2 else p.data.fill_(1.0 if "norm" in n else 0.0)).to(
            torch.float32 if WanTransformerModel.keeps_fp32(n) else torch.bfloat16
        )
    latents = torch.randn(1, kw["in_channels"], *LATENT, device=dev, dtype=torch.bfloat16)
    text = torch.randn(2, 512, kw["text_dim"], device=dev, dtype=torch.bfloat16)
    for row, tokens in enumerate(PROMPT_TOKENS):
        text[row, tokens:] = 0
    image = None
    if "image_dim" in kw:
        image = torch.randn(2, IMAGE_TOKENS, kw["image_dim"], device=dev, dtype=torch.bfloat16)
    t = torch.full((2,), 900.0, device=dev)
    # What the executor does once per request (compress_text, on by default): prompt rows + one pad key.
    short_text, text_bias = compress_text_padding(text, multiple_of=16 if dev.type == "cuda" else 1)
    return DiTSetup(kw, model, latents, text, image, t, short_text, text_bias)


@torch.inference_mode()
def dit_case(name: str, repeats: int) -> dict:
    from diffusers import WanTransformer3DModel

    from wanpipe.runtime.attention import sdpa_choice
    from wanpipe.weights.keymap import remap_state_dict
    from wanpipe.weights.transformer_keys import TRANSFORMER_TO_DIFFUSERS_KEYS

    setup = dit_setup(name)
    kw, ours, dev = setup.kw, setup.model, DEVICE
    latents, text, image, t = setup.latents, setup.text, setup.image, setup.t
    f, h, w = LATENT
    tokens, head_dim = f * (h // 2) * (w // 2), kw["attention_head_dim"]
    cross = sdpa_choice(
        tokens, setup.short_text.shape[1], head_dim, torch.bfloat16, dev, setup.text_bias is not None
    )
    attention = f"self: {sdpa_choice(tokens, tokens, head_dim, torch.bfloat16, dev)}, cross: {cross}"

    def ours_step(full_text: bool = False):
        return setup.guided(full_text=full_text)

    _reset_peak()
    ours_times, _ = _timed(ours_step, repeats)
    ours_peak = _peak_gib()
    ours_out = ours_step().float()
    full_text_times, _ = _timed(lambda: ours_step(full_text=True), repeats)
    full_text_diff = (ours_step(full_text=True).float() - ours_out).abs().max().item()
    state = remap_state_dict(ours.state_dict(), TRANSFORMER_TO_DIFFUSERS_KEYS)  # views of our weights

    # Built in bf16 (a 14B model in fp32 would not fit beside the state dict), with diffusers' fp32
    # modules back in fp32, as from_pretrained(torch_dtype=bfloat16) leaves them; then the same weights.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            ref = WanTransformer3DModel(**kw)
    finally:
        torch.set_default_dtype(default)
    for n, m in ref.named_modules():
        if any(part in WanTransformer3DModel._keep_in_fp32_modules for part in n.split(".")):
            m.float()
    for n, p in ref.named_parameters():
        if n.endswith("scale_shift_table"):
            p.data = p.data.float()
    ref.load_state_dict(state)
    del state
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    def ref_step():
        cond = ref(latents, t[:1], text[:1], image[:1] if image is not None else None, return_dict=False)[0]
        uncond = ref(latents, t[:1], text[1:], image[1:] if image is not None else None, return_dict=False)[0]
        return uncond + GUIDANCE * (cond - uncond)

    _reset_peak()
    ref_times, _ = _timed(ref_step, repeats)
    ref_peak = _peak_gib()
    diff = (ref_step().float() - ours_out).abs().max().item()
    ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
    full_s = statistics.median(full_text_times)
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "wanpipe_attention_kernels": attention,
        "wanpipe_s_per_step": round(ours_s, 4),
        "wanpipe_s_per_step_full_512_text": round(full_s, 4),
        "compressed_vs_full_text_max_abs_diff": full_text_diff,
        "diffusers_s_per_step": round(ref_s, 4),
        "speedup": round(ref_s / ours_s, 3),
        "wanpipe_peak_gib": round(ours_peak, 2),
        "diffusers_peak_gib": round(ref_peak, 2),
        "max_abs_diff_guided_prediction": diff,
        "tflop_per_step": round(setup.flops / 1e12, 2),
        "wanpipe_mfu": mfu(setup.flops, ours_s),
        "wanpipe_mfu_full_512_text": mfu(setup.flops, full_s),
        "diffusers_mfu": mfu(setup.flops, ref_s),
    }


def runtime_runner(setup: DiTSetup, options: RuntimeOptions) -> DiTRunner:
    """Place ``setup.model`` as ``options`` ask, the way users get it (``WanExecutor.set_runtime``: block
    offload streams the blocks from pinned host memory, ``compile`` compiles them) -> the executor's DiT
    runner (``runner.forward(model, ...)`` is the denoising stage's forward). The executor also wants a
    VAE: a tiny one stands in, unused."""
    from wanpipe.executor import WanExecutor
    from wanpipe.models.vae import VAEConfig, WanVAE

    vae = WanVAE(VAEConfig(base_dim=8))
    executor = WanExecutor(None, setup.model, vae, device=DEVICE, dtype=torch.bfloat16, runtime=options)
    return executor.runner


def measure(setup: DiTSetup, forward, repeats: int, label: str) -> tuple[dict, torch.Tensor]:
    """The guided step through ``forward`` (see :meth:`DiTSetup.guided`): a warm-up, ``repeats`` timed
    steps -> ({label_s_per_step, label_peak_gib, label_mfu}, the last guided prediction in fp32)."""
    _reset_peak()
    times, out = _timed(lambda: setup.guided(forward), repeats)
    seconds = statistics.median(times)
    record = {
        f"{label}_s_per_step": round(seconds, 4),
        f"{label}_peak_gib": round(_peak_gib(), 2),
        f"{label}_mfu": mfu(setup.flops, seconds),
    }
    return record, out.float()


def _free() -> None:
    """Give a finished case's memory back (call after ``del``-ing its setup)."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def offload_case(repeats: int) -> dict:
    """Issue 19: block offload (``RuntimeOptions(offload="block")``: blocks in pinned host memory, two
    device buffers, the next block copied on a side stream) against resident blocks, both through the
    executor's runner: seconds per step, peak GiB, MFU. 1.3B both ways (target: within 15%); 14B I2V
    offloaded only (target <= 24 GiB; its resident figures are the ``14b-i2v`` case's)."""
    from wanpipe.runtime.options import RuntimeOptions

    out: dict = {}
    for name, modes in (("1.3b", ("none", "block")), ("14b-i2v", ("block",))):
        setup = dit_setup(name)
        record, preds = {"tflop_per_step": round(setup.flops / 1e12, 2)}, {}
        for mode in modes:
            runner = runtime_runner(setup, RuntimeOptions(offload=mode))
            _free()
            figures, preds[mode] = measure(
                setup, functools.partial(runner.forward, setup.model), repeats, mode
            )
            record.update({k.replace("none_", "resident_"): v for k, v in figures.items()})
        if len(preds) == 2:
            record["block_vs_resident_max_abs_diff"] = (preds["block"] - preds["none"]).abs().max().item()
            record["block_over_resident"] = round(
                record["block_s_per_step"] / record["resident_s_per_step"], 3
            )
        out[name] = record
        del setup, runner, preds
        _free()
    return out


@torch.inference_mode()
def compile_case(repeats: int) -> dict:
    """Issue 19: ``RuntimeOptions(compile=True)`` on the 1.3B shape: the compile time apart (the runner's
    warm-up forward, as the executor reports it, and the whole first guided step), the compiled step
    against eager (both through the executor's runner), and the largest difference of the guided
    predictions (bf16)."""
    from wanpipe.runtime.options import RuntimeOptions

    setup = dit_setup("1.3b")
    eager = runtime_runner(setup, RuntimeOptions())
    record, eager_pred = measure(setup, functools.partial(eager.forward, setup.model), repeats, "eager")
    compiled = runtime_runner(setup, RuntimeOptions(compile=True))
    forward = functools.partial(compiled.forward, setup.model)
    _sync()
    t0 = time.perf_counter()
    setup.guided(forward)
    _sync()
    record["compile_first_step_s"] = round(time.perf_counter() - t0, 2)
    record["compile_s"] = round(compiled.compile_s, 2)
    figures, pred = measure(setup, forward, repeats, "compiled")
    record.update(figures)
    record["compiled_vs_eager_max_abs_diff"] = (pred - eager_pred).abs().max().item()
    record["compiled_over_eager"] = round(record["compiled_s_per_step"] / record["eager_s_per_step"], 3)
    return record


@torch.inference_mode()
def fp8_case(repeats: int) -> dict:
    """Issue 19: ``--fp8 scaled_mm`` on the 1.3B shape, on CUDA capability >= 8.9 only: the blocks'
    linears quantized to e4m3fn with per-tensor scales and swapped for ``Fp8Linear`` as the pipeline's
    load does (``dit_fp8_state``, ``use_fp8_linears``), against the same weights in bf16: seconds per
    step, peak GiB, MFU (over the bf16 matmul throughput), the largest difference of the guided
    predictions. In smoke mode the CPU runs the same code, its fp8 layers falling back to upcasting."""
    from wanpipe.weights.fp8 import dit_fp8_state, fp8_matmul_supported, use_fp8_linears

    supported = fp8_matmul_supported(DEVICE)
    if not supported and not SMOKE:
        capability = torch.cuda.get_device_capability()
        return {
            "skipped": f"fp8 matmuls need CUDA capability >= 8.9 and torch._scaled_mm; this has {capability}"
        }
    setup = dit_setup("1.3b")
    record, bf16 = measure(setup, None, repeats, "bf16")
    state, layers = dit_fp8_state(setup.model.state_dict(), "scaled_mm")
    use_fp8_linears(setup.model, layers, "scaled_mm")
    setup.model.load_state_dict(state, assign=True)
    del state
    _free()
    figures, fp8 = measure(setup, None, repeats, "fp8")
    record.update(figures)
    record["fp8_layers"] = len(layers)
    record["fp8_matmuls"] = supported
    record["fp8_vs_bf16_max_abs_diff"] = (fp8 - bf16).abs().max().item()
    record["fp8_over_bf16"] = round(record["fp8_s_per_step"] / record["bf16_s_per_step"], 3)
    return record


@torch.inference_mode()
def vae_case(repeats: int) -> dict:
    from wanpipe.models.vae import VAEConfig, WanVAE

    dev = DEVICE
    with dev:
        vae = WanVAE(VAEConfig(base_dim=8) if SMOKE else VAEConfig())
    for n, p in vae.named_parameters():
        p.data.normal_(0, 0.02) if p.ndim >= 2 else p.data.fill_(1.0 if "gamma" in n else 0.0)
    z = torch.randn(1, 16, *LATENT, device=dev)
    out = {}
    for frames in (5, LATENT[0]):
        _reset_peak()
        times, _ = _timed(lambda frames=frames: vae.decode(z[:, :, :frames]), repeats)
        out[f"decode_{4 * (frames - 1) + 1}_frames_s"] = round(statistics.median(times), 3)
        out[f"decode_{4 * (frames - 1) + 1}_frames_peak_gib"] = round(_peak_gib(), 2)
    return out


@torch.inference_mode()
def vae720_case(repeats: int) -> dict:
    """Issue 21's GPU target: 81 frames at 1280 x 720 (21 x 90 x 160 latents), Wan 2.1 VAE at the real
    width, bf16, decoded tiled (exact) within a budget so that the whole decode peaks under 6 GiB, against
    the untiled decode (which fits an H100/H200): seconds, peak memory, the tile grid and the largest
    difference. Then the exactness check in fp32 without TF32 on 5 frames (<= 1e-5 expected: only
    summation order differs)."""
    from wanpipe.models.vae import VAEConfig, WanVAE
    from wanpipe.stages.decode import plan_decode

    dev = DEVICE
    latent = (3, 12, 20) if SMOKE else (21, 90, 160)
    budget = 200_000 if SMOKE else 4 * 2**30  # the upper part's share of the 6 GiB
    with dev:
        vae = WanVAE(VAEConfig(base_dim=8) if SMOKE else VAEConfig())
    for n, p in vae.named_parameters():
        p.data.normal_(0, 0.02) if p.ndim >= 2 else p.data.fill_(1.0 if "gamma" in n else 0.0)
    out: dict = {"latent": list(latent), "budget_gib": round(budget / 2**30, 2)}
    for dtype, frames in ((torch.bfloat16, latent[0]), (torch.float32, 2)):
        vae.to(dtype)
        g = torch.Generator(dev).manual_seed(0)
        z = torch.randn(1, 16, frames, *latent[1:], device=dev, generator=g).to(dtype)
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        out.update(_tiled_vs_untiled(vae, z, plan_decode(vae, z, budget).tile, name, repeats))
    return out


def _tiled_vs_untiled(vae, z: torch.Tensor, tile, name: str, repeats: int) -> dict:
    """One dtype of :func:`vae720_case`: the tiled decode (seconds, peak), the untiled one, their difference."""
    from wanpipe.models.vae_tiling import decode_tiled

    def run(fn) -> tuple[torch.Tensor, float, float]:
        """A warm-up, then ``repeats`` timed calls -> the last output, the median seconds, the peak GiB."""
        times, video = _timed(fn, repeats, after_warmup=_reset_peak)
        return video, round(statistics.median(times), 3), round(_peak_gib(), 2)

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {
        f"{name}_tiles": None if tile is None else {"rows": list(tile.rows), "cols": list(tile.cols)}
    }
    tiled, out[f"{name}_tiled_s"], out[f"{name}_tiled_peak_gib"] = run(
        lambda: decode_tiled(vae, z, tile) if tile is not None else vae.decode(z)
    )
    whole, out[f"{name}_untiled_s"], out[f"{name}_untiled_peak_gib"] = run(lambda: vae.decode(z))
    out[f"{name}_max_abs_diff"] = float((tiled.float() - whole.float()).abs().max())
    out[f"{name}_frames"] = tiled.shape[2]
    return out


RUNTIME_CASES = {"offload": offload_case, "compile": compile_case, "fp8": fp8_case}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="1.3b,14b-i2v,vae,vae720")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu.py needs a CUDA device (BENCH_GPU_SMOKE=1 runs it at tiny shapes on the CPU)"
        )
    cases = args.cases.split(",")
    results: dict = {}
    record: dict = {}
    if any(case in CASES or case in RUNTIME_CASES for case in cases):  # the MFU figures' denominator
        record["bf16_matmul_tflops"] = round(matmul_tflops(), 1)
        print("bf16_matmul_tflops", record["bf16_matmul_tflops"], flush=True)
    record["results"] = results
    path = None
    if not SMOKE:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        record = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit.stdout.strip(),
            "command": "python bench/bench_gpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            **record,
        }
        name = torch.cuda.get_device_name().replace(" ", "-").lower()
        path = ROOT / "bench" / "results" / f"gpu-{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    for case in cases:
        if case == "vae":
            results[case] = vae_case(args.repeats)
        elif case == "vae720":
            results[case] = vae720_case(1)
        elif case in RUNTIME_CASES:
            results[case] = RUNTIME_CASES[case](args.repeats)
        else:
            results[case] = dit_case(case, args.repeats)
        print(case, json.dumps(results[case]), flush=True)
        if path is not None:  # after every case, so a step cut short by its timeout keeps what it measured
            path.write_text(json.dumps(record, indent=2) + "\n")
    if path is None:
        print("smoke run: nothing written")
    else:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
