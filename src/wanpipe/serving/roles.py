"""``wanpipe serve --role all|api|worker``: one process, or API replicas and GPU workers on one job store.

- ``all`` (the default): today's single server, the HTTP API and the model in one process; its store is
  SQLite in ``--output-dir``, or PostgreSQL with ``--store postgresql://...``.
- ``worker`` (``--store`` required): loads the model, pulls batches from the shared queue under leases
  (:mod:`wanpipe.serving.store_pg`), registers itself and its model card with the store and its
  heartbeat; answers only ``/health``, ``/ready`` (model loaded) and ``/metrics``. It also resolves the
  jobs API replicas queued (fills the defaults, computes the batch key, resizes VACE/Animate inputs): a
  request the engine refuses there fails its job (``invalid_request``) instead of a 400.
- ``api`` (``--store`` required, no ``--model``): the HTTP API without a model (:class:`ApiFront`, the
  manager's interface for the app). It learns the served models from the live workers' registrations,
  checks a request against the registered defaults and the server's limits, draws the seed (so a job
  runs with the same seed wherever and however often it runs) and queues it unresolved. The queue limit
  (429) is counted in the store: it holds for the whole cluster.

Videos and uploads live in the media store every process of a deployment shares: ``--media-dir`` (an NFS
or cloud file mount) or ``--media s3://bucket/prefix`` (:mod:`wanpipe.serving.media_store`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from wanpipe import arguments as a
from wanpipe.context import InvalidRequestError
from wanpipe.serving.job_request import check_limits
from wanpipe.serving.manager import NotReadyError, ShuttingDownError, UnknownModelError, add_to_queue
from wanpipe.serving.metrics import Metrics
from wanpipe.serving.parsing import NewJob, ServeLimits
from wanpipe.serving.store import ANIMATE_ARRAY_NAMES, Job, JobStatus, JobStore, new_job_id

if TYPE_CHECKING:
    from fastapi import FastAPI

    from wanpipe.serving.manager import JobManager
    from wanpipe.serving.media_store import MediaStore
    from wanpipe.serving.schemas import ModelCard
    from wanpipe.serving.store_pg import PgJobStore

logger = logging.getLogger("wanpipe.serving")

ROLES = ("all", "api", "worker")
WORKER_ROUTES = ("/health", "/ready", "/metrics")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all: API and model in one process (default); api: HTTP API only, no model (needs --store); "
        "worker: the model, pulling jobs from --store, answering /health, /ready, /metrics only",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="keep jobs in PostgreSQL (postgresql://user:password@host:port/db) instead of SQLite in "
        "--output-dir: API replicas and workers share it",
    )
    p.add_argument(
        "--lease-seconds",
        type=a.number(0.5, 3600, what="seconds"),
        default=30.0,
        help="with --store: a running job's lease, renewed every third of it; a job whose worker stops "
        "renewing goes back to the queue when it expires (default: 30)",
    )


def check_role(args: argparse.Namespace) -> str | None:
    """Why the role's flags do not fit together, or None."""
    if args.role != "all" and not args.store:
        return f"--role {args.role} needs --store postgresql://... (a job store the processes share)"
    if args.store and not args.store.startswith(("postgresql://", "postgres://")):
        return f"--store: expected a postgresql:// URL, got {args.store.split('://', 1)[0]}://..."
    if args.role == "api" and args.model is not None:
        return "--role api loads no model: drop --model (the workers name the models they serve)"
    return None


def open_store(args: argparse.Namespace, media: MediaStore | None = None) -> JobStore:
    """SQLite in --output-dir, or PostgreSQL at --store (StoreConfigError: one line naming it); files in
    ``media`` (``--media-dir`` or ``--media``: ``wanpipe.serving.cli.open_media``)."""
    if not args.store:
        return JobStore(args.output_dir, media=media)
    from wanpipe.serving.store_pg import PgJobStore

    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # one reconnect warning per second otherwise
    return PgJobStore(args.store, args.output_dir, media=media, lease_seconds=args.lease_seconds)


# -- the worker -------------------------------------------------------------------------------------------
def stored_new_job(store: JobStore, job: Job) -> NewJob:
    """A queued, unresolved job (from an API replica) as the parsed request it was: spec and uploads."""
    inputs = store.read_inputs(job)
    animate = {name: inputs[name] for name in ANIMATE_ARRAY_NAMES if name in inputs}
    return NewJob(
        spec=job.spec,
        image=inputs.get("image"),
        last_image=inputs.get("last_image"),
        model=job.model,
        video=inputs.get("video"),
        mask=inputs.get("mask"),
        reference_images=tuple(inputs.get("reference_images") or ()),
        animate_videos=animate or None,
    )


def attach_worker(manager: JobManager, store: PgJobStore, created: int) -> None:
    """A worker on a PostgreSQL store: it resolves the jobs API replicas queued, and once its model is
    loaded registers its /v1/models card (the API replicas list it and check requests against it)."""
    from wanpipe.serving.app import model_card
    from wanpipe.serving.resolve import resolve_job

    def resolve(job: Job) -> tuple:
        new = stored_new_job(store, job)
        manager.check_loras(new.spec.loras)
        assert manager.pipe is not None
        return resolve_job(manager.pipe, manager.limits, new)

    store.resolver = resolve
    store.progress_of = manager.running_progress

    def register() -> None:
        while not manager.wait_ready(1.0):
            if manager.stopping or manager.load_error is not None:
                return
        card = model_card(manager, created).model_dump(mode="json")
        store.card = {"card": card, "aliases": sorted(manager.model_names - {manager.model_name})}
        store.models = tuple(sorted(manager.model_names))
        try:
            store.renew(time.time())
        except OSError as e:  # the heartbeat registers it once the database is back
            logger.warning("cannot register the worker yet: %s", e)

    threading.Thread(target=register, name="wanpipe-register", daemon=True).start()


def restrict_to_worker_routes(app: FastAPI) -> None:
    """A worker answers /health, /ready and /metrics; anything else is a 404 naming the role."""
    from fastapi.responses import JSONResponse

    from wanpipe.serving.errors import APIError

    inner = app.build_middleware_stack

    def build() -> Any:
        stack = inner()

        async def only_worker_routes(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "http" and scope["path"] not in WORKER_ROUTES:
                error = APIError(
                    404,
                    f"{scope['path']}: this is a worker (--role worker): it answers {', '.join(WORKER_ROUTES)}; "
                    "send API requests to an API replica",
                    type="invalid_request_error",
                    code="not_found",
                )
                await JSONResponse(error.body(), status_code=404)(scope, receive, send)
                return
            await stack(scope, receive, send)

        return only_worker_routes

    app.build_middleware_stack = build  # type: ignore[method-assign]


# -- the API replica --------------------------------------------------------------------------------------
class ApiFront:
    """What the app asks of a job manager, for an API replica: no model, no worker thread; jobs go to the
    shared store unresolved and are run (and resolved) by the workers."""

    def __init__(self, store: PgJobStore, *, limits: ServeLimits | None = None):
        self.store = store
        self.limits = limits or ServeLimits()
        self.metrics = Metrics()
        self.loras = None
        self.load_error: BaseException | None = None
        self.step_gate = None
        self._stopping = threading.Event()
        self._cards: tuple[float, list[dict[str, Any]]] = (0.0, [])

    # the life cycle the app drives
    def start(self) -> None:
        pass

    def stop(self, timeout: float = 60.0) -> None:
        self.begin_shutdown()
        self.store.close()

    def begin_shutdown(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _registered(self) -> list[dict[str, Any]]:
        """The live workers' registrations (read at most once a second)."""
        read_at, cards = self._cards
        if time.monotonic() - read_at > 1.0:
            cards = self.store.live_cards()
            self._cards = (time.monotonic(), cards)
        return cards

    @property
    def ready(self) -> bool:
        """Some live worker serves a model (and the store answers)."""
        if self._stopping.is_set():
            return False
        try:
            return bool(self._registered())
        except OSError:
            return False

    def model_cards(self) -> list[ModelCard]:
        from wanpipe.serving.schemas import ModelCard

        seen: dict[str, ModelCard] = {}
        for entry in self._registered():
            card = ModelCard(**entry["card"])
            seen.setdefault(card.id, card)
        return list(seen.values())

    def _card_for(self, name: str | None) -> dict[str, Any]:
        """The registered card of the model a request names (its id or an alias); the first one for None."""
        entries = self._registered()
        if not entries:
            raise NotReadyError("no worker serves a model yet")
        for entry in entries:
            if name is None or name == entry["card"]["id"] or name in entry.get("aliases", ()):
                return entry["card"]
        served = sorted({entry["card"]["id"] for entry in entries})
        raise UnknownModelError(f"the model {name!r} is not served here; the workers serve {served}")

    @property
    def model_name(self) -> str:
        return self._card_for(None)["id"]

    @property
    def pipe(self) -> SimpleNamespace:
        """What the app reads of a model to parse a body: its default fps and temporal stride."""
        d = self._card_for(None)["defaults"]
        return SimpleNamespace(
            arch=SimpleNamespace(defaults=SimpleNamespace(fps=d["fps"]), temporal_stride=d["temporal_stride"])
        )

    def check_model(self, name: str | None) -> None:
        self._card_for(name)

    def submit(self, new: NewJob, source: str) -> Job:
        """Check a request against the limits and the registered model, draw its seed, queue it
        unresolved (a worker resolves it). Raises as :meth:`JobManager.submit` does."""
        if self._stopping.is_set():
            raise ShuttingDownError("the server is shutting down")
        card = self._card_for(new.model)
        if new.spec.loras:
            raise InvalidRequestError("loras: LoRA adapters are not served through API replicas yet", "loras")
        d = card["defaults"]
        defaults = SimpleNamespace(
            height=d["height"],
            width=d["width"],
            num_frames=d["num_frames"],
            num_inference_steps=d["num_inference_steps"],
        )
        if not new.animate_videos:
            check_limits(defaults, self.limits, new.spec, None if new.video is None else len(new.video))
        seed = new.spec.seed if new.spec.seed is not None else secrets.randbelow(2**31)
        spec = replace(new.spec, seed=seed, fps=new.spec.fps if new.spec.fps is not None else float(d["fps"]))
        job = Job(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            model=card["id"],
            spec=spec,
            batch_key="",  # unresolved: a worker of the model resolves it before it can be claimed
            source=source,
            created_at=time.time(),
        )
        images: dict[str, Any] = {
            "image": new.image,
            "last_image": new.last_image,
            "video": new.video,
            "mask": new.mask,
        }
        for i, reference in enumerate(new.reference_images):
            images[f"reference_image.{i}"] = reference
        images.update(dict(new.animate_videos or {}))
        added = add_to_queue(self, job, {k: v for k, v in images.items() if v is not None})
        self.metrics.count("submitted", source)
        return added

    def retry_after(self, queued: int | None = None) -> int:
        queued = self.store.count(JobStatus.QUEUED) if queued is None else queued
        return int(min(3600, max(1, math.ceil(max(queued, 1) / self.limits.max_batch) * 10)))

    def progress(self, job: Job) -> int:
        return 100 if job.status == JobStatus.COMPLETED else job.progress

    def running_batch_size(self) -> int:
        return 0

    def delete(self, job_id: str) -> Job | None:
        """Delete a job: a running one's worker sees it gone within a step (``PgJobStore.cancelled``)."""
        job = self.store.delete(job_id)
        if job is None:
            return None
        if not job.finished:
            self.metrics.count("finished", "cancelled")
            logger.info("job %s cancelled (%s)", job_id, job.status.value)
        self.store.remove_files(job_id)
        return job

    async def wait_finished(self, job_id: str, is_disconnected: Callable[[], Awaitable[bool]]) -> Job | None:
        """Poll the store until the job is finished (None if deleted); as :meth:`JobManager.wait_finished`."""
        from starlette.concurrency import run_in_threadpool

        while True:
            job = await run_in_threadpool(self.store.get, job_id)
            if job is None or job.finished:
                return job
            if self._stopping.is_set():
                raise ShuttingDownError("the server is shutting down")
            if await is_disconnected():
                return job
            await asyncio.sleep(0.3)
