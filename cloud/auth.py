"""Who may use the controller's HTTP API: `Authorization: Bearer <token>`.

- Every change (any method but GET/HEAD/OPTIONS) needs the token, always: `auth_middleware`
  checks it before any handler runs, so a new endpoint cannot forget to.
- With `--api-auth all`, every other `/api/v1` request needs it too; `/healthz`, `/metrics`,
  `/api/v1/openapi.json` and the dashboard's own files (`/`, `/static/*`) stay open: probes and
  Prometheus keep working, and the page can ask for the token.
- The token comes from a file (`--api-token-file`, re-read when it changes: a mounted Secret
  rotates in place) or from a Kubernetes Secret (`--api-token-secret`, read through the API,
  cached 30 s and read again at once, at most every 2 s, when a token does not match, so a
  rotated token works within seconds). A file or Secret may hold several tokens, one per line:
  add the new one, move the clients, drop the old one.
- No token configured: changes are refused (403) unless `--api-insecure` says otherwise. Both
  cases are logged loudly at start.

A token is never logged, nor put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeError
from shared.http import ApiError, Rejection
from shared.logs import get_logger
from shared.openapi import SPEC_PATH

log = get_logger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/", SPEC_PATH})
OPEN_PREFIXES = ("/static/",)
MAX_TOKEN_CHARS = 4096
SECRET_TTL_S = 30.0
SECRET_MIN_REFRESH_S = 2.0
WARN_EVERY_S = 60.0


class TokenUnavailable(RuntimeError):
    """The configured token cannot be read (file missing or empty, Secret or key gone)."""


class TokenSource(Protocol):
    where: str

    async def tokens(self, *, fresh: bool = False) -> frozenset[str]: ...


def _parse_tokens(text: str, where: str) -> frozenset[str]:
    tokens = frozenset(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise TokenUnavailable(f"{where} holds no token")
    return tokens


class FileTokens:
    """Tokens from a file, read again whenever its inode, size or mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"file {path}"
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: frozenset[str] = frozenset()

    def _read(self) -> frozenset[str]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self._tokens = _parse_tokens(self.path.read_text(encoding="utf-8"), self.where)
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            self._stamp = None
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise TokenUnavailable(f"{self.where} is unreadable: {reason}") from None
        except TokenUnavailable:
            self._stamp = None
            raise
        return self._tokens

    async def tokens(self, *, fresh: bool = False) -> frozenset[str]:
        return await asyncio.to_thread(self._read)


class SecretTokens:
    """Tokens from one key of a Kubernetes Secret, cached for SECRET_TTL_S.

    While the API server cannot be reached, the last tokens read stay valid (the API keeps
    working through a control-plane blip); a Secret or key that is gone, or a refusal (403),
    revokes them at once."""

    def __init__(self, kube: Kube, namespace: str, name: str, key: str) -> None:
        self.kube = kube
        self.namespace, self.name, self.key = namespace, name, key
        self.where = f"Secret {namespace}/{name} key {key!r}"
        self._tokens: frozenset[str] | None = None
        self._error: str | None = None
        self._fetched_at = -1e18
        self._lock = asyncio.Lock()
        self._warned_at = -1e18

    async def tokens(self, *, fresh: bool = False) -> frozenset[str]:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if self._tokens is not None and (age < SECRET_MIN_REFRESH_S or (age < SECRET_TTL_S and not fresh)):
                return self._tokens
            if self._error is not None and age < SECRET_MIN_REFRESH_S:  # nor a failure more often
                raise TokenUnavailable(self._error)
            try:
                secret = await self.kube.call(self.kube.core.read_namespaced_secret, self.name, self.namespace)
            except KubeError as exc:
                if self._tokens is not None and (exc.status in (0, 429) or exc.status >= 500):
                    self._warn(f"cannot read the API token's {self.where} ({exc.status} {exc.reason}): "
                               "using the tokens read before")
                    self._fetched_at = time.monotonic() - SECRET_TTL_S + SECRET_MIN_REFRESH_S
                    return self._tokens
                return self._fail(f"cannot read {self.where}: {exc.status} {exc.reason}")
            encoded = (secret.data or {}).get(self.key)
            if encoded is None:
                return self._fail(f"{self.where}: no such key")
            try:
                tokens = _parse_tokens(base64.b64decode(encoded, validate=True).decode("utf-8"), self.where)
            except (binascii.Error, ValueError):
                return self._fail(f"{self.where} is not base64-encoded UTF-8")
            except TokenUnavailable as exc:
                return self._fail(str(exc))
            self._tokens, self._error, self._fetched_at = tokens, None, time.monotonic()
            return tokens

    def _fail(self, error: str) -> frozenset[str]:
        """Revoke what was read before and remember why (asked again after SECRET_MIN_REFRESH_S)."""
        self._tokens, self._error, self._fetched_at = None, error, time.monotonic()
        raise TokenUnavailable(error)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(message)


@dataclass
class ApiAuth:
    """The API's access rule: what needs a token, and where the token comes from."""

    source: TokenSource | None
    protect_reads: bool
    insecure: bool

    @classmethod
    def from_settings(cls, settings: CloudSettings, kube: Kube | None) -> ApiAuth:
        source: TokenSource | None = None
        if settings.api_token_file is not None:
            source = FileTokens(settings.api_token_file)
        elif (ref := settings.token_secret()) is not None:
            if kube is None:  # refused by CloudSettings already; kept for callers that build their own
                raise ValueError("api_token_secret needs a cluster")
            source = SecretTokens(kube, *ref)
        return cls(source, settings.api_auth == "all", settings.api_insecure)

    def needs_token(self, request: web.Request) -> bool:
        if request.method not in READ_METHODS:
            return True
        if not self.protect_reads:
            return False
        path = request.path
        return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)

    async def check(self, request: web.Request) -> None:
        """Return if the request may go on; raise a JSON 401/403/503 otherwise."""
        if not self.needs_token(request):
            return
        if self.source is None:
            if self.insecure:
                return
            raise ApiError(403, "changes are disabled: no API token is configured",
                           "start the controller with --api-token-file or --api-token-secret "
                           "(or --api-insecure, in a lab)", rejection=Rejection.FORBIDDEN)
        given = _bearer(request)
        if given is None:
            raise _unauthorized("a bearer token is required" + ("" if self.protect_reads else " for changes"))
        for fresh in (False, True):
            try:
                tokens = await self.source.tokens(fresh=fresh)
            except TokenUnavailable as exc:
                log.error("API token unavailable: %s", exc)
                raise ApiError(503, "the API token cannot be read", str(exc)) from None
            if _matches(given, tokens):
                return
        raise _unauthorized("the bearer token is not valid")

    async def log_start(self) -> None:
        """One loud line at start about how the API is protected (never the token itself)."""
        if self.source is None:
            if self.insecure:
                log.warning("API SECURITY: no API token configured and --api-insecure given: anyone who "
                            "reaches the HTTP API can change policies and start rollouts")
            else:
                log.warning("API SECURITY: no API token configured: every change over the HTTP API is "
                            "refused (403); set --api-token-file or --api-token-secret")
            return
        try:
            count = len(await self.source.tokens())
        except TokenUnavailable as exc:
            log.error("API token unavailable at start: %s (changes answer 503 until it is)", exc)
            return
        log.info("API changes need a bearer token", extra={
            "token_source": self.source.where, "tokens": count,
            "reads": "need the token" if self.protect_reads else "open"})


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > MAX_TOKEN_CHARS:
        return None
    return value


def _matches(given: str, tokens: frozenset[str]) -> bool:
    presented = given.encode("utf-8", "surrogatepass")
    found = False
    for token in tokens:  # compare with every token: the time taken does not say which matched
        found |= hmac.compare_digest(presented, token.encode("utf-8", "surrogatepass"))
    return found


def _unauthorized(error: str) -> ApiError:
    return ApiError(401, error, None, rejection=Rejection.UNAUTHORIZED,
                    headers={"WWW-Authenticate": 'Bearer realm="kgpu"'})


AUTH: web.AppKey[ApiAuth] = web.AppKey("api_auth", ApiAuth)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Checks the token before the handler (unknown routes and methods fall through to 404/405)."""
    if request.match_info.http_exception is None:
        await request.app[AUTH].check(request)
    return await handler(request)
