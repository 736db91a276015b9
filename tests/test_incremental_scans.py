"""The periodic whole-fleet scans read only what changed (issue 17), and decide exactly as a full
read would: the migration scan's GPU view (cloud/migration/fleet_view.py) and the policy
reconcile's reads (cloud/policies/repository.py), on a real fleet store (SQLite and PostgreSQL),
fed through the real ingest."""

from __future__ import annotations

import asyncio
import time

from cloud.commands import EdgeCommands
from cloud.config import CloudSettings
from cloud.migration.manager import MigrationManager
from cloud.migration.repository import MigrationRepository
from cloud.policies.manager import PolicyManager
from cloud.policies.repository import PolicyRepository
from cloud.services import BatchBus
from cloud.store import FleetStore, Incoming
from shared.gpu import GpuSample, Health
from shared.protocol import GpuSummary, HealthBody, Kind, StatusBody, TelemetryBody, make_envelope
from shared.wire import WireModel

NODES, GPUS = 12, 2
T0 = time.time()


def message(node: str, body: WireModel, kind: Kind, ts: float, seq: int | None = None) -> Incoming:
    envelope = make_envelope(node, body, kind, seq=seq).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def status(n: int, ts: float, *, sick: int | None = None, pods: tuple[str, ...] = (),
           remediation: str | None = None, gpus: int = GPUS, policy: tuple[str, int] | None = None) -> Incoming:
    summaries = [GpuSummary(index=i, uuid=f"GPU-{n}-{i}", name="NVIDIA H100 80GB HBM3",
                            health=Health.UNHEALTHY if i == sick else Health.HEALTHY,
                            pods=list(pods) if i == 0 else [], remediation=remediation if i == 0 else None)
                 for i in range(gpus)]
    name, version = policy or (None, None)
    return message(f"edge-{n:02d}", StatusBody(state="online", gpus=summaries, outbox_epoch=f"e{n}",
                                               policy_name=name, policy_version=version), Kind.STATUS, ts)


def telemetry(n: int, ts: float, uuids: list[tuple[int, str]]) -> Incoming:
    return message(f"edge-{n:02d}", TelemetryBody(samples=[GpuSample(index=i, uuid=u, ts=ts, power_w=100.0)
                                                           for i, u in uuids]), Kind.TELEMETRY, ts)


def test_the_migration_scan_reads_only_what_changed_and_sees_what_a_full_read_sees(db_url: str) -> None:
    """Each pass re-reads the nodes whose status moved (ours or another replica's), whose status
    changed what the view holds, or whose telemetry names a GPU it does not hold; and after every
    step its world equals a full read's, triggers included."""

    async def scenario() -> None:
        settings = CloudSettings(db=db_url, no_kube=True, migration_grace=1)
        store = FleetStore(settings.db)
        batches = BatchBus()
        commands = EdgeCommands(settings=settings, store=store, publish=lambda *a, **k: False, batches=batches)
        now = [T0]
        manager = MigrationManager(settings=settings, store=store, kube=None, commands=commands,
                                   batches=batches, clock=lambda: now[0])
        view = manager.repo.view
        view.full_every_s = 3600.0  # no safety-net pass unless the test asks for one, however slow the box

        async def ours(items: list[Incoming]) -> None:  # ingested by this replica
            store.ingest(items)
            await batches.deliver(items)

        def reread_by(step: list[Incoming] | None = None) -> int:
            """Re-read nodes of one scan's load, after checking it against a full read."""
            before = view.counts.nodes_reread
            world, _, _ = manager.repo.load(now[0])
            full, _, _ = MigrationRepository(store).load(now[0])
            assert world == full
            return view.counts.nodes_reread - before

        try:
            await ours([status(n, T0) for n in range(NODES)])
            manager.periodic()  # a new leader: the first read is whole
            assert reread_by() == 0 and view.counts.full == 1
            # statuses that change nothing, from this replica: nothing re-read
            await ours([status(n, T0 + 1) for n in range(NODES)])
            assert reread_by() == 0
            # ours, changing health, pods, remediation: those nodes only
            await ours([status(1, T0 + 2, sick=0), status(2, T0 + 2, pods=("default/train",)),
                        status(3, T0 + 2, remediation="fenced"), status(4, T0 + 2)])
            assert reread_by() == 3
            # another replica's (not on our bus): its status_ts moved
            store.ingest([status(5, T0 + 3, sick=1), status(6, T0 + 3)])
            assert reread_by() == 2
            # telemetry naming a GPU the view does not hold (a row without a status)
            await ours([telemetry(7, T0 + 4, [(0, "GPU-7-0"), (5, "GPU-7-new")]),
                        telemetry(8, T0 + 4, [(0, "GPU-8-0"), (1, "GPU-8-1")])])
            assert reread_by() == 1
            # a node that loses a GPU, and a new node
            await ours([status(9, T0 + 5, gpus=1), status(NODES, T0 + 5)])
            assert reread_by() == 2
            # a health event for a node with a non-healthy GPU: its events are read every pass
            await ours([message("edge-05", HealthBody(level="gpu", gpu_index=1, gpu_uuid="GPU-5-1",
                                                       previous=Health.HEALTHY, current=Health.UNHEALTHY,
                                                       reasons=["xid 79"]), Kind.HEALTH, T0 + 6, seq=1)])
            assert reread_by() == 0
            # the safety net: a full read after FULL_READ_EVERY_S, whatever the marks say
            view.full_every_s = 0.0
            assert reread_by() == 0 and view.counts.full >= 2
            view.full_every_s = 3600.0
            # and the decisions: the GPU with a health event is past the grace at once; the one
            # without, timed from the scan's first sight of it, one grace later
            now[0] = T0 + 60
            await manager.tick()
            assert {m["node"] for m in manager.migrations()} == {"edge-05"}
            now[0] = T0 + 62
            await manager.tick()
            found = {(m["node"], m["gpu_uuid"], m["state"]) for m in manager.migrations()}
            assert found == {("edge-01", "GPU-1-0", "needs-cluster"), ("edge-05", "GPU-5-1", "needs-cluster")}
        finally:
            store.close()

    asyncio.run(scenario())


def test_the_policy_reconcile_adopts_only_a_changed_fleet_and_resolves_as_before(db_url: str) -> None:
    """An unchanged fleet is not re-adopted; a new node is, with the labels given before it first
    reported mirrored to the fleet store; what each node reports reaches the resolution."""

    async def scenario() -> None:
        store = FleetStore(db_url)
        published: list[str] = []

        def publish(topic: str, payload: bytes, *, retain: bool = False) -> bool:
            published.append(topic)
            return True

        manager = PolicyManager(store=store, kube=None, publish=publish, batches=BatchBus())
        manager.full_every_s = 3600.0  # no safety-net pass however slow the box
        tables = manager.tables
        try:
            store.ingest([status(n, T0) for n in range(3)])
            tables.put_policy("everywhere", {"thermalThrottling": {"maxTempC": 80}}, "api", T0)
            tables.put_policy("gold", {"nodeSelector": {"tier": "gold"}, "priority": 5,
                                       "thermalThrottling": {"maxTempC": 70}}, "api", T0)
            tables.set_labels("edge-09", {"tier": "gold"}, T0)  # before it ever reports
            manager.periodic()
            first = await manager.reconcile()
            assert {n: r.policy_name for n, r in first.nodes.items()} == {
                "edge-00": "everywhere", "edge-01": "everywhere", "edge-02": "everywhere", "edge-09": "gold"}
            assert len(published) == 4
            # an unchanged fleet: the adoption is skipped (its planning would read every node)
            seen = tables._fleet_seen
            await manager.reconcile()
            assert tables._fleet_seen is seen
            # edge-09 appears: adopted again, its labels shown in the fleet store
            version = first.nodes["edge-09"].version
            store.ingest([status(9, T0 + 1, policy=("gold", version))])
            second = await manager.reconcile()
            assert tables._fleet_seen is not seen
            assert store.node("edge-09", gpu_limit=0)["labels"] == {"tier": "gold"}  # type: ignore[index]
            assert second.nodes["edge-09"].applied and not second.nodes["edge-00"].applied
            # the narrow snapshot says what the full node rows say
            snap = tables.snapshot()
            states = store.node_states()
            for node in snap.nodes:
                state = states.get(node.name) or {}
                assert (node.reported_name, node.reported_version) == (state.get("policy_name"),
                                                                       state.get("policy_version"))
                assert snap.online[node.name] == bool(state.get("online"))
            assert {n.name: dict(n.labels) for n in snap.nodes}["edge-09"] == {"tier": "gold"}
            assert PolicyRepository(store).snapshot().records == snap.records
            # the safety net: adopted again, changed fleet or not
            seen = tables._fleet_seen
            manager.full_every_s = 0.0
            await manager.reconcile()
            assert tables._fleet_seen is not seen and tables._fleet_seen == seen
        finally:
            store.close()

    asyncio.run(scenario())


def test_a_refused_policy_publish_stops_the_pass_and_the_next_pass_publishes_the_rest(db_url: str) -> None:
    """At start-up a controller publishes a policy to every node, more than the link's outgoing
    queue holds: once one is refused, the pass neither builds nor tries the rest (thousands of
    futile publishes on the event loop); the next pass publishes them."""

    async def scenario() -> tuple[list[str], list[str]]:
        store = FleetStore(db_url)
        tried: list[str] = []
        room = [2]  # the queue takes two, then is full

        def publish(topic: str, payload: bytes, *, retain: bool = False) -> bool:
            tried.append(topic)
            if room[0] <= 0:
                return False
            room[0] -= 1
            return True

        manager = PolicyManager(store=store, kube=None, publish=publish, batches=BatchBus())
        try:
            store.ingest([status(n, T0) for n in range(6)])
            manager.tables.put_policy("everywhere", {"thermalThrottling": {"maxTempC": 80}}, "api", T0)
            manager.periodic()
            await manager.reconcile()
            first = list(tried)
            tried.clear()
            room[0] = 100  # the queue drained
            await manager.reconcile()
            return first, list(tried)
        finally:
            store.close()

    first, second = asyncio.run(scenario())
    assert len(first) == 3  # two taken, one refused, the other three not tried
    assert len(second) == 4 and not set(second) & set(first[:2])  # the refused one and the three left
