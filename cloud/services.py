"""What the composition root (cloud/app.py) hands to the controller's parts, and the one loop
that runs every part's periodic work while this replica leads.

A part (policies, migration, rollout, edge commands) names in its constructor the few services it
uses (`store=`, `kube=`, `publish=`, ...) and is given exactly those, from one frozen `Services`
built once per process. No part sees the controller, the MQTT link or another part; the
composition root is the only module that knows them all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from cloud.config import CloudSettings
from cloud.kube import Kube, KubeUnavailable
from cloud.store import FleetStore, Incoming
from shared.aio import wait_event
from shared.logs import get_logger
from shared.protocol import CommandBody, Kind

log = get_logger(__name__)

WARN_EVERY_S = 60.0  # the same expected failure of a periodic step is logged at most this often


class Publish(Protocol):
    """QoS 1 publish to an edge; False when the link is down (the caller retries later)."""

    def __call__(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


class CommandSender(Protocol):
    """Sends a command to an edge through the command outbox (cloud/commands)."""

    async def send(self, node: str, body: CommandBody, command_id: str | None = None) -> bool: ...


BatchListener = Callable[[list[Incoming]], Awaitable[None]]


class BatchBus:
    """Every batch the ingest has committed, handed to the parts that react to fleet state (a
    migration request wakes the migration scan, a command result closes its command). A listener
    that fails is logged; the others still run and the ingest goes on.

    A listener names the kinds of message it reads (`kinds`; None: all) and gets only batches
    holding one of them: a batch of telemetry, most of what arrives, goes to the one part that
    reads telemetry instead of every part looking at each of its messages (a few µs a message
    in a backlog drain)."""

    def __init__(self) -> None:
        self._listeners: list[tuple[BatchListener, frozenset[Kind] | None]] = []

    def subscribe(self, listener: BatchListener, kinds: Iterable[Kind] | None = None) -> None:
        self._listeners.append((listener, frozenset(kinds) if kinds is not None else None))

    async def deliver(self, batch: list[Incoming], kinds: Iterable[Kind] | None = None) -> None:
        """`kinds`: the kinds the batch holds, when the caller knows (else they are looked up)."""
        if not batch:
            return
        present = frozenset(kinds) if kinds is not None else frozenset(i.envelope.kind for i in batch)
        for listener, wanted in self._listeners:
            if wanted is not None and wanted.isdisjoint(present):
                continue
            try:
                await listener(batch)
            except Exception:
                log.exception("batch listener %s failed", getattr(listener, "__qualname__", listener))


@dataclass(frozen=True)
class Services:
    """The services of one controller process. Built by cloud/app.py; parts take fields of it."""

    settings: CloudSettings
    store: FleetStore
    kube: Kube | None  # None with --no-kube
    publish: Publish
    commands: CommandSender
    batches: BatchBus
    leading: asyncio.Event  # set while this replica holds the leader Lease (cloud/leader.py)


def require_kube(kube: Kube | None, feature: str) -> Kube:
    """The Kubernetes client, or a clear refusal when the controller runs with --no-kube."""
    if kube is None:
        raise KubeUnavailable(f"{feature} needs a Kubernetes cluster; the controller runs with --no-kube")
    return kube


@dataclass(frozen=True)
class Periodic:
    """A part's work on the leader: `step()` every `interval_s`, or at once when `wake` is set.

    `step` returns True to run again right away (more to do), anything else to wait. Errors of
    the types in `expected` (the database or the API server away) are one throttled warning line;
    any other error is logged with its traceback. Either way the loop goes on."""

    name: str
    step: Callable[[], Awaitable[bool | None]]
    interval_s: float
    wake: asyncio.Event | None = None
    min_gap_s: float = 0.0  # at least this between the starts of two steps
    settle_s: float = 0.0  # after a wake-up, wait this long so that the rest of a burst lands
    expected: tuple[type[BaseException], ...] = field(default_factory=tuple)


async def run_periodically(p: Periodic) -> None:
    """Run `p` until cancelled (leadership lost, shutdown)."""
    warned: dict[str, float] = {}
    while True:
        started = time.monotonic()
        if p.wake is not None:
            p.wake.clear()  # before looking: a wake-up during the step runs the next one
        again = False
        try:
            again = (await p.step()) is True
        except asyncio.CancelledError:
            raise
        except p.expected as exc:
            message = f"{p.name}: {type(exc).__name__}: {exc}"
            if time.monotonic() - warned.get(message, float("-inf")) >= WARN_EVERY_S:
                warned[message] = time.monotonic()
                log.warning("%s (retrying)", message)
        except Exception:
            log.exception("%s failed; retrying", p.name)
        if again:
            await asyncio.sleep(0)  # let the loop breathe between back-to-back steps
            continue
        if p.wake is not None:
            woke = await wait_event(p.wake, p.interval_s)
        else:
            await asyncio.sleep(p.interval_s)
            woke = False
        if woke and p.settle_s:
            await asyncio.sleep(p.settle_s)
        await asyncio.sleep(max(0.0, p.min_gap_s - (time.monotonic() - started)))


class Part(Protocol):
    """A part of the controller that takes decisions. Its HTTP routes are served on every
    replica; its `periodic()` loops run only on the leader and are cancelled when it stops
    leading."""

    name: str

    def add_routes(self, app: web.Application) -> None: ...

    def periodic(self) -> Sequence[Periodic]: ...
