"""`kgpu watch`: a live, read-only monitor of everything under `kgpu/v1/` for operators.

Three layers, so the part worth testing is pure:

* `WatchState` (kgpu/watch_state.py) is fed `(topic, payload, received_at)` and keeps what an
  operator asks about (per-node table, message rates, latest events, rejected messages). No I/O,
  no clock of its own: every time is passed in, so tests feed it real envelopes and fixed times.
* `render()` (kgpu/watch_render.py) turns a state into rich renderables, laid out for the
  terminal's width (80 columns upward) and, with `--node NAME`, that node's GPUs one per row;
  `json_line()` turns one observation into the `--json` line.
* `run_watch()` (here) owns the MQTT link (shared.mqtt, never paho directly), the loop and the
  output.

The watcher never publishes: it subscribes to `kgpu/v1/#` with a clean session, so it leaves no
queued messages or retained state behind on the broker.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live

from kgpu.watch_render import LinkView, key_presses, move_focus, render
from kgpu.watch_state import DEFAULT_MAX_EVENTS, WatchError, WatchState, json_line
from shared.mqtt import MqttLink, Received, TlsOptions, parse_broker_url, redact
from shared.topics import PREFIX

SUBSCRIPTION = f"{PREFIX}/#"
REFRESH_PER_S = 4.0


@dataclass(frozen=True)
class WatchOptions:
    mqtt: str | None
    node: str | None = None
    kind: str | None = None
    json_lines: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    password_file: Path | None = None
    max_events: int = DEFAULT_MAX_EVENTS


def make_link(opts: WatchOptions, on_message: Any) -> MqttLink:
    """Check the options and build the (not yet started) link; WatchError says what is wrong."""
    if not opts.mqtt:
        raise WatchError("no broker given: use --mqtt mqtt://host:port (or set KGPU_MQTT)")
    if opts.password_file is not None and not opts.password_file.is_file():
        raise WatchError(f"password file not found: {opts.password_file}")
    try:
        address = parse_broker_url(opts.mqtt, password_file=opts.password_file)
    except ValueError as exc:
        raise WatchError(str(exc)) from None
    except OSError as exc:
        raise WatchError(f"cannot read password file {opts.password_file}: {exc.strerror or exc}") from None
    tls_flags = opts.ca_file or opts.cert_file or opts.key_file or opts.tls_insecure
    if tls_flags and not address.tls:
        raise WatchError(f"TLS options need an mqtts:// URL, got {redact(opts.mqtt)!r}")
    files = (("CA file", opts.ca_file), ("certificate file", opts.cert_file), ("key file", opts.key_file))
    for label, path in files:
        if path is not None and not path.is_file():
            raise WatchError(f"{label} not found: {path}")
    if opts.max_events < 1:
        raise WatchError("--events must be at least 1")
    tls = TlsOptions(ca_file=opts.ca_file, cert_file=opts.cert_file, key_file=opts.key_file,
                     insecure=opts.tls_insecure) if address.tls else None
    # A unique id: two operators watching at once must not kick each other off the broker.
    client_id = f"kgpu-watch-{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        return MqttLink(address, client_id, subscriptions=[(SUBSCRIPTION, 1)], tls=tls, clean_session=True,
                        backoff_min_s=0.5, backoff_max_s=5.0, on_message=on_message)
    except (OSError, ValueError) as exc:  # e.g. an unreadable CA bundle
        raise WatchError(f"cannot set up the MQTT connection: {exc}") from None


def run_watch(opts: WatchOptions, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None,
              console: Console | None = None, stop: threading.Event | None = None,
              refresh_per_s: float = REFRESH_PER_S) -> int:
    """Watch until Ctrl-C (or `stop` is set); returns the exit code. Raises WatchError on bad options."""
    import sys

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    stop = stop or threading.Event()
    state = WatchState(node=opts.node, kind=opts.kind, max_events=opts.max_events)
    inbox: queue.Queue[tuple[float, Received]] = queue.Queue()
    # received_at is taken on the network thread, when the message arrives, not when we get to it
    link = make_link(opts, lambda message: inbox.put((time.time(), message)))
    # shared.mqtt logs its connection troubles; we report them ourselves, in one place
    mqtt_logger = logging.getLogger("shared.mqtt")
    saved_level = mqtt_logger.level
    mqtt_logger.setLevel(logging.CRITICAL)
    view = LinkView(broker=link.address.display)
    link.start()
    try:
        if opts.json_lines:
            _run_json(state, link, view, inbox, stdout, stderr, stop)
        else:
            # keys only for the real terminal: a console handed in (tests) has no keyboard
            _run_live(state, link, view, inbox, console or Console(), stop, refresh_per_s,
                      None if console is not None or opts.node is not None else sys.stdin)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `kgpu watch --json | head`: the reader left; that is a normal way to stop
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    finally:
        link.stop(timeout_s=2.0)
        mqtt_logger.setLevel(saved_level)
    return 0


def _link_changed(link: MqttLink, view: LinkView) -> bool:
    connected, error = link.connected.is_set(), link.last_error
    if connected == view.connected and (connected or error == view.error):
        return False
    view.connected, view.error = connected, (None if connected else error)
    return True


def _drain(inbox: queue.Queue[tuple[float, Received]], timeout: float) -> Iterable[tuple[float, Received]]:
    """What arrived, waiting up to `timeout` for the first message."""
    try:
        yield inbox.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return
    for _ in range(10_000):  # bounded: a flood must not starve the display or the link check
        try:
            yield inbox.get_nowait()
        except queue.Empty:
            return


def _run_json(state: WatchState, link: MqttLink, view: LinkView, inbox: queue.Queue[tuple[float, Received]],
              stdout: IO[str], stderr: IO[str], stop: threading.Event) -> None:
    while not stop.is_set():
        for received_at, message in _drain(inbox, 0.25):
            obs = state.feed(message.topic, message.payload, received_at, retained=message.retain)
            if obs is not None:
                stdout.write(json.dumps(json_line(obs), ensure_ascii=False, separators=(",", ":")) + "\n")
                stdout.flush()
        if _link_changed(link, view):
            if view.connected:
                say = f"connected to {view.broker}, watching {SUBSCRIPTION}"
                print(f"kgpu watch: {say}", file=stderr, flush=True)
            elif view.error:
                print(f"kgpu watch: {view.error}; retrying", file=stderr, flush=True)
            else:
                print(f"kgpu watch: lost {view.broker}; retrying", file=stderr, flush=True)


def _in_foreground(fd: int) -> bool:
    """False when this process is in the background of its terminal (`kgpu watch &`): changing
    the terminal's mode from there would stop it (SIGTTOU)."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not our controlling terminal: no job control applies to us on it
        return True


class KeyReader:
    """Single key presses from the terminal the watch runs in (cbreak mode: no Enter needed, and
    Ctrl-C still interrupts), its settings restored on exit. Reads nothing when stdin is not a
    terminal (a pipe, a test's in-process console)."""

    def __init__(self, stdin: IO[str] | None) -> None:
        self.fd: int | None = None
        self._saved: list[Any] | None = None
        try:
            if stdin is not None and stdin.isatty() and _in_foreground(stdin.fileno()):
                self.fd = stdin.fileno()
        except (OSError, ValueError, AttributeError):
            self.fd = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> KeyReader:
        if self.fd is not None:
            import termios
            import tty

            try:
                self._saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
            except (OSError, termios.error):
                self._saved = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except (OSError, termios.error):
                pass
            self._saved = None

    def typed(self) -> str:
        """What was typed since the last call (never waits)."""
        if not self.active or self.fd is None:
            return ""
        out = b""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 64)
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")


def _run_live(state: WatchState, link: MqttLink, view: LinkView, inbox: queue.Queue[tuple[float, Received]],
              console: Console, stop: threading.Event, refresh_per_s: float, stdin: IO[str] | None = None) -> None:
    period = 1.0 / refresh_per_s
    focus: str | None = None  # the node whose GPUs are shown, moved with n/p (a: all nodes)
    # We refresh from this thread ourselves (auto_refresh off): rich's refresh thread would read
    # the state while this one changes it.
    with KeyReader(stdin) as keys, Live(render(state, time.time(), view), console=console, auto_refresh=False,
                                        redirect_stdout=False, redirect_stderr=False) as live:
        next_refresh = time.monotonic()
        while not stop.is_set():
            for received_at, message in _drain(inbox, next_refresh - time.monotonic()):
                state.feed(message.topic, message.payload, received_at, retained=message.retain)
            moved = False
            for key in key_presses(keys.typed()):
                focus, moved = move_focus(list(state.nodes), focus, key), True
            if moved or time.monotonic() >= next_refresh:
                _link_changed(link, view)
                live.update(render(state, time.time(), view, focus=focus, keys=keys.active), refresh=True)
                next_refresh = time.monotonic() + period
