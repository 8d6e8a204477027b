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

    python bench/bench_gpu.py [--cases 1.3b,14b-i2v,vae,vae720] [--repeats 3]

Writes bench/results/gpu-<device>-<date>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

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


@torch.inference_mode()
def dit_case(name: str, repeats: int) -> dict:
    from diffusers import WanTransformer3DModel

    from wanpipe.models.transformer import WanTransformerModel
    from wanpipe.models.transformer_layers import TransformerConfig, compress_text_padding
    from wanpipe.runtime.attention import sdpa_choice
    from wanpipe.weights.keymap import remap_state_dict
    from wanpipe.weights.transformer_keys import TRANSFORMER_TO_DIFFUSERS_KEYS

    kw = {**COMMON, **CASES[name]}
    dev = DEVICE
    torch.manual_seed(0)
    with dev:
        ours = WanTransformerModel(TransformerConfig.from_dict(kw))
    for n, p in ours.named_parameters():
        p.data = (p.data.normal_(0, 0.02) if p.ndim >= 2 else p.data.fill_(1.0 if "norm" in n else 0.0)).to(
            torch.float32 if WanTransformerModel.keeps_fp32(n) else torch.bfloat16
        )
    f, h, w = LATENT
    latents = torch.randn(1, kw["in_channels"], f, h, w, device=dev, dtype=torch.bfloat16)
    text = torch.randn(2, 512, kw["text_dim"], device=dev, dtype=torch.bfloat16)
    for row, tokens in enumerate(PROMPT_TOKENS):
        text[row, tokens:] = 0
    image = (
        torch.randn(2, 257, kw["image_dim"], device=dev, dtype=torch.bfloat16) if "image_dim" in kw else None
    )
    t = torch.full((2,), 900.0, device=dev)
    # What the executor does once per request (compress_text, on by default): prompt rows + one pad key.
    short_text, text_bias = compress_text_padding(text, multiple_of=16 if dev.type == "cuda" else 1)
    tokens, head_dim = f * (h // 2) * (w // 2), kw["attention_head_dim"]
    attention = (
        f"self: {sdpa_choice(tokens, tokens, head_dim, torch.bfloat16, dev)}, "
        f"cross: {sdpa_choice(tokens, short_text.shape[1], head_dim, torch.bfloat16, dev, text_bias is not None)}"
    )

    def ours_step(full_text: bool = False):
        if full_text:
            pred = ours(latents.expand(2, -1, -1, -1, -1), t, text, image)
        else:
            pred = ours(latents.expand(2, -1, -1, -1, -1), t, short_text, image, text_bias=text_bias)
        return pred[1] + 5.0 * (pred[0] - pred[1])

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
        return uncond + 5.0 * (cond - uncond)

    _reset_peak()
    ref_times, _ = _timed(ref_step, repeats)
    ref_peak = _peak_gib()
    diff = (ref_step().float() - ours_out).abs().max().item()
    ours_s, ref_s = statistics.median(ours_times), statistics.median(ref_times)
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "wanpipe_attention_kernels": attention,
        "wanpipe_s_per_step": round(ours_s, 4),
        "wanpipe_s_per_step_full_512_text": round(statistics.median(full_text_times), 4),
        "compressed_vs_full_text_max_abs_diff": full_text_diff,
        "diffusers_s_per_step": round(ref_s, 4),
        "speedup": round(ref_s / ours_s, 3),
        "wanpipe_peak_gib": round(ours_peak, 2),
        "diffusers_peak_gib": round(ref_peak, 2),
        "max_abs_diff_guided_prediction": diff,
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="1.3b,14b-i2v,vae,vae720")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu.py needs a CUDA device (BENCH_GPU_SMOKE=1 runs it at tiny shapes on the CPU)"
        )
    results = {}
    for case in args.cases.split(","):
        if case == "vae":
            results[case] = vae_case(args.repeats)
        elif case == "vae720":
            results[case] = vae720_case(1)
        else:
            results[case] = dit_case(case, args.repeats)
        print(case, json.dumps(results[case]), flush=True)
    if SMOKE:
        print("smoke run: nothing written")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "command": "python bench/bench_gpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "results": results,
    }
    name = torch.cuda.get_device_name().replace(" ", "-").lower()
    path = ROOT / "bench" / "results" / f"gpu-{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
