"""The composition root: the only module that knows every part of the controller.

`build(settings)` makes one controller process's objects: the Kubernetes client (or none), the
fleet store, the MQTT link, the ingest, the command outbox, the frozen `Services` every part
takes its few services from, and the parts (commands, policies, migration, rollouts). `serve`
runs them: MQTT in, batched ingest, acks out, HTTP on every replica; the parts' periodic work
only on the replica holding the leader Lease (`cloud/leader.py`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path

import sqlalchemy as sa
from aiohttp import web
from kubernetes.config import ConfigException
from urllib3.exceptions import HTTPError

from cloud.budget import BudgetLimits
from cloud.commands import EdgeCommands
from cloud.config import CloudSettings
from cloud.http.api import make_app
from cloud.ingest import Ingestor
from cloud.kube import Kube
from cloud.labels import NodeLabeler
from cloud.leader import LeaderElector
from cloud.link import EdgeLink
from cloud.memory_share import MemoryShareEnforcer
from cloud.migration import MigrationManager
from cloud.partitioning import PartitioningManager
from cloud.policies import PolicyManager
from cloud.quarantine import BrokerQuarantine
from cloud.reboots import RebootManager
from cloud.rollout import RolloutManager
from cloud.sample_writer import AREA_BYTES, SampleWriterProcess, WriterSettings
from cloud.services import BatchBus, Part, Periodic, Services, run_periodically
from cloud.store import FleetStore, FleetStoreError, HistoryTiers, RetentionPolicy
from shared.logs import get_logger
from shared.paths import directory_problem

log = get_logger(__name__)

PRUNE_EVERY_S = 300.0


class ControllerApp:
    """One controller process: its services, its parts, and the loops that run them."""

    def __init__(self, settings: CloudSettings, *, kube: Kube | None, store: FleetStore) -> None:
        self.settings = settings
        self.kube = kube
        self.store = store
        self.link = EdgeLink(settings, known_nodes=store.node_names)  # their retained status after a connect
        self.batches = BatchBus()
        # runaway nodes shut out at the broker (a failed quarantine is retried while the node is flagged)
        self.quarantine = BrokerQuarantine.for_settings(settings, flagged=lambda: self.ingestor.budget_flags)
        self.ingestor = Ingestor(store, self.link.publish_ack, batches=self.batches, batch_size=settings.batch_size,
                                 tune_gc=True, batch_interval_s=settings.batch_interval,
                                 budget=budget_limits(settings), queue_max=settings.ingest_queue_max,
                                 queue_max_bytes=settings.ingest_queue_max_bytes,
                                 reject_log_every_s=settings.reject_log_interval,
                                 on_runaway=self.quarantine.runaway, sample_writer=sample_writer_for(settings))
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
            MemoryShareEnforcer(kube=s.kube, batches=s.batches, leading=s.leading),
            PartitioningManager(store=s.store, kube=s.kube, publish=s.publish, batches=s.batches),
            NodeLabeler(kube=s.kube, batches=s.batches),
            RebootManager(settings=s.settings, store=s.store, kube=s.kube, commands=s.commands, batches=s.batches),
        ]

    def http_app(self) -> web.Application:
        """The HTTP API, the dashboard, /metrics and every part's routes."""
        return make_app(self.services, ingestor=self.ingestor, link=self.link, parts=self.parts,
                        command_resends=lambda: self.commands.resends, quarantine=self.quarantine)

    def close(self) -> None:
        """Release the database and the Kubernetes client (after `run`, or instead of it)."""
        self.store.close()
        if self.kube is not None:
            self.kube.close()

    # -- running ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: receive, ingest, prune, elect, lead. Then write what was accepted, and close."""
        s = self.settings
        # budgets on the network threads; telemetry handed to the sample writer process from there
        self.link.start(asyncio.get_running_loop(), accept=self.ingestor.accept,
                        take_telemetry=self.ingestor.take_telemetry)
        tasks = [
            asyncio.create_task(self._receive(), name="receive"),
            asyncio.create_task(self.ingestor.run(), name="ingest"),
            asyncio.create_task(run_periodically(self._retention()), name="retention"),
            asyncio.create_task(self._lead_while_leader(stop), name="lead"),
            asyncio.create_task(self.quarantine.run(), name="quarantine"),
        ]
        if self.kube is None:
            self.leading.set()  # no cluster, no Lease: run a single replica (documented)
        else:
            elector = LeaderElector(self.kube, s, self.identity, self.leading)
            tasks.append(asyncio.create_task(elector.run(stop), name="leader-election"))
        log.info("controller running", extra={"subscription": self.link.subscription(), "db": s.db.split("@")[-1]})
        await stop.wait()
        # stop taking messages, then write what was already accepted before leaving, for at most
        # shutdown_timeout: a database that is gone cannot drain it, and what is not written was
        # not acked either (the edges send it again), so it is lost from this process only
        tasks[0].cancel()
        abandoned = await self.ingestor.drain(s.shutdown_timeout)
        if abandoned:
            log.warning("shutdown: %d accepted messages not written within %.0f s are abandoned "
                        "(events among them were not acked: their edges send them again)",
                        abandoned, s.shutdown_timeout)
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.link.stop()
        await asyncio.to_thread(self.store.close)
        if self.kube is not None:
            self.kube.close()

    async def _receive(self) -> None:
        while True:  # waits while the ingest queue is full: the link stops reading (back-pressure)
            await self.ingestor.put(await self.link.receive(), budgeted=True)  # `accept` ran on the link

    def _retention(self) -> Periodic:
        """Every PRUNE_EVERY_S: the sample history rolled up into its tiers and pruned per tier,
        then events and decisions by age and count (cloud/store/retention.py), in small
        transactions; again at once while more is left."""
        s, store = self.settings, self.store
        policy = RetentionPolicy(max_age_s=s.event_retention, max_rows=s.event_retention_rows)
        cursors: dict[str, int] = {}

        async def step() -> bool:
            if not cursors:  # a new round
                done = await asyncio.to_thread(store.maintain_history)
                if done.rolled_up or done.raw_deleted or any(done.rollups_deleted.values()):
                    log.info("history: rolled up %d samples, deleted %d raw, %s", done.rolled_up,
                             done.raw_deleted, done.rollups_deleted)
            result = await asyncio.to_thread(store.apply_retention, policy, cursors=cursors)
            if result.events or result.decisions:
                log.info("retention: deleted %d events and %d decisions", result.events, result.decisions)
            cursors.clear()
            if result.more and result.cursors:
                cursors.update(result.cursors)
            return result.more

        return Periodic("retention", step, PRUNE_EVERY_S, expected=(FleetStoreError,))

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


def budget_limits(settings: CloudSettings) -> BudgetLimits:
    """Each node's ingest budget from the settings (cloud/budget.py)."""
    return BudgetLimits(messages_per_second=settings.node_max_messages_per_second,
                        bytes_per_second=settings.node_max_bytes_per_second,
                        events_per_minute=settings.node_max_events_per_minute,
                        event_burst=settings.node_event_burst, gpus=settings.node_max_gpus,
                        burst_s=settings.node_burst, backlog=settings.node_max_backlog,
                        runaway_drops_per_second=settings.node_runaway_drops_per_second,
                        # a replica knows the others' acks from the fleet store, as of its own last
                        # batch with the node's messages: twice the margin for that
                        events_ahead=settings.node_max_events_ahead * (2 if settings.shared_subscription else 1))


def check_kube_reachable(kube: Kube) -> None:
    """One request to the API server at the start, no retries: a controller that cannot reach it
    would otherwise run on, retrying its Lease with warnings only. Any HTTP answer will do (a 401
    or 403 is for the parts to report); a later outage is retried, as before."""
    host = kube.api_client.configuration.host
    try:
        kube.api_client.rest_client.pool_manager.request("GET", f"{host}/version", retries=False, timeout=10.0)
    except (HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigException(f"the API server at {host} does not answer ({str(reason)[:200]})") from None


def sqlite_problem(db: str) -> str | None:
    """For a SQLite URL, why its file cannot be made or written where it is (a missing, read-only
    or blocked directory), in words to act on; None otherwise."""
    url = sa.engine.make_url(db)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    path = Path(url.database)
    problem = directory_problem(path)
    return f"fleet database {path}: {problem}" if problem else None


def sample_writer_for(settings: CloudSettings) -> SampleWriterProcess | None:
    """The process that writes telemetry (cloud/sample_writer.py), unless `sample_process` is off."""
    if not settings.sample_process:
        return None
    return SampleWriterProcess(WriterSettings(
        db=settings.db, history_resolution_s=settings.history_resolution,
        latest_sample_every=settings.latest_sample_every, log_level=settings.log_level, log_json=settings.log_json,
        reject_log_every_s=settings.reject_log_interval),
        # the payloads of the batch being written and of the next one's first frames: each at most
        # the ingest queue's byte bound (cloud/sample_handover.py)
        area_bytes=2 * settings.ingest_queue_max_bytes if settings.ingest_queue_max_bytes else AREA_BYTES)


def build(settings: CloudSettings) -> ControllerApp:
    """Every object of one controller process, wired; nothing started yet."""
    # Kubernetes first: a missing kubeconfig or an API server that does not answer must fail
    # before anything is written.
    kube = None if settings.no_kube else Kube.connect(settings.kubeconfig, settings.in_cluster)
    try:
        if kube is not None:
            check_kube_reachable(kube)
        problem = sqlite_problem(settings.db)
        if problem is not None:
            raise FleetStoreError(problem)
        store = FleetStore(settings.db, history_resolution_s=settings.history_resolution,
                           history_tiers=HistoryTiers(*settings.history_tier_spec),
                           latest_sample_every=settings.latest_sample_every)
    except BaseException:
        if kube is not None:
            kube.close()
        raise
    return ControllerApp(settings, kube=kube, store=store)


async def serve(settings: CloudSettings) -> None:
    """`kgpu cloud run`: the controller until SIGINT or SIGTERM (one that comes while the store
    is still being opened stops it as soon as it is up, cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    controller = build(settings)
    runner = web.AppRunner(controller.http_app(), access_log=None)
    await runner.setup()
    host, port = settings.http_address
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        controller.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        print(f"kgpu: cannot listen on {settings.http} for the API: {reason}; choose another with --http HOST:PORT",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    log.info("HTTP API listening", extra={"http": settings.http})
    try:
        await controller.run(stop)
    finally:
        await runner.cleanup()
