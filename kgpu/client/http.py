"""The client's side of the controller's HTTP API: where the controller is, the bearer token, and
one-line errors with exit codes a script can tell apart.

A client command is a short-lived process, so plain blocking `urllib` is enough (no event loop,
no extra dependency); every failure becomes a `ClientError` that the CLI prints as one line."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SERVER = "http://127.0.0.1:9420"  # the demo's controller
TIMEOUT_S = 15.0
TOKEN_HINT = "pass --token-file FILE, set KGPU_TOKEN_FILE, or put `token-file: FILE` in {config}"

# Exit codes (docs/cli.md): what went wrong, so that a script can tell a down controller from a refusal.
EXIT_REFUSED = 1  # the controller answered with an error (400, 409, 5xx) or the edge reported a failure
EXIT_USAGE = 2  # bad flags, unreadable file or config (also click's own usage errors)
EXIT_UNREACHABLE = 3  # no answer from the controller
EXIT_AUTH = 4  # 401 / 403
EXIT_NOT_FOUND = 5  # 404


class ClientError(Exception):
    """One line for the operator, and the process's exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def config_path() -> Path:
    """`$XDG_CONFIG_HOME/kgpu/client.yaml`, else `~/.config/kgpu/client.yaml`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kgpu" / "client.yaml"


@dataclass(frozen=True)
class Target:
    """Where the controller is and the token to send (None: send none)."""

    server: str
    token: str | None
    token_from: str | None  # where the token was read, for error messages


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ClientError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict) or set(loaded) - {"server", "token-file"}:
        raise ClientError(f"{path}: expected a mapping with `server` and `token-file` only", EXIT_USAGE)
    return loaded


def _read_token(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.expanduser().read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ClientError(f"cannot read the token file {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    if not lines:
        raise ClientError(f"the token file {path} is empty", EXIT_USAGE)
    return lines[0]


def resolve_target(server: str | None, token_file: Path | None) -> Target:
    """Flags (which Typer already filled from KGPU_SERVER / KGPU_TOKEN_FILE) win over the config
    file, which wins over the default."""
    config = _read_config(config_path())
    url = (server or config.get("server") or DEFAULT_SERVER).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientError(f"--server must be http(s)://HOST[:PORT], got {url!r}", EXIT_USAGE)
    source = token_file or (Path(str(config["token-file"])) if config.get("token-file") else None)
    token = _read_token(source) if source is not None else None
    return Target(url, token, str(source) if source is not None else None)


class Api:
    """JSON requests to one controller; raises ClientError with the controller's own error text."""

    def __init__(self, target: Target, timeout: float = TIMEOUT_S) -> None:
        self.target = target
        self.timeout = timeout
        self.last_status = 0  # of the last answered request: 201 (created) against 200 (replaced)

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        url = self.target.server + path
        pairs = {k: v for k, v in (query or {}).items() if v is not None}
        if pairs:
            url += "?" + urllib.parse.urlencode(pairs)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.target.token is not None:
            headers["Authorization"] = f"Bearer {self.target.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                self.last_status = response.status
                return _decode(response.read())
        except urllib.error.HTTPError as exc:
            raise self._refusal(exc.code, _decode(exc.read()), method, path) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            raise ClientError(f"cannot reach the controller at {self.target.server} ({reason}); start it, or pass "
                              "--server URL (env KGPU_SERVER)", EXIT_UNREACHABLE) from None

    def _refusal(self, status: int, body: Any, method: str, path: str) -> ClientError:
        error, detail = _error_text(body)
        hint = TOKEN_HINT.format(config=config_path())
        if status == 401:
            if self.target.token is None:
                return ClientError(f"the controller at {self.target.server} needs a token ({error}): {hint}",
                                   EXIT_AUTH)
            return ClientError(f"the controller refused the token from {self.target.token_from} ({error}); "
                               "check that file against the controller's --api-token-file", EXIT_AUTH)
        if status == 403:
            fix = (" — the controller has no API token configured: start it with --api-token-file FILE "
                   "(or --api-insecure, a lab only)" if "no API token" in error else "")
            return ClientError(f"{method} {path}: forbidden ({error}){fix}", EXIT_AUTH)
        text = error + (f": {detail}" if detail else "")
        if status == 404:
            return ClientError(text or f"{path}: not found", EXIT_NOT_FOUND)
        return ClientError(f"{text or 'error'} (HTTP {status})", EXIT_REFUSED)


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:300]


def _error_text(body: Any) -> tuple[str, str]:
    """The controller's `{"error", "detail"}` as text; field errors as `field: problem; ...`."""
    if not isinstance(body, dict):
        return (str(body).strip() if body else ""), ""
    error = str(body.get("error") or "")
    detail = body.get("detail")
    if isinstance(detail, list):
        parts = [f"{d.get('field') or '(body)'}: {d.get('problem')}" if isinstance(d, dict) else str(d)
                 for d in detail]
        return error, "; ".join(parts)
    if isinstance(detail, dict):
        return error, ", ".join(f"{k}={v}" for k, v in detail.items())
    return error, "" if detail is None else str(detail)


def pages(api: Api, path: str, key: str, limit: int | None = None, **query: Any) -> list[dict[str, Any]]:
    """Every row of a paged listing (following `next_cursor`), or the first `limit`."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_size = None if limit is None else min(max(limit - len(rows), 1), 1000)
        body = api.get(path, cursor=cursor, limit=page_size, **query)
        rows.extend(body.get(key) or [])
        cursor = body.get("next_cursor")
        if not cursor or (limit is not None and len(rows) >= limit):
            return rows if limit is None else rows[:limit]
