"""The one thing every sim tool does: call the daemon's sim HTTP API at `$KGPU_EDGE_API`."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, NoReturn

API_ENV = "KGPU_EDGE_API"
UNREACHABLE_EXIT = 2  # the simulation cannot be reached: nothing was done
TIMEOUT_S = 60.0


def fail(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def call(prog: str, method: str, path: str) -> tuple[int, Any]:
    """(HTTP status, JSON body) of one request to the simulation; exits 2 with a clear message
    when `$KGPU_EDGE_API` is unset or the daemon does not answer."""
    base = os.environ.get(API_ENV, "").strip()
    if not base:
        fail(prog, f"${API_ENV} is not set: this stand-in acts on a simulated node through its edge "
             "daemon's HTTP API (e.g. KGPU_EDGE_API=http://127.0.0.1:9400)", UNREACHABLE_EXIT)
    url = base.rstrip("/") + path
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                     headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"null")
        except ValueError:
            body = None
        if exc.code == 405 or (exc.code == 404 and not isinstance(body, dict)):
            fail(prog, f"{url} is not a simulated node's sim API (HTTP {exc.code}): is the daemon "
                 "running with --backend sim?", UNREACHABLE_EXIT)
        return exc.code, body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(prog, f"cannot reach the simulated node's API at {base} (${API_ENV}): {reason}",
             UNREACHABLE_EXIT)


def gpu_index(prog: str, raw: str) -> int:
    """A GPU index given with -i; the stand-ins take indices only (not UUIDs or bus ids)."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4):
        fail(prog, f"this stand-in takes a GPU index with -i, not {raw!r}", 2)
    return int(raw)
