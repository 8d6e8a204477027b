"""Multi-process checks for ``wanpipe.parallel``: gloo worlds of 2 and 4 CPU processes.

:func:`run_world` spawns ``world`` processes (torch.multiprocessing, spawn) that join one gloo
process group through :func:`wanpipe.parallel.init_distributed` with torchrun's environment variables
(127.0.0.1, a free port), run every check of :func:`plan` and write ``{check name: result}`` per rank;
the parent merges them (the worst diff over the ranks). A check's result is the max abs diff against
the single-process computation, or the message of the error it expected. Every check is built from a
seed, so all ranks hold the same full tensors and models and each compares its own gathered result.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

B, D = 2, 8

Mesh = tuple[int, int, bool]
"""(ulysses, ring, cfg_parallel)."""

MESHES: dict[int, list[Mesh]] = {
    2: [(2, 1, False), (1, 2, False), (1, 1, True)],
    4: [(4, 1, False), (1, 4, False), (2, 2, False), (2, 1, True), (1, 2, True)],
}

DIT_T2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=16,
    freq_dim=8,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
# Image tokens in the context, per-token timesteps and a temporal patch of 2: every input path.
DIT_I2V = {**DIT_T2V, "patch_size": (2, 2, 2), "in_channels": 20, "image_dim": 8, "added_kv_proj_dim": 48}
# VACE: control tokens sharded like the latent tokens, hints after blocks 0 and 2, per-row scales.
DIT_VACE = {**DIT_T2V, "num_layers": 3, "vace_layers": (0, 2), "vace_in_channels": 6}
DIT_CONFIGS = {"t2v": DIT_T2V, "i2v": DIT_I2V, "vace": DIT_VACE}
DIT_SHAPES = {"t2v": (3, 6, 10), "i2v": (4, 4, 8), "vace": (3, 6, 10)}  # latent (F, H, W): 45, 16, 45 tokens


def mesh_label(mesh: Mesh) -> str:
    ulysses, ring, cfg = mesh
    parts = (
        (["cfg2"] if cfg else [])
        + ([f"U{ulysses}"] if ulysses > 1 else [])
        + ([f"R{ring}"] if ring > 1 else [])
    )
    return "x".join(parts)


def attention_cases(mesh: Mesh) -> list[tuple[int, int]]:
    """(heads, sequence length) pairs: divisible, not divisible, shorter than the degree."""
    ulysses, ring, _ = mesh
    degree = ulysses * ring
    heads = [h for h in (4, 2, 3) if h % ulysses == 0]
    lengths = sorted({4 * degree, 4 * degree - 1 if degree > 1 else 3, max(1, degree - 1)}, reverse=True)
    return [(h, n) for h in heads for n in lengths]


def variants(mesh: Mesh) -> list[str]:
    ulysses, ring, _ = mesh
    return ["usp"] + (["ulysses"] if ring == 1 else []) + (["ring"] if ulysses == 1 else [])


@dataclass(frozen=True)
class Check:
    name: str
    kind: str  # "attention", "cfg", "dit", "error"
    mesh: Mesh | None = None
    args: tuple = ()


def plan(world: int) -> list[Check]:
    """Every check a world of ``world`` processes runs, in the order all ranks run them."""
    checks: list[Check] = []
    if world == 2:
        checks += [
            Check("error/world-size", "error", (4, 1, False)),
            Check("error/heads", "error", (2, 1, False), (3,)),
        ]
    for mesh in MESHES[world]:
        label = mesh_label(mesh)
        for heads, length in attention_cases(mesh):
            for variant in variants(mesh):
                checks.append(
                    Check(
                        f"attention/{label}/{variant}/H{heads}/L{length}",
                        "attention",
                        mesh,
                        (variant, heads, length),
                    )
                )
        if mesh[2]:
            checks.append(Check(f"cfg/{label}/even", "cfg", mesh, (4,)))
            checks.append(Check(f"cfg/{label}/odd", "cfg", mesh, (3,)))
        for model in ("t2v", "i2v", "vace"):
            checks.append(Check(f"dit/{label}/{model}", "dit", mesh, (model,)))
    return checks


# --------------------------------------------------------------------------------------------
# Inside a worker
# --------------------------------------------------------------------------------------------


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(repr(key))) % (2**31))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item()


def _check_attention(mesh, variant: str, heads: int, length: int) -> float:
    from wanpipe.parallel import (
        SequenceShard,
        gather_sequence,
        ring_attention,
        ulysses_attention,
        usp_attention,
    )

    gen = _generator("attention", heads, length)
    q, k, v = (torch.randn(B, heads, length, D, generator=gen) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    shard = SequenceShard.of(mesh, length)
    ql, kl, vl = (shard.shard(t, 2) for t in (q, k, v))
    if variant == "ulysses":
        out = ulysses_attention(ql, kl, vl, mesh.ulysses_group, seq_len=length)
    elif variant == "ring":
        out = ring_attention(ql, kl, vl, mesh.ring_group, seq_len=length)
    else:
        out = usp_attention(ql, kl, vl, mesh.ulysses_group, mesh.ring_group, seq_len=length)
    assert out.shape == ql.shape, (out.shape, ql.shape)
    return _diff(gather_sequence(out, mesh, length, dim=2), expected)


def _check_cfg(mesh, rows: int) -> float:
    from wanpipe.parallel import gather_cfg_batch, split_cfg_batch

    gen = _generator("cfg", rows)
    x, weight = torch.randn(rows, 5, 6, generator=gen), torch.randn(6, 7, generator=gen)
    local = split_cfg_batch(x, mesh)
    if rows % 2 == 0:
        assert local.shape[0] == rows // 2
    return _diff(gather_cfg_batch(local @ weight, mesh, rows), x @ weight)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1 + noise if re.search(r"norm[^.]*\.weight$", name) else noise * 2)


_DIT_CACHE: dict[str, tuple] = {}


def _dit_case(model_name: str):
    """(model, inputs, single-process prediction), built once per worker."""
    if model_name not in _DIT_CACHE:
        from wanpipe.models.transformer import WanTransformerModel
        from wanpipe.models.transformer_layers import TransformerConfig

        raw = DIT_CONFIGS[model_name]
        config = TransformerConfig.from_dict(raw)
        model = WanTransformerModel(config).eval()
        _randomize(model, 0)
        gen = _generator("dit", model_name)
        shape = DIT_SHAPES[model_name]
        latents = torch.randn(2, config.in_channels, *shape, generator=gen)
        text = torch.randn(2, 7, config.text_dim, generator=gen)
        if model_name == "vace":
            control = torch.randn(2, config.vace_in_channels, *shape, generator=gen)
            scale = torch.tensor([[1.0, 0.5], [-0.7, 1.5]])
            inputs = (latents, torch.tensor([900.0, 900.0]), text, None, None, control, scale)
            with torch.inference_mode():
                _DIT_CACHE[model_name] = (model, inputs, model(*inputs))
            return _DIT_CACHE[model_name]
        if model_name == "t2v":
            timestep, image = torch.tensor([900.0, 900.0]), None
        else:
            tokens = (shape[0] // 2) * (shape[1] // 2) * (shape[2] // 2)
            timestep = torch.rand(2, tokens, generator=gen) * 1000
            image = torch.randn(2, 5, config.image_dim, generator=gen)
        inputs = (latents, timestep, text, image)
        with torch.inference_mode():
            expected = model(*inputs)
        _DIT_CACHE[model_name] = (model, inputs, expected)
    return _DIT_CACHE[model_name]


def _check_dit(mesh, model_name: str) -> float:
    from wanpipe.parallel import parallel_forward

    model, inputs, expected = _dit_case(model_name)
    with torch.inference_mode():
        out = parallel_forward(mesh, model, *inputs)
    return _diff(out, expected)


def _check_error(config, num_heads: int | None = None) -> str:
    from wanpipe.parallel import ParallelMesh

    try:
        ParallelMesh.build(config, num_heads=num_heads)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{config} was accepted")


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    from wanpipe.parallel import ParallelConfig, ParallelMesh

    device = join_world(rank, world, port)
    assert device.type == "cpu" and dist.get_world_size() == world and dist.get_rank() == rank
    results: dict[str, object] = {}
    meshes: dict[Mesh, ParallelMesh] = {}
    try:
        for check in plan(world):
            ulysses, ring, cfg = check.mesh or (1, 1, False)
            config = ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=cfg)
            if check.kind == "error":
                results[check.name] = _check_error(config, *check.args)
                continue
            if check.mesh not in meshes:
                meshes[check.mesh] = ParallelMesh.build(config, num_heads=4)
            mesh = meshes[check.mesh]
            fn: Callable[..., object] = {"attention": _check_attention, "cfg": _check_cfg, "dit": _check_dit}[
                check.kind
            ]
            results[check.name] = fn(mesh, *check.args)
        dist.barrier()
    finally:
        Path(outdir, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def rendezvous_store() -> torch.distributed.TCPStore:
    """The world's rendezvous store, hosted by the parent on a port the OS picks, as torchrun's agent
    hosts it: the ranks connect to ``store.port`` (TORCHELASTIC_USE_AGENT_STORE, see :func:`join_world`),
    so no port is picked, released and bound again. Keep it referenced until the world is done."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def spawn_world(target: Callable[..., None], world: int, args: tuple, timeout_s: float) -> None:
    """Run ``target(rank, world, port, *args)`` on ``world`` spawned processes; kill them all and
    raise TimeoutError after ``timeout_s``; a process that fails raises (torch's ProcessRaisedException)."""
    store = rendezvous_store()
    ctx = mp.start_processes(
        target, args=(world, store.port, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"the {world}-process world did not finish in {timeout_s:.0f} s")
    del store


def join_world(rank: int, world: int, port: int, timeout_s: float = 60.0) -> torch.device:
    """In a spawned process: torchrun's environment for ``rank`` (the parent's rendezvous store on
    ``port``, :func:`rendezvous_store`), then join the gloo group."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    from wanpipe.parallel import init_distributed

    return init_distributed(backend="gloo", timeout=timedelta(seconds=timeout_s))


def run_world(world: int, timeout_s: float = 150.0) -> dict[str, object]:
    """Run :func:`plan` (``world``) on ``world`` spawned processes -> {check: worst result}."""
    with tempfile.TemporaryDirectory() as outdir:
        spawn_world(_worker, world, (outdir,), timeout_s)
        merged: dict[str, object] = {}
        for rank in range(world):
            for name, value in json.loads(Path(outdir, f"{rank}.json").read_text()).items():
                old = merged.get(name)
                merged[name] = max(old, value) if isinstance(value, float) and old is not None else value
        return merged


# --------------------------------------------------------------------------------------------
# ``wanpipe generate`` across a world (tests/test_parallel_generate.py)
# --------------------------------------------------------------------------------------------

GENERATE_LAYOUTS: dict[str, tuple[int, int, bool]] = {
    "ulysses": (2, 1, False),
    "ring": (1, 2, False),
    "cfg": (1, 1, True),
}
"""name -> (ulysses, ring, cfg_parallel) for a world of 2; the CLI runs "ulysses" and "cfg"."""

CLI_FLAGS = {"ulysses": ["--ulysses", "2"], "cfg": ["--cfg-parallel"]}
GENERATE_KW = dict(
    prompt="a cat walks on the grass",
    negative_prompt="blurred details",
    height=32,
    width=32,
    num_frames=5,
    num_inference_steps=3,
    guidance_scale=5.0,
)


VAE_HALOS = (0, 4, -1)
"""``executor.vae_halo`` values the generate world decodes with (seed 11, ``--ulysses 2``); -1: the
exact bands (``wanpipe.parallel.vae.EXACT_HALO``)."""


def generate_argv(ckpt: str, output: str, *extra: str) -> list[str]:
    """``wanpipe generate`` on the tiny checkpoint with :data:`GENERATE_KW`."""
    kw = GENERATE_KW
    return [
        "generate",
        "--model",
        ckpt,
        "--prompt",
        str(kw["prompt"]),
        "--negative-prompt",
        str(kw["negative_prompt"]),
        "--height",
        str(kw["height"]),
        "--width",
        str(kw["width"]),
        "--num-frames",
        str(kw["num_frames"]),
        "--steps",
        str(kw["num_inference_steps"]),
        "--guidance-scale",
        str(kw["guidance_scale"]),
        "--no-progress",
        "--output",
        output,
        *extra,
    ]


def _generate_worker(rank: int, world: int, port: int, ckpt: str, outdir: str) -> None:
    """CLI runs (seed 7) into ``outdir/cli-{layout}``; a bad mesh; then ``WanPipeline.generate``
    without a seed per layout: its frames to ``outdir/{layout}-{rank}.npy``, its seed to the results."""
    import contextlib
    import io

    import numpy as np
    import torch.distributed as dist

    join_world(rank, world, port)
    from wanpipe.cli import main
    from wanpipe.parallel import ParallelConfig
    from wanpipe.pipeline import WanPipeline

    results: dict[str, object] = {}
    try:
        for name, flags in CLI_FLAGS.items():
            argv = generate_argv(ckpt, str(Path(outdir, f"cli-{name}")), "--seed", "7", *flags)
            results[f"cli/{name}"] = main(argv)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(generate_argv(ckpt, str(Path(outdir, "bad")), "--ulysses", "3"))
        results["bad"] = [code, err.getvalue()]
        pipe = WanPipeline.from_pretrained(ckpt, device="cpu", dtype="float32")
        for name, (ulysses, ring, cfg) in GENERATE_LAYOUTS.items():
            pipe.enable_parallel(ParallelConfig(ulysses=ulysses, ring=ring, cfg_parallel=cfg))
            video = pipe.generate(**GENERATE_KW, progress=False)
            np.save(Path(outdir, f"{name}-{rank}.npy"), video.frames)
            results[f"seed/{name}"] = video.seed
        # Rank 1 without a text encoder: rank 0 encodes the prompts and broadcasts the embeddings.
        lean = WanPipeline.from_pretrained(
            ckpt,
            device="cpu",
            dtype="float32",
            load_text_encoder=rank == 0,
            parallel=ParallelConfig(ulysses=2),
        )
        results["lean/text_encoder"] = lean.executor.text_encoder is not None
        results["lean/params"] = [_param_count(pipe), _param_count(lean)]
        video = lean.generate(**GENERATE_KW, progress=False)
        np.save(Path(outdir, f"lean-{rank}.npy"), video.frames)
        results["seed/lean"] = video.seed
        # --vae-parallel: bands of latent rows decoded per rank; a halo of 4 covers the 4 rows of a
        # 32x32 video (exact), a halo of 0 does not (an approximation at the band edge).
        for halo in VAE_HALOS:
            lean.enable_parallel(ParallelConfig(ulysses=2), vae_halo=halo)
            video = lean.generate(**GENERATE_KW, seed=11, progress=False)
            np.save(Path(outdir, f"vae-halo{halo}-{rank}.npy"), video.frames)
        dist.barrier()
    finally:
        Path(outdir, f"{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def _param_count(pipe) -> int:
    """Parameters and buffers of every module a pipeline's executor holds (each tensor once)."""
    executor = pipe.executor
    modules = [executor.text_encoder, executor.vae, executor.image_encoder, executor.experts.high]
    modules.append(executor.experts.low)
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
    return total


def run_generate_world(ckpt: str, outdir: str, world: int = 2, timeout_s: float = 120.0) -> list[dict]:
    """:func:`_generate_worker` on ``world`` processes -> each rank's results."""
    spawn_world(_generate_worker, world, (ckpt, outdir), timeout_s)
    return [json.loads(Path(outdir, f"{rank}.json").read_text()) for rank in range(world)]


# --------------------------------------------------------------------------------------------
# ``wanpipe serve`` across a world (tests/test_parallel_serve.py)
# --------------------------------------------------------------------------------------------


def _serve_worker(rank: int, world: int, port: int, argv: list[str], outdir: str) -> None:
    """``wanpipe serve`` (the CLI's ``main``) on every rank: rank 0 serves, the others follow; rank 0's
    stdout (its address) goes to ``outdir/serve-0.out``, each rank's exit code to ``outdir/serve-{rank}.json``,
    and the frames of every job a rank computes to ``outdir/frames-{rank}-{seed}.npy`` (before H.264)."""
    import contextlib
    import sys

    import numpy as np
    import torch.distributed as dist

    from wanpipe.pipeline import WanPipeline

    run_contexts = WanPipeline.run_contexts

    def recording(self, contexts, *args, **kwargs):
        # the float frames (before the server's streaming into its sinks rounds them), written into the
        # sinks here so the server still stores its videos
        import torch

        from wanpipe.stages.stream import write_frames

        sinks = kwargs.pop("sinks", None)
        frames, timings = run_contexts(self, contexts, *args, **kwargs)
        for ctx, made in zip(contexts, frames):
            if made is not None:  # None: a row dropped mid-batch (its job deleted)
                np.save(Path(outdir, f"frames-{rank}-{ctx.seed}.npy"), made)
        if sinks is None:
            return frames, timings
        for sink, made in zip(sinks, frames):
            if made is not None:
                write_frames(torch.from_numpy(made)[None], [sink])
        return [None if made is None else sink for sink, made in zip(sinks, frames)], timings

    WanPipeline.run_contexts = recording  # this spawned process only
    join_world(rank, world, port)
    from wanpipe.cli import main

    code: object = "raised"
    try:
        with (
            open(Path(outdir, f"serve-{rank}.out"), "w", buffering=1) as out,
            contextlib.redirect_stdout(out),
        ):
            code = main(argv)
    finally:
        Path(outdir, f"serve-{rank}.json").write_text(json.dumps(code))
        dist.destroy_process_group()
    sys.exit(code)


@dataclass
class ServeWorld:
    """A ``wanpipe serve`` world started by :func:`start_serve_world`."""

    processes: list[mp.Process]
    store: torch.distributed.TCPStore  # the rendezvous store, alive as long as the world
    outdir: Path

    def url(self, timeout: float = 60.0) -> str:
        """Rank 0's address, from the line it prints once it listens (``--port 0``: the OS's pick)."""
        deadline = time.monotonic() + timeout
        out = self.outdir / "serve-0.out"
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", out.read_text() if out.exists() else "")
            if found:
                return found.group(1)
            if not self.processes[0].is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"rank 0 printed no address; exit {self.processes[0].exitcode}")


def start_serve_world(argv: list[str], outdir: str, world: int = 2) -> ServeWorld:
    """:func:`_serve_worker` on ``world`` spawned processes, not joined (the caller stops rank 0)."""
    store = rendezvous_store()
    ctx = mp.start_processes(
        _serve_worker,
        args=(world, store.port, argv, outdir),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    return ServeWorld(ctx.processes, store, Path(outdir))
