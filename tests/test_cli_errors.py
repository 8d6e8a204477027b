"""Every bad command-line value, for every flag that takes one: exit code 2 and one line on stderr,
``wanpipe...: error: ...``, that names the flag and what was wrong; no traceback, nothing written.

The table below runs through ``wanpipe.cli.main`` in-process. Most values are refused while the command
line is parsed; the ones that only the model can judge (a height that is not a multiple of the model's
stride, a LoRA expert the checkpoint lacks) load the tiny checkpoint first. ``test_every_flag_is_covered``
checks that the table has a bad value for every flag with a value of every command.
"""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

import pytest
import torch

from wanpipe.cli import build_parser, main

CUDA = torch.cuda.is_available()

# Placeholders in the argv of a case: {ckpt} the tiny checkpoint, {tmp} the test's folder (exists),
# {file} an existing file (no suffix) that is no checkpoint, image or video, {png} an existing 32x32 PNG,
# {empty} an existing empty folder, {missing} a path that does not exist.
GENERATE = [
    "generate",
    "--model",
    "{ckpt}",
    "--prompt",
    "a cat",
    "--height",
    "32",
    "--width",
    "32",
    "--num-frames",
    "5",
    "--steps",
    "1",
    "--output",
    "{tmp}/out.mp4",
    "--no-progress",
]
SINGLE = ["generate", "--prompt", "a cat", "--output", "{tmp}/out.mp4"]  # single files, no --model
SERVE = ["serve", "--model", "{empty}", "--port", "0", "--output-dir", "{tmp}/serve"]
CONVERT = ["convert", "{ckpt}", "--output", "{tmp}/converted"]
BENCH = ["bench", "--out-dir", "{tmp}/bench"]

# (base argv, the flag (or argument) named, the bad values after the base, a regex the line must match)
CASES: list[tuple[list[str], str, list[str], str]] = [
    # -- generate: the request ---------------------------------------------------------------------
    (GENERATE, "--model", ["--model", "{missing}"], r"no such folder .*hub id"),
    (GENERATE, "--model", ["--model", "{file}"], r"is a file"),
    (GENERATE, "--model", ["--model", "{empty}"], r"--model: .*model_index\.json"),
    (GENERATE, "--prompt", ["--prompt", ""], r"expected a prompt, got an empty value"),
    (GENERATE, "--prompt", ["--prompt", "   "], r"empty value"),
    (GENERATE, "--height", ["--height", "abc"], r"expected a whole number, at least 1 \(pixels"),
    (GENERATE, "--height", ["--height", "0"], r"at least 1"),
    (GENERATE, "--height", ["--height", "-16"], r"at least 1"),
    (GENERATE, "--height", ["--height", "1e3"], r"whole number"),
    (GENERATE, "--height", ["--height", "33"], r"--height must be a positive multiple of 16"),
    (GENERATE, "--height", ["--height", "528"], r"--height must be at most 512 for this model"),
    (GENERATE, "--width", ["--width", "nan"], r"whole number"),
    (GENERATE, "--width", ["--width", "40"], r"--width must be a positive multiple of 16"),
    (GENERATE, "--width", ["--width", "99999999999999999984"], r"--width must be at most 512"),
    (GENERATE, "--num-frames", ["--num-frames", "6"], r"--num-frames must be 4k\+1"),
    (GENERATE, "--num-frames", ["--num-frames", "0"], r"at least 1 \(4k\+1 frames"),
    (GENERATE, "--num-frames", ["--num-frames", "x"], r"whole number"),
    (GENERATE, "--num-frames", ["--num-frames", "129"], r"--num-frames must be at most 125"),
    (GENERATE, "--steps", ["--steps", "0"], r"at least 1 and at most 1000"),
    (GENERATE, "--steps", ["--steps", "-1"], r"at least 1"),
    (GENERATE, "--steps", ["--steps", "1001"], r"at most 1000"),
    (GENERATE, "--steps", ["--steps", "2.5"], r"whole number"),
    (GENERATE, "--guidance-scale", ["--guidance-scale", "-1"], r"finite number, at least 0"),
    (GENERATE, "--guidance-scale", ["--guidance-scale", "nan"], r"finite"),
    (GENERATE, "--guidance-scale", ["--guidance-scale", "inf"], r"finite"),
    (GENERATE, "--guidance-scale", ["--guidance-scale", "x"], r"finite number"),
    (GENERATE, "--guidance-scale-2", ["--guidance-scale-2", "-1"], r"at least 0"),
    (GENERATE, "--guidance-scale-2", ["--guidance-scale-2", "3"], r"--guidance-scale-2 is for .*two experts"),
    (GENERATE, "--image", ["--image", "{missing}.png"], r"no such image file"),
    (GENERATE, "--image", ["--image", "{tmp}"], r"expected an image file, got a folder"),
    (GENERATE, "--image", ["--image", "{png}"], r"--image: .*text-to-video only"),
    (GENERATE, "--last-image", ["--last-image", "{missing}.png"], r"no such image file"),
    (GENERATE, "--last-image", ["--last-image", "{png}"], r"--last-image needs --image \(the first frame\)"),
    (GENERATE, "--video", ["--video", "{missing}.mp4"], r"no such video file"),
    (GENERATE, "--video", ["--video", "{file}"], r"--video: cannot read the video"),
    # Animate's flags: bad values, and Animate inputs on the tiny text-to-video checkpoint
    (GENERATE, "--pose-video", ["--pose-video", "{missing}.mp4"], r"no such video file"),
    (GENERATE, "--pose-video", ["--pose-video", "{file}"], r"--pose-video is for Wan2.2-Animate-14B"),
    (GENERATE, "--face-video", ["--face-video", "{tmp}"], r"expected a video file, got a folder"),
    (GENERATE, "--face-video", ["--face-video", "{file}"], r"--face-video is for Wan2.2-Animate-14B"),
    (GENERATE, "--background-video", ["--background-video", "{missing}"], r"no such video file"),
    (GENERATE, "--mask-video", ["--mask-video", "{missing}"], r"no such video file"),
    (GENERATE, "--mode", ["--mode", "dance"], r"expected animate or replace, got 'dance'"),
    (GENERATE, "--mode", ["--mode", "replace"], r"--mode is for Wan2.2-Animate-14B checkpoints"),
    (GENERATE, "--segment-frame-length", ["--segment-frame-length", "10"], r"4k\+1 frames per segment"),
    (GENERATE, "--segment-frame-length", ["--segment-frame-length", "1"], r"at least 5"),
    (GENERATE, "--prev-segment-frames", ["--prev-segment-frames", "3"], r"\(1 or 5\), got '3'"),
    (GENERATE, "--prev-segment-frames", ["--prev-segment-frames", "5"], r"--prev-segment-frames is for"),
    # extension (wanpipe.extend_cli)
    (GENERATE, "--extend", ["--extend", "{missing}.mp4"], r"no such video file"),
    (
        GENERATE,
        "--extend",
        ["--extend", "{png}"],
        r"--extend: this wan2\.1-t2v-1\.3b checkpoint cannot extend",
    ),
    (GENERATE, "--overlap-frames", ["--overlap-frames", "0"], r"at least 1"),
    (GENERATE, "--clip-frames", ["--clip-frames", "6"], r"4k\+1 frames per clip"),
    (GENERATE, "--context-frames", ["--context-frames", "9"], r"--context-frames \(9\) must not be longer"),
    (GENERATE, "--context-frames", ["--context-frames", "4"], r"4k\+1 video frames"),
    (GENERATE, "--context-overlap", ["--context-frames", "5", "--context-overlap", "8"], r"smaller than"),
    (GENERATE, "--context-overlap", ["--context-overlap", "4"], r"needs --context-frames"),
    (GENERATE, "--context-schedule", ["--context-frames", "5", "--context-schedule", "x"], r"uniform_looped"),
    (GENERATE, "--context-blend", ["--context-frames", "5", "--context-blend", "x"], r"linear, pyramid"),
    (GENERATE, "--prompt-at", ["--prompt-at", "0-4"], r"expected START-END:TEXT"),
    (
        GENERATE,
        "--prompt-at",
        ["--prompt-at", "0-8:a"],
        r"--prompt-at: per-window prompts need .*--context-frames",
    ),
    (GENERATE, "--preprocessed", ["--preprocessed", "{missing}"], r"no such preprocessed folder"),
    (GENERATE, "--preprocessed", ["--preprocessed", "{empty}"], r"--preprocessed: .*lacks src_ref.png"),
    (GENERATE, "--strength", ["--strength", "0"], r"a number above 0, at most 1"),
    (GENERATE, "--strength", ["--strength", "1.5"], r"at most 1"),
    (GENERATE, "--strength", ["--strength", "nan"], r"above 0"),
    (GENERATE, "--strength", ["--strength", "0.5"], r"--strength is for video-to-video: pass --video too"),
    (GENERATE, "--control-video", ["--control-video", "{missing}.mp4"], r"no such video file"),
    (GENERATE, "--mask", ["--mask", "{missing}.png"], r"no such mask file"),
    (GENERATE, "--mask", ["--mask", "{png}"], r"--mask is for VACE checkpoints"),
    (GENERATE, "--reference-image", ["--reference-image", "{missing}.png"], r"no such image file"),
    (
        GENERATE,
        "--reference-image",
        ["--reference-image", "{png}", "--reference-image", "{png}"],
        r"--reference-image is for VACE checkpoints",
    ),
    (GENERATE, "--conditioning-scale", ["--conditioning-scale", "strong"], r"a finite number X, or X,Y"),
    (GENERATE, "--conditioning-scale", ["--conditioning-scale", "1,nan"], r"finite number"),
    (GENERATE, "--conditioning-scale", ["--conditioning-scale", "0.5"], r"--conditioning-scale is for VACE"),
    (GENERATE, "--decoder", ["--decoder", "taesd"], r"expected a decoder: vae, tiny; got 'taesd'"),
    (
        GENERATE,
        "--decoder",
        ["--decoder", "tiny"],
        r"--decoder 'tiny' needs the tiny VAE loaded: pass --tiny-vae",
    ),
    (GENERATE, "--tiny-vae", ["--tiny-vae", "{missing}"], r"no such TAEHV file .*owner/name/FILE"),
    (GENERATE, "--tiny-vae", ["--tiny-vae", "{tmp}"], r"expected a TAEHV file, got a folder"),
    (GENERATE, "--tiny-vae", ["--tiny-vae", "{file}"], r"--tiny-vae: .*unknown weights format"),
    (SERVE, "--tiny-vae", ["--tiny-vae", "{missing}.pth"], r"no such TAEHV file"),
    (
        GENERATE,
        "--experts",
        ["--experts", "both"],
        r"invalid choice: 'both' \(choose from 'resident', 'swap'\)",
    ),
    (GENERATE, "--preset", ["--preset", "turbo"], r"unknown preset 'turbo'; the presets are: lightx2v-4step"),
    (
        GENERATE,
        "--preset",
        ["--preset", "fastwan"],
        r"--preset 'fastwan' is for Wan 2\.2 TI2V-5B checkpoints",
    ),
    (GENERATE, "--preset", ["--preset", "lightning-a14b"], r"Wan 2\.2 T2V-A14B or .*use lightx2v-4step"),
    (GENERATE, "--flow-shift", ["--flow-shift", "0"], r"a number above 0"),
    (GENERATE, "--flow-shift", ["--flow-shift", "-3"], r"above 0"),
    (GENERATE, "--flow-shift", ["--flow-shift", "inf"], r"above 0"),
    (GENERATE, "--seed", ["--seed", "-1"], r"at least 0 and at most 9223372036854775807"),
    (GENERATE, "--seed", ["--seed", str(2**63)], r"at most 9223372036854775807"),
    (GENERATE, "--seed", ["--seed", "abc"], r"whole number"),
    (GENERATE, "--sampler", ["--sampler", "ddim"], r"expected a sampler: unipc, euler, lcm, dmd; got 'ddim'"),
    (
        GENERATE,
        "--sigmas",
        ["--sigmas", "0.3,0.6"],
        r"comma-separated numbers in \(0, 1\], strictly decreasing",
    ),
    (GENERATE, "--sigmas", ["--sigmas", "1.5"], r"in \(0, 1\]"),
    (GENERATE, "--sigmas", ["--sigmas", "0.9,,0.5"], r"comma-separated numbers"),
    (GENERATE, "--sigmas", ["--sigmas", "0.9,0.5"], r"--sigmas must have one value per step: --steps=1"),
    (GENERATE, "--timesteps", ["--timesteps", "1000,1000"], r"in \(0, 1000\], strictly decreasing"),
    (GENERATE, "--timesteps", ["--timesteps", "1200"], r"in \(0, 1000\]"),
    (GENERATE, "--timesteps", ["--timesteps", "0"], r"in \(0, 1000\]"),
    (GENERATE, "--timesteps", ["--sigmas", "0.9", "--timesteps", "900"], r"either sigmas or timesteps"),
    (GENERATE, "--device", ["--device", "foo"], r"'foo' is not a device; use cpu, cuda or cuda:N"),
    (GENERATE, "--device", ["--device", "cuda:x"], r"is not a device"),
    (GENERATE, "--device", ["--device", "meta"], r"wanpipe does not run on 'meta'"),
    (GENERATE, "--device", ["--device", "cuda:99"], r"CUDA"),
    (GENERATE, "--dtype", ["--dtype", "int8"], r"expected float32, bfloat16 or float16"),
    (GENERATE, "--dtype", ["--dtype", "float64"], r"float32, bfloat16 or float16"),
    (GENERATE, "--output", ["--output", "{tmp}/out.avi"], r"--output: cannot tell the output format"),
    (GENERATE, "--output", ["--output", "{tmp}/out.png"], r"--output: .*single image"),
    (GENERATE, "--output", ["--output", "{file}"], r"--output: .* is a file, not a folder"),
    (GENERATE, "--output", ["--output", "{file}/out.mp4"], r"--output: cannot create .* is a file"),
    (GENERATE, "--output", ["--output", ""], r"empty value"),
    (
        GENERATE,
        "--lora",
        ["--lora", "x.safetensors:abc"],
        r"SCALE 'abc' is not a finite number .*FILE\[:SCALE\]",
    ),
    (GENERATE, "--lora", ["--lora", "x.safetensors:inf"], r"SCALE 'inf' is not a finite number"),
    (GENERATE, "--lora", ["--lora", "x.safetensors@middle"], r"'@middle' is not @high, @low or @both"),
    (GENERATE, "--lora", ["--lora", "{missing}.safetensors:0.5@high"], r"no such LoRA file"),
    (GENERATE, "--lora", ["--lora", "{file}"], r"--lora .*unknown weights format"),
    (GENERATE, "--lora", ["--lora", "{file}@low"], r"--lora .*one DiT: expert='low'"),
    (GENERATE, "--fp8", ["--fp8", "fp4"], r"invalid choice: 'fp4'"),
    (GENERATE, "--fp8", ["--device", "cpu", "--fp8", "scaled_mm"], r"--fp8 scaled_mm: .*CUDA GPU"),
    (GENERATE, "--sigma-grid", ["--sigma-grid", "karras"], r"invalid choice: 'karras'"),
    # -- generate: single files ------------------------------------------------------------------
    (
        GENERATE,
        "--transformer",
        ["--transformer", "{file}"],
        r"give --model or single files \(--transformer\)",
    ),
    (SINGLE, "--transformer", ["--transformer", "{missing}"], r"no such DiT file or folder"),
    (
        SINGLE,
        "--transformer",
        ["--transformer", "{file}", "--vae", "{file}", "--text-encoder", "{file}"],
        r"--transformer: .*unknown weights format",
    ),
    (SINGLE, "--transformer-2", ["--transformer-2", "{missing}"], r"no such DiT file or folder"),
    (SINGLE, "--vae", ["--vae", "{missing}"], r"no such VAE file"),
    (SINGLE, "--vae", ["--transformer", "{file}", "--text-encoder", "{file}"], r"single files need --vae"),
    (SINGLE, "--text-encoder", ["--text-encoder", "{tmp}"], r"expected a text encoder file, got a folder"),
    (SINGLE, "--image-encoder", ["--image-encoder", "{missing}"], r"no such image encoder file"),
    (SINGLE, "--tokenizer", ["--tokenizer", "{file}"], r"is a file; expected a tokenizer folder"),
    (GENERATE, "--tokenizer", ["--tokenizer", "{empty}"], r"give --model or single files \(--tokenizer\)"),
    # -- generate: parallel, speed and memory ----------------------------------------------------
    (GENERATE, "--ulysses", ["--ulysses", "0"], r"at least 1 \(ranks\)"),
    (GENERATE, "--ulysses", ["--ulysses", "2"], r"--ulysses 2 x --ring 1 = 2"),
    (GENERATE, "--ring", ["--ring", "-1"], r"at least 1"),
    (GENERATE, "--vae-halo", ["--vae-halo", "-1"], r"at least 0 \(latent rows\)"),
    (GENERATE, "--offload", ["--offload", "disk"], r"invalid choice: 'disk'"),
    (GENERATE, "--offload-buffers", ["--offload-buffers", "0"], r"at least 1"),
    (GENERATE, "--offload-buffers", ["--offload-buffers", "x"], r"whole number"),
    (GENERATE, "--cache", ["--cache", "fast"], r"invalid choice: 'fast'"),
    (
        GENERATE,
        "--cache",
        ["--cache", "teacache"],
        r"TeaCache has no published coefficients.*--teacache-coefficients",
    ),
    (GENERATE, "--cache-option", ["--cache-option", "max_order"], r"expected KEY=VALUE"),
    (GENERATE, "--cache-option", ["--cache-option", "max_order=2"], r"--cache-option needs --cache"),
    (
        GENERATE,
        "--cache-option",
        ["--cache", "taylorseer", "--cache-option", "max_order=-1"],
        r"--cache-option: taylorseer max_order must be at least 0, got -1",
    ),
    (
        GENERATE,
        "--cache-option",
        ["--cache", "taylorseer", "--cache-option", "interval=2"],
        r"taylorseer has no option 'interval'; taylorseer options: cache_interval \(default 5\)",
    ),
    (
        GENERATE,
        "--cache-option",
        ["--cache", "magcache"],
        r"--cache-option: MagCache has no published mag_ratios for a DiT of width 24.*calibrate",
    ),
    (GENERATE, "--residual-threshold", ["--residual-threshold", "-1"], r"finite number, at least 0"),
    (GENERATE, "--residual-threshold", ["--residual-threshold", "nan"], r"finite"),
    (GENERATE, "--teacache-coefficients", ["--teacache-coefficients", "x"], r"comma-separated numbers"),
    (GENERATE, "--teacache-coefficients", ["--teacache-coefficients", "1,nan"], r"comma-separated numbers"),
    (GENERATE, "--cfg-truncation", ["--cfg-truncation", "2"], r"at least 0 and at most 1"),
    (GENERATE, "--cfg-truncation", ["--cfg-truncation", "-0.1"], r"at least 0"),
    (GENERATE, "--text-encoder-device", ["--text-encoder-device", "foo"], r"is not a device"),
    (GENERATE, "--text-encoder-device", ["--text-encoder-device", "cuda:99"], r"CUDA"),
    (GENERATE, "--vae-chunk-frames", ["--vae-chunk-frames", "0"], r"at least 1"),
    (GENERATE, "--vae-memory", ["--vae-memory", "2XB"], r"--vae-memory: expected a memory size such as 2GB"),
    (GENERATE, "--vae-memory", ["--vae-memory", "0"], r"memory size"),
    (GENERATE, "--preview", ["--preview", "live.gif"], r"--preview: a \.webp file name, got 'live\.gif'"),
    (GENERATE, "--preview-every", ["--preview-every", "0"], r"--preview-every: .*at least 1"),
    (GENERATE, "--preview-decoder", ["--preview-decoder", "vae"], r"invalid choice: 'vae'"),
    (
        GENERATE,
        "--preview-decoder",
        ["--preview-decoder", "tiny"],
        r"--preview-decoder tiny needs the tiny VAE",
    ),
    (GENERATE, "--text-cache-size", ["--text-cache-size", "-1"], r"at least 0"),
    (GENERATE, "--attention-backend", ["--attention-backend", "fastest"], r"invalid choice: 'fastest'"),
    (
        GENERATE,
        "--attention-backend",
        ["--device", "cpu", "--attention-backend", "cudnn"],
        r"--attention-backend cudnn: PyTorch has no cudnn attention kernel on the CPU; use auto, .*math",
    ),
    (GENERATE, "--attention-backend", ["--device", "cpu", "--attention-backend", "efficient"], r"on the CPU"),
    (GENERATE, "--host-memory", ["--host-memory", "huge"], r"invalid choice: 'huge'"),
    # -- serve -----------------------------------------------------------------------------------
    (SERVE, "--model", ["--model", "{missing}"], r"no such folder"),
    (SERVE, "--model", ["--model", "{file}"], r"is a file"),
    (SERVE, "--served-model-name", ["--served-model-name", ""], r"empty value"),
    (SERVE, "--host", ["--host", ""], r"empty value"),
    (SERVE, "--host", ["--host", "nosuch.invalid"], r"--host nosuch\.invalid: cannot resolve it"),
    (SERVE, "--host", ["--host", "192.0.2.1"], r"cannot listen on --host 192\.0\.2\.1"),
    (SERVE, "--port", ["--port", "70000"], r"at least 0 and at most 65535"),
    (SERVE, "--port", ["--port", "-1"], r"at least 0"),
    (SERVE, "--port", ["--port", "http"], r"whole number"),
    (SERVE, "--output-dir", ["--output-dir", "{file}"], r"is a file, not a folder"),
    (SERVE, "--output-dir", ["--output-dir", "{file}/jobs"], r"cannot create .* is a file"),
    (SERVE, "--output-dir", ["--output-dir", ""], r"empty value"),
    (SERVE, "--media-dir", ["--media-dir", "{file}"], r"is a file, not a folder"),
    (SERVE, "--media", ["--media", "https://bucket/videos"], r"expected s3://BUCKET or s3://BUCKET/PREFIX"),
    (SERVE, "--media", ["--media", "s3://Not_A_Bucket/x"], r"'Not_A_Bucket' is not a bucket name"),
    (SERVE, "--media", ["--media-dir", "{tmp}/m", "--media", "s3://b-1/x"], r"--media-dir name two media"),
    (SERVE, "--role", ["--role", "gpu"], r"invalid choice: 'gpu'"),
    (SERVE, "--role", ["--role", "api"], r"--role api needs --store postgresql://"),
    (
        SERVE,
        "--store",
        ["--store", "mysql://db/jobs"],
        r"--store: expected a postgresql:// URL, got mysql://",
    ),
    (SERVE, "--lease-seconds", ["--lease-seconds", "0"], r"at least 0\.5"),
    (SERVE, "--api-key", ["--api-key", ""], r"the key is empty"),
    (SERVE, "--api-key", ["--api-key", "two words"], r"printable ASCII without spaces"),
    (SERVE, "--max-queue", ["--max-queue", "0"], r"at least 1"),
    (SERVE, "--max-batch", ["--max-batch", "0"], r"at least 1"),
    (SERVE, "--max-batch", ["--max-batch", "x"], r"whole number"),
    (SERVE, "--max-pixels", ["--max-pixels", "0"], r"at least 1"),
    (SERVE, "--max-frames", ["--max-frames", "0"], r"at least 1"),
    (SERVE, "--max-steps", ["--max-steps", "-5"], r"at least 1"),
    (SERVE, "--max-body-mb", ["--max-body-mb", "inf"], r"finite number, at least 0\.001 and at most 1000000"),
    (SERVE, "--max-body-mb", ["--max-body-mb", "nan"], r"finite"),
    (SERVE, "--max-body-mb", ["--max-body-mb", "0"], r"at least 0\.001"),
    (SERVE, "--max-body-mb", ["--max-body-mb", "-1"], r"at least 0\.001"),
    (SERVE, "--device", ["--device", "gpu"], r"'gpu' is not a device"),
    (SERVE, "--device", ["--device", "cuda:99"], r"CUDA"),
    (SERVE, "--dtype", ["--dtype", "int8"], r"float32, bfloat16 or float16"),
    (SERVE, "--ulysses", ["--ulysses", "0"], r"at least 1"),
    (SERVE, "--ring", ["--ring", "0"], r"at least 1"),
    (SERVE, "--vae-halo", ["--vae-halo", "-1"], r"at least 0"),
    (SERVE, "--lora-dir", ["--lora-dir", "{missing}"], r"no such LoRA folder"),
    (SERVE, "--lora-dir", ["--lora-dir", "{file}"], r"no such LoRA folder"),
    (SERVE, "--lora-expert", ["--lora-expert", "middle"], r"invalid choice: 'middle'"),
    (SERVE, "--lora-cache", ["--lora-cache", "0"], r"at least 1"),
    # -- convert ---------------------------------------------------------------------------------
    (["convert", "--output", "{tmp}/converted"], "model", ["{missing}"], r"argument model: no such folder"),
    (["convert", "--output", "{tmp}/converted"], "model", ["{file}"], r"argument model: .*is a file"),
    (["convert", "--output", "{tmp}/converted"], "model", ["{empty}"], r"model: .*model_index\.json"),
    (
        CONVERT,
        "--to",
        ["--to", "comfyui"],
        r"invalid choice: 'comfyui' \(choose from 'diffusers', 'original'\)",
    ),
    (CONVERT, "--output", ["--output", "{file}"], r"is a file, not a folder"),
    (CONVERT, "--output", ["--output", ""], r"empty value"),
    (CONVERT, "--dtype", ["--dtype", "int8"], r"float32, bfloat16 or float16"),
    (CONVERT, "--max-shard-size", ["--max-shard-size", "5XB"], r"expected a size such as 5GB"),
    (CONVERT, "--max-shard-size", ["--max-shard-size", "infGB"], r"expected a size"),
    (CONVERT, "--max-shard-size", ["--max-shard-size=-1GB"], r"expected a size"),
    (CONVERT, "--max-shard-size", ["--max-shard-size", "0"], r"at least 1 byte"),
    (CONVERT, "--max-shard-size", ["--max-shard-size", "0.1B"], r"at least 1 byte"),
    (CONVERT, "--transformer", ["--transformer", "{missing}"], r"no such DiT file or folder"),
    (CONVERT, "--transformer", ["--transformer", "{file}"], r"give a checkpoint \(MODEL\) or single files"),
    (
        ["convert", "--output", "{tmp}/converted"],
        "--vae",
        ["--transformer", "{file}"],
        r"single files --transformer, --vae and --text-encoder \(missing: --vae, --text-encoder\)",
    ),
    (CONVERT, "--transformer-2", ["--transformer-2", "{missing}"], r"no such DiT"),
    (CONVERT, "--vae", ["--vae", "{missing}"], r"no such VAE file"),
    (CONVERT, "--text-encoder", ["--text-encoder", "{missing}"], r"no such text encoder file"),
    (CONVERT, "--image-encoder", ["--image-encoder", "{missing}"], r"no such image encoder file"),
    (CONVERT, "--tokenizer", ["--tokenizer", "{missing}"], r"no such folder"),
    # -- bench -----------------------------------------------------------------------------------
    (BENCH, "--steps", ["--steps", "0"], r"at least 1 and at most 1000"),
    (BENCH, "--frames", ["--frames", "6"], r"4k\+1 frames"),
    (BENCH, "--frames", ["--frames", "0"], r"at least 1"),
    (BENCH, "--size", ["--size", "100"], r"a multiple of 16"),
    (BENCH, "--size", ["--size", "0"], r"at least 16"),
    (BENCH, "--repeats", ["--repeats", "0"], r"at least 1"),
    (BENCH, "--threads", ["--threads", "-1"], r"at least 0"),
    (BENCH, "--engines", ["--engines", "torch"], r"comma-separated list of diffusers and wanpipe"),
    (BENCH, "--engines", ["--engines", "wanpipe,wanpipe"], r"each once"),
    (BENCH, "--engines", ["--engines", ""], r"comma-separated"),
    (BENCH, "--out-dir", ["--out-dir", "{file}"], r"is a file, not a folder"),
    (BENCH, "--vae-chunk-frames", ["--vae-chunk-frames", "0"], r"at least 1"),
    (BENCH, "--vae-memory", ["--vae-memory", "many"], r"--vae-memory: expected a memory size such as 2GB"),
    (BENCH, "--cache", ["--cache", "fast"], r"invalid choice"),
    (BENCH, "--residual-threshold", ["--residual-threshold", "-1"], r"at least 0"),
    (BENCH, "--residual-threshold", ["--residual-threshold", "nan"], r"finite"),
    (BENCH, "--cfg-truncation", ["--cfg-truncation", "2"], r"at most 1"),
    # -- the command itself ----------------------------------------------------------------------
    ([], "command", [], r"the following arguments are required: command"),
    ([], "command", ["render"], r"argument command: invalid choice: 'render'"),
    (["generate"], "--prompt", [], r"the following arguments are required: --prompt"),
]

# Flags that take a value but have no bad one (any text is a negative prompt).
NO_BAD_VALUE = {("generate", "--negative-prompt")}


def _case_id(case: tuple[list[str], str, list[str], str]) -> str:
    base, flag, extra, _ = case
    command = base[0] if base else "wanpipe"
    return f"{command} {' '.join(extra) or flag}".replace("{", "").replace("}", "")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The placeholders' files, outside each test's own folder (which must stay empty)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "notes").write_text("not weights, not an image\n")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "frame.png")
    (folder / "empty").mkdir()
    return {
        "file": str(folder / "notes"),
        "png": str(folder / "frame.png"),
        "empty": str(folder / "empty"),
        "missing": str(folder / "missing"),
    }


def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tiny_ckpt: Path, files, tmp_path: Path, capsys) -> None:
    base, flag, extra, pattern = case
    if flag == "--host" and "192.0.2.1" in extra and _can_bind("192.0.2.1"):
        pytest.skip("this machine has the address 192.0.2.1")
    values = {**files, "ckpt": str(tiny_ckpt), "tmp": str(tmp_path)}
    argv = [part.format(**values) for part in [*base, *extra]]
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("wanpipe") and "error:" in line, line
    assert flag in line, line
    assert re.search(pattern, line), line
    assert _snapshot(tmp_path) == before  # nothing written: no video, no folder, no job database


def _can_bind(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def test_no_cuda_names_the_build(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    """``--device cuda`` on a CPU build of torch says so (and how to get on)."""
    if CUDA:
        pytest.skip("CUDA is available here")
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "a", "--device", "cuda"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line
    if torch.version.cuda is None:
        assert f"this build of torch has no CUDA (torch {torch.__version__}); use --device cpu" in line
    else:
        assert "no CUDA device is visible" in line


def _flags_with_values(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.nargs == 0:
            continue
        names.add(max(action.option_strings, key=len) if action.option_strings else action.dest)
    return names


def test_every_flag_is_covered() -> None:
    """Every flag that takes a value, of every command, has a bad value in the table."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    covered = {(base[0] if base else "wanpipe", flag) for base, flag, _, _ in CASES}
    missing = [
        (name, flag)
        for name, sub in commands.items()
        for flag in sorted(_flags_with_values(sub))
        if (name, flag) not in covered | NO_BAD_VALUE
    ]
    assert not missing, f"flags without a bad value in CASES: {missing}"
    assert len(CASES) >= 150


def test_good_values_still_parse() -> None:
    """The checks refuse only what is wrong: the documented forms pass."""
    parser = build_parser()
    args = parser.parse_args(
        [
            "generate",
            "--prompt",
            "a",
            "--device",
            "cpu",
            "--dtype",
            "BF16",
            "--steps",
            "1000",
            "--seed",
            str(2**63 - 1),
            "--strength",
            "1",
            "--cfg-truncation",
            "0",
            "--text-cache-size",
            "0",
            "--vae-halo",
            "0",
        ]
    )
    assert (args.steps, args.seed, args.strength, args.dtype) == (1000, 2**63 - 1, 1.0, "BF16")
    args = parser.parse_args(["convert", "--output", "o", "--vae", __file__, "--max-shard-size", "1.5GB"])
    assert args.max_shard_size == int(1.5 * 1024**3)
    args = parser.parse_args(["serve", "--port", "0", "--max-body-mb", "0.5", "--api-key", "sk-1"])
    assert (args.port, args.max_body_mb, args.api_key) == (0, 0.5, "sk-1")
    args = parser.parse_args(["bench", "--frames", "1", "--size", "16", "--engines", "wanpipe"])
    assert (args.frames, args.size, args.engines) == (1, 16, "wanpipe")


def test_lora_syntax() -> None:
    from wanpipe.arguments import parse_lora_arg

    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0, "both")
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5, "both")
    assert parse_lora_arg("a.safetensors:-1@low") == ("a.safetensors", -1.0, "low")
    assert parse_lora_arg("a.safetensors@high") == ("a.safetensors", 1.0, "high")
    assert parse_lora_arg("/data/run:3/a.safetensors") == ("/data/run:3/a.safetensors", 1.0, "both")
    assert parse_lora_arg(__file__) == (__file__, 1.0, "both")
    for bad in ("a.safetensors:abc", "a.safetensors:nan", "a.safetensors@mid", "a.safetensors:x@high"):
        with pytest.raises(ValueError, match=r"FILE\[:SCALE\]\[@high\|low\|both\]"):
            parse_lora_arg(bad)


def test_request_errors_name_the_flag() -> None:
    from wanpipe.arguments import request_error
    from wanpipe.context import InvalidRequestError

    def said(message: str, param: str | None) -> str:
        return request_error(InvalidRequestError(message, param))

    assert said("num_inference_steps must be at least 1, got 0", "num_inference_steps") == (
        "--steps must be at least 1, got 0"
    )
    assert said("guidance_scale_2 must be >= 0, got -1", "guidance_scale_2").startswith("--guidance-scale-2 ")
    assert said("video: cannot read the video (x)", "video") == "--video: cannot read the video (x)"
    assert said("this checkpoint is image-to-video: pass image", "image") == (
        "--image: this checkpoint is image-to-video: pass --image"
    )
    assert said("the video has 1 frames, fewer than num_frames=5", "video").endswith("--num-frames=5")
    assert said("mask needs video too: x", "mask") == "--mask needs --video too: x"
    assert said("reference_images: cannot read the image (x)", "reference_images") == (
        "--reference-image: cannot read the image (x)"
    )
    assert said("something else", None) == "something else"
