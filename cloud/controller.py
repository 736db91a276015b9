"""The cloud controller process: MQTT in, fleet store, acks out, HTTP."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Protocol

from aiohttp import web

from cloud.api import make_app
from cloud.config import CloudSettings
from cloud.ingest import Ingestor
from cloud.kube import Kube, KubeUnavailable
from cloud.store import FleetStore
from shared.aio import wait_event
from shared.logs import get_logger
from shared.mqtt import AsyncMqtt, TlsOptions, parse_broker_url
from shared.protocol import AckBody, Kind, make_envelope
from shared.topics import EDGE_WILDCARD, cloud_topic

log = get_logger(__name__)

PRUNE_EVERY_S = 300.0


class Subsystem(Protocol):
    """A part of the controller that takes decisions (policies, migrations, rollouts).

    Ingest runs on every replica; `lead()` runs only on the replica holding the leader Lease and
    is cancelled when it loses it. `add_routes` adds the subsystem's HTTP endpoints."""

    name: str

    def add_routes(self, app: web.Application) -> None: ...

    async def lead(self) -> None: ...


class Controller:
    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        # Kubernetes first: a missing kubeconfig must fail before anything is written.
        self.kube: Kube | None = None if settings.no_kube else Kube.connect(settings.kubeconfig, settings.in_cluster)
        self.store = FleetStore(settings.db, history_resolution_s=settings.history_resolution)
        self.ingestor = Ingestor(self.store, self.publish_ack, batch_size=settings.batch_size, tune_gc=True,
                                 batch_interval_s=settings.batch_interval)
        self.mqtt: AsyncMqtt | None = None
        from cloud.edge_commands import EdgeCommands

        self.commands = EdgeCommands(self)  # every subsystem sends its edge commands through it
        self.identity = settings.client_id  # this replica's name in the leader Lease
        self.leading = asyncio.Event()  # set while this replica is the leader
        self.subsystems: list[Subsystem] = []

    def require_kube(self, feature: str) -> Kube:
        """The Kubernetes client, or a clear refusal when running with --no-kube."""
        if self.kube is None:
            raise KubeUnavailable(f"{feature} needs a Kubernetes cluster; the controller runs with --no-kube")
        return self.kube

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """QoS 1 publish to an edge; False when the link is down (the caller retries)."""
        return self.mqtt is not None and self.mqtt.publish(topic, payload, qos=1, retain=retain)

    async def _lead_while_leader(self, stop: asyncio.Event) -> None:
        """Run every subsystem's lead() while `leading` is set; cancel them when it is cleared."""
        while not stop.is_set():
            await _wait_any(self.leading.wait(), stop.wait())
            if stop.is_set():
                return
            log.info("leading: starting %s", ", ".join(s.name for s in self.subsystems) or "no subsystems")
            tasks = [asyncio.create_task(s.lead(), name=f"lead-{s.name}") for s in self.subsystems]
            while self.leading.is_set() and not stop.is_set():
                await _wait_any(stop.wait(), _cleared(self.leading))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not stop.is_set():
                log.warning("lost leadership: decisions stopped on this replica")

    def subscription(self) -> str:
        group = self.settings.shared_subscription
        return f"$share/{group}/{EDGE_WILDCARD}" if group else EDGE_WILDCARD

    def publish_ack(self, node: str, upto: int, epoch: str | None) -> None:
        assert self.mqtt is not None
        ack = make_envelope(node, AckBody(upto=upto, epoch=epoch), Kind.ACK)
        if not self.mqtt.publish(cloud_topic(node, "ack"), ack.to_json(), qos=1):
            log.warning("link down: ack up to %d not sent (the edge will send again)", upto, extra={"node": node})

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        address = parse_broker_url(s.mqtt, password_file=s.mqtt_password_file)
        self.mqtt = AsyncMqtt(
            asyncio.get_running_loop(), address, s.client_id, subscriptions=[(self.subscription(), 1)],
            tls=TlsOptions(s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file, s.mqtt_tls_insecure),
            # Alone, a durable session lets the broker queue events while the controller restarts.
            # In a $share group it would keep a dead replica's round-robin share queued for days,
            # so replicas use clean sessions; the edges re-send anything not acked.
            clean_session=s.shared_subscription is not None,
            password_file=s.mqtt_password_file,
        )
        self.mqtt.start()
        tasks = [
            asyncio.create_task(self._receive(), name="receive"),
            asyncio.create_task(self.ingestor.run(), name="ingest"),
            asyncio.create_task(self._prune(stop), name="prune"),
            asyncio.create_task(self._lead_while_leader(stop), name="lead"),
        ]
        if self.kube is None:
            self.leading.set()  # no cluster, no Lease: run a single replica (documented)
        else:
            from cloud.leader import LeaderElector

            elector = LeaderElector(self.kube, self.settings, self.identity, self.leading)
            tasks.append(asyncio.create_task(elector.run(stop), name="leader-election"))
        log.info("controller running", extra={"subscription": self.subscription(), "db": s.db.split("@")[-1]})
        await stop.wait()
        # stop taking messages, then write what was already accepted before leaving
        tasks[0].cancel()
        while not self.ingestor.queue.empty():
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.settings.batch_interval + 0.05)
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.mqtt.stop()
        await asyncio.to_thread(self.store.close)
        if self.kube is not None:
            self.kube.close()

    async def _receive(self) -> None:
        assert self.mqtt is not None
        while True:
            self.ingestor.offer(await self.mqtt.messages.get())

    async def _prune(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                removed = await asyncio.to_thread(self.store.prune_samples, time.time() - self.settings.history_retention)
                if removed:
                    log.info("pruned %d history samples", removed)
            except Exception as exc:
                log.error("pruning the sample history failed: %s", exc)
            await wait_event(stop, PRUNE_EVERY_S)


async def _wait_any(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[arg-type]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _cleared(event: asyncio.Event) -> None:
    while event.is_set():
        await asyncio.sleep(0.2)


SUBSYSTEMS = (  # (module, class): every decision-taking part, each built from the controller
    ("cloud.edge_commands", "EdgeCommands"),
    ("cloud.policies", "PolicyManager"),
    ("cloud.workload_migration", "MigrationManager"),
    ("cloud.rollout", "RolloutManager"),
)


def build_subsystems(controller: Controller) -> list[Subsystem]:
    from cloud.policies import PolicyManager
    from cloud.rollout import RolloutManager
    from cloud.workload_migration import MigrationManager

    return [controller.commands, PolicyManager(controller), MigrationManager(controller), RolloutManager(controller)]


async def serve(settings: CloudSettings) -> None:
    controller = Controller(settings)
    controller.subsystems = build_subsystems(controller)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(make_app(controller), access_log=None)
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
