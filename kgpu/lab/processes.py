"""Ports, waits, child processes and HTTP calls: what every lab setup (demo, tests, benchmarks) does
before and around the processes it starts.

Why one copy: the demo, the tests and the benchmarks each had their own `free_port` and
`wait_for`, and only one `free_port` was safe (see below). Everything here is plain standard
library, so the tests' helpers and the benchmarks can use it as well as the demo.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


class LabError(RuntimeError):
    """Something the lab needs did not happen (a process did not start, a binary is missing);
    the message says what."""


class TimedOut(LabError, AssertionError):
    """`wait_for` gave up. Also an AssertionError, so that a test reports it as a failed check."""


# ---- ports ----------------------------------------------------------------------------------

PORT_RANGE = range(20000, 32000)  # below Linux's ephemeral range (32768-60999)
_HANDED_OUT: set[int] = set()
# One file a port handed out, by any process on this machine: the test workers run in parallel
# and each picked its ports alone, so two could pick the same one (seen in CI: a broker of one
# worker found its port taken by another's). A claim only has to last until its server binds the
# port (a bound port fails free_port's own check): it goes when its process exits, and one left
# by a killed process is stale after PORT_CLAIM_TTL_S.
PORT_CLAIMS = Path(tempfile.gettempdir()) / "kgpu-lab-ports"
PORT_CLAIM_TTL_S = 600.0
_CLAIMED: list[Path] = []  # this process's claims, removed at exit


def free_port() -> int:
    """A free loopback port for a server that someone is about to start.

    A port picked by binding port 0 comes from the ephemeral range, where any client socket or
    another port-0 bind may take it before the server binds it. So pick below that range (only an
    explicit bind can take such a port), check that it binds now, and never hand the same one out
    twice on this machine while the process that picked it runs (`PORT_CLAIMS`; `reserve_port`
    marks a port chosen elsewhere)."""
    for port in random.sample(PORT_RANGE, 500):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _HANDED_OUT.add(port)
        return port
    raise LabError(f"no free port in {PORT_RANGE.start}-{PORT_RANGE.stop}")


def reserve_port(port: int) -> None:
    """A port promised to a server this process starts later (`free_port` will not return it)."""
    _HANDED_OUT.add(port)
    _claim(port)


def _claim(port: int) -> bool:
    """Whether no other process on this machine has handed `port` out within PORT_CLAIM_TTL_S:
    a claim file created exclusively (a stale one is replaced, by one taker)."""
    path = PORT_CLAIMS / str(port)
    for _attempt in range(2):
        try:
            PORT_CLAIMS.mkdir(exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            if not _CLAIMED:
                atexit.register(_release_claims)
            _CLAIMED.append(path)
            return True
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime < PORT_CLAIM_TTL_S:
                    return False
                path.unlink()
            except FileNotFoundError:
                pass  # replaced meanwhile: try to create it again
        except OSError:
            return True  # no claims here (read-only temp dir): this process's own set still holds
    return False


def _release_claims() -> None:
    for path in _CLAIMED:
        with contextlib.suppress(OSError):
            path.unlink()


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---- waiting --------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.2, what: str = "condition",
             *, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll until `check()` returns something truthy and return it; raise TimedOut naming `what`
    after `timeout` seconds. Exceptions of the `ignore` types (a process still starting, a partial
    answer) count as "not yet"; any other exception from `check` propagates at once."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ignore as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        time.sleep(interval)
    raise TimedOut(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


# ---- HTTP -----------------------------------------------------------------------------------


def http_json(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """One request with a JSON body (or `raw` bytes); (status, the answer decoded as JSON, or as
    text when it is not JSON). An HTTP error status is returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except json.JSONDecodeError:
        return status, payload.decode(errors="replace")


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url`: its JSON answer, or ValueError when the status is not 200."""
    status, body = http_json("GET", url, timeout=timeout)
    if status != 200:
        raise ValueError(f"GET {url}: {status} {body}")
    return body


# ---- child processes ------------------------------------------------------------------------


def dies_with_parent(args: list[str]) -> list[str]:
    """`args` run so that the child gets SIGTERM if its parent dies without stopping it (kill -9):
    Linux's parent-death signal, set by util-linux's setpriv, which then execs the command (same
    pid). Where setpriv is missing, as on macOS, the command as it is."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *args] if setpriv else args


class Child:
    """One process owned by the lab, in its own process group (Ctrl-C reaches only its parent,
    which then stops the children in order), with stdout and stderr in a log file. If the parent
    is killed outright, the child gets SIGTERM (`dies_with_parent`). Linux sends that signal when
    the *thread* that started the child ends: start children from a thread that outlives them (the
    main thread, a pool kept until the end). `start()` again after a stop starts it anew,
    appending to the same log."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.args, self.log_path, self.env = name, args, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(dies_with_parent(self.args), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **(self.env or {})},
                                         process_group=0)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it was paused), then SIGKILL after `timeout` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


def wait_listening(child: Child, port: int, timeout: float = 15.0) -> None:
    """Until `child` accepts connections on loopback `port`; LabError (with its log) if it exits."""
    def listening() -> bool:
        if not child.alive():
            raise LabError(f"{child.name} exited: {child.log_tail()}")
        return port_open(port)

    wait_for(listening, timeout, 0.05, f"{child.name} to listen on {port}")
