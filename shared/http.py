"""aiohttp pieces both HTTP servers use: JSON errors `{"error": ..., "detail": ...}`, strict JSON
request bodies, query parameters checked, and every refused request counted by reason.

Both servers are bounded the same way (`handler_args`, `REQUEST_TIMEOUT`): a request's headers
must arrive within a few seconds of the connection opening (or of the previous response on a
kept-alive connection), a handler that runs too long is cancelled and answered with a JSON 503,
and a handler is cancelled when its client goes away. List endpoints page with an opaque cursor
(`page_query`, `encode_cursor`), and blocking reads run in a pool of their own (`ReadPool`).

A request is *rejected* when it is malformed or not allowed: a body too large, not UTF-8, not
JSON, nested too deeply, of the wrong content type or failing validation; a bad query or path
parameter; a missing or wrong token; an unknown route or method. Each rejection is answered with
a 4xx JSON error, logged (method, path, reason; never the body or a header) and counted in
`kgpu_http_rejected_total{reason}` (see `RejectionCollector`). A 404 for a resource that does not
exist (an unknown node) is an answer, not a rejection, and is not counted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import math
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar, cast

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError

from shared.logs import get_logger

log = get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")
T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # the deepest real body (a rollout's templatePatch) is far below this
MAX_QUERY_VALUE_CHARS = 512
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0


def handler_args(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S) -> dict[str, Any]:
    """aiohttp's per-connection settings for `web.Application(handler_args=...)`, the same on both
    servers.

    - `max_line_size`: aiohttp answers a request line over 8190 bytes itself, in text/plain; a
      longer line is allowed so that an over-long (percent-encoded) query reaches
      error_middleware and gets a JSON 400.
    - `keepalive_timeout`: aiohttp (3.14) arms this timer when a connection opens and again after
      each response, and closes the connection if no complete request head has arrived by then.
      So it is the header-read timeout (a client that sends its headers a byte a second is cut
      after `header_timeout_s`) and the idle keep-alive time alike.
    - `handler_cancellation`: a request whose client went away is cancelled rather than run to the
      end for nobody (its queued thread work is dropped too: `ReadPool`)."""
    return {"max_line_size": 64 * 1024, "keepalive_timeout": header_timeout_s, "handler_cancellation": True}


HANDLER_ARGS = handler_args()

REQUEST_TIMEOUT: web.AppKey[float] = web.AppKey("request_timeout_s", float)
"""Seconds a handler may run before it is cancelled and answered 503 (`error_middleware`);
DEFAULT_REQUEST_TIMEOUT_S when the app does not set it."""
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
    limit_s = request.app.get(REQUEST_TIMEOUT, DEFAULT_REQUEST_TIMEOUT_S)
    deadline = asyncio.timeout(limit_s)
    try:
        _check_parameters(request)
        async with deadline:
            response = await handler(request)
    except TimeoutError:
        if not deadline.expired():
            log.exception("unhandled error serving %s %s", request.method, request.path[:200])
            return json_error(500, "internal error", None)
        log.warning("HTTP request timed out: %s %s after %g s", request.method, request.path[:200], limit_s,
                    extra={"timeout_s": limit_s, "remote": request.remote})
        return json_error(503, "request timed out", {"timeout_s": limit_s}, {"Retry-After": "5"})
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



# ---- pages ------------------------------------------------------------------------------------


def encode_cursor(kind: str, *key: Any) -> str:
    """An opaque cursor: where the next page of a `kind` listing starts (JSON scalars, base64url)."""
    raw = json.dumps([kind, *key], separators=(",", ":"), allow_nan=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, value: str) -> list[Any]:
    """The key of a cursor made by `encode_cursor(kind, ...)`, or a counted 400 for anything else
    (a cursor of another listing, an edited or truncated one)."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)),
                             parse_constant=_no_constants)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        decoded = None
    if not (isinstance(decoded, list) and decoded and decoded[0] == kind
            and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in decoded[1:])):
        raise bad_query("not a valid cursor", "pass the next_cursor of the previous page unchanged")
    return decoded[1:]


def page_query(request: web.Request, kind: str, *, default: int, maximum: int) -> tuple[int, list[Any] | None]:
    """(`limit`, the decoded `cursor` key or None) of a paged listing; a limit outside 1..maximum
    or a cursor that is not one of this listing's is a counted 400."""
    limit = int_query(request, "limit", default, lo=1, hi=maximum)
    value = request.query.get("cursor")
    return limit if limit is not None else default, (decode_cursor(kind, value) if value else None)


# ---- blocking work ------------------------------------------------------------------------------


class ReadPool:
    """A thread pool of its own for an HTTP server's blocking reads, so that readers queue on it
    and never on the threads that write (the ingest has its own). A read whose request is
    cancelled (its client left, or it timed out) before a thread took it is dropped, never run
    (`dropped`); one already running finishes its current transaction, which a page keeps short.
    `waiting`: reads queued for a thread now; `running`: reads running now."""

    def __init__(self, threads: int, name: str = "http-read") -> None:
        self.threads = threads
        self.waiting = 0
        self.running = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        state = {"started": False, "abandoned": False}

        def call() -> T:
            with self._lock:
                if state["abandoned"]:
                    return cast(T, None)  # its request is gone (nobody awaits this): never run
                state["started"] = True
                self.waiting -= 1
                self.running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        with self._lock:
            self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except asyncio.CancelledError:
            with self._lock:
                if not state["started"]:
                    state["abandoned"] = True
                    self.waiting -= 1
                    self.dropped += 1
            raise

    def close(self) -> None:
        """Stop taking work; what is queued is dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def json_bytes(payload: Any) -> bytes:
    """`payload` as a JSON body: for a handler to encode a large answer in a ReadPool thread rather
    than on the event loop (`web.Response(body=..., content_type="application/json")`)."""
    return json.dumps(payload, separators=(",", ":")).encode()


def json_response(body: bytes, status: int = 200) -> web.Response:
    """A JSON body made by `json_bytes`."""
    return web.Response(body=body, status=status, content_type="application/json")


READ_POOL: web.AppKey[ReadPool] = web.AppKey("read_pool", ReadPool)
"""The app's ReadPool, where it has one (the controller's): a part's route runs its store reads
with `request.app[READ_POOL].run(...)` rather than in the default thread pool."""


class ReadPoolCollector(Collector):
    """kgpu_http_reads_waiting and kgpu_http_reads_dropped_total of a ReadPool."""

    def __init__(self, pool: ReadPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("kgpu_http_reads_waiting", "HTTP API reads waiting for one of the read threads.")
        waiting.add_metric([], self.pool.waiting)
        yield waiting
        dropped = CounterMetricFamily("kgpu_http_reads_dropped", "HTTP API reads never run: their request was "
                                      "cancelled (client gone, or timed out) while they waited for a thread.")
        dropped.add_metric([], self.pool.dropped)
        yield dropped
