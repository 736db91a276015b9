"""Fleet simulator: thousands of light simulated edge nodes in ONE process, against a real broker
and a real controller, speaking the edge's protocol with the edge's envelopes.

Every simulated node behaves like `kgpu edge run` on the wire (edge/sync.py):

- `kgpu/v1/edge/{node}/status`: QoS 1, retained, on connect, on a policy change and every
  `status_interval`; the broker's last will says `offline` when the connection dies uncleanly.
- `kgpu/v1/edge/{node}/telemetry`: QoS 0, one sample of the node's N GPUs every `interval`
  (nodes are spread evenly over the interval, as a real fleet's clocks are).
- `kgpu/v1/edge/{node}/events`: decisions from a per-node outbox numbered by `seq`; at most
  `outbox_window` in flight; an event leaves the outbox only when the cloud's cumulative ack
  (`kgpu/v1/cloud/{node}/ack`, epoch checked) covers it; unacked events are sent again after a
  reconnect or after `ack_timeout`.
- `kgpu/v1/cloud/{node}/#`: acks, the retained policy (its version goes into the next status) and
  commands (applied at most once per id, the result goes back as a `command_result` event).

Payloads are built as plain dicts in the exact shape of shared/protocol.py's models and written
with `json.dumps` (tests decode every kind with `shared.protocol.decode`): building thousands of
pydantic models a second would make the simulator, not the controller, the bottleneck on a small
machine. Everything received from the cloud IS decoded with `shared.protocol.decode`.

Why one asyncio loop driving many paho clients (not one thread per node, not paho's loop_start):
paho's external-loop interface (`on_socket_open/close`, `on_socket_register_write`,
`loop_read/loop_write/loop_misc`) lets one event loop multiplex every client's socket with epoll,
so 2,000 connections cost 2,000 file descriptors and no threads; one thread per client would
spend the machine on context switches and the GIL. All node state lives on that one loop, so
nothing needs a lock. How many nodes share one MQTT connection is a flag
(`nodes_per_connection`):

- 1 (default): one connection per node, exactly as a real fleet: per-node client id
  (`kgpu-edge-{node}`), per-node subscriptions, and a real last will per node. Needs one file
  descriptor per node here and in the broker (the simulator raises its own soft limit; check
  the broker's `max_connections` and `ulimit -n`).
- K > 1: a connection carries K nodes (fewer sockets, e.g. to go past a descriptor limit). MQTT
  gives a connection one will, so only the connection's first node has a broker-side last will;
  the others say `offline` only on a clean stop.

Ingest lag, measured here: for events, from the first publish of a seq to the arrival of the
cumulative ack that covers it (the cloud acks only after the commit, so this is "stored" plus the
ack's trip back); for telemetry (QoS 0, never acked), optional probes poll the controller's
`GET /api/v1/nodes/{node}` after publishing until the node's stored sample carries that `ts`.

Why here and not in bench/: an operator load-tests their own broker and controller with the
installed package (`kgpu fleet-sim`), without the repository; bench/fleet_scale.py,
bench/outbox_catchup.py and bench/rollout_fleet.py drive the same class against processes they start.

    kgpu fleet-sim --mqtt mqtt://127.0.0.1:1883 --nodes 2000 --gpus 8 --interval 10 \\
        --cloud http://127.0.0.1:9420 --duration 120
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import os
import random
import resource
import signal
import socket
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from shared.logs import get_logger
from shared.mqtt import BrokerAddress, parse_broker_url
from shared.protocol import AckBody, CommandBody, PolicyBody, RejectedMessage, decode
from shared.topics import BadTopic, cloud_wildcard_for, edge_topic, parse_topic

log = get_logger(__name__)

GPU_MODEL = "NVIDIA H100 80GB HBM3"
GPU_MEMORY_BYTES = 80 * 1024**3
DEFAULT_LIMIT_W = 700.0
_SUBSCRIBE_CHUNK = 100  # topics per SUBSCRIBE packet when a connection carries many nodes
_MAX_INFLIGHT = 65_000  # MQTT message ids are 16-bit


@dataclass(frozen=True)
class FleetOptions:
    """What to simulate. Defaults follow `kgpu edge run`'s defaults where there is one."""

    mqtt: str
    nodes: int = 100
    gpus: int = 8
    interval_s: float = 10.0  # telemetry per node
    event_every_s: float = 60.0  # mean gap between two events of one node; 0: no events
    status_interval_s: float = 30.0
    nodes_per_connection: int = 1
    prefix: str = "sim"
    outbox_window: int = 100
    ack_timeout_s: float = 15.0
    connect_rate: float = 500.0  # new connections per second at start (a fleet does not arrive at once)
    keepalive_s: int = 60
    daemon_version: str = "fleetsim"
    cloud: str | None = None  # controller's HTTP base URL: enables telemetry lag probes
    probes: int = 10  # nodes whose telemetry is probed (spread over the fleet)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus < 1:
            raise ValueError("nodes and gpus must be at least 1")
        if self.nodes_per_connection < 1:
            raise ValueError("nodes_per_connection must be at least 1")
        if self.interval_s <= 0 or self.status_interval_s <= 0 or self.event_every_s < 0:
            raise ValueError("interval and status_interval must be positive, event_every not negative")

    @property
    def connections(self) -> int:
        return math.ceil(self.nodes / self.nodes_per_connection)


# ---- measurements ---------------------------------------------------------------------------


class LagRecorder:
    """(when, lag) pairs in two compact arrays; percentiles over any time window."""

    def __init__(self) -> None:
        self.at = array("d")
        self.lag = array("d")

    def record(self, at: float, lag: float) -> None:
        self.at.append(at)
        self.lag.append(lag)

    def window(self, since: float = float("-inf"), until: float = float("inf")) -> list[float]:
        return sorted(lag for at, lag in zip(self.at, self.lag, strict=True) if since <= at <= until)

    def __len__(self) -> int:
        return len(self.lag)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class FleetCounters:
    published: dict[str, int] = field(default_factory=lambda: {"status": 0, "telemetry": 0, "events": 0})
    events_created: int = 0
    events_acked: int = 0
    resent_events: int = 0  # publishes of a seq that was published before
    resend_timeouts: int = 0  # nodes whose unacked events were sent again after ack_timeout
    telemetry_skipped: int = 0  # due while the node's link was down
    acks: int = 0
    stale_acks: int = 0  # acks not newer than what we had
    policies: int = 0
    commands: int = 0
    commands_repeated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # messages from the cloud we refused
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    schedule_late_max_s: float = 0.0  # how far behind its own schedule the simulator fell


# ---- one simulated node ---------------------------------------------------------------------


@dataclass
class OutboxEntry:
    payload: bytes
    created: float  # monotonic
    first_sent: float | None = None


class SimNode:
    """The wire-level state of one edge: outbox, acks, policy, applied commands, GPU figures."""

    def __init__(self, index: int, name: str, gpus: int, rng: random.Random) -> None:
        self.index = index
        self.name = name
        self.epoch = os.urandom(8).hex()
        self.topics = {k: edge_topic(name, k) for k in ("status", "telemetry", "events")}
        self.next_seq = 1
        self.outbox: dict[int, OutboxEntry] = {}
        self.acked_upto = 0
        self.highest_sent = 0
        self.oldest_unacked_sent_at: float | None = None
        self.policy_name: str | None = None
        self.policy_version: int | None = None
        self.applied_commands: set[str] = set()
        self.draining: set[str] = set()
        self.conn: SimConnection | None = None
        self.version: str | None = None  # None: the fleet's daemon_version; set by restart()
        self.probe_busy = False
        self.uuids = [f"GPU-{name}-{i:02d}" for i in range(gpus)]
        self.util = [rng.uniform(20, 90) for _ in range(gpus)]
        self.energy_mj = [rng.randrange(10**9, 10**10) for _ in range(gpus)]
        self.last_sample_at = time.time()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.up


# ---- payloads (the shapes of shared/protocol.py) --------------------------------------------


def envelope_json(node: str, kind: str, body: dict[str, Any], seq: int | None = None,
                  ts: float | None = None) -> bytes:
    return json.dumps(
        {"v": 1, "node": node, "seq": seq, "id": os.urandom(16).hex(), "ts": time.time() if ts is None else ts,
         "kind": kind, "body": body},
        separators=(",", ":"),
    ).encode()


def status_body(node: SimNode, version: str, state: str = "online") -> dict[str, Any]:
    return {
        "state": state,
        "version": node.version or version,
        "gpus": [
            {"index": i, "uuid": uuid, "name": GPU_MODEL, "health": "healthy", "power_limit_w": DEFAULT_LIMIT_W,
             "draining": uuid in node.draining}
            for i, uuid in enumerate(node.uuids)
        ],
        "policy_name": node.policy_name,
        "policy_version": node.policy_version,
        "outbox_depth": len(node.outbox),
        "outbox_epoch": node.epoch,
        "degraded": [],
    }


def telemetry_body(node: SimNode, rng: random.Random, now: float) -> dict[str, Any]:
    """One sample of every GPU, every figure the real edge reports, moving a little each time."""
    elapsed = max(0.0, now - node.last_sample_at)
    node.last_sample_at = now
    samples = []
    for i, uuid in enumerate(node.uuids):
        util = min(100.0, max(0.0, node.util[i] + rng.uniform(-5, 5)))
        node.util[i] = util
        power = 90.0 + 5.5 * util
        node.energy_mj[i] += int(power * elapsed * 1000)
        used = int(GPU_MEMORY_BYTES * util / 130)
        samples.append({
            "index": i, "uuid": uuid, "ts": now, "lost": False,
            "utilization_pct": round(util, 1), "memory_util_pct": round(util * 0.6, 1),
            "memory_used_bytes": used, "memory_free_bytes": GPU_MEMORY_BYTES - used,
            "temperature_c": round(32.0 + power * 0.07, 1), "power_w": round(power, 1),
            "power_limit_w": DEFAULT_LIMIT_W, "sm_clock_mhz": 1980, "memory_clock_mhz": 2619,
            "throttle_reasons": 0, "energy_mj": node.energy_mj[i], "ecc_sbe_volatile": 0, "ecc_dbe_volatile": 0,
            "remapped_rows_correctable": 0, "remapped_rows_uncorrectable": 0, "remap_pending": False,
            "remap_failure": False,
            "processes": [{"pid": 4000 + i, "used_memory_bytes": used, "sm_util_pct": round(util, 1)}],
            "missing": [],
        })
    return {"samples": samples}


def decision_body(node: SimNode, rng: random.Random) -> dict[str, Any]:
    gpu = rng.randrange(len(node.uuids))
    temperature = round(rng.uniform(84, 89), 1)
    return {
        "gpu_index": gpu, "gpu_uuid": node.uuids[gpu], "rule": "thermal_step_down", "action": "set_power_limit",
        "value": 630.0, "outcome": "applied", "reason": f"GPU {gpu} at {temperature} °C >= maxTempC 83.0",
        "inputs": {"temperature_c": temperature, "power_limit_w": DEFAULT_LIMIT_W},
        "policy_version": node.policy_version,
    }


# ---- one MQTT connection, carrying one or more nodes -----------------------------------------


class SimConnection:
    """A paho client driven by the simulator's event loop (no thread of its own)."""

    def __init__(self, sim: FleetSim, index: int, nodes: list[SimNode]) -> None:
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
                        envelope_json(will_node.name, "status", {"state": "offline", "outbox_epoch": will_node.epoch}),
                        qos=1, retain=True)
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
        if sock is not None:
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
                             envelope_json(node.name, "status", status_body(node, self.sim.options.daemon_version,
                                                                            "offline")), qos=1, retain=True)
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
        self.sim.handle(self._nodes_by_name, message.topic, message.payload)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool:
        if not self.up:
            return False
        return self.client.publish(topic, payload, qos=qos, retain=retain).rc == paho.MQTT_ERR_SUCCESS


# ---- the fleet ------------------------------------------------------------------------------


_TELEMETRY, _STATUS = 0, 1


class FleetSim:
    """Many SimNodes on a few (or many) SimConnections, all on the running asyncio loop."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        self.address: BrokerAddress = parse_broker_url(options.mqtt)
        self.rng = random.Random(options.seed)
        self.nodes = [SimNode(i, f"{options.prefix}-{i:05d}", options.gpus, self.rng) for i in range(options.nodes)]
        self._by_name = {n.name: n for n in self.nodes}
        self.connections: list[SimConnection] = []
        self.counters = FleetCounters()
        self.event_lag = LagRecorder()
        self.telemetry_lag = LagRecorder()
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._http: Any = None
        self._probe_every = max(1, options.nodes // max(1, options.probes)) if options.cloud and options.probes else 0
        self.started_at = 0.0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in start()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open every connection (at `connect_rate` per second) and start the schedules."""
        self.loop = asyncio.get_running_loop()
        raise_fd_limit(self.options.connections + 256)
        per = self.options.nodes_per_connection
        for index, start in enumerate(range(0, len(self.nodes), per)):
            self.connections.append(SimConnection(self, index, self.nodes[start:start + per]))
        if self.options.cloud and self._probe_every:
            import aiohttp

            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.started_at = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._connect_all(), name="fleetsim-connect"),
            asyncio.create_task(self._schedule(), name="fleetsim-schedule"),
            asyncio.create_task(self._housekeeping(), name="fleetsim-housekeeping"),
        ]
        if self.options.event_every_s > 0:
            self._tasks.append(asyncio.create_task(self._events(), name="fleetsim-events"))

    async def stop(self) -> None:
        """A clean stop: offline statuses, DISCONNECT, no wills."""
        self.stopping = True
        for task in [*self._tasks, *self._probe_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._probe_tasks, return_exceptions=True)
        for conn in self.connections:
            conn.goodbye()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(c.client.want_write() and c.client.socket() for c in self.connections):
            await asyncio.sleep(0.05)
        for conn in self.connections:
            sock = conn.client.socket()
            if sock is not None:
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
                try:
                    sock.close()
                except OSError:
                    pass
        if self._http is not None:
            await self._http.close()

    async def quiesce(self) -> None:
        """No new events from now on (telemetry and status go on); outboxes keep draining."""
        for task in self._tasks:
            if task.get_name() == "fleetsim-events":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def wait_connected(self, timeout_s: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(c.up for c in self.connections):
                return True
            await asyncio.sleep(0.1)
        return False

    def cut_links(self, connections: list[SimConnection] | None = None) -> None:
        """A partition: connections drop without DISCONNECT (the broker sends the wills); the
        nodes keep making events into their outboxes."""
        for conn in self.connections if connections is None else connections:
            conn.cut()

    async def restore_links(self, connections: list[SimConnection] | None = None) -> None:
        """Reconnect (at connect_rate): each node sends its status, then its whole backlog."""
        for index, conn in enumerate(self.connections if connections is None else connections):
            conn.restore()
            if index % 50 == 49:
                await asyncio.sleep(50 / self.options.connect_rate)

    def connections_of(self, names: Iterable[str]) -> list[SimConnection]:
        wanted = set(names)
        return [c for c in self.connections if any(n.name in wanted for n in c.nodes)]

    def node(self, name: str) -> SimNode:
        return self._by_name[name]

    def restart(self, name: str, version: str) -> None:
        """The node's daemon came back as `version` (a rollout replaced its pod): a fresh status."""
        node = self._by_name[name]
        node.version = version
        self.publish_status(node)

    def seq_marks(self) -> list[int]:
        """Every node's last seq made so far (see all_acked)."""
        return [n.next_seq - 1 for n in self.nodes]

    def all_acked(self, marks: list[int]) -> bool:
        """Has the cloud acked, on every node, everything made up to `marks`?"""
        return all(n.acked_upto >= mark for n, mark in zip(self.nodes, marks, strict=True))

    async def _connect_all(self) -> None:
        batch = max(1, int(self.options.connect_rate / 20))
        for index, conn in enumerate(self.connections):
            conn.connect()
            if index % batch == batch - 1:
                await asyncio.sleep(batch / self.options.connect_rate)

    # -- schedules -------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        """Telemetry every interval and status every status_interval, per node, spread evenly."""
        o = self.options
        now = time.monotonic()
        heap: list[tuple[float, int, int]] = []
        for node in self.nodes:
            heap.append((now + self.rng.uniform(0, o.interval_s), _TELEMETRY, node.index))
            heap.append((now + o.status_interval_s * (0.5 + self.rng.random() / 2), _STATUS, node.index))
        heapq.heapify(heap)
        while True:
            due = heap[0][0]
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            wall = time.time()
            handled = 0
            while heap and heap[0][0] <= now:
                due, what, index = heapq.heappop(heap)
                late = now - due
                if late > self.counters.schedule_late_max_s and now - self.started_at > o.interval_s:
                    self.counters.schedule_late_max_s = late
                node = self.nodes[index]
                if what == _TELEMETRY:
                    self.publish_telemetry(node, wall)
                    heapq.heappush(heap, (due + o.interval_s, _TELEMETRY, index))
                else:
                    self.publish_status(node)
                    heapq.heappush(heap, (due + o.status_interval_s, _STATUS, index))
                handled += 1
                if handled % 200 == 0:
                    await asyncio.sleep(0)  # let acks in
                    now = time.monotonic()

    async def _events(self) -> None:
        """Decisions at `nodes / event_every` per second over the fleet, at random nodes."""
        rate = self.options.nodes / self.options.event_every_s
        tick = 0.05
        owed = 0.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            owed += rate * (now - last)
            last = now
            while owed >= 1:
                owed -= 1
                node = self.nodes[self.rng.randrange(len(self.nodes))]
                self.add_event(node, "decision", decision_body(node, self.rng))

    async def _housekeeping(self) -> None:
        """Every second: keepalives, and events whose ack is overdue are sent again."""
        while True:
            await asyncio.sleep(1.0)
            for conn in self.connections:
                conn.misc()
            now = time.monotonic()
            for node in self.nodes:
                if (node.oldest_unacked_sent_at is not None and node.highest_sent > node.acked_upto
                        and now - node.oldest_unacked_sent_at > self.options.ack_timeout_s and node.connected):
                    self.counters.resend_timeouts += 1
                    node.highest_sent = node.acked_upto
                    node.oldest_unacked_sent_at = None
                    self.drain(node)

    # -- publishing ------------------------------------------------------------------------------

    def publish_status(self, node: SimNode) -> None:
        if node.conn is None:
            return
        payload = envelope_json(node.name, "status", status_body(node, self.options.daemon_version))
        if node.conn.publish(node.topics["status"], payload, qos=1, retain=True):
            self.counters.published["status"] += 1

    def publish_telemetry(self, node: SimNode, wall: float) -> None:
        if not node.connected:
            self.counters.telemetry_skipped += 1
            return
        assert node.conn is not None
        payload = envelope_json(node.name, "telemetry", telemetry_body(node, self.rng, wall), ts=wall)
        if node.conn.publish(node.topics["telemetry"], payload, qos=0):
            self.counters.published["telemetry"] += 1
            if self._probe_every and node.index % self._probe_every == 0 and not node.probe_busy:
                task = asyncio.create_task(self._probe(node, wall, time.monotonic()))
                self._probe_tasks.add(task)
                task.add_done_callback(self._probe_tasks.discard)

    def add_event(self, node: SimNode, kind: str, body: dict[str, Any]) -> None:
        """Into the node's outbox (seq assigned here, as the edge's SQLite outbox does)."""
        seq = node.next_seq
        node.next_seq += 1
        node.outbox[seq] = OutboxEntry(envelope_json(node.name, kind, body, seq=seq), time.monotonic())
        self.counters.events_created += 1
        self.drain(node)

    def drain(self, node: SimNode) -> None:
        """Publish the next unsent seqs, keeping at most `outbox_window` unacked."""
        if not node.connected:
            return
        assert node.conn is not None
        room = self.options.outbox_window - (node.highest_sent - node.acked_upto)
        now = time.monotonic()
        while room > 0 and node.highest_sent + 1 < node.next_seq:
            seq = node.highest_sent + 1
            entry = node.outbox[seq]
            if not node.conn.publish(node.topics["events"], entry.payload, qos=1):
                return
            if entry.first_sent is None:
                entry.first_sent = now
            else:
                self.counters.resent_events += 1
            self.counters.published["events"] += 1
            node.highest_sent = seq
            room -= 1
            if node.oldest_unacked_sent_at is None:
                node.oldest_unacked_sent_at = now

    # -- from the cloud --------------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1

    def handle(self, carried: dict[str, SimNode], topic: str, payload: bytes) -> None:
        """One message on kgpu/v1/cloud/{node}/...: the same checks as edge/sync.py."""
        try:
            parts = parse_topic(topic)
        except BadTopic:
            self._reject("bad_topic")
            return
        node = carried.get(parts.node)
        if node is None or parts.side != "cloud":
            self._reject("node_mismatch")
            return
        if not payload and parts.kind == "policy":
            return  # the cloud cleared the retained policy: keep ours
        try:
            envelope, body = decode(payload)
        except RejectedMessage as exc:
            self._reject(exc.reason)
            return
        if envelope.node != node.name:
            self._reject("node_mismatch")
        elif parts.kind == "ack" and isinstance(body, AckBody):
            self._on_ack(node, body)
        elif parts.kind == "policy" and isinstance(body, PolicyBody):
            self.counters.policies += 1
            if node.policy_version is None or (body.policy.version or 0) > node.policy_version:
                node.policy_name, node.policy_version = body.policy.name, body.policy.version
                self.publish_status(node)
        elif parts.kind == "commands" and isinstance(body, CommandBody):
            self._on_command(node, envelope.id, body)
        else:
            self._reject("kind_mismatch")

    def _on_ack(self, node: SimNode, ack: AckBody) -> None:
        self.counters.acks += 1
        if ack.epoch is not None and ack.epoch != node.epoch:
            self._reject("ack_epoch")
            return
        upto = min(ack.upto, node.next_seq - 1)
        if upto <= node.acked_upto:
            self.counters.stale_acks += 1
            return
        now = time.monotonic()
        for seq in range(node.acked_upto + 1, upto + 1):
            entry = node.outbox.pop(seq, None)
            if entry is not None:
                self.counters.events_acked += 1
                if entry.first_sent is not None:
                    self.event_lag.record(now, now - entry.first_sent)
        node.acked_upto = upto
        node.highest_sent = max(node.highest_sent, upto)
        node.oldest_unacked_sent_at = now if node.highest_sent > upto else None
        self.drain(node)

    def _on_command(self, node: SimNode, command_id: str, command: CommandBody) -> None:
        if command_id in node.applied_commands:
            self.counters.commands_repeated += 1
            return
        node.applied_commands.add(command_id)
        self.counters.commands += 1
        if command.gpu_uuid in node.uuids:
            if command.command in ("drain", "migrate_away"):
                node.draining.add(command.gpu_uuid)
            elif command.command == "undrain":
                node.draining.discard(command.gpu_uuid)
        self.add_event(node, "command_result", {"command_id": command_id, "command": command.command, "ok": True,
                                                "detail": "simulated"})
        self.publish_status(node)

    # -- telemetry probes ------------------------------------------------------------------------

    async def _probe(self, node: SimNode, ts: float, published: float) -> None:
        """Poll the controller until this node's stored sample is the one just published."""
        node.probe_busy = True
        url = f"{self.options.cloud}/api/v1/nodes/{node.name}"
        try:
            deadline = published + 60
            while time.monotonic() < deadline:
                try:
                    async with self._http.get(url) as response:
                        state = await response.json() if response.status == 200 else None
                except (OSError, TimeoutError, ValueError):  # aiohttp.ClientError is an OSError
                    state = None
                if state and any((g.get("sample_ts") or 0) >= ts - 1e-6 for g in state.get("gpus", [])):
                    now = time.monotonic()
                    self.telemetry_lag.record(now, now - published)
                    return
                await asyncio.sleep(0.1)
        finally:
            node.probe_busy = False

    # -- reading the state -----------------------------------------------------------------------

    def outbox_depth(self) -> int:
        return sum(len(n.outbox) for n in self.nodes)

    async def wait_drained(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox_depth() == 0:
                return True
            await asyncio.sleep(0.05)
        return self.outbox_depth() == 0


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards `wanted` (at most the hard limit); return the new soft limit.
    Child processes started afterwards (a broker) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raise FleetSimError(
            f"{wanted} file descriptors needed but the hard limit is {hard}: "
            "raise `ulimit -n` or carry more nodes per connection (--nodes-per-connection)"
        )
    return soft


class FleetSimError(RuntimeError):
    """The simulated fleet cannot run here (too few file descriptors for its connections)."""


# ---- summaries ------------------------------------------------------------------------------


def lag_summary(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"count": float(len(ordered)), "p50": percentile(ordered, 50), "p95": percentile(ordered, 95),
            "p99": percentile(ordered, 99), "max": ordered[-1] if ordered else float("nan")}


def _fmt_lag(summary: dict[str, float]) -> str:
    if not summary["count"]:
        return "no samples"
    return (f"p50 {summary['p50']:.2f} s, p99 {summary['p99']:.2f} s, max {summary['max']:.2f} s "
            f"({summary['count']:.0f} samples)")


async def run_fleet(options: FleetOptions, duration_s: float, report_every_s: float = 10.0,
                    echo: Any = print) -> dict[str, Any]:
    """`kgpu fleet-sim`: run the fleet for `duration_s` (0: until cancelled), print progress lines,
    then stop cleanly and return the figures."""
    sim = FleetSim(options)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)  # a supervisor's stop is as clean as Ctrl-C
    await sim.start()
    echo(f"fleet-sim: {options.nodes} nodes x {options.gpus} GPUs, telemetry every {options.interval_s:g} s, "
         f"an event per node every {options.event_every_s:g} s, {options.connections} MQTT connections "
         f"to {sim.address.display}")
    started = time.monotonic()
    last = started
    last_published = dict(sim.counters.published)
    try:
        while duration_s <= 0 or time.monotonic() - started < duration_s:
            await asyncio.sleep(min(report_every_s, max(0.1, duration_s - (time.monotonic() - started)))
                                if duration_s > 0 else report_every_s)
            now = time.monotonic()
            rates = {k: (v - last_published[k]) / max(now - last, 1e-9) for k, v in sim.counters.published.items()}
            last_published = dict(sim.counters.published)
            event_lag = lag_summary(sim.event_lag.window(last, now))
            probes = lag_summary(sim.telemetry_lag.window(last, now))
            echo(f"  t={now - started:5.0f}s up {sum(c.up for c in sim.connections)}/{len(sim.connections)} conns  "
                 f"telemetry {rates['telemetry']:.0f}/s  events {rates['events']:.0f}/s  "
                 f"outbox {sim.outbox_depth()}  event lag {_fmt_lag(event_lag)}"
                 + (f"  telemetry lag {_fmt_lag(probes)}" if options.cloud else ""))
            last = now
    except asyncio.CancelledError:
        pass
    finally:
        await sim.stop()
    c = sim.counters
    return {
        "nodes": options.nodes, "gpus": options.gpus, "connections": len(sim.connections),
        "published": dict(c.published), "events_created": c.events_created, "events_acked": c.events_acked,
        "event_lag": lag_summary(sim.event_lag.lag), "telemetry_lag": lag_summary(sim.telemetry_lag.lag),
        "outbox_depth": sim.outbox_depth(), "resend_timeouts": c.resend_timeouts, "rejected": dict(c.rejected),
        "disconnects": c.disconnects, "schedule_late_max_s": c.schedule_late_max_s,
    }
