"""aiohttp pieces both HTTP servers use: JSON errors `{"error": ..., "detail": ...}`, strict JSON
request bodies, query parameters checked, and every refused request counted by reason.

A request is *rejected* when it is malformed or not allowed: a body too large, not UTF-8, not
JSON, nested too deeply, of the wrong content type or failing validation; a bad query or path
parameter; a missing or wrong token; an unknown route or method. Each rejection is answered with
a 4xx JSON error, logged (method, path, reason; never the body or a header) and counted in
`kgpu_http_rejected_total{reason}` (see `RejectionCollector`). A 404 for a resource that does not
exist (an unknown node) is an answer, not a rejection, and is not counted.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError

from shared.logs import get_logger

log = get_logger(__name__)

M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # the deepest real body (a rollout's templatePatch) is far below this
MAX_QUERY_VALUE_CHARS = 512
# aiohttp answers a request line over 8190 bytes itself, in text/plain; a longer line is allowed
# so that an over-long (percent-encoded) query reaches error_middleware and gets a JSON 400.
HANDLER_ARGS = {"max_line_size": 64 * 1024}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class Rejection(StrEnum):
    """Why a request was refused: the `reason` label of kgpu_http_rejected_total (a fixed set)."""

    BODY_TOO_LARGE = "body_too_large"
    NOT_UTF8 = "not_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_BODY = "invalid_body"
    INVALID_QUERY = "invalid_query"
    INVALID_PATH = "invalid_path"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NO_ROUTE = "no_route"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_REQUEST = "invalid_request"  # any other 400 a handler answers


_BY_STATUS = {
    400: Rejection.INVALID_REQUEST,
    401: Rejection.UNAUTHORIZED,
    403: Rejection.FORBIDDEN,
    405: Rejection.METHOD_NOT_ALLOWED,
    413: Rejection.BODY_TOO_LARGE,
    415: Rejection.UNSUPPORTED_MEDIA_TYPE,
}


class ApiError(Exception):
    """Raise from a handler (or a helper it calls) to answer with a JSON error.

    `rejection` marks a refused request (counted); None is an ordinary error answer."""

    def __init__(self, status: int, error: str, detail: Any = None, *, rejection: Rejection | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.rejection = rejection
        self.headers = dict(headers or {})


class HttpRejections:
    """Counts of refused requests by reason, kept on the app (`REJECTIONS`)."""

    def __init__(self) -> None:
        self.counts: dict[Rejection, int] = {reason: 0 for reason in Rejection}

    def count(self, reason: Rejection, request: web.Request, status: int) -> None:
        self.counts[reason] += 1
        log.info("HTTP request rejected: %s %s -> %d %s", request.method, request.path[:200], status, reason.value,
                 extra={"reason": reason.value, "status": status, "remote": request.remote})


REJECTIONS: web.AppKey[HttpRejections] = web.AppKey("http_rejections", HttpRejections)


class RejectionCollector(Collector):
    """Exposes an app's HttpRejections as kgpu_http_rejected_total{reason} (every reason, from 0)."""

    def __init__(self, rejections: HttpRejections) -> None:
        self.rejections = rejections

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("kgpu_http_rejected", "HTTP requests refused (4xx), by reason.",
                                     labels=["reason"])
        for reason, count in sorted(self.rejections.counts.items()):
            family.add_metric([reason.value], count)
        yield family


def track_rejections(app: web.Application) -> HttpRejections:
    """Give `app` a rejection counter (the metrics registry registers a RejectionCollector on it)."""
    rejections = HttpRejections()
    app[REJECTIONS] = rejections
    return rejections


def json_error(status: int, error: str, detail: Any = None, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def _reject(status: int, reason: Rejection, error: str, detail: Any = None) -> ApiError:
    return ApiError(status, error, detail, rejection=reason)


def _check_parameters(request: web.Request) -> None:
    """Control characters (NUL above all: PostgreSQL refuses it) never reach a handler."""
    for name, value in request.query.items():
        if len(value) > MAX_QUERY_VALUE_CHARS:
            raise _reject(400, Rejection.INVALID_QUERY, f"query parameter {name!r} is too long",
                          f"at most {MAX_QUERY_VALUE_CHARS} characters")
        if _CONTROL_CHARS.search(value) or _CONTROL_CHARS.search(name):
            raise _reject(400, Rejection.INVALID_QUERY, f"query parameter {name[:64]!r} holds control characters")
    for name, value in request.match_info.items():
        if _CONTROL_CHARS.search(value):
            raise _reject(400, Rejection.INVALID_PATH, f"path parameter {name!r} holds control characters")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON; an unexpected exception is a logged 500, never a crash; every
    rejected request is counted by reason (when the app tracks rejections)."""
    reason: Rejection | None = None
    try:
        _check_parameters(request)
        response = await handler(request)
    except ApiError as exc:
        response = json_error(exc.status, exc.error, exc.detail, exc.headers or None)
        reason = exc.rejection
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":
            response = web.Response(status=exc.status, body=exc.body, headers=exc.headers)
        else:
            detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else None
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
            response = json_error(exc.status, exc.reason, detail, headers)
        if exc.status == 404 and request.match_info.http_exception is not None:
            reason = Rejection.NO_ROUTE
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path[:200])
        return json_error(500, "internal error", None)
    if reason is None and response.status in _BY_STATUS:
        reason = _BY_STATUS[response.status]
    if reason is not None:
        rejections = request.app.get(REJECTIONS)
        if rejections is not None:
            rejections.count(reason, request, response.status)
    return response


# ---- request bodies -------------------------------------------------------------------------


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or (content_type.startswith("application/")
                                                  and content_type.endswith("+json"))


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON `text`, without parsing it (strings skipped)."""
    brackets = _BRACKETS.findall(_JSON_STRING.sub("", text))
    steps = (1 if b in "[{" else -1 for b in brackets)
    return max(itertools.accumulate(steps), default=0)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (None when empty), or a counted 4xx that says what is wrong:
    413 over MAX_BODY_BYTES, 415 not application/json, 400 not UTF-8, not JSON (NaN and
    Infinity included) or nested deeper than MAX_JSON_DEPTH."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _reject(413, Rejection.BODY_TOO_LARGE, "request body too large",
                      {"max_bytes": MAX_BODY_BYTES, "bytes": request.content_length})
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _reject(413, Rejection.BODY_TOO_LARGE, "request body too large", {"max_bytes": MAX_BODY_BYTES}) from None
    if len(raw) > MAX_BODY_BYTES:
        raise _reject(413, Rejection.BODY_TOO_LARGE, "request body too large",
                      {"max_bytes": MAX_BODY_BYTES, "bytes": len(raw)})
    if not raw:
        return None
    if not _is_json_type(request.content_type):
        raise _reject(415, Rejection.UNSUPPORTED_MEDIA_TYPE, "the body must be JSON",
                      f"send Content-Type: application/json (got {request.content_type!r})")
    if request.charset not in (None, "utf-8", "utf8"):
        raise _reject(415, Rejection.UNSUPPORTED_MEDIA_TYPE, "the body must be UTF-8",
                      f"charset {request.charset[:40]!r} is not supported")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _reject(400, Rejection.NOT_UTF8, "body is not UTF-8", f"invalid byte at offset {exc.start}") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise _reject(400, Rejection.TOO_DEEPLY_NESTED, "body is nested too deeply",
                      {"max_depth": MAX_JSON_DEPTH, "depth": depth})
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise _reject(400, Rejection.INVALID_JSON, "body is not valid JSON", str(exc)[:200]) from None


def invalid_body(detail: Any, error: str = "invalid request body") -> ApiError:
    """A body that is JSON but not what the endpoint takes (counted as invalid_body)."""
    return _reject(400, Rejection.INVALID_BODY, error, detail)


def validation_detail(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as `[{"field": "a.b", "problem": ...}]`."""
    return [{"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors(include_url=False)]


BodyCheck = Callable[[web.Request, Any, str], None]
"""A further check of a JSON body that passed the handler's own validation: raises an ApiError
(`invalid_body`) for a body it refuses. (request, body, error message)."""

BODY_CHECK: web.AppKey[BodyCheck] = web.AppKey("body_check")
"""The app's BodyCheck, if it has one: shared.openapi.add_spec_route installs the API
description's (`conform_body`). Kept as a hook so that this module needs nothing above it."""


def check_body(request: web.Request, data: Any, error: str = "invalid request body") -> None:
    """Run the app's BodyCheck (when it has one) on a body its handler already validated."""
    check = request.app.get(BODY_CHECK)
    if check is not None:
        check(request, data, error)


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse a JSON request body into `model`, or raise a counted 4xx with the reasons."""
    data = await read_json(request)
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(validation_detail(exc)) from None
    check_body(request, data)  # and exactly the types the description gives (no lax coercion)
    return parsed


# ---- query parameters -----------------------------------------------------------------------


def bad_query(error: str, detail: Any = None) -> ApiError:
    return _reject(400, Rejection.INVALID_QUERY, error, detail)


def int_query(request: web.Request, name: str, default: int | None, *, lo: int = 0, hi: int = 10_000) -> int | None:
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise bad_query(f"query parameter {name!r} must be an integer", value[:100]) from None
    if not lo <= number <= hi:
        raise bad_query(f"query parameter {name!r} must be within {lo}..{hi}", number)
    return number


def float_query(request: web.Request, name: str, *, lo: float = 0.0, hi: float = 1e11) -> float | None:
    """A finite number (e.g. unix seconds) within lo..hi, or None when absent."""
    value = request.query.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise bad_query(f"query parameter {name!r} must be a number", value[:100]) from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise bad_query(f"query parameter {name!r} must be a finite number within {lo:g}..{hi:g}", value[:100])
    return number

