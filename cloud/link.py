"""The controller's MQTT link to the edges: started by the composition root (cloud/app.py),
published through by the parts (`Services.publish`), watched by /healthz and /metrics.

Its state exists before the link does (HTTP serves before the first connection), so everything
here answers sensibly while `mqtt` is still None: not connected, nothing published.

Two connections, so that one node flooding telemetry cannot delay the fleet's events and status
(paho parses some 20,000 messages a second per connection; beyond, the broker queues for us):
- `mqtt`, events and status (the client id; alone a durable session, so that the broker queues
  events while we restart): `kgpu/v1/edge/+/events`, `kgpu/v1/edge/+/status` and
  `kgpu/v1/edge/+/+/+/#` (a node name spanning several levels: RabbitMQ turns dots into levels);
- `telemetry` (`<client id>-telemetry`, clean session, QoS 0): `kgpu/v1/edge/+/+`, that is
  telemetry and any unknown kind (counted as `bad_topic` by the ingest); the status and events it
  also gets are dropped on its network thread, since `mqtt` has them.
Both hand their messages to `receive`, taking turns; both run the ingest's budget check
(`accept`) on their network threads, so a flood's excess never reaches the event loop.

What it subscribes to holds on every MQTT 3.1.1 broker we know (docs/broker.md, section 8). In a
`$share` group the events and telemetry filters get `$share/<group>/`, and status is subscribed
without `$share` for every node's retained status at start-up (MQTT 5 says a shared subscription
gets no retained messages). If the group delivers nothing while live status arrives (RabbitMQ and
aedes grant `$share/...` and ignore it), `shared_silent` says so and an ERROR is logged.
- RabbitMQ sends no retained message to a wildcard subscription: so a connect is followed, after
  `STATUS_CATCH_UP_AFTER_S`, by exact subscriptions (unsubscribed at their SUBACK) to the status
  topics of the known nodes whose retained status has not arrived yet.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from cloud.config import CloudSettings
from shared.logs import get_logger
from shared.mqtt import AsyncMqtt, Received, TlsOptions, parse_broker_url
from shared.protocol import AckBody, Kind, make_envelope
from shared.topics import EDGE_STATUS_WILDCARD, EDGE_WILDCARD, PREFIX, cloud_topic, edge_topic

log = get_logger(__name__)

EDGE_EVENTS_WILDCARD = f"{PREFIX}/edge/+/events"
EDGE_MULTILEVEL_WILDCARD = f"{PREFIX}/edge/+/+/+/#"  # node names spanning levels (dots on RabbitMQ)
EDGE_ANY_KIND_WILDCARD = f"{PREFIX}/edge/+/+"  # the telemetry connection: telemetry, unknown kinds
ON_MAIN_CONNECTION = ("/status", "/events")  # what the telemetry connection drops: `mqtt` has it

ACK_RETRY_S = 0.5  # an ack the link could not take is published again this often until it is
STATUS_CATCH_UP_AFTER_S = 2.0  # brokers that send retained messages to wildcards have done so by then
STATUS_CATCH_UP_CHUNK = 200  # filters per SUBSCRIBE


class EdgeLink:
    """The MQTT connection of one controller replica (a `Publish` for the parts).

    `known_nodes` (from the composition root: the fleet store's node names; called in a thread)
    names the nodes whose retained status is asked for by exact topic after a connect."""

    def __init__(self, settings: CloudSettings, known_nodes: Callable[[], list[str]] | None = None) -> None:
        self.settings = settings
        self.known_nodes = known_nodes
        self.mqtt: AsyncMqtt | None = None  # events and status
        self.telemetry: AsyncMqtt | None = None  # telemetry (and unknown kinds)
        self._arrived = asyncio.Event()  # set when either connection hands messages to the loop
        self._telemetry_turn = False  # `receive` alternates between the two
        # The $share check: live (not retained) messages since the last connect, by kind.
        self.shared_silent: str | None = None  # why we think the $share group delivers nothing
        self._up_since: float | None = None
        self._live_status = 0
        self._live_other = 0
        self._status_seen: set[str] = set()  # nodes whose status arrived since the last connect
        self.status_caught_up = 0  # nodes whose retained status was asked for by exact topic
        self._watch: asyncio.Task[None] | None = None
        # node -> its newest ack that the link could not take (down, or its outgoing queue full of
        # a bulk publish: policies or partitionings to 20,000 nodes). Acks are cumulative, so the
        # newest is all a node needs; `_resend_acks` publishes them again until they go out.
        self.acks_waiting: dict[str, bytes] = {}
        self.acks_resent = 0
        self._ack_retry: asyncio.Task[None] | None = None

    def _connections(self) -> list[AsyncMqtt]:
        return [c for c in (self.mqtt, self.telemetry) if c is not None]

    @property
    def connected(self) -> bool:
        """Both connections up (one alone leaves the controller deaf to part of the fleet's messages)."""
        connections = self._connections()
        return len(connections) == 2 and all(c.connected for c in connections)

    @property
    def last_error(self) -> str | None:
        main = self.mqtt.link.last_error if self.mqtt is not None else None
        telemetry = self.telemetry.link.last_error if self.telemetry is not None else None
        return main or (f"telemetry connection: {telemetry}" if telemetry else None)

    @property
    def refused_subscriptions(self) -> dict[str, str]:
        """filter -> the SUBACK code the broker refused it with (empty when all were granted)."""
        refused: dict[str, str] = {}
        for connection in self._connections():
            refused.update(connection.link.refused_subscriptions)
        return refused

    def receive_queues(self) -> dict[str, tuple[int, int]]:
        """connection ("events", "telemetry") -> (messages waiting in its receive queue, times its
        network thread found that queue full and stopped reading from the broker): the MQTT side
        of the controller's backlog, before the ingest queue."""
        named = (("events", self.mqtt), ("telemetry", self.telemetry))
        return {name: (c.messages.qsize(), c.receive_full) for name, c in named if c is not None}

    @property
    def not_accepted(self) -> int:
        """Messages dropped on the network threads (over budget, or the telemetry connection's copy
        of status and events)."""
        return sum(c.not_accepted for c in self._connections())

    def broker_problems(self) -> list[str]:
        """What the broker does that leaves this controller deaf, one line each (for /healthz)."""
        problems = [f"subscription to {topic} refused (SUBACK {code})"
                    for topic, code in sorted(self.refused_subscriptions.items())]
        if self.shared_silent:
            problems.append(self.shared_silent)
        return problems

    def _shared(self, topic_filter: str) -> str:
        group = self.settings.shared_subscription
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def subscription(self) -> str:
        """The filter the fleet's events arrive by (in a `$share` group: the group's)."""
        return self._shared(EDGE_EVENTS_WILDCARD)

    def subscriptions(self) -> list[tuple[str, int]]:
        """The events and status connection's filters (status never through `$share`: see above)."""
        return [(self.subscription(), 1), (self._shared(EDGE_MULTILEVEL_WILDCARD), 1), (EDGE_STATUS_WILDCARD, 1)]

    def telemetry_subscriptions(self) -> list[tuple[str, int]]:
        return [(self._shared(EDGE_ANY_KIND_WILDCARD), 0)]

    def start(self, loop: asyncio.AbstractEventLoop, accept: Callable[[Received], bool] | None = None,
              take_telemetry: Callable[[Received], bool] | None = None) -> None:
        """Connect both. `accept` (the ingest's budget check) runs on the network threads: what it
        refuses is dropped there; the caller then need not check again what `receive` returns.
        `take_telemetry` (the ingest's, with a sample writer process) runs on the telemetry
        connection's network thread after it: what it takes never reaches `receive`."""
        s = self.settings
        address = parse_broker_url(s.mqtt, password_file=s.mqtt_password_file)
        tls = TlsOptions(s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file, s.mqtt_tls_insecure)

        def accept_telemetry(message: Received) -> bool:
            if message.topic.endswith(ON_MAIN_CONNECTION):
                return False  # the events and status connection has it
            return accept is None or accept(message)

        self.mqtt = AsyncMqtt(
            loop, address, s.client_id, subscriptions=self.subscriptions(), accept=accept,
            # Alone, a durable session lets the broker queue events while the controller restarts
            # (what an older version subscribed to is dropped from it). In a $share group it would
            # keep a dead replica's round-robin share queued for days, so replicas use clean
            # sessions; the edges re-send anything not acked.
            clean_session=s.shared_subscription is not None,
            retired_subscriptions=[] if s.shared_subscription else [EDGE_WILDCARD],
            tls=tls, password_file=s.mqtt_password_file, max_received=s.mqtt_receive_queue,
            max_received_bytes=s.mqtt_receive_queue_bytes, on_ready=self._arrived.set,
        )
        self.telemetry = AsyncMqtt(
            loop, address, f"{s.client_id}-telemetry", subscriptions=self.telemetry_subscriptions(),
            accept=accept_telemetry, divert=take_telemetry, clean_session=True,
            tls=tls, password_file=s.mqtt_password_file, max_received=s.mqtt_receive_queue,
            max_received_bytes=s.mqtt_receive_queue_bytes, on_ready=self._arrived.set,
        )
        self._watch = loop.create_task(self._on_link_changes(), name="mqtt-link-changes")
        self.mqtt.start()
        self.telemetry.start()

    async def stop(self) -> None:
        for task in (self._watch, self._ack_retry):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self._connections()))

    async def receive(self) -> Received:
        """The next message from the edges (after `start`), from the two connections in turn."""
        assert self.mqtt is not None and self.telemetry is not None
        while True:
            self._telemetry_turn = not self._telemetry_turn
            order = (self.telemetry, self.mqtt) if self._telemetry_turn else (self.mqtt, self.telemetry)
            for connection in order:
                if not connection.messages.empty():
                    message = connection.messages.get_nowait()
                    self._note(message)
                    return message
            self._arrived.clear()  # both empty; nothing can arrive before the wait (one loop)
            await self._arrived.wait()

    # ---- what arrives: retained status seen, the $share check ------------------------------------

    def _note(self, message: Received) -> None:
        levels = message.topic.split("/")
        is_status = levels[-1] == "status"
        if is_status and len(levels) >= 5:
            self._status_seen.add(".".join(levels[3:-1]))
        if not self.settings.shared_subscription or message.retain:
            return
        if not is_status:
            self._live_other += 1
            if self.shared_silent is not None:
                log.info("the shared subscription %s delivers again", self.subscription())
                self.shared_silent = None
            return
        self._live_status += 1
        up_for = time.monotonic() - self._up_since if self._up_since is not None else 0.0
        if self.shared_silent is None and self._live_other == 0 and up_for >= self.settings.shared_subscription_check:
            self.shared_silent = (
                f"the broker granted {self.subscription()} (and the telemetry connection's "
                f"{self._shared(EDGE_ANY_KIND_WILDCARD)}) but delivered nothing through them for {up_for:.0f} s "
                f"while nodes publish ({self._live_status} live status messages came by {EDGE_STATUS_WILDCARD}): "
                "it probably does not support shared subscriptions (RabbitMQ and aedes ignore them); run one "
                "replica without --shared-subscription")
            log.error("%s", self.shared_silent, extra={"subscription": self.subscription()})

    async def _on_link_changes(self) -> None:
        assert self.mqtt is not None and self.telemetry is not None
        telemetry = self.telemetry
        while True:
            while not telemetry.link_changes.empty():  # logged by the link itself; not kept
                telemetry.link_changes.get_nowait()
            if await self.mqtt.link_changes.get():
                self._up_since = time.monotonic()
                self._live_status = self._live_other = 0
                self._status_seen.clear()
                if self.known_nodes is not None:
                    await asyncio.sleep(STATUS_CATCH_UP_AFTER_S)
                    await self._catch_up_status()

    async def _catch_up_status(self) -> None:
        """Ask for the retained status of the known nodes not heard from since the connect."""
        assert self.mqtt is not None and self.known_nodes is not None
        try:
            names = await asyncio.to_thread(self.known_nodes)
        except Exception as exc:  # noqa: BLE001 - best effort: the nodes' periodic status comes anyway
            log.warning("cannot list the known nodes to ask for their retained status: %s", exc)
            return
        missing = [name for name in names if name not in self._status_seen]
        if not missing:
            return
        chunks = self.mqtt.link.subscribe_once([edge_topic(name, "status") for name in missing],
                                               chunk=STATUS_CATCH_UP_CHUNK)
        if chunks:
            self.status_caught_up += len(missing)
            log.info("asked for the retained status of %d known nodes by exact topic (the broker sent none "
                     "through the wildcard within %.0f s)", len(missing), STATUS_CATCH_UP_AFTER_S)

    # ---- publishing ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """QoS 1 publish to an edge; False when the link is down or its outgoing queue is full
        (the caller retries)."""
        return self.mqtt is not None and self.mqtt.publish(topic, payload, qos=1, retain=retain)

    def publish_ack(self, node: str, upto: int, epoch: str | None, *, conflict: bool = False,
                    behind_s: float | None = None) -> None:
        """The ingest's cumulative ack to a node, after the commit (`conflict`, `behind_s`: see
        AckBody; `behind_s` only to edges that read it: an older edge refuses the whole ack)."""
        behind = round(behind_s, 1) if behind_s else None
        ack = make_envelope(node, AckBody(upto=upto, epoch=epoch, conflict=conflict, behind_s=behind), Kind.ACK)
        payload = ack.to_json()
        if self.publish(cloud_topic(node, "ack"), payload):
            self.acks_waiting.pop(node, None)  # an older one that waited: this one covers it
            return
        if not self.acks_waiting:
            log.warning("acks waiting: the MQTT link is down or its outgoing queue is full; each is published "
                        "again every %.1f s until it goes out (meanwhile an edge may send its events again)",
                        ACK_RETRY_S, extra={"node": node})
        self.acks_waiting[node] = payload
        if self._ack_retry is None or self._ack_retry.done():
            self._ack_retry = asyncio.get_running_loop().create_task(self._resend_acks(), name="mqtt-ack-resend")

    async def _resend_acks(self) -> None:
        """Publish the acks that waited, as the link takes them, until none waits."""
        while self.acks_waiting:
            await asyncio.sleep(ACK_RETRY_S)
            for node, payload in list(self.acks_waiting.items()):
                if not self.publish(cloud_topic(node, "ack"), payload):
                    break  # still no room: the rest wait with it
                if self.acks_waiting.get(node) is payload:  # not replaced by a newer one meanwhile
                    del self.acks_waiting[node]
                self.acks_resent += 1
        log.info("acks that waited are all sent", extra={"resent": self.acks_resent})
