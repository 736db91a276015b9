"""Edge ↔ cloud sync over MQTT.

- `status` (retained, QoS 1): published on connect, on change and every `status_interval`; the
  last will publishes `offline` when the link dies without a clean disconnect.
- `telemetry` (QoS 0): one message per sampling cycle while connected. While disconnected, a
  min/max/mean summary per GPU is kept and recorded as an `offline_summary` event (through the
  outbox, so it survives a restart) when the link is back.
- `events`: the outbox, drained in `seq` order with QoS 1 and at most `outbox_window` events in
  flight. An event is deleted only when the cloud's cumulative ack covers it; unacked events are
  sent again after a reconnect or when no ack came for `resend_wait`: `ack_timeout`, plus twice
  how far behind the last ack showed the cloud to be (capped by `ack_timeout_max`; the cloud
  deduplicates by node and seq). "Behind" is the larger of how late that ack came (its newest
  event's publish to the ack) and the ack's own `behind_s`: a cloud that falls behind keeps
  acking, late, and is not sent every event twice on top of its backlog, while a cloud that
  stops acking altogether still gets the re-send (after `ack_timeout` plus twice the lag it last
  showed: a fraction of a second for a cloud that kept up). Lateness is not measured across our
  own reconnect: an ack that waited in the broker while our link was down would measure our
  outage (after a string of broker restarts the link's backoff alone is up to 30 s), not the cloud.
  The status carries `outbox_acked` (what a cloud acked before: a restored fleet database resumes
  from it); an ack with `conflict` (the cloud holds other events under seqs we reused: our
  database went back in time) starts a new outbox epoch, announced by a status before any event.
- `policy` (retained) and `commands` from the cloud: validated; a policy not newer than ours is
  ignored; a command is applied at most once per id and its result goes back as an event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.config import EdgeSettings
from edge.store import StoreError
from shared.aio import wait_event
from shared.gpu import GpuSample
from shared.logs import get_logger
from shared.mqtt import AsyncMqtt, Received, TlsOptions, Will, parse_broker_url
from shared.protocol import (
    ROUTES,
    AckBody,
    CommandBody,
    CommandResultBody,
    Direction,
    Envelope,
    GpuOfflineStats,
    Kind,
    OfflineSummaryBody,
    PartitioningBody,
    PolicyBody,
    RejectedMessage,
    StatusBody,
    TelemetryBody,
    decode_and_check,
    make_envelope,
)
from shared.topics import BadTopic, cloud_topic, cloud_topics_for, cloud_wildcard_for, edge_topic, parse_topic

if TYPE_CHECKING:
    from edge.daemon import EdgeDaemon

log = get_logger(__name__)

# The lag may grow between two acks: unacked events wait for twice the lag the last ack showed.
ACK_LAG_HEADROOM = 2.0


def resend_wait(ack_timeout: float, behind_s: float, cap: float) -> float:
    """Seconds unacked events wait for an ack before they are sent again: `ack_timeout`, plus room
    for a cloud `behind_s` behind, at most `cap` (and never less than `ack_timeout`)."""
    return max(ack_timeout, min(cap, ack_timeout + ACK_LAG_HEADROOM * max(0.0, behind_s)))


NEW_EPOCH_REASON = "the cloud holds different events under seqs we reused: the edge database went back in time"

# How each of our topics is published (the one contract: shared.protocol.ROUTES)
STATUS, TELEMETRY, EVENTS = ROUTES["status"], ROUTES["telemetry"], ROUTES["events"]


@dataclass
class RunningStats:
    """min / max / mean of one figure without keeping the samples."""

    count: int = 0
    low: float = float("inf")
    high: float = float("-inf")
    total: float = 0.0

    def add(self, value: float | None) -> None:
        if value is None:
            return
        self.count += 1
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.total += value

    def triple(self) -> tuple[float, float, float] | None:
        if not self.count:
            return None
        return (round(self.low, 2), round(self.high, 2), round(self.total / self.count, 2))


@dataclass
class OfflineSummary:
    """What the GPUs did while the link was down."""

    since: float
    samples: dict[int, int] = field(default_factory=dict)
    uuids: dict[int, str] = field(default_factory=dict)
    temperature: dict[int, RunningStats] = field(default_factory=dict)
    power: dict[int, RunningStats] = field(default_factory=dict)
    utilization: dict[int, RunningStats] = field(default_factory=dict)

    def add(self, sample: GpuSample) -> None:
        if sample.lost:
            return
        i = sample.index
        self.uuids[i] = sample.uuid
        self.samples[i] = self.samples.get(i, 0) + 1
        self.temperature.setdefault(i, RunningStats()).add(sample.temperature_c)
        self.power.setdefault(i, RunningStats()).add(sample.power_w)
        self.utilization.setdefault(i, RunningStats()).add(sample.utilization_pct)

    def body(self, until: float) -> OfflineSummaryBody:
        return OfflineSummaryBody(
            from_ts=self.since,
            to_ts=until,
            gpus=[
                GpuOfflineStats(
                    index=i, uuid=self.uuids[i], samples=n,
                    temperature_c=self.temperature[i].triple(), power_w=self.power[i].triple(),
                    utilization_pct=self.utilization[i].triple(),
                )
                for i, n in sorted(self.samples.items())
            ],
        )


class EdgeSync:
    def __init__(self, daemon: EdgeDaemon, settings: EdgeSettings) -> None:
        assert settings.mqtt is not None
        self.daemon = daemon
        self.settings = settings
        self.node = daemon.node
        self.rejected: dict[str, int] = {}
        self.conflicts = 0  # acks that said `conflict`: new outbox epochs started because of them
        self.acked_upto = 0
        self._highest_sent = 0
        # The highest seq this process has published. An ack beyond it cannot be for events the
        # cloud received from us now; it deletes no further (after a restart, the re-send of the
        # events before it is acked again).
        self.max_published = 0
        self._oldest_unacked_sent_at: float | None = None
        self._sent_at: dict[int, float] = {}  # seq -> when it was last published (monotonic), until acked
        # How far behind the cloud was at its last ack (seconds): see `resend_wait`
        self.cloud_behind_s = 0.0
        self.events_published = 0  # event publishes, first copies and re-sends
        self.events_resent = 0  # publishes of a seq this process had published before
        self.ack_timeouts = 0  # times unacked events were sent again for want of an ack
        self._last_status_key: tuple | None = None
        self._last_status_at = 0.0
        # The outbox epoch of the last status handed to the broker: no event is sent before the
        # cloud has been told the epoch it belongs to (it files events under the epoch it knows).
        self._announced_epoch: str | None = None
        self._left_epoch: str | None = None  # the epoch a conflict made us leave: its late acks are expected
        # True while a conflict renumbers the outbox into a new epoch: the store already names the
        # new epoch while `acked_upto` still holds the old one's, and a status pairing the two would
        # tell the cloud that the new epoch's first seqs were acked (it would then drop them).
        self._switching_epoch = False
        # Held while events are read and published, and while a new epoch renumbers them: an
        # event read under the old epoch is never published after the new epoch's status.
        self._send_lock = asyncio.Lock()
        self._offline: OfflineSummary | None = OfflineSummary(since=time.time())
        self._link_ever_up = False
        self.mqtt: AsyncMqtt | None = None
        daemon.sync = self

    # ---- set-up ------------------------------------------------------------------------------

    def _make_client(self) -> AsyncMqtt:
        settings = self.settings
        address = parse_broker_url(settings.mqtt or "", password_file=settings.mqtt_password_file)
        offline = make_envelope(
            self.node, StatusBody(state="offline", outbox_epoch=self.daemon.store.epoch), Kind.STATUS
        )
        tls = TlsOptions(settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file,
                         settings.mqtt_tls_insecure)
        return AsyncMqtt(
            asyncio.get_running_loop(), address, f"kgpu-edge-{self.node}",
            # the exact topics, not .../#: RabbitMQ sends retained messages (our policy) only to those
            subscriptions=[(topic, 1) for topic in cloud_topics_for(self.node)],
            retired_subscriptions=[cloud_wildcard_for(self.node)],  # older releases' filter, kept by durable sessions
            will=Will(edge_topic(self.node, "status"), offline.to_json(), qos=STATUS.qos, retain=STATUS.retained),
            tls=tls, clean_session=False, password_file=settings.mqtt_password_file,
        )

    @property
    def refused_subscriptions(self) -> dict[str, str]:
        """filter -> the SUBACK code the broker refused it with (empty when all were granted): what
        /healthz shows, since a refused filter means policies, acks or commands never arrive."""
        return dict(self.mqtt.link.refused_subscriptions) if self.mqtt is not None else {}

    async def run(self, stop: asyncio.Event) -> None:
        self.mqtt = self._make_client()
        self.mqtt.start()
        self.daemon.cycle_listeners.append(self._after_cycle)
        try:
            self.acked_upto = await asyncio.to_thread(self.daemon.store.acked_upto)
            tasks = [
                asyncio.create_task(self._receive_loop(), name="sync-receive"),
                asyncio.create_task(self._link_loop(), name="sync-link"),
                asyncio.create_task(self._drain_loop(stop), name="sync-drain"),
            ]
            await stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.mqtt.connected:
                # a clean goodbye: the retained status says offline, no last will needed
                self._publish_status(state="offline")
        finally:
            self.daemon.cycle_listeners.remove(self._after_cycle)
            await self.mqtt.stop()

    # ---- link up / down ----------------------------------------------------------------------

    async def _link_loop(self) -> None:
        assert self.mqtt is not None
        while True:
            up = await self.mqtt.link_changes.get()
            if up:
                await self._on_link_up()
            elif self._offline is None:
                self._offline = OfflineSummary(since=time.time())
                log.warning("link to the cloud lost; deciding locally, summarising telemetry")

    async def _on_link_up(self) -> None:
        self._link_ever_up = True
        async with self._send_lock:
            # The status first: it names our epoch and `outbox_acked` (a restored fleet database
            # moves its acked_seq up to it) before any event arrives.
            self._publish_status(force=True)
            # everything not yet acked goes again, from the oldest (the cloud deduplicates)
            self._highest_sent = self.acked_upto
            self._oldest_unacked_sent_at = None
        if self._offline is not None:
            summary, self._offline = self._offline, None
            if summary.samples:
                await self.daemon.record([(Kind.OFFLINE_SUMMARY, summary.body(until=time.time()))])
                log.info("link back: recorded an offline summary of %.0f s", time.time() - summary.since)
        self.daemon.outbox_changed.set()

    # ---- per cycle: telemetry and status -----------------------------------------------------

    async def _after_cycle(self, samples: dict[int, GpuSample | None]) -> None:
        present = [s for s in samples.values() if s is not None]
        if self.mqtt is None or not self.mqtt.connected:
            if self._offline is None:
                self._offline = OfflineSummary(since=time.time())
            for sample in present:
                self._offline.add(sample)
            return
        if present:
            envelope = make_envelope(self.node, TelemetryBody(samples=present), Kind.TELEMETRY)
            self.mqtt.publish(edge_topic(self.node, "telemetry"), envelope.to_json(), qos=TELEMETRY.qos,
                              retain=TELEMETRY.retained)
        self._publish_status()

    def _publish_status(self, *, force: bool = False, state: str = "online") -> None:
        """Retained status when something an operator cares about changed, or periodically."""
        assert self.mqtt is not None
        if self._switching_epoch:
            return  # the switch publishes the new epoch's status itself, once acked_upto matches it
        body = self.daemon.status_body()
        if state == "offline":
            body = body.model_copy(update={"state": "offline"})
        key = (body.state, tuple((g.index, g.health, g.power_limit_w, g.draining, g.mig_mode,
                                  tuple(d.uuid for d in g.mig_devices), g.replicas) for g in body.gpus),
               body.policy_version, tuple(body.degraded), body.outbox_depth == 0,
               body.partitioning_version, body.partitioning_state)
        now = time.monotonic()
        if not force and key == self._last_status_key and now - self._last_status_at < self.settings.status_interval:
            return
        envelope = make_envelope(self.node, body, Kind.STATUS)
        if self.mqtt.publish(edge_topic(self.node, "status"), envelope.to_json(), qos=STATUS.qos,
                             retain=STATUS.retained):
            self._last_status_key, self._last_status_at = key, now
            if body.state == "online":
                self._announced_epoch = body.outbox_epoch

    # ---- the outbox --------------------------------------------------------------------------

    async def _drain_loop(self, stop: asyncio.Event) -> None:
        """Publish pending events in seq order, keeping at most `outbox_window` unacked."""
        assert self.mqtt is not None
        changed = self.daemon.outbox_changed
        while not stop.is_set():
            await wait_event(changed, 1.0)
            changed.clear()
            if not self.mqtt.connected:
                continue
            async with self._send_lock:
                if await self._send_some():
                    changed.set()  # more waiting: go round again once acks make room

    async def _send_some(self) -> bool:
        """One round of the drain (under the send lock); True when more events are waiting."""
        assert self.mqtt is not None
        if self._announced_epoch != self.daemon.store.epoch:
            self._publish_status(force=True)  # the cloud must know the epoch before its events
            if self._announced_epoch != self.daemon.store.epoch:
                return False
        now = time.monotonic()
        wait = resend_wait(self.settings.ack_timeout, self.cloud_behind_s, self.settings.ack_timeout_max)
        if (self._oldest_unacked_sent_at is not None and self._highest_sent > self.acked_upto
                and now - self._oldest_unacked_sent_at > wait):
            log.warning("no ack for seq %d..%d within %.0f s (the cloud was %.1f s behind at its last ack); "
                        "sending them again", self.acked_upto + 1, self._highest_sent, wait, self.cloud_behind_s,
                        extra={"node": self.node, "wait_s": round(wait, 1)})
            self.ack_timeouts += 1
            self._highest_sent = self.acked_upto
            self._oldest_unacked_sent_at = None
        room = self.settings.outbox_window - (self._highest_sent - self.acked_upto)
        if room <= 0:
            return False
        try:
            pending: list[Envelope] = await asyncio.to_thread(
                self.daemon.store.outbox_pending, room, self._highest_sent
            )
        except Exception as exc:  # noqa: BLE001 - a store error must not end the send loop: retry next round
            log.error("cannot read the outbox: %s", exc)
            return False
        for envelope in pending:
            if not self.mqtt.publish(edge_topic(self.node, "events"), envelope.to_json(), qos=EVENTS.qos,
                                     retain=EVENTS.retained):
                break
            assert envelope.seq is not None
            sent_at = time.monotonic()
            self.events_published += 1
            if envelope.seq <= self.max_published:
                self.events_resent += 1
            self._sent_at[envelope.seq] = sent_at
            self._highest_sent = envelope.seq
            self.max_published = max(self.max_published, envelope.seq)
            if self._oldest_unacked_sent_at is None:
                self._oldest_unacked_sent_at = sent_at
        return len(pending) == room

    # ---- from the cloud ----------------------------------------------------------------------

    def _reject(self, reason: str, detail: str, topic: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        log.warning("rejected a message from the cloud: %s: %s", reason, detail[:200], extra={"topic": topic})

    async def _receive_loop(self) -> None:
        assert self.mqtt is not None
        while True:
            message = await self.mqtt.messages.get()
            try:
                await self._handle(message)
            except Exception:
                log.exception("failed to handle a message on %s", message.topic)

    async def _handle(self, message: Received) -> None:
        cleared = _retained_kind(message.topic, self.node) if not message.payload else None
        if cleared is not None:
            # The cloud cleared its retained policy or partitioning (nothing selects this node any
            # more): keep the one we have; the config's policy applies again only after a fresh install.
            log.info("the cloud no longer holds a %s for this node; keeping the current one", cleared)
            return
        try:
            checked = decode_and_check(message.topic, message.payload, direction=Direction.CLOUD_TO_EDGE,
                                       node=self.node)
        except RejectedMessage as exc:
            self._reject(exc.reason, exc.detail, message.topic)
            return
        envelope, body = checked.envelope, checked.body
        if isinstance(body, AckBody):
            await self._on_ack(body)
        elif isinstance(body, PolicyBody):
            await self.daemon.apply_policy(body.policy, "cloud")
            self._publish_status(force=True)
        elif isinstance(body, CommandBody):
            await self._on_command(envelope, body)
        elif isinstance(body, PartitioningBody):
            if await self.daemon.partitions.accept(body.partitioning):
                self._publish_status(force=True)

    async def _on_ack(self, ack: AckBody) -> None:
        if ack.epoch is not None and ack.epoch == self._left_epoch:
            log.debug("ack for the epoch we left after a conflict (up to %d): ignored", ack.upto)
            return
        if ack.epoch is not None and ack.epoch != self.daemon.store.epoch:
            self._reject("ack_epoch", f"ack for outbox epoch {ack.epoch}, ours is {self.daemon.store.epoch}",
                         cloud_topic(self.node, "ack"))
            return
        if ack.conflict:
            await self._start_new_epoch(ack)
            return
        upto = min(ack.upto, self.max_published)
        if upto < ack.upto:
            log.debug("ack up to seq %d is beyond what was sent (%d): applying it up to there", ack.upto, upto)
        if upto <= self.acked_upto:
            if ack.behind_s is not None:
                self.cloud_behind_s = ack.behind_s
            return
        try:
            deleted = await asyncio.to_thread(self.daemon.store.ack, upto)
        except StoreError as exc:  # disk full: the events stay; the cloud acks their re-sends again
            log.warning("cannot apply the cloud's ack up to seq %d now: %s", upto, exc)
            return
        self.acked_upto = upto  # at most max_published, a seq this store holds: never past last_seq
        if self._highest_sent < self.acked_upto:
            self._highest_sent = self.acked_upto
        self._oldest_unacked_sent_at = time.monotonic() if self._highest_sent > self.acked_upto else None
        # only now: a shorter wait must not meet the old clock while the store applied the ack
        self._note_ack_lag(upto, ack.behind_s)
        log.debug("cloud acked up to seq %d (%d deleted)", upto, deleted)
        await self.daemon.refresh_outbox_depth()
        self.daemon.outbox_changed.set()

    def _note_ack_lag(self, upto: int, behind_s: float | None) -> None:
        """How far behind the cloud is, from an ack that moves `acked_upto` to `upto`: how late it
        came (from the last publish of the newest event it covers) or what it says, the larger."""
        now = time.monotonic()
        sent_at = self._sent_at.get(upto)
        since = self.mqtt.connected_since if self.mqtt is not None else None
        # an event published before this connection: its ack may have waited out our own outage
        late = now - sent_at if sent_at is not None and since is not None and sent_at >= since else 0.0
        self.cloud_behind_s = max(late, behind_s or 0.0)
        for seq in [seq for seq in self._sent_at if seq <= upto]:
            del self._sent_at[seq]

    async def _start_new_epoch(self, ack: AckBody) -> None:
        """The cloud holds other events under seqs we sent in this epoch: our database went back
        in time (a restored backup, a lost WAL). Apply the ack (it stops before the first such
        seq), renumber what is left in a new epoch, tell the cloud the epoch, then send again."""
        async with self._send_lock:
            store = self.daemon.store
            if ack.epoch is not None and ack.epoch != store.epoch:
                return  # another conflict ack of the old epoch got here first
            upto = min(ack.upto, self.max_published)
            old = store.epoch
            self._switching_epoch = True
            try:
                if upto > self.acked_upto:
                    await asyncio.to_thread(store.ack, upto)
                    self.acked_upto = upto
                await asyncio.to_thread(store.start_new_epoch, NEW_EPOCH_REASON)
            except StoreError as exc:  # the events stay; the cloud says conflict again at the re-send
                log.error("the cloud reports a seq conflict (our database went back in time), but the "
                          "outbox cannot start a new epoch now: %s", exc)
                return
            finally:
                if store.epoch != old:  # the new epoch is in place (even if this task was cancelled)
                    self.acked_upto = self._highest_sent = self.max_published = 0
                    self._oldest_unacked_sent_at = None
                    self._sent_at.clear()
                self._switching_epoch = False
            log.warning("the cloud holds other events under seqs we sent in epoch %s: started epoch %s, "
                        "sending the unacked events again under it", old, store.epoch,
                        extra={"old_epoch": old, "epoch": store.epoch, "acked_upto": upto})
            self.conflicts += 1
            self._left_epoch = old
            self._publish_status(force=True)  # before any event of the new epoch (see _send_some)
        await self.daemon.refresh_outbox_depth()
        self.daemon.outbox_changed.set()

    async def _on_command(self, envelope: Envelope, command: CommandBody) -> None:
        """At most once per id: the id is marked applied in the same transaction as the result."""
        if await asyncio.to_thread(self.daemon.store.command_applied, envelope.id):
            log.info("command %s already applied; ignoring the repeat", command.command,
                     extra={"msg_id": envelope.id})
            return
        ok, detail = await self.daemon.execute_command(command)
        result = CommandResultBody(command_id=envelope.id, command=command.command, ok=ok, detail=detail)
        recorded = await asyncio.to_thread(
            self.daemon.store.record_command_result, envelope.id, command.command, result,
            self.daemon.draining_uuids(),
        )
        log.info("command %s: %s", command.command, "ok" if ok else f"failed: {detail}",
                 extra={"msg_id": envelope.id})
        if recorded is not None:
            self.daemon.outbox_changed.set()
            await self.daemon.refresh_outbox_depth()


def _retained_kind(topic: str, node: str) -> str | None:
    """"policy" or "partitioning" for our retained topics (also as a broker that maps `.` to `/`
    delivers them: parse_topic), None for any other."""
    try:
        parts = parse_topic(topic)
    except BadTopic:
        return None
    retained = parts.side == "cloud" and parts.node == node and parts.kind in ("policy", "partitioning")
    return parts.kind if retained else None
