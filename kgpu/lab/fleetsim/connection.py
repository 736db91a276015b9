"""One MQTT connection of the fleet simulator, carrying one or more simulated nodes: a paho client
driven by the simulator's asyncio loop through paho's external-loop interface, no thread of its own.

Why not paho's loop_start: `on_socket_open/close`, `on_socket_register_write` and
`loop_read/loop_write/loop_misc` let one event loop multiplex every client's socket with epoll,
so 2,000 connections cost 2,000 file descriptors and no threads.
"""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from kgpu.lab.fleetsim.node import (
    FleetCounters,
    FleetOptions,
    SimNode,
    envelope_json,
    offline_status_body,
    status_body,
)
from shared.logs import get_logger
from shared.mqtt import BrokerAddress
from shared.protocol import ROUTES, Kind
from shared.topics import cloud_wildcard_for

log = get_logger(__name__)

_SUBSCRIBE_CHUNK = 100  # topics per SUBSCRIBE packet when a connection carries many nodes
_MAX_INFLIGHT = 65_000  # MQTT message ids are 16-bit
STATUS = ROUTES["status"]  # retained, with the last will (shared.protocol's one contract)


class ConnectionOwner(Protocol):
    """What a connection needs of the simulator that owns it (FleetSim)."""

    options: FleetOptions
    address: BrokerAddress
    loop: asyncio.AbstractEventLoop
    counters: FleetCounters
    stopping: bool

    def publish_status(self, node: SimNode) -> None: ...

    def drain(self, node: SimNode) -> None: ...

    def handle(self, carried: dict[str, SimNode], topic: str, payload: bytes) -> None: ...


class SimConnection:
    """A paho client driven by the simulator's event loop (no thread of its own)."""

    def __init__(self, sim: ConnectionOwner, index: int, nodes: list[SimNode]) -> None:
        self.sim = sim
        self.index = index
        self.nodes = nodes
        self.up = False
        self.paused = False  # links cut on purpose: do not reconnect
        self.backoff_s = 0.5
        self._reconnect_handle: asyncio.TimerHandle | None = None
        options = sim.options
        single = len(nodes) == 1
        client_id = f"kgpu-edge-{nodes[0].name}" if single else f"kgpu-fleetsim-{options.prefix}-{index}"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                             protocol=paho.MQTTv311, reconnect_on_failure=False)
        address = sim.address
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set()
        will_node = nodes[0]  # MQTT: one will per connection
        client.will_set(will_node.topics["status"],
                        envelope_json(will_node.name, Kind.STATUS, offline_status_body(will_node)),
                        qos=STATUS.qos, retain=STATUS.retained)
        client.max_inflight_messages_set(min(_MAX_INFLIGHT, (options.outbox_window + 4) * len(nodes)))
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.client = client
        self._nodes_by_name = {n.name: n for n in nodes}
        for node in nodes:
            node.conn = self

    # -- the event loop drives the socket --------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, _userdata: object, sock: Any) -> None:
        self.sim.loop.add_reader(sock, self._read)

    def _on_socket_close(self, _client: paho.Client, _userdata: object, sock: Any) -> None:
        self.sim.loop.remove_reader(sock)
        self.sim.loop.remove_writer(sock)

    def _on_register_write(self, client: paho.Client, _userdata: object, sock: Any) -> None:
        self.sim.loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, _client: paho.Client, _userdata: object, sock: Any) -> None:
        self.sim.loop.remove_writer(sock)

    def _read(self) -> None:
        self.client.loop_read(max_packets=100)

    def misc(self) -> None:
        """Keepalive pings; paho notices a dead broker here."""
        if self.client.socket() is not None:
            self.client.loop_misc()

    # -- connecting ------------------------------------------------------------------------------

    def connect(self) -> None:
        if self.paused:
            return
        try:
            self.client.connect(self.sim.address.host, self.sim.address.port, keepalive=self.sim.options.keepalive_s)
        except (OSError, ValueError) as exc:
            self.sim.counters.connect_failures += 1
            log.debug("fleet-sim connection %d: cannot connect: %s", self.index, exc)
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self.paused or self.sim.stopping or self._reconnect_handle is not None:
            return
        delay = random.uniform(self.backoff_s / 2, self.backoff_s)  # jitter, as the edge
        self.backoff_s = min(self.backoff_s * 2, 30.0)
        self._reconnect_handle = self.sim.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_handle = None
        self.connect()

    def cut(self) -> None:
        """Drop the TCP connection without DISCONNECT (the broker publishes the last will)."""
        self.paused = True
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # TLS too: ssl.SSLSocket is one
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.client.loop_read()  # paho sees the dead socket now: on_disconnect, socket closed

    def restore(self) -> None:
        self.paused = False
        self.backoff_s = 0.5
        self.connect()

    def goodbye(self) -> None:
        """Clean stop: every node says offline (retained), then DISCONNECT (no will)."""
        self.paused = True
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None
        if self.up:
            for node in self.nodes:
                self.publish(node.topics["status"],
                             envelope_json(node.name, Kind.STATUS,
                                           status_body(node, self.sim.options.daemon_version, "offline")),
                             qos=STATUS.qos, retain=STATUS.retained)
            self.client.disconnect()

    # -- paho callbacks (on the loop) ------------------------------------------------------------

    def _on_connect(self, client: paho.Client, _userdata: object, _flags: object, reason: Any,
                    _properties: object) -> None:
        if getattr(reason, "is_failure", False):
            self.sim.counters.connect_failures += 1
            client.disconnect()
            return
        self.up = True
        self.backoff_s = 0.5
        self.sim.counters.connects += 1
        topics = [(cloud_wildcard_for(n.name), 1) for n in self.nodes]
        for start in range(0, len(topics), _SUBSCRIBE_CHUNK):
            client.subscribe(topics[start:start + _SUBSCRIBE_CHUNK])
        for node in self.nodes:
            self.sim.publish_status(node)
            node.highest_sent = node.acked_upto  # everything unacked goes again (the cloud dedups)
            node.oldest_unacked_sent_at = None
            self.sim.drain(node)

    def _on_disconnect(self, _client: paho.Client, _userdata: object, _flags: object, _reason: object,
                       _properties: object) -> None:
        if self.up:
            self.sim.counters.disconnects += 1
        self.up = False
        self._schedule_reconnect()

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self.sim.handle(self._nodes_by_name, message.topic, bytes(message.payload))

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool:
        if not self.up:
            return False
        return self.client.publish(topic, payload, qos=qos, retain=retain).rc == paho.MQTT_ERR_SUCCESS
