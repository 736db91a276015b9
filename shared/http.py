"""aiohttp pieces both HTTP servers use: JSON errors `{"error": ..., "detail": ...}`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.logs import get_logger

log = get_logger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024


def json_error(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON; an unexpected exception is a logged 500, never a crash."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason, exc.text if exc.text != f"{exc.status}: {exc.reason}" else None)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return json_error(500, "internal error", None)


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse a JSON request body into `model`, or raise a 400/413 with the reasons."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(raw))
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad_request("body is not valid JSON", str(exc)) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors(include_url=False)
        ]
        raise _bad_request("invalid request body", detail) from None


def _bad_request(error: str, detail: Any) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": error, "detail": detail}), content_type="application/json"
    )


def int_query(request: web.Request, name: str, default: int | None, *, lo: int = 0, hi: int = 10_000) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad_request(f"query parameter {name!r} must be an integer", value) from None
    if not lo <= number <= hi:
        raise _bad_request(f"query parameter {name!r} must be within {lo}..{hi}", number)
    return number
