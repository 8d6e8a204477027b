"""``wanpipe serve``: the video generation server on FastAPI + uvicorn.

``add_serve_parser(subparsers)`` adds the ``serve`` command to the ``wanpipe`` parser and
``cmd_serve(args)`` runs it; ``python -m wanpipe.serving ARGS`` runs the same without the subcommand.
The server binds first (``--port 0`` picks a free port; the address is printed), then loads the model
in the worker thread: ``/health`` answers at once, ``/ready`` once the model is loaded. SIGTERM and
SIGINT stop it gracefully: the running batch stops at its next denoising step and stays queued.

Under torchrun (``--ulysses/--ring/--cfg-parallel``) rank 0 serves and every other rank follows its
batches (``wanpipe.serving.distributed``); see docs/parallel.md.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from wanpipe import arguments as a
from wanpipe.parallel.options import add_parallel_arguments, parallel_config, vae_halo
from wanpipe.weights.taehv import add_tiny_vae_argument

if TYPE_CHECKING:
    import torch

    from wanpipe.parallel.mesh import ParallelConfig
    from wanpipe.pipeline import WanPipeline
    from wanpipe.serving.media_store import MediaStore

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

logger = logging.getLogger("wanpipe.serving")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from wanpipe.serving.parsing import ServeLimits

    limits = ServeLimits()
    a.add_model_arguments(p)
    add_tiny_vae_argument(p)
    p.add_argument(
        "--served-model-name",
        type=a.non_empty("a model name"),
        default=None,
        help="the model's name in the API (default: --model)",
    )
    p.add_argument(
        "--host",
        type=a.non_empty("a host name or IP address"),
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1)",
    )
    p.add_argument(
        "--port", type=a.integer(0, 65535), default=8000, help="port (default: 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--output-dir",
        type=a.output_folder,
        default="wanpipe-serve",
        help="where the job database and the videos live (default: ./wanpipe-serve)",
    )
    p.add_argument(
        "--api-key",
        type=a.api_key,
        default=os.environ.get("WANPIPE_API_KEY") or None,
        help="require Authorization: Bearer KEY on /v1 routes (default: $WANPIPE_API_KEY, else none)",
    )
    count = a.integer(1)
    p.add_argument("--max-queue", type=count, default=limits.max_queue, help="queued jobs before 429")
    p.add_argument("--max-batch", type=count, default=limits.max_batch, help="jobs of one shape run together")
    p.add_argument(
        "--max-pixels", type=count, default=limits.max_pixels, help="largest width*height accepted"
    )
    p.add_argument("--max-frames", type=count, default=limits.max_frames, help="most frames accepted")
    p.add_argument("--max-steps", type=count, default=limits.max_steps, help="most steps accepted")
    p.add_argument(
        "--max-body-mb",
        type=a.number(0.001, 1_000_000, what="MiB"),
        default=25.0,
        help="largest request body in MiB (default: 25)",
    )
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument(
        "--lora-dir",
        type=a.existing_folder("LoRA"),
        default=None,
        help="serve the LoRA files (.safetensors) of this folder by name: a request's loras "
        '[{"name", "scale"}] merges them for its job (GET /v1/loras lists them)',
    )
    p.add_argument(
        "--lora-expert",
        choices=("high", "low", "both"),
        default="both",
        help="the Wan 2.2 A14B experts the --lora-dir adapters go to (default: both)",
    )
    p.add_argument(
        "--lora-cache", type=count, default=8, help="--lora-dir adapters kept read in memory (default: 8)"
    )
    add_parallel_arguments(p)
    add_media_arguments(p)
    from wanpipe.serving.roles import add_cluster_arguments

    add_cluster_arguments(p)


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    """Where uploads and videos live (:mod:`wanpipe.serving.media_store`)."""
    p.add_argument(
        "--media-dir",
        type=a.output_folder,
        default=None,
        help="keep uploads and videos in this folder (a shared mount such as NFS for several servers; "
        "default: --output-dir)",
    )
    p.add_argument(
        "--media",
        metavar="s3://BUCKET/PREFIX",
        default=None,
        help="keep uploads and videos in S3-compatible object storage (boto3; endpoint and credentials from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)",
    )
    p.add_argument(
        "--media-redirect",
        action="store_true",
        help="with --media: answer a content request with a redirect to a presigned URL instead of streaming",
    )


def open_media(
    output_dir: str | os.PathLike[str],
    *,
    media_dir: str | os.PathLike[str] | None = None,
    media_url: str | None = None,
    redirect: bool = False,
) -> MediaStore:
    """The media store of ``wanpipe serve``: ``--media s3://...``, else ``--media-dir``, else the output
    folder. Checked before it is returned (MediaConfigError, one line)."""
    from wanpipe.serving.media_store import LocalMedia, MediaConfigError

    if media_url is not None and media_dir is not None:
        raise MediaConfigError("--media and --media-dir name two media stores: give one")
    if redirect and media_url is None:
        raise MediaConfigError("--media-redirect needs object storage (--media s3://bucket/prefix)")
    if media_url is not None:
        from wanpipe.serving.media_s3 import S3Media

        media: MediaStore = S3Media.from_url(media_url, redirect=redirect)
    elif media_dir is not None:
        try:
            media = LocalMedia(media_dir, shared=True)
        except OSError as e:
            raise MediaConfigError(f"--media-dir {media_dir}: cannot use it ({e.strerror or e})") from None
    else:
        media = LocalMedia(output_dir)
    media.check()
    return media


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve`` to a ``wanpipe`` subcommand parser; ``cmd_serve(args)`` runs it."""
    p = subparsers.add_parser(
        "serve",
        help="serve video generation over HTTP (OpenAI Videos API, Open Responses, a web page)",
        description="A video generation server: jobs queue in a SQLite database in --output-dir, run on the "
        "model in batches, and stay downloadable across restarts. Without --model, the built-in demo "
        "checkpoint (random weights: its videos are noise) is served.",
    )
    add_serve_arguments(p)
    return p


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=256)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(message: str, code: int) -> int:
    return a.fail("wanpipe serve", message, code)


def _check_host(host: str, port: int) -> str | None:
    """Why ``--host`` cannot be listened on (a name that does not resolve), or None."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host}: cannot resolve it ({e}); use an IP address (127.0.0.1, 0.0.0.0, ::) or a host name"
    return None


def _model(args: argparse.Namespace, announce: bool = True) -> str:
    if args.model is not None:
        return args.model
    from wanpipe.demo import ensure_demo_checkpoint

    model = str(ensure_demo_checkpoint())
    if announce:
        print(f"no --model given: serving the demo checkpoint at {model} (random weights: videos are noise)")
    return model


def _load_pipeline(
    model: str,
    args: argparse.Namespace,
    parallel: ParallelConfig | None = None,
    rank_device: torch.device | None = None,
) -> WanPipeline:
    """The pipeline on this rank's device; with ``parallel``, its mesh (a collective on every rank)."""
    from wanpipe.pipeline import WanPipeline

    if rank_device is not None and rank_device.type == "cuda":
        import torch

        torch.cuda.set_device(rank_device)  # the current device is per thread (rank 0 loads in its worker)
    import torch.distributed as dist

    device = args.device if args.device is not None else rank_device
    # Under torchrun rank 0 alone encodes the prompts (and broadcasts them): the others skip UMT5.
    first = parallel is None or not dist.is_initialized() or dist.get_rank() == 0

    return WanPipeline.from_pretrained(
        model,
        device=device,
        dtype=args.dtype,
        load_text_encoder=first,
        parallel=parallel,
        vae_halo=vae_halo(args) if parallel is not None else None,
        tiny_vae=args.tiny_vae,
    )


def _load_exit_code(error: BaseException) -> int:
    bad_input = isinstance(error, FileNotFoundError | NotImplementedError | ValueError)  # CheckpointError too
    return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


def cmd_serve(args: argparse.Namespace) -> int:
    """``wanpipe serve``; under torchrun rank 0 serves (:func:`_serve`) and the others follow."""
    try:
        config = parallel_config(args)
    except ValueError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    problem = _check_host(args.host, args.port)
    if problem is not None:
        return _fail(problem, EXIT_BAD_INPUT)
    if config is None:
        return _serve(args)

    import torch.distributed as dist

    from wanpipe.parallel.mesh import init_distributed

    owned = not dist.is_initialized()  # destroy the process group only if this call made it
    try:
        device = init_distributed()
        if dist.get_rank() == 0:
            return _serve(args, config, device)
        return _follow(args, config, device)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def _follow(args: argparse.Namespace, config: ParallelConfig, device: torch.device) -> int:
    """A rank other than 0: load the same pipeline, then run rank 0's batches until it stops."""
    import torch.distributed as dist

    from wanpipe.serving.distributed import follow

    rank = dist.get_rank()
    try:
        pipe = _load_pipeline(_model(args, announce=False), args, config, device)
    except Exception as e:
        return _fail(f"rank {rank}: cannot load the model: {e}", _load_exit_code(e))
    try:
        return follow(pipe)
    except Exception:
        logger.exception("rank %d: a batch failed; this rank stops (restart the server)", rank)
        return EXIT_FAILED


def _serve(
    args: argparse.Namespace, parallel: ParallelConfig | None = None, rank_device: torch.device | None = None
) -> int:
    """The server (rank 0 under torchrun, with ``parallel`` and this rank's device)."""
    import uvicorn

    from wanpipe.serving.app import create_app
    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.parsing import ServeLimits
    from wanpipe.serving.roles import (
        ApiFront,
        attach_worker,
        check_role,
        open_store,
        restrict_to_worker_routes,
    )
    from wanpipe.serving.store import StoreLockedError

    serving_logger = logging.getLogger("wanpipe.serving")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if serving_logger.getEffectiveLevel() > logging.INFO:
        serving_logger.setLevel(logging.INFO)

    fail = _fail
    problem = check_role(args)
    if problem is not None:
        return fail(problem, EXIT_BAD_INPUT)
    model = _model(args) if args.role != "api" else ""
    name = args.served_model_name or (args.model if args.model is not None else "wanpipe-demo")
    aliases = tuple({str(model), Path(str(model)).name} - {name})
    try:
        limits = ServeLimits(
            max_queue=args.max_queue,
            max_batch=args.max_batch,
            max_pixels=args.max_pixels,
            max_frames=args.max_frames,
            max_steps=args.max_steps,
        )
    except ValueError as e:
        return fail(str(e), EXIT_BAD_INPUT)
    if not args.max_body_mb > 0:
        return fail(f"--max-body-mb must be positive, got {args.max_body_mb}", EXIT_BAD_INPUT)
    loras = None
    if getattr(args, "lora_dir", None) is not None:
        if parallel is not None:
            return fail("--lora-dir is not supported under torchrun yet (one process only)", EXIT_BAD_INPUT)
        from wanpipe.serving.loras import LoraLibrary

        try:
            loras = LoraLibrary(args.lora_dir, expert=args.lora_expert, cache_size=args.lora_cache)
        except OSError as e:
            return fail(str(e), EXIT_BAD_INPUT)
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        # An address this machine does not have is bad input; a port in use is not.
        code = EXIT_BAD_INPUT if e.errno == errno.EADDRNOTAVAIL else EXIT_FAILED
        return fail(f"cannot listen on --host {args.host} --port {args.port}: {e}", code)
    from wanpipe.serving.media_store import MediaConfigError

    try:
        media = open_media(
            args.output_dir,
            media_dir=getattr(args, "media_dir", None),
            media_url=getattr(args, "media", None),
            redirect=getattr(args, "media_redirect", False),
        )
    except MediaConfigError as e:
        sock.close()
        return fail(str(e), EXIT_BAD_INPUT)
    try:
        store = open_store(args, media)
    except (StoreLockedError, OSError, RuntimeError) as e:
        sock.close()
        return fail(str(e), EXIT_FAILED)

    def load() -> WanPipeline:
        return _load_pipeline(model, args, parallel, rank_device)

    server: uvicorn.Server | None = None

    def on_fatal(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    leader = None
    if parallel is not None:
        from wanpipe.serving.distributed import BatchLeader

        leader = BatchLeader()
    if args.role == "api":
        manager = ApiFront(store, limits=limits)
    else:
        manager = JobManager(
            store,
            load,
            model_name=name,
            model_aliases=aliases,
            limits=limits,
            on_fatal=on_fatal,
            leader=leader,
            loras=loras,
        )
    app = create_app(manager, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2**20))
    if args.store and args.role != "api":  # a worker of the shared queue (also "all" on PostgreSQL)
        attach_worker(manager, store, app.state.started_at)
    if args.role == "worker":
        restrict_to_worker_routes(app)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            manager.begin_shutdown()  # stops the running batch; waiting /v1/responses calls answer 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level="info" if args.access_log else "warning",
        access_log=args.access_log,
        timeout_graceful_shutdown=10,
    )
    server = Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and not args.api_key:
        logger.warning("listening on %s without --api-key: anyone who reaches it can use the server", host)
    print(
        f"wanpipe serve: listening on http://{shown}:{port} ({_what(args, name)}, jobs in "
        f"{getattr(store, 'name', store.folder)}, media in {media.where})",
        flush=True,
    )
    server.run(sockets=[sock])
    error = manager.load_error
    if error is not None:
        return fail(f"cannot load the model: {error}", _load_exit_code(error))
    if manager.fatal_error is not None:
        return fail(f"stopped after a failure under torchrun: {manager.fatal_error}", EXIT_FAILED)
    return 0


def _what(args: argparse.Namespace, name: str) -> str:
    if args.role == "api":
        return "API replica: the workers' models"
    return f"model {name}" if args.role == "all" else f"worker, model {name}"


def build_parser() -> argparse.ArgumentParser:
    parser = a.Parser(
        prog="python -m wanpipe.serving", description="wanpipe serve: a video generation server"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    add_serve_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = a.parse(build_parser(), argv)
    if isinstance(args, int):
        return args  # a bad command line, already said in one line
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
