"""The live routes of ``wanpipe serve``: a job's progress as Server-Sent Events and its latest preview.

* ``GET /v1/videos/{id}/events`` (``text/event-stream``): one ``progress`` event with the job's current
  state as soon as the client connects, one more each time the job reports something (a denoising step,
  a preview), then exactly one final event, ``completed``, ``failed`` or ``cancelled`` (the job was
  deleted), and the stream ends. A finished job's stream is its final event alone. Each event's data is
  one line of JSON: the video object of ``GET /v1/videos/{id}`` plus ``step`` (denoising steps done),
  ``num_steps``, ``eta_seconds`` (until the last step ends; null while unknown) and, once the job has a
  preview, ``preview_url`` and ``preview_step``. A comment line every 15 s keeps idle connections open.
  A client that goes away changes nothing for the job. At shutdown the streams end without a final
  event (the running jobs stay queued).
* ``GET /v1/videos/{id}/preview``: the latest preview as an animated WebP (404 ``preview_not_ready``
  before the first one); ``X-Preview-Step`` says after which step it was made.

The routes are made by :func:`live_router` from the app's own helpers (the video object, the 404 of an
unknown id), so this module does not import :mod:`wanpipe.serving.app`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from wanpipe.media import encode_webp
from wanpipe.serving.bodies import require_api_key
from wanpipe.serving.errors import APIError
from wanpipe.serving.events import JobEvents, sse_event
from wanpipe.serving.manager import JobManager
from wanpipe.serving.openapi import errors
from wanpipe.serving.store import Job, JobStatus

KEEPALIVE_S = 15.0
FINAL_EVENTS = {JobStatus.COMPLETED: "completed", JobStatus.FAILED: "failed"}

EVENTS_RESPONSE = {
    "description": "Server-Sent Events: `progress` (the current state first, then one per step or "
    "preview), then one final `completed`, `failed` or `cancelled`; each `data` is the video object "
    "plus `step`, `num_steps`, `eta_seconds`, `preview_url` and `preview_step`.",
    "content": {
        "text/event-stream": {
            "schema": {  # one event (OpenAPI 3.1: the schema of a text/event-stream is each event's)
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"enum": ["progress", "completed", "failed", "cancelled"]},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "description": "The video object plus step, num_steps, eta_seconds, preview_url, "
                        "preview_step (JSON text).",
                    },
                },
            }
        }
    },
}
PREVIEW_RESPONSE = {
    "description": "The latest preview as an animated WebP (`X-Preview-Step`: the steps done when it was "
    "made).",
    "content": {"image/webp": {"schema": {"type": "string", "format": "binary"}}},
}


def live_state(
    job: Job, manager: JobManager, video: dict[str, Any], preview_url: Callable[[], str]
) -> dict[str, Any]:
    """An event's data: the video object ``video`` plus the step, ETA and preview of the job."""
    hub: JobEvents = manager.events
    state = hub.state(job.id)
    planned = job.spec.num_inference_steps or 0
    num_steps = state.num_steps if state is not None else planned
    if job.status == JobStatus.COMPLETED:
        step = num_steps
    elif job.status == JobStatus.QUEUED or state is None:
        step = 0
    else:
        step = state.step
    running = job.status == JobStatus.IN_PROGRESS and state is not None
    data = {
        **video,
        "step": step,
        "num_steps": num_steps,
        "eta_seconds": state.eta_seconds if running else None,
    }
    preview = hub.latest_preview(job.id)
    if preview is not None:
        data.update(preview_url=preview_url(), preview_step=preview.step)
    return data


def live_router(
    video_object: Callable[[Job, JobManager], Any], get_job: Callable[[JobManager, str], Job]
) -> APIRouter:
    """The two routes, with the app's video object (a pydantic model) and its 404 for unknown ids."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @router.get(
        "/videos/{video_id}/events",
        response_class=StreamingResponse,
        responses={200: EVENTS_RESPONSE, **errors(401, 404)},
    )
    async def video_events(request: Request, video_id: str) -> StreamingResponse:
        manager: JobManager = request.app.state.manager
        get_job(manager, video_id)  # 404 before the stream starts

        def describe(job: Job) -> dict[str, Any]:
            video = video_object(job, manager).model_dump(mode="json")
            return live_state(
                job, manager, video, lambda: str(request.url_for("video_preview", video_id=job.id))
            )

        return StreamingResponse(
            _stream(manager, video_id, describe),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get(
        "/videos/{video_id}/preview",
        name="video_preview",
        response_class=Response,
        responses={200: PREVIEW_RESPONSE, **errors(401, 404)},
    )
    async def video_preview(request: Request, video_id: str) -> Response:
        manager: JobManager = request.app.state.manager
        get_job(manager, video_id)
        found = await run_in_threadpool(manager.events.preview_webp, video_id, encode_webp)
        if found is None:
            raise APIError(
                404, f"video {video_id} has no preview yet", param="video_id", code="preview_not_ready"
            )
        data, step = found
        headers = {"Cache-Control": "no-cache", "X-Preview-Step": str(step)}
        return Response(data, media_type="image/webp", headers=headers)

    return router


async def _stream(
    manager: JobManager, job_id: str, describe: Callable[[Job], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """The events of one job (see the module's note); woken by the job's reports, never polling."""
    last: dict[str, Any] | None = None
    sent = ""
    with manager.events.watch(job_id) as wake:
        while True:
            wake.clear()  # before reading: a report that comes after the read wakes the wait below
            job = manager.store.get(job_id)
            if job is None:  # deleted: cancelled (a queued job never ran, a running one stopped)
                gone = {
                    **(last or {"id": job_id, "object": "video"}),
                    "status": "cancelled",
                    "eta_seconds": None,
                }
                yield sse_event("cancelled", json.dumps(gone))
                return
            last = describe(job)
            text = json.dumps(last)
            final = FINAL_EVENTS.get(job.status)
            if final is not None:
                yield sse_event(final, text)
                return
            if manager.stopping:
                return
            if text != sent:
                yield sse_event("progress", text)
                sent = text
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
