"""The composition root: the only module that knows every part of the controller.

`build(settings)` makes one controller process's objects: the Kubernetes client (or none), the
fleet store, the MQTT link, the ingest, the command outbox, the frozen `Services` every part
takes its few services from, and the parts (commands, policies, migration, rollouts). `serve`
runs them: MQTT in, batched ingest, acks out, HTTP on every replica; the parts' periodic work
only on the replica holding the leader Lease (`cloud/leader.py`).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable

from aiohttp import web

from cloud.commands import EdgeCommands
from cloud.config import CloudSettings
from cloud.http.api import make_app
from cloud.ingest import Ingestor
from cloud.kube import Kube
from cloud.leader import LeaderElector
from cloud.link import EdgeLink
from cloud.migration import MigrationManager
from cloud.policies import PolicyManager
from cloud.rollout import RolloutManager
from cloud.services import BatchBus, Part, Services, run_periodically
from cloud.store import FleetStore
from shared.aio import wait_event
from shared.logs import get_logger

log = get_logger(__name__)

PRUNE_EVERY_S = 300.0


class ControllerApp:
    """One controller process: its services, its parts, and the loops that run them."""

    def __init__(self, settings: CloudSettings, *, kube: Kube | None, store: FleetStore) -> None:
        self.settings = settings
        self.kube = kube
        self.store = store
        self.link = EdgeLink(settings)
        self.batches = BatchBus()
        self.ingestor = Ingestor(store, self.link.publish_ack, batches=self.batches, batch_size=settings.batch_size,
                                 tune_gc=True, batch_interval_s=settings.batch_interval)
        self.identity = settings.client_id  # this replica's name in the leader Lease
        self.leading = asyncio.Event()  # set while this replica is the leader
        # every part sends its edge commands through the outbox
        self.commands = EdgeCommands(settings=settings, store=store, publish=self.link.publish, batches=self.batches)
        self.services = Services(settings=settings, store=store, kube=kube, publish=self.link.publish,
                                 commands=self.commands, batches=self.batches, leading=self.leading)
        s = self.services
        self.parts: list[Part] = [
            self.commands,
            PolicyManager(store=s.store, kube=s.kube, publish=s.publish, batches=s.batches),
            MigrationManager(settings=s.settings, store=s.store, kube=s.kube, commands=s.commands, batches=s.batches),
            RolloutManager(settings=s.settings, store=s.store, kube=s.kube, batches=s.batches),
        ]

    def http_app(self) -> web.Application:
        """The HTTP API, the dashboard, /metrics and every part's routes."""
        return make_app(self.services, ingestor=self.ingestor, link=self.link, parts=self.parts,
                        command_resends=lambda: self.commands.resends)

    def close(self) -> None:
        """Release the database and the Kubernetes client (after `run`, or instead of it)."""
        self.store.close()
        if self.kube is not None:
            self.kube.close()

    # -- running ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: receive, ingest, prune, elect, lead. Then write what was accepted, and close."""
        s = self.settings
        self.link.start(asyncio.get_running_loop())
        tasks = [
            asyncio.create_task(self._receive(), name="receive"),
            asyncio.create_task(self.ingestor.run(), name="ingest"),
            asyncio.create_task(self._prune(stop), name="prune"),
            asyncio.create_task(self._lead_while_leader(stop), name="lead"),
        ]
        if self.kube is None:
            self.leading.set()  # no cluster, no Lease: run a single replica (documented)
        else:
            elector = LeaderElector(self.kube, s, self.identity, self.leading)
            tasks.append(asyncio.create_task(elector.run(stop), name="leader-election"))
        log.info("controller running", extra={"subscription": self.link.subscription(), "db": s.db.split("@")[-1]})
        await stop.wait()
        # stop taking messages, then write what was already accepted before leaving
        tasks[0].cancel()
        while not self.ingestor.queue.empty():
            await asyncio.sleep(0.05)
        await asyncio.sleep(s.batch_interval + 0.05)
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.link.stop()
        await asyncio.to_thread(self.store.close)
        if self.kube is not None:
            self.kube.close()

    async def _receive(self) -> None:
        while True:
            self.ingestor.offer(await self.link.receive())

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                cutoff = time.time() - self.settings.history_retention
                removed = await asyncio.to_thread(self.store.prune_samples, cutoff)
                if removed:
                    log.info("pruned %d history samples", removed)
            except Exception as exc:  # noqa: BLE001 - best effort: the next round tries again
                log.error("pruning the sample history failed: %s", exc)
            await wait_event(stop, PRUNE_EVERY_S)

    async def _lead_while_leader(self, stop: asyncio.Event) -> None:
        """Run every part's periodic work while `leading` is set; cancel it when it is cleared."""
        while not stop.is_set():
            await _wait_any(self.leading.wait(), stop.wait())
            if stop.is_set():
                return
            loops = [(part.name, p) for part in self.parts for p in part.periodic()]
            log.info("leading: starting %s", ", ".join(f"{name}: {p.name}" for name, p in loops) or "nothing")
            tasks = [asyncio.create_task(run_periodically(p), name=f"lead-{name}-{p.name}") for name, p in loops]
            while self.leading.is_set() and not stop.is_set():
                await _wait_any(stop.wait(), _cleared(self.leading))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not stop.is_set():
                log.warning("lost leadership: decisions stopped on this replica")


async def _wait_any(*aws: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _cleared(event: asyncio.Event) -> None:
    while event.is_set():
        await asyncio.sleep(0.2)


def build(settings: CloudSettings) -> ControllerApp:
    """Every object of one controller process, wired; nothing started yet."""
    # Kubernetes first: a missing kubeconfig must fail before anything is written.
    kube = None if settings.no_kube else Kube.connect(settings.kubeconfig, settings.in_cluster)
    try:
        store = FleetStore(settings.db, history_resolution_s=settings.history_resolution)
    except BaseException:
        if kube is not None:
            kube.close()
        raise
    return ControllerApp(settings, kube=kube, store=store)


async def serve(settings: CloudSettings) -> None:
    """`kgpu cloud run`: the controller until SIGINT or SIGTERM."""
    controller = build(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(controller.http_app(), access_log=None)
    await runner.setup()
    host, port = settings.http_address
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.http, exc.strerror)
        raise SystemExit(1) from None
    log.info("HTTP API listening", extra={"http": settings.http})
    try:
        await controller.run(stop)
    finally:
        await runner.cleanup()
