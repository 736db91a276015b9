"""FleetSim: many simulated nodes (node.py) on a few or many MQTT connections (connection.py), all
on the running asyncio loop, so nothing needs a lock: the schedules that make telemetry, status
and events, the outboxes and what comes back from the cloud.

See the package's docstring for what each node does on the wire and why one loop drives them.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import resource
import time
from collections.abc import Iterable
from typing import Any

from edge.sync import resend_wait
from kgpu.lab.fleetsim.connection import SimConnection
from kgpu.lab.fleetsim.node import (
    FleetCounters,
    FleetOptions,
    LagRecorder,
    OutboxEntry,
    SimNode,
    decision_body,
    envelope_json,
    status_body,
    telemetry_body,
)
from shared.mqtt import BrokerAddress, parse_broker_url
from shared.protocol import (
    ROUTES,
    AckBody,
    CommandBody,
    CommandResultBody,
    Direction,
    Kind,
    PolicyBody,
    Reason,
    RejectedMessage,
    decode_and_check,
)
from shared.topics import BadTopic, parse_topic
from shared.wire import WireModel

_TELEMETRY, _STATUS = 0, 1
# How each of a node's topics is published (the one contract: shared.protocol.ROUTES)
STATUS, TELEMETRY, EVENTS = ROUTES["status"], ROUTES["telemetry"], ROUTES["events"]


PROBE_POLL_MIN_S = 0.25  # telemetry probes: the shortest wait between two reads of a node

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
        while time.monotonic() < deadline and any(
            c.client.want_write() and c.client.socket() for c in self.connections
        ):
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
                self.add_event(node, Kind.DECISION, decision_body(node, self.rng))

    async def _housekeeping(self) -> None:
        """Every second: keepalives, and events whose ack is overdue are sent again (after the
        edge's `resend_wait`: longer while the cloud is behind)."""
        options = self.options
        while True:
            await asyncio.sleep(1.0)
            for conn in self.connections:
                conn.misc()
            now = time.monotonic()
            for node in self.nodes:
                if (node.oldest_unacked_sent_at is not None and node.highest_sent > node.acked_upto and node.connected
                        and now - node.oldest_unacked_sent_at
                        > resend_wait(options.ack_timeout_s, node.cloud_behind_s, options.ack_timeout_max_s)):
                    self.counters.resend_timeouts += 1
                    node.highest_sent = node.acked_upto
                    node.oldest_unacked_sent_at = None
                    self.drain(node)

    # -- publishing ------------------------------------------------------------------------------

    def publish_status(self, node: SimNode) -> None:
        if node.conn is None:
            return
        payload = envelope_json(node.name, Kind.STATUS, status_body(node, self.options.daemon_version))
        if node.conn.publish(node.topics["status"], payload, qos=STATUS.qos, retain=STATUS.retained):
            self.counters.published["status"] += 1

    def publish_telemetry(self, node: SimNode, wall: float) -> None:
        if not node.connected:
            self.counters.telemetry_skipped += 1
            return
        assert node.conn is not None
        payload = envelope_json(node.name, Kind.TELEMETRY, telemetry_body(node, self.rng, wall), ts=wall)
        if node.conn.publish(node.topics["telemetry"], payload, qos=TELEMETRY.qos):
            self.counters.published["telemetry"] += 1
            if self._probe_every and node.index % self._probe_every == 0 and not node.probe_busy:
                task = asyncio.create_task(self._probe(node, wall, time.monotonic()))
                self._probe_tasks.add(task)
                task.add_done_callback(self._probe_tasks.discard)

    def add_event(self, node: SimNode, kind: Kind | str, body: WireModel) -> None:
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
            if not node.conn.publish(node.topics["events"], entry.payload, qos=EVENTS.qos):
                return
            if entry.first_sent is None:
                entry.first_sent = now
            else:
                self.counters.resent_events += 1
            entry.last_sent = now
            self.counters.published["events"] += 1
            node.highest_sent = seq
            room -= 1
            if node.oldest_unacked_sent_at is None:
                node.oldest_unacked_sent_at = now

    # -- from the cloud --------------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        reason = str(reason)  # a plain label, also from a Reason
        self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1

    def handle(self, carried: dict[str, SimNode], topic: str, payload: bytes) -> None:
        """One message on kgpu/v1/cloud/{node}/...: checked as edge/sync.py checks it, by the
        protocol's one `decode_and_check` (rejections counted under its reasons)."""
        try:
            parts = parse_topic(topic)
        except BadTopic:
            self._reject(Reason.BAD_TOPIC)
            return
        node = carried.get(parts.node)
        if node is None:  # another node's message on this connection
            self._reject(Reason.NODE_MISMATCH)
            return
        if not payload and parts.kind == "policy":
            return  # the cloud cleared the retained policy: keep ours
        try:
            checked = decode_and_check(topic, payload, direction=Direction.CLOUD_TO_EDGE, node=node.name)
        except RejectedMessage as exc:
            self._reject(exc.reason)
            return
        body = checked.body
        if isinstance(body, AckBody):
            self._on_ack(node, body)
        elif isinstance(body, PolicyBody):
            self.counters.policies += 1
            if node.policy_version is None or (body.policy.version or 0) > node.policy_version:
                node.policy_name, node.policy_version = body.policy.name, body.policy.version
                self.publish_status(node)
        elif isinstance(body, CommandBody):
            self._on_command(node, checked.envelope.id, body)

    def _on_ack(self, node: SimNode, ack: AckBody) -> None:
        self.counters.acks += 1
        if ack.epoch is not None and ack.epoch != node.epoch:
            self._reject("ack_epoch")
            return
        upto = min(ack.upto, node.next_seq - 1)
        if upto <= node.acked_upto:
            self.counters.stale_acks += 1
            if ack.behind_s is not None:
                node.cloud_behind_s = ack.behind_s
            return
        now = time.monotonic()
        # how late this ack came (from the newest event's latest publish: a reconnect publishes
        # every unacked event again before any ack is read) or what it says, as edge/sync.py
        newest = node.outbox.get(upto)
        late = now - newest.last_sent if newest is not None and newest.last_sent is not None else 0.0
        node.cloud_behind_s = max(late, ack.behind_s or 0.0)
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
        self.add_event(node, Kind.COMMAND_RESULT,
                       CommandResultBody(command_id=command_id, command=command.command, ok=True, detail="simulated"))
        self.publish_status(node)

    # -- telemetry probes ------------------------------------------------------------------------

    async def _probe(self, node: SimNode, ts: float, published: float) -> None:
        """Poll the controller until this node's stored sample is the one just published (each wait
        a tenth of the time waited so far, at least PROBE_POLL_MIN_S)."""
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
                # a tenth of the wait so far, at least PROBE_POLL_MIN_S: the lag is still read within
                # 10 % (or 0.25 s), and a controller that falls behind is not polled harder (a node
                # read costs a few ms: ten probes at 0.1 s were 16 % of a controller's core)
                await asyncio.sleep(max(PROBE_POLL_MIN_S, (time.monotonic() - published) / 10))
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
