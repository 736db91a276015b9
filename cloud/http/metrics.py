"""Prometheus exposition of the controller, read at scrape time from the ingestor's counters, the
MQTT link, the leader flag and the command outbox: each handed in, nothing reached through a
controller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud.ingest import DROP_REASONS, REJECTION_REASONS, Ingestor
from cloud.link import EdgeLink
from shared import __version__

RECENT_S = 60.0  # kgpu_ingest_lag_max_seconds looks at the nodes heard from this recently


class _Described(Collector):
    """A collector the registry knows by its metric names, so that a scrape asking for a few
    names (`?name[]=`, what the benches poll) collects only the collectors holding them. Its
    families are the same whatever the state: `describe` is `collect` once, at registration."""

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())


class ControllerCollector(_Described):
    """The controller's own figures, a few series whatever the fleet's size."""

    def __init__(self, *, ingestor: Ingestor, link: EdgeLink, leading: asyncio.Event,
                 command_resends: Callable[[], int],
                 receive_queues: Callable[[], dict[str, tuple[int, int]]] = dict) -> None:
        self.ingestor = ingestor
        self.link = link
        self.leading = leading
        self.command_resends = command_resends
        self.receive_queues = receive_queues  # EdgeLink.receive_queues

    def collect(self) -> Iterator[Metric]:
        ingest = self.ingestor
        accepted = CounterMetricFamily("kgpu_ingest_messages", "Valid messages received, by kind.", labels=["kind"])
        for kind, count in sorted(ingest.accepted.items()):
            accepted.add_metric([kind], count)
        yield accepted
        rejected = CounterMetricFamily("kgpu_ingest_rejected", "Messages refused, by reason (every reason from 0).",
                                       labels=["reason"])
        for reason, count in sorted(({reason: 0 for reason in REJECTION_REASONS} | dict(ingest.rejected)).items()):
            rejected.add_metric([reason], count)
        yield rejected
        dropped = CounterMetricFamily(
            "kgpu_ingest_dropped", "A node's excess over its ingest budget, dropped before queueing, by budget "
            "(messages; GPU samples or summaries for gpus; every budget from 0).", labels=["reason"])
        for reason, count in sorted(({reason: 0 for reason in DROP_REASONS} | dict(ingest.dropped)).items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily("kgpu_ingest_events_stored", "Edge events stored (first copies).",
                                  value=ingest.stored)
        yield CounterMetricFamily("kgpu_ingest_duplicates", "Edge events received again and ignored.",
                                  value=ingest.duplicates)
        yield CounterMetricFamily("kgpu_ingest_seq_gaps", "Events received beyond a hole in a node's seq.",
                                  value=ingest.gaps)
        yield CounterMetricFamily("kgpu_ingest_stale_epoch", "Events of an outbox epoch the node left.",
                                  value=ingest.stale)
        yield CounterMetricFamily("kgpu_ingest_seq_conflicts",
                                  "Events refused: their seq holds another event (the edge's database went back).",
                                  value=ingest.conflicts)
        yield CounterMetricFamily("kgpu_ingest_restored_floors",
                                  "Acked seqs moved up to what the edge had acked (fleet database went back).",
                                  value=ingest.restored_floors)
        yield CounterMetricFamily("kgpu_ingest_batches", "Batches written to the fleet store (the ingest's own, "
                                  "and the sample writer process's telemetry batches).",
                                  value=ingest.batches)
        yield CounterMetricFamily("kgpu_ingest_store_errors", "Failed fleet-store writes (retried).",
                                  value=ingest.store_errors)
        writer = ingest.sample_writer
        yield CounterMetricFamily("kgpu_ingest_sample_writer_starts", "Sample writer processes started (more "
                                  "than one: it ended and was started again; 0 without sample_process).",
                                  value=writer.starts if writer is not None else 0)
        yield CounterMetricFamily("kgpu_ingest_telemetry_direct", "Telemetry messages handed to the sample writer "
                                  "process by the telemetry connection's network thread, not crossing the event loop "
                                  "(the rest: what the peek could not read, or all without sample_process).",
                                  value=ingest.telemetry_direct)
        yield GaugeMetricFamily("kgpu_ingest_queue_depth", "Messages waiting to be written (queued, or in the batch "
                                "being filled or written).", value=ingest.pending())
        yield GaugeMetricFamily("kgpu_ingest_queue_bytes", "Payload bytes of the messages waiting to be written.",
                                value=ingest.queued_bytes())
        yield GaugeMetricFamily("kgpu_ingest_backlog_age_seconds", "Age of the oldest message waiting to be "
                                "written (0 when none).", value=ingest.backlog_age_s())
        yield GaugeMetricFamily("kgpu_ingest_last_batch_seconds", "Time to write the last batch.",
                                value=ingest.last_batch_seconds)
        yield from self._overload_families()
        yield CounterMetricFamily("kgpu_edge_commands_resent", "Edge commands published again for want of a result.",
                                  value=self.command_resends())
        yield GaugeMetricFamily("kgpu_mqtt_connected", "1 while the controller's MQTT link is up.",
                                value=1.0 if self.link.connected else 0.0)
        yield GaugeMetricFamily("kgpu_mqtt_acks_waiting", "Nodes whose ack the MQTT link could not take yet (down, "
                                "or its outgoing queue full): published again every 0.5 s.",
                                value=len(self.link.acks_waiting))
        yield CounterMetricFamily("kgpu_mqtt_acks_resent", "Acks published again after the link could not take "
                                  "them at first.", value=self.link.acks_resent)
        yield GaugeMetricFamily("kgpu_controller_leader", "1 while this replica holds the leader Lease.",
                                value=1.0 if self.leading.is_set() else 0.0)
        info = GaugeMetricFamily("kgpu_controller_info", "The controller's version.", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info

    def _overload_families(self) -> Iterator[Metric]:
        """Where a controller that falls behind holds its backlog, in a few series whatever the
        fleet's size: the MQTT receive queues (before the ingest queue) and the worst node lag."""
        depth = GaugeMetricFamily("kgpu_mqtt_receive_queue_depth", "Messages received from the broker and "
                                  "waiting for the ingest, by connection.", labels=["connection"])
        full = CounterMetricFamily("kgpu_mqtt_receive_queue_full", "Times a connection's receive queue was full "
                                   "and it stopped reading from the broker (back-pressure), by connection.",
                                   labels=["connection"])
        for name, (waiting, was_full) in sorted(self.receive_queues().items()):
            if name == "telemetry":  # its telemetry waits for the sample writer process there, too
                was_full += self.ingestor.telemetry_room_waits
            depth.add_metric([name], waiting)
            full.add_metric([name], was_full)
        yield depth
        yield full
        ingest = self.ingestor
        recent = time.time() - RECENT_S
        lags = [lag for node, lag in list(ingest.lag_seconds.items()) if ingest.last_seen.get(node, 0.0) >= recent]
        yield GaugeMetricFamily(
            "kgpu_ingest_lag_max_seconds", f"The largest kgpu_node_lag_seconds among the nodes heard from in the "
            f"last {RECENT_S:.0f} s (0 when none): the fleet's worst lag in one series.", value=max(lags, default=0.0))


class NodeCollector(_Described):
    """The per-node series: as many as the fleet has nodes (a scrape of a few names skips them)."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def collect(self) -> Iterator[Metric]:
        ingest = self.ingestor
        over = GaugeMetricFamily("kgpu_node_over_budget", "1 while the node is over its ingest budget "
                                 "(the budget it went over last).", labels=["node", "budget"])
        for node, budget in sorted(ingest.budget_flags.items()):
            over.add_metric([node, budget], 1.0)
        yield over
        yield _by_node(
            "kgpu_node_lag_seconds", "Arrival minus the edge's timestamp of its last message, with the "
            "node's estimated clock skew taken out (an old outbox event shows as lag, a wrong clock does not).",
            ingest.lag_seconds)
        yield _by_node(
            "kgpu_node_clock_skew_seconds", "The edge's clock minus the controller's, estimated from its "
            "telemetry's arrival (positive: the edge is ahead; 0 within 2 s).", ingest.clock.skew)
        yield _by_node(
            "kgpu_node_last_seen_timestamp_seconds", "When this replica last received a message from the node "
            "(unix time; with replicas sharing the ingest, take the max by node).", ingest.last_seen)
        yield _by_node("kgpu_node_online", "1 if the node's last status said online, 0 after its offline status "
                       "or last will.", {node: 1.0 if up else 0.0 for node, up in ingest.online.items()})


def _by_node(name: str, documentation: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    """A gauge with one series a node, in node order."""
    family = GaugeMetricFamily(name, documentation, labels=["node"])
    for node, value in sorted(values.items()):
        family.add_metric([node], value)
    return family


def make_registry(*, ingestor: Ingestor, link: EdgeLink, leading: asyncio.Event,
                  command_resends: Callable[[], int]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(ingestor=ingestor, link=link, leading=leading,
                                          command_resends=command_resends, receive_queues=link.receive_queues))
    registry.register(NodeCollector(ingestor))
    return registry
