"""The FastAPI app of ``wanpipe serve``: routes, authentication, body limits, OpenAI-style errors.

Routes (all ``/v1`` routes need ``Authorization: Bearer <key>`` when the server has an API key):

* ``POST /v1/videos`` (multipart or JSON), ``GET /v1/videos`` (newest first, ``after``/``limit``/
  ``order``), ``GET /v1/videos/{id}``, ``GET /v1/videos/{id}/content`` (``variant=video`` mp4 or
  ``thumbnail`` JPEG), ``DELETE /v1/videos/{id}``: the OpenAI Videos API; ``GET /v1/videos/{id}/events``
  (Server-Sent Events) and ``/preview`` (animated WebP): :mod:`wanpipe.serving.live`.
* ``POST /v1/responses``: Open Responses as MAX serves it; answers when the video is done.
* ``GET /v1/models``, ``GET /v1/loras`` (the LoRA adapters of ``--lora-dir``); ``/health`` (the process answers), ``/ready`` (the model is loaded),
  ``/metrics`` (Prometheus text) and ``/`` (the web page).
* ``/openapi.json`` and ``/docs``: the OpenAPI document (:mod:`wanpipe.serving.openapi` adds the request
  bodies FastAPI cannot see; each route declares its error statuses here).

Every 4xx/5xx body is ``{"error": {"message", "type", "param", "code"}}``; a 405 names the allowed
methods in ``Allow``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

from wanpipe import __version__
from wanpipe.context import InvalidRequestError
from wanpipe.presets import PRESETS
from wanpipe.serving.bodies import (
    BodyLimitMiddleware,
    BodyTooLargeError,
    read_fields,
    read_json,
    require_api_key,
    too_large,
)
from wanpipe.serving.errors import APIError, invalid
from wanpipe.serving.job_request import LimitExceededError
from wanpipe.serving.live import live_router
from wanpipe.serving.manager import (
    JobManager,
    NotReadyError,
    QueueFullError,
    ShuttingDownError,
    UnknownModelError,
)
from wanpipe.serving.media_store import media_response, thumbnail_key, video_key
from wanpipe.serving.metrics import CONTENT_TYPE
from wanpipe.serving.openapi import LIST_PARAMETERS, POLL_HEADER, VARIANT_PARAMETERS, build_openapi, errors
from wanpipe.serving.parsing import NewJob, parse_responses_create, parse_video_create
from wanpipe.serving.scalars import format_seconds, parse_int
from wanpipe.serving.schemas import (
    LoraCard,
    LoraList,
    LoraUse,
    ModelCard,
    ModelList,
    OutputMessage,
    OutputVideo,
    PresetCard,
    ResponseObject,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
    VideoParameters,
)
from wanpipe.serving.store import Job, JobStatus
from wanpipe.serving.store_pg import StoreUnavailableError

logger = logging.getLogger("wanpipe.serving")

DEFAULT_MAX_BODY_BYTES = 25 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _manager(request: Request) -> JobManager:
    return request.app.state.manager


def _require_ready(manager: JobManager) -> None:
    if manager.stopping:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if not manager.ready:
        if manager.load_error is not None:
            raise APIError(
                503,
                f"the model failed to load: {manager.load_error}",
                type="server_error",
                code="model_failed",
            )
        raise APIError(
            503,
            "the model is still loading; try again shortly",
            type="server_error",
            code="model_loading",
            headers={"Retry-After": "5"},
        )


async def submit(manager: JobManager, new: NewJob, source: str) -> Job:
    """Queue a parsed request; the engine's validation (reading the images, resolving defaults) runs in a
    thread."""
    try:
        return await run_in_threadpool(manager.submit, new, source)
    except NotReadyError:
        _require_ready(manager)
        raise
    except ShuttingDownError as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    except UnknownModelError as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    except LimitExceededError as e:
        manager.metrics.count("rejected", "limit")
        raise APIError(400, str(e), param=new.api_param(e.param), code="limit_exceeded") from None
    except InvalidRequestError as e:
        manager.metrics.count("rejected", "invalid")
        raise APIError(400, str(e), param=new.api_param(e.param), code="invalid_value") from None
    except QueueFullError as e:
        raise APIError(
            429,
            str(e),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None


def video_object(job: Job, manager: JobManager) -> VideoObject:
    s = job.spec
    fps = s.fps or 16.0
    return VideoObject(
        id=job.id,
        status=job.status.value,
        progress=manager.progress(job),
        created_at=int(job.created_at),
        completed_at=int(job.completed_at) if job.completed_at is not None else None,
        model=job.model,
        prompt=s.prompt,
        size=f"{s.width}x{s.height}",
        seconds=format_seconds(s.num_frames or 1, fps),
        error=VideoError(**job.error) if job.error else None,
        parameters=VideoParameters(
            height=s.height,
            width=s.width,
            num_frames=s.num_frames,
            fps=fps,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            guidance_scale_2=s.guidance_scale_2,
            flow_shift=s.flow_shift,
            seed=s.seed,
            negative_prompt=s.negative_prompt,
            image=s.has_image,
            last_image=s.has_last_image,
            sampler=s.sampler,
            sigmas=None if s.sigmas is None else list(s.sigmas),
            timesteps=None if s.timesteps is None else list(s.timesteps),
            preset=s.preset,
            video=s.has_video,
            mask=s.has_mask,
            reference_images=s.reference_images,
            conditioning_scale=s.conditioning_scale,
            cache=s.cache,
            cache_options=s.cache_options,
            pose_video=s.has_pose_video,
            face_video=s.has_face_video,
            background_video=s.has_background_video,
            mask_video=s.has_mask_video,
            mode=s.mode,
            segment_frame_length=s.segment_frame_length,
            prev_segment_conditioning_frames=s.prev_segment_conditioning_frames,
            loras=[LoraUse(name=n, scale=v) for n, v in s.loras],
            decoder=s.decoder,
            preview=s.preview,
            preview_every=s.preview_every,
        ),
        batch_size=job.batch_size,
    )


def _video_response(job: Job, manager: JobManager) -> JSONResponse:
    headers = {}
    if not job.finished:  # the openai SDK's poll() waits this long between retrievals
        headers["openai-poll-after-ms"] = "250" if job.status == JobStatus.IN_PROGRESS else "500"
    return JSONResponse(video_object(job, manager).model_dump(mode="json"), headers=headers)


# What a video id can look like (the store makes video_<32 hex digits>): anything else, a path
# character, a NUL, a long string, is a 404 before the store is asked.
VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _no_video(video_id: str) -> APIError:
    shown = video_id if len(video_id) <= 80 else video_id[:77] + "..."
    return APIError(404, f"no video with id {shown!r}", param="video_id", code="not_found")


def _get_job(manager: JobManager, video_id: str) -> Job:
    job = manager.store.get(video_id) if VIDEO_ID.fullmatch(video_id) else None
    if job is None:
        raise _no_video(video_id)
    return job


# ---------------------------------------------------------------------------------------------------------
# Routes

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@v1.post(
    "/videos",
    response_model=VideoObject,
    responses={200: {"headers": POLL_HEADER}, **errors(400, 401, 404, 413, 415, 429, 503)},
)
async def create_video(request: Request) -> JSONResponse:
    manager = _manager(request)
    _require_ready(manager)
    arch = manager.pipe.arch
    try:
        fields = await read_fields(request, request.app.state.max_body_bytes)
        new = parse_video_create(
            fields,
            default_fps=arch.defaults.fps,
            temporal_stride=arch.temporal_stride,
            max_image_pixels=manager.limits.max_image_pixels,
            max_frames=manager.limits.max_frames,
            max_video_pixels=manager.limits.max_video_pixels,
        )
    except (APIError, BodyTooLargeError):
        manager.metrics.count("rejected", "invalid")
        raise
    job = await submit(manager, new, "videos")
    return _video_response(job, manager)


@v1.get(
    "/videos",
    response_model=VideoList,
    responses=errors(400, 401),
    openapi_extra={"parameters": LIST_PARAMETERS},
)
async def list_videos(request: Request) -> JSONResponse:
    manager = _manager(request)
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "order"})
    if unknown:
        raise invalid(f"unknown query parameter {unknown[0]!r}; accepted: after, limit, order", unknown[0])
    limit = parse_int(query.get("limit", "20"), "limit", 1)
    if limit > 100:
        raise invalid(f"limit must be at most 100, got {limit}", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid(f"order must be asc or desc, got {order!r}", "order")
    try:
        jobs, has_more = manager.store.list(limit=limit, after=query.get("after"), order=order)
    except KeyError:
        raise invalid(f"after: no video with id {query.get('after')!r}", "after", "not_found") from None
    data = [video_object(job, manager) for job in jobs]
    page = VideoList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )
    return JSONResponse(page.model_dump(mode="json"))


@v1.get(
    "/videos/{video_id}",
    response_model=VideoObject,
    responses={200: {"headers": POLL_HEADER}, **errors(401, 404)},
)
async def retrieve_video(request: Request, video_id: str) -> JSONResponse:
    manager = _manager(request)
    return _video_response(_get_job(manager, video_id), manager)


@v1.get(
    "/videos/{video_id}/content",
    name="video_content",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The mp4 (`variant=video`), or a JPEG of the first frame (`variant=thumbnail`).",
            "content": {
                "video/mp4": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        307: {"description": "With --media-redirect: a presigned URL of the object, in `Location`."},
        **errors(400, 401, 404, 409),
    },
    openapi_extra={"parameters": VARIANT_PARAMETERS},
)
async def video_content(request: Request, video_id: str) -> Response:
    manager = _manager(request)
    variant = request.query_params.get("variant", "video")
    if variant not in ("video", "thumbnail"):
        raise invalid(
            f"variant must be video or thumbnail, got {variant!r}", "variant", "unsupported_variant"
        )
    job = _get_job(manager, video_id)
    if job.status != JobStatus.COMPLETED:
        raise APIError(
            409,
            f"video {video_id} is {job.status.value}: its content exists once it is completed",
            param="video_id",
            code="video_not_ready",
        )
    key, media_type = (
        (video_key(video_id), "video/mp4") if variant == "video" else (thumbnail_key(video_id), "image/jpeg")
    )
    try:
        return await media_response(manager.store.media, key, media_type, key.rsplit("/", 1)[-1])
    except FileNotFoundError:
        raise APIError(
            404, f"the file of video {video_id} is missing from the media store", code="not_found"
        ) from None


@v1.delete("/videos/{video_id}", response_model=VideoDeleted, responses=errors(401, 404))
async def delete_video(request: Request, video_id: str) -> JSONResponse:
    manager = _manager(request)
    job = await run_in_threadpool(manager.delete, video_id) if VIDEO_ID.fullmatch(video_id) else None
    if job is None:
        raise _no_video(video_id)
    manager.events.forget(video_id)
    return JSONResponse(VideoDeleted(id=video_id).model_dump(mode="json"))


@v1.post(
    "/responses",
    response_model=ResponseObject,
    responses={
        204: {"description": "The client went away before the video was done (the job goes on)."},
        **errors(400, 401, 404, 409, 413, 429, 503),
    },
)
async def create_response(request: Request) -> Response:
    manager = _manager(request)
    _require_ready(manager)
    try:
        body = await read_json(request)
        new, response_format = parse_responses_create(body, max_image_pixels=manager.limits.max_image_pixels)
    except (APIError, BodyTooLargeError):
        manager.metrics.count("rejected", "invalid")
        raise
    job = await submit(manager, new, "responses")
    try:
        done = await manager.wait_finished(job.id, request.is_disconnected)
    except ShuttingDownError:
        raise APIError(
            503,
            f"the server is shutting down; job {job.id} is kept and runs after a restart "
            f"(GET /v1/videos/{job.id})",
            type="server_error",
            code="shutting_down",
            headers={"Retry-After": "30"},
        ) from None
    if done is None:
        raise APIError(409, f"job {job.id} was deleted before it finished", code="cancelled")
    if not done.finished:  # the client went away; the job goes on and stays listed under /v1/videos
        return Response(status_code=204)
    if done.status == JobStatus.FAILED:
        error = done.error or {}
        raise APIError(
            500,
            f"generation failed: {error.get('message', 'unknown error')}",
            type="server_error",
            code=error.get("code", "generation_failed"),
        )
    content = OutputVideo(frames_per_second=done.spec.fps or 16.0, num_frames=done.spec.num_frames or 1)
    if response_format == "b64_json":
        data = await run_in_threadpool(manager.store.media.get, video_key(done.id))
        content.video_data = base64.b64encode(data).decode("ascii")
    else:
        content.video_url = str(request.url_for("video_content", video_id=done.id))
    response = ResponseObject(
        id=f"resp_{done.id.removeprefix('video_')}",
        created_at=int(done.created_at),
        completed_at=int(done.completed_at or done.created_at),
        model=done.model,
        output=[OutputMessage(id=f"msg_{done.id.removeprefix('video_')}_0", content=[content])],
        seed=done.spec.seed,
        video_id=done.id,
    )
    return JSONResponse(response.model_dump(mode="json", exclude_none=True))


@v1.get("/models", response_model=ModelList, responses=errors(401, 503))
async def list_models(request: Request) -> JSONResponse:
    manager = _manager(request)
    _require_ready(manager)
    cards = getattr(manager, "model_cards", None)  # an API replica (--role api): its live workers' cards
    data = cards() if cards is not None else [model_card(manager, request.app.state.started_at)]
    return JSONResponse(ModelList(data=data).model_dump(mode="json"))


def model_card(manager: JobManager, created: int) -> ModelCard:
    """The /v1/models card of the model a manager runs (loaded)."""
    arch = manager.pipe.arch
    d, lim = arch.defaults, manager.limits
    return ModelCard(
        id=manager.model_name,
        created=created,
        task=arch.variant.task,
        defaults={
            "height": d.height,
            "width": d.width,
            "num_frames": d.num_frames,
            "num_inference_steps": d.num_inference_steps,
            "guidance_scale": d.guidance_scale,
            "fps": d.fps,
            "spatial_multiple": arch.spatial_multiple,
            "temporal_stride": arch.temporal_stride,
        },
        limits={
            "max_pixels": lim.max_pixels,
            "max_frames": lim.max_frames,
            "max_steps": lim.max_steps,
            "max_batch": lim.max_batch,
            "max_queue": lim.max_queue,
        },
        presets=[PresetCard(**p.card(), fits_model=p.fits_checkpoint(arch)) for p in PRESETS.values()],
        inputs={
            "image": arch.accepts_image,
            "image_required": arch.takes_image,
            "last_image": arch.accepts_last_image,
        }
        | dict.fromkeys(("video", "mask", "reference_image"), arch.accepts_vace)
        | dict.fromkeys(("pose_video", "face_video"), arch.accepts_animate),
    )


@v1.get("/loras", response_model=LoraList, responses=errors(401))
async def list_loras(request: Request) -> JSONResponse:
    """The LoRA adapters a request's ``loras`` may name (the files of ``--lora-dir``; none without it)."""
    library = _manager(request).loras
    infos = [] if library is None else await run_in_threadpool(library.list)
    cards = [
        LoraCard(
            id=i.name,
            file=i.file,
            size_bytes=i.size_bytes,
            experts=i.experts,
            layers=i.layers,
            unmatched_keys=i.unmatched_keys,
        )
        for i in infos
    ]
    return JSONResponse(LoraList(data=cards).model_dump(mode="json"))


plain = APIRouter()


@plain.get("/health", responses=errors())
async def health() -> dict[str, str]:
    return {"status": "ok"}


@plain.get("/ready", responses=errors(503))
async def ready(request: Request) -> dict[str, str]:
    manager = _manager(request)
    _require_ready(manager)
    return {"status": "ready", "model": manager.model_name}


class PrometheusText(PlainTextResponse):
    media_type = CONTENT_TYPE  # what the metrics render (prometheus_client's text format 0.0.4)


@plain.get(
    "/metrics",
    response_class=PrometheusText,
    responses={200: {"description": "The Prometheus text format."}, **errors()},
)
async def metrics(request: Request) -> PlainTextResponse:
    manager = _manager(request)
    text = manager.metrics.render(
        ready=manager.ready, counts=manager.store.counts(), running_batch=manager.running_batch_size()
    )
    return PrometheusText(text)


@plain.get("/", response_class=HTMLResponse, responses=errors())
async def index() -> HTMLResponse:
    page = resources.files("wanpipe.serving").joinpath("static", "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------------
# The app


def _error_response(status: int, message: str, code: str | None, headers: dict[str, str] | None = None):
    error = APIError(
        status, message, type="invalid_request_error" if status < 500 else "server_error", code=code
    )
    return JSONResponse(error.body(), status_code=status, headers=headers)


def create_app(
    manager: JobManager,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app for one job manager. Its lifespan starts the manager's worker and stops it on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)

    app = FastAPI(
        title="wanpipe serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None
    )
    app.state.manager = manager
    app.state.api_key = api_key or None
    app.state.max_body_bytes = max_body_bytes
    app.state.started_at = int(time.time())
    app.include_router(v1)
    app.include_router(live_router(video_object, _get_job))  # .../events, .../preview
    app.include_router(plain)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(BodyTooLargeError)
    async def ontoo_large(request: Request, e: BodyTooLargeError) -> JSONResponse:
        return too_large(max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        error = invalid(f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}", ".".join(loc) or None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers = dict(e.headers or {})
        message = str(e.detail)
        if e.status_code == 405:
            allowed = _allowed_methods(app, request.scope)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        return _error_response(e.status_code, message, codes.get(e.status_code), headers)

    @app.exception_handler(StoreUnavailableError)
    async def on_store_down(request: Request, e: StoreUnavailableError) -> JSONResponse:
        return _error_response(503, str(e), "store_unavailable", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def on_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("error in %s %s", request.method, request.url.path)
        return _error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route takes on this path (Starlette's 405 names the first route's alone)."""
    methods: set[str] = set()
    for route in (*app.router.routes, *v1.routes, *plain.routes):
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    order = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return sorted(methods, key=lambda m: order.index(m) if m in order else len(order))
