"""What the HTTP side reads before a route runs: the body size limit (413 at once from Content-Length,
else while reading), the API key (401), and a body as JSON or multipart / urlencoded form fields."""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanpipe.serving.errors import APIError, invalid
from wanpipe.serving.parsing import unflatten_form_keys
from wanpipe.serving.uploads import Upload


class BodyTooLargeError(Exception):
    pass


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``: at once from Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= 2 * self.max_bytes:
                await self._drain(receive, self.max_bytes * 2)
            await too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await self._drain(receive, self.max_bytes)
                    raise BodyTooLargeError
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _drain(receive: Receive, limit: int) -> None:
        """Read and drop up to ``limit`` more body bytes, so that a client still uploading can finish
        writing and read the 413 (closing on it mid-upload makes it see a broken connection instead).
        A body longer than that is cut off: the connection closes after the 413."""
        drained = 0
        while drained <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def too_large(max_bytes: int) -> JSONResponse:
    error = APIError(
        413,
        f"the request body is larger than this server accepts ({max_bytes} bytes, --max-body-mb)",
        code="request_too_large",
    )
    return JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})


async def require_api_key(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not given:
        raise APIError(
            401,
            "missing API key: send the header Authorization: Bearer <key>",
            param=None,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


async def read_fields(request: Request, max_part_bytes: int) -> dict[str, Any]:
    """A JSON object, or multipart / urlencoded form fields (uploads as bytes), as a dict."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        return await read_json(request)
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_part_size=max_part_bytes)
        except BodyTooLargeError:
            raise
        except StarletteHTTPException as e:
            raise invalid(f"malformed form data: {e.detail}", None, "invalid_form") from None
        except Exception as e:  # python-multipart's own errors on garbage
            raise invalid(f"malformed form data: {e}", None, "invalid_form") from None
        try:
            items: list[tuple[str, Any]] = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value = Upload(await value.read(), value.filename, value.content_type)
                items.append((key, value))
        finally:
            await form.close()
        return unflatten_form_keys(items)
    raise APIError(
        415,
        f"unsupported content type {media_type or '(none)'!r}: send application/json or multipart/form-data",
        code="unsupported_media_type",
    )


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"malformed JSON body: {e}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the JSON body must be an object", None, "invalid_json")
    return data
