"""cloud/reboots/: the circuit breaker's rules (pure, rule by rule), the `reboots` table on real
SQLite and PostgreSQL, and the leader granting a reboot to an edge through a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator

from cloud.http.api import openapi_spec
from cloud.reboots import RebootManager
from cloud.reboots.breaker import (
    ZONE_LABEL,
    Decision,
    Ended,
    Grant,
    Limits,
    NodeState,
    Request,
    Verdict,
    decide,
    open_sites,
    track,
)
from cloud.reboots.repository import RebootRepository
from cloud.store import Incoming
from kgpu.lab.broker import mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.gpu import Health
from shared.http import error_middleware
from shared.mqtt import MqttLink, Received, parse_broker_url
from shared.protocol import (
    GpuSummary,
    Kind,
    RebootRequestBody,
    StatusBody,
    decode,
    make_envelope,
)
from shared.wire import WireModel
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401  (pg_url: fixture)

if TYPE_CHECKING:
    from kgpu.lab.broker import Mosquitto
    from kgpu.lab.kube import KubeEmulator

NOW = 1_800_000_000.0
HOUR = 3600.0
LIMITS = Limits(max_per_site=1, window_s=HOUR, timeout_s=900.0)
ZONES = {"a": "z1", "b": "z1", "c": "z1", "d": "z2"}


def up(healthy: int = 1, seen: float = NOW) -> NodeState:
    return NodeState(online=True, last_seen=seen, healthy_gpus=healthy)


def down(seen: float = NOW - 60) -> NodeState:
    return NodeState(online=False, last_seen=seen, healthy_gpus=0)


def verdicts(decisions: list[Decision]) -> dict[str, tuple[Verdict, str]]:
    return {d.node: (d.verdict, d.why) for d in decisions}


# ---- the pure breaker --------------------------------------------------------------------------


def test_one_reboot_at_a_time_per_site_and_other_sites_are_independent() -> None:
    nodes = {"a": up(), "b": up(), "c": up(), "d": up(0)}
    got = verdicts(decide([Request(1, "a", NOW), Request(2, "b", NOW), Request(3, "d", NOW)], [], nodes,
                          ZONES, Limits(5, HOUR, 900), NOW))
    assert got["a"][0] is Verdict.GRANT and got["d"][0] is Verdict.GRANT  # z2 has its own budget
    assert got["b"][0] is Verdict.HOLD and "another reboot in site 'z1' is still in progress (a," in got["b"][1]


def test_the_budget_per_site_per_window_then_it_opens_again() -> None:
    nodes = {"a": up(), "b": up(), "c": up()}
    first = Grant(request_id=1, node="a", site="z1", granted_at=NOW - 600, ended_at=NOW - 300, ended=Ended.BACK)
    [held] = decide([Request(2, "b", NOW)], [first], nodes, ZONES, LIMITS, NOW)
    assert held.verdict is Verdict.HOLD
    assert "budget of site 'z1' (1 per 3600 s) is spent until 2027-01-15T08:50:00Z" in held.why
    assert open_sites([first], ["z1", "z2"], NOW, LIMITS) == {"z1": True, "z2": False}
    later = NOW - 600 + HOUR
    [granted] = decide([Request(2, "b", NOW)], [first], nodes, ZONES, LIMITS, later)
    assert granted.verdict is Verdict.GRANT and "reboot 1 of 1" in granted.why
    assert open_sites([first], ["z1"], later, LIMITS) == {"z1": False}
    # two per window: the second goes once the first is back, the third waits for the window
    two = Limits(2, HOUR, 900)
    decisions = decide([Request(2, "b", NOW)], [first], nodes, ZONES, two, NOW)
    assert decisions[0].verdict is Verdict.GRANT
    second = Grant(2, "b", "z1", NOW, ended_at=NOW + 100, ended=Ended.BACK)
    [third] = decide([Request(3, "c", NOW + 200)], [first, second], nodes, ZONES, two, NOW + 200)
    assert third.verdict is Verdict.HOLD and "spent until" in third.why


def test_never_the_last_healthy_node_of_a_site() -> None:
    # b serves nothing (no healthy GPU), c is offline: a is the last healthy node of z1
    nodes = {"a": up(3), "b": up(0), "c": down()}
    [held] = decide([Request(1, "a", NOW)], [], nodes, ZONES, LIMITS, NOW)
    assert held.verdict is Verdict.HOLD and "last healthy node of site 'z1'" in held.why
    # b has no healthy GPU left: rebooting it takes nothing away
    [b] = decide([Request(2, "b", NOW)], [], nodes, ZONES, LIMITS, NOW)
    assert b.verdict is Verdict.GRANT
    # with c back and healthy, a may go; a node rebooting does not count as healthy
    nodes["c"] = up(1)
    assert decide([Request(1, "a", NOW)], [], nodes, ZONES, LIMITS, NOW)[0].verdict is Verdict.GRANT
    rebooting_c = Grant(9, "c", "z1", NOW - 2 * HOUR)  # long timed out: counts neither way
    assert decide([Request(1, "a", NOW)], [rebooting_c], nodes, ZONES, LIMITS, NOW)[0].verdict is Verdict.GRANT
    c_now = Grant(9, "c", "x-elsewhere", NOW - 10)  # c rebooting (granted under another site): not healthy
    [a] = decide([Request(1, "a", NOW)], [c_now], nodes, ZONES, LIMITS, NOW)
    assert a.verdict is Verdict.HOLD and "last healthy node" in a.why


def test_an_offline_node_is_held_and_a_node_rebooting_waits() -> None:
    nodes = {"a": down(), "b": up(0), "c": up()}
    [a] = decide([Request(1, "a", NOW)], [], nodes, ZONES, LIMITS, NOW)
    assert a.verdict is Verdict.HOLD and "offline" in a.why
    own = Grant(1, "b", "z1", NOW - 10)
    [b] = decide([Request(5, "b", NOW)], [own], nodes, ZONES, Limits(9, HOUR, 900), NOW)
    assert b.verdict is Verdict.HOLD and "a reboot of this node granted at" in b.why


def test_a_grant_is_in_progress_until_the_node_is_back_refused_or_timed_out() -> None:
    g = Grant(1, "a", "z1", NOW)
    [same] = track([g], {"a": up(seen=NOW + 5)}, NOW + 5, LIMITS)
    assert same == g  # still online, not yet down: in progress
    [gone] = track([g], {"a": down(seen=NOW + 8)}, NOW + 10, LIMITS)
    assert (gone.down_at, gone.ended) == (NOW + 8, None)  # its last message: when it went
    [still] = track([gone], {"a": up(seen=NOW + 8)}, NOW + 11, LIMITS)  # nothing new since it went down
    assert still.ended is None
    [silent] = track([g], {"a": down(seen=NOW - 3)}, NOW + 10, LIMITS)  # quiet since before the grant
    assert silent.down_at == NOW
    [back] = track([gone], {"a": up(seen=NOW + 70)}, NOW + 71, LIMITS)
    assert (back.ended, back.ended_at) == (Ended.BACK, NOW + 71)
    [late] = track([gone], {"a": down(seen=NOW + 8)}, NOW + 900, LIMITS)
    assert late.ended is Ended.TIMED_OUT
    [refused] = track([Grant(1, "a", "z1", NOW, refusal="not waiting for a reboot")], {"a": up()}, NOW + 3, LIMITS)
    assert refused.ended is Ended.REFUSED
    # ended: the site's next reboot may go (if its budget allows)
    nodes = {"a": up(0), "b": up(0), "c": up()}
    assert decide([Request(2, "b", NOW + 71)], [back], nodes, ZONES, Limits(2, HOUR, 900),
                  NOW + 71)[0].verdict is Verdict.GRANT
    assert decide([Request(2, "b", NOW + 20)], [gone], nodes, ZONES, Limits(2, HOUR, 900),
                  NOW + 20)[0].verdict is Verdict.HOLD


def test_nodes_without_a_zone_are_each_their_own_site() -> None:
    nodes = {"x": up(0), "y": up(0), "w": up(2)}
    got = verdicts(decide([Request(1, "x", NOW), Request(2, "y", NOW), Request(3, "w", NOW)], [], nodes, {},
                          LIMITS, NOW))
    assert got["x"][0] is got["y"][0] is Verdict.GRANT  # two sites, one reboot each, at once
    assert got["w"][0] is Verdict.HOLD and "last healthy node of its own site (no zone)" in got["w"][1]
    x_done = Grant(1, "x", "x", NOW, ended_at=NOW + 60, ended=Ended.BACK)
    [again] = decide([Request(4, "x", NOW + 120)], [x_done], nodes, {}, LIMITS, NOW + 120)
    assert again.verdict is Verdict.HOLD and "budget of its own site" in again.why


def test_zero_per_site_only_advises() -> None:
    nodes = {"a": up(0), "b": up(0)}
    decisions = decide([Request(1, "a", NOW), Request(2, "b", NOW)], [], nodes, ZONES, Limits(0, HOUR, 900), NOW)
    assert {d.verdict for d in decisions} == {Verdict.DENY}
    assert "advised only" in decisions[0].why
    assert open_sites([], ["z1"], NOW, Limits(0, HOUR, 900)) == {"z1": True}


def test_a_nodes_requests_share_one_verdict_and_one_command() -> None:
    nodes = {"a": up(0), "b": up()}
    decisions = decide([Request(7, "a", NOW), Request(3, "a", NOW)], [], nodes, ZONES, LIMITS, NOW)
    assert [(d.request_id, d.verdict, d.command_id) for d in decisions] == [
        (3, Verdict.GRANT, "reboot-3"), (7, Verdict.GRANT, "reboot-3")]


# ---- the store, SQLite and PostgreSQL ----------------------------------------------------------


def edge_message(node: str, body: WireModel, kind: Kind, seq: int | None, ts: float) -> Incoming:
    envelope = make_envelope(node, body, kind, seq).model_copy(update={"ts": ts})
    return Incoming(envelope=envelope, body=envelope.parsed_body(), received_at=ts)


def status(node: str, state: Literal["online", "offline"], ts: float, healthy: int = 0, gpus: int = 1) -> Incoming:
    summaries = [GpuSummary(index=i, uuid=f"{node}-GPU-{i}", name="NVIDIA H100 80GB HBM3",
                            health=Health.HEALTHY if i < healthy else Health.UNHEALTHY) for i in range(gpus)]
    return edge_message(node, StatusBody(state=state, gpus=summaries, outbox_epoch="e1"), Kind.STATUS, None, ts)


def reboot_request(node: str, seq: int, ts: float, gpu: int = 0) -> Incoming:
    body = RebootRequestBody(gpu_index=gpu, gpu_uuid=f"{node}-GPU-{gpu}", reason="xid 79 after 2 resets", attempt=3)
    return edge_message(node, body, Kind.REBOOT_REQUEST, seq, ts)


def test_the_repository_takes_each_request_once_and_follows_its_grant(db_url: str) -> None:
    from cloud.store import FleetStore

    store = FleetStore(db_url)
    repo = RebootRepository(store)
    t0 = time.time()
    try:
        request_a = reboot_request("edge-a", 1, t0)
        store.ingest([status("edge-a", "online", t0, healthy=1, gpus=2), status("edge-b", "online", t0),
                      request_a, reboot_request("edge-b", 1, t0)])
        store.ingest([request_a])  # the edge sent it again (no ack reached it): still one event
        snap = repo.load(t0, HOUR)
        assert [(r.node, r.seq, r.gpu_uuid, r.attempt) for r in snap.new] == [
            ("edge-a", 1, "edge-a-GPU-0", 3), ("edge-b", 1, "edge-b-GPU-0", 3)]
        assert snap.nodes["edge-a"] == NodeState(True, t0, 1) and snap.nodes["edge-b"].healthy_gpus == 0
        a, b = snap.new
        decisions = {d.request_id: d for d in decide(
            [Request(r.event_id, r.node, r.received_at) for r in snap.new], [], snap.nodes, {}, LIMITS, t0)}
        assert decisions[a.event_id].verdict is Verdict.HOLD and decisions[b.event_id].verdict is Verdict.GRANT
        repo.save(snap.new, decisions, [], t0)
        repo.save(snap.new, {k: Decision(k, d.node, d.site, Verdict.DENY, "late", k) for k, d in decisions.items()},
                  [], t0 + 1)  # a second save of the same new requests (another leader): the first stays
        again = repo.load(t0 + 2, HOUR)
        assert again.new == [] and [(r.node, r.verdict) for r in again.open] == [("edge-a", "hold")]
        [grant] = again.grants
        assert (grant.node, grant.site, grant.granted_at, grant.down_at) == ("edge-b", "edge-b", t0, None)
        assert again.granted[b.event_id].gpu_uuid == "edge-b-GPU-0"
        # the node goes offline (any replica's ingest notes it), then comes back
        assert repo.mark_down({"edge-b": t0 + 5, "edge-a": t0 + 5}) == 1
        store.ingest([status("edge-b", "offline", t0 + 5)])
        store.ingest([status("edge-b", "online", t0 + 60)])
        snap = repo.load(t0 + 61, HOUR)
        assert snap.grants[0].down_at == t0 + 5
        [back] = track(snap.grants, snap.nodes, t0 + 61, LIMITS)
        assert back.ended is Ended.BACK
        repo.save([], {}, [back], t0 + 61)
        rows = repo.reboots()
        assert [(r["node"], r["verdict"], r["ended"]) for r in rows] == [("edge-b", "grant", "back"),
                                                                        ("edge-a", "hold", None)]
        assert rows[0]["command_id"] == f"reboot-{b.event_id}" and rows[0]["why"].startswith("its own site")
        assert repo.reboots(node="edge-a", verdict="grant") == []
        assert [r["event_id"] for r in repo.reboots(limit=1, before_id=b.event_id)] == [a.event_id]
    finally:
        store.close()


# ---- the leader granting over a real broker ----------------------------------------------------


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh)")
def test_the_manager_grants_a_reboot_through_the_broker(tmp_path: Path, broker: Mosquitto,
                                                        kube: KubeEmulator) -> None:
    from cloud.commands import EdgeCommands
    from cloud.config import CloudSettings
    from cloud.kube import Kube
    from cloud.services import BatchBus, run_periodically
    from cloud.store import FleetStore

    kube.add_node("edge-b", {ZONE_LABEL: "depot"})
    kube.add_node("edge-w", {ZONE_LABEL: "depot"})
    kube.add_node("edge-x")  # no zone: its own site
    client = Kube.connect(kube.kubeconfig, False)
    commands: queue.Queue[Received] = queue.Queue()
    edge = MqttLink(parse_broker_url(broker.url), "edge-b", on_message=commands.put,
                    subscriptions=[("kgpu/v1/cloud/+/commands", 1)])
    cloud = MqttLink(parse_broker_url(broker.url), "controller")
    edge.start(), cloud.start()

    def publish(topic: str, payload: bytes, *, retain: bool = False) -> bool:
        return cloud.publish(topic, payload, qos=1, retain=retain)

    def command() -> tuple[str, dict[str, object]]:
        message = commands.get(timeout=30)
        envelope, body = decode(message.payload)  # what the edge's receiver checks
        return message.topic, {"id": envelope.id, **body.model_dump()}

    async def scenario() -> None:
        settings = CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}")
        store = FleetStore(settings.db)
        batches = BatchBus()
        outbox = EdgeCommands(settings=settings, store=store, publish=publish, batches=batches)
        manager = RebootManager(settings=settings, store=store, kube=client, commands=outbox, batches=batches)
        app = web.Application(middlewares=[error_middleware])  # the API's errors as JSON
        manager.add_routes(app)
        [scan] = manager.periodic()
        loop = asyncio.create_task(run_periodically(scan))

        async def ingest(*batch: Incoming) -> None:  # what the ingest does: store, then tell the parts
            await asyncio.to_thread(store.ingest, list(batch))
            await batches.deliver(list(batch))

        def rows() -> dict[str, dict[str, Any]]:
            return {r["node"]: r for r in manager.repo.reboots()}

        try:
            await asyncio.to_thread(wait_for, lambda: edge.connected.is_set() and cloud.connected.is_set(),
                                    what="both clients connected")
            t0 = time.time()
            # edge-b's only GPU is lost; edge-w and edge-x still have a healthy GPU each
            await ingest(status("edge-b", "online", t0), status("edge-w", "online", t0, healthy=1, gpus=2),
                         status("edge-x", "online", t0, healthy=1, gpus=2),
                         reboot_request("edge-b", 4, t0), reboot_request("edge-w", 1, t0, gpu=1),
                         reboot_request("edge-x", 9, t0, gpu=1))
            topic, body = await asyncio.to_thread(command)  # the wake-up: no waiting for the interval
            assert topic == "kgpu/v1/cloud/edge-b/commands"
            got = await asyncio.to_thread(rows)
            request = got["edge-b"]["event_id"]
            assert body == {"id": f"reboot-{request}", "command": "reboot", "gpu_uuid": "edge-b-GPU-0",
                            "args": {"request": request, "seq": 4}}
            assert (got["edge-b"]["verdict"], got["edge-b"]["command_id"], got["edge-b"]["site"]) == (
                "grant", body["id"], "depot")
            assert got["edge-w"]["verdict"] == "hold" and "another reboot in site 'depot'" in got["edge-w"]["why"]
            assert got["edge-x"]["verdict"] == "hold" and "last healthy node of its own site" in got["edge-x"]["why"]
            await ingest(status("edge-b", "offline", time.time()))  # the reboot begins (its clean stop)
            await ingest(status("edge-b", "online", time.time()))
            await asyncio.to_thread(wait_for, lambda: rows()["edge-b"]["ended"] == "back",
                                    timeout=60, what="edge-b back from its reboot")
            await asyncio.to_thread(wait_for, lambda: "budget of site 'depot'" in rows()["edge-w"]["why"],
                                    timeout=60, what="edge-w held by the spent budget")
            async with TestClient(TestServer(app)) as http:
                answer = await http.get("/api/v1/reboots", params={"limit": "2"})
                page = await answer.json()
                full = await (await http.get("/api/v1/reboots", params={"cursor": page["next_cursor"]})).json()
                bad = await http.get("/api/v1/reboots", params={"verdict": "maybe"})
                assert bad.status == 400 and (await bad.json())["error"] == "not a verdict"
            assert [(r["node"], r["verdict"], r["reboot"]) for r in page["reboots"]] == [
                ("edge-x", "hold", None), ("edge-w", "hold", None)]
            assert page["next_cursor"] is not None
            assert [(r["node"], r["reboot"]) for r in full["reboots"]] == [("edge-b", "back")]
            doc = openapi_spec().document  # the rows are what cloud/openapi.yaml says
            schema = doc["paths"]["/api/v1/reboots"]["get"]["responses"]["200"]["content"]["application/json"]
            for answered in (page, full):
                Draft202012Validator({**schema["schema"], "components": doc["components"]}).validate(answered)
            metrics = {(m.name, tuple(s.labels.items()), s.value) for m in manager.collect() for s in m.samples}
            assert ("kgpu_reboots", (("verdict", "grant"),), 1.0) in metrics
            assert ("kgpu_reboots", (("verdict", "hold"),), 3.0) in metrics  # edge-w's second reason counts
            assert ("kgpu_reboot_breaker_open", (("site", "depot"),), 1.0) in metrics  # its 1 per hour is used
            assert ("kgpu_reboot_breaker_open", (("site", "edge-x"),), 0.0) in metrics
            while not commands.empty():  # QoS 1 may deliver twice; nothing for the nodes held
                assert json.loads(commands.get_nowait().payload)["id"] == body["id"]
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            store.close()

    try:
        asyncio.run(scenario())
    finally:
        edge.stop(), cloud.stop()
        client.close()
