"""Structure-aware hypothesis fuzzing of every MQTT handler, on both sides and in `kgpu watch`.

tests/test_ingest_fuzz.py throws mostly garbage at the handlers; a well-formed envelope for the
right node and topic is rare there. Here every message is a *valid envelope on the right topic*
whose body is generated (plausible, absurd or the wrong shape), so the code behind validation —
acks deleting from the outbox, policies replacing the enforced one, commands being applied,
ingest writing to the fleet store, the watch's node table — is what gets fuzzed. Each test
states the invariant that must hold whatever arrives.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.store import FleetStore
from kgpu.watch_render import render
from kgpu.watch_state import WatchState
from shared.mqtt import Received
from shared.protocol import DecisionBody, Kind
from shared.topics import cloud_topic, edge_topic
from tests.helpers.ingest import counted, ingest_all

NODE = "edge-a"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---- building blocks ---------------------------------------------------------------------------

numbers = st.one_of(st.integers(min_value=-10, max_value=10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, -1, 1e308, -1e308, 2**63, 2**64 + 1, 0.5]))
short_text = st.text(max_size=12)
junk = st.recursive(st.none() | st.booleans() | numbers | short_text,
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(short_text, kids, max_size=3),
                    max_leaves=12)


def envelope(node: str, kind: str, body: Any, *, seq: Any = None, msg_id: str | None = None,
             ts: float = 1_700_000_000.0) -> bytes:
    raw = {"v": 1, "node": node, "id": msg_id or uuid.uuid4().hex, "ts": ts, "kind": kind, "body": body}
    if seq is not None:
        raw["seq"] = seq
    return json.dumps(raw).encode()


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


policy_specs = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["site", "p", "", "x" * 300]),
    "version": st.one_of(st.integers(min_value=-2, max_value=40), short_text),
    "powerCapWatts": maybe(numbers),
    "thermalThrottling": st.fixed_dictionaries({}, optional={
        "maxTempC": numbers, "criticalTempC": numbers, "coolDownPeriod": st.sampled_from(["30s", "5m", "soon", -1, 10]),
        "stepPercent": numbers}),
    "powerSaving": st.fixed_dictionaries({}, optional={
        "enabled": st.booleans(), "capPercent": numbers, "utilizationThreshold": numbers,
        "sustainPeriod": st.sampled_from(["0s", "1m", "x", 5])}),
    "xidPolicy": st.fixed_dictionaries({}, optional={"defaultAction": st.sampled_from(["record", "explode", 3])}),
    "surprise": junk,
})


# ---- the edge: ack, policy, commands -----------------------------------------------------------

@pytest.fixture
def edge(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A real EdgeSync over a real EdgeDaemon on the simulated driver (no broker needed: the
    handler is called with what the MQTT link would hand it)."""
    from edge import sim
    from edge.config import EdgeSettings
    from edge.daemon import EdgeDaemon
    from edge.sync import EdgeSync

    settings_ = EdgeSettings(node=NODE, db=tmp_path / "e.db", backend="sim", mqtt="mqtt://127.0.0.1:1")
    simulated = sim.install(2, "T4")
    daemon = EdgeDaemon(settings_, sim=simulated)
    yield EdgeSync(daemon, settings_), daemon
    daemon.store.close()
    simulated.uninstall()


def handle(sync: Any, topic: str, payload: bytes) -> None:
    async def deliver() -> None:
        if sync.mqtt is None:  # a link that is never started: what it would publish is dropped
            sync.mqtt = sync._make_client()
        await sync._handle(Received(topic, payload, False))

    asyncio.run(deliver())


acks = st.fixed_dictionaries({"upto": st.one_of(st.integers(min_value=-3, max_value=30), short_text)},
                             optional={"epoch": st.one_of(st.just("OURS"), short_text, st.none(), st.integers())})


@FUZZ
@given(messages=st.lists(acks, min_size=1, max_size=12))
def test_acks_only_ever_delete_a_prefix_up_to_what_was_acked_and_sent(edge: tuple[Any, Any],
                                                              messages: list[dict[str, Any]]) -> None:
    sync, daemon = edge
    store = daemon.store
    base = store.last_seq()
    store.record([(Kind.DECISION, DecisionBody(rule="r", action="a", outcome="recorded", reason=str(i)))
                  for i in range(20)])
    written = list(range(base + 1, base + 21))
    sent = base + 15  # the last five were never published: no ack may delete them
    sync.max_published = sent
    highest_accepted = sync.acked_upto
    for ack in messages:
        body = {**ack, "epoch": store.epoch} if ack.get("epoch") == "OURS" else ack
        if isinstance(body.get("upto"), int) and body["upto"] >= 0:
            body = {**body, "upto": base + body["upto"]}
        rejected_before = sum(sync.rejected.values())
        handle(sync, cloud_topic(NODE, "ack"), envelope(NODE, "ack", body))
        accepted = sum(sync.rejected.values()) == rejected_before
        if accepted and isinstance(body.get("upto"), int):
            highest_accepted = max(highest_accepted, min(body["upto"], sent))
        pending = [e.seq for e in store.outbox_pending(limit=1000)]
        # the outbox is always a suffix of what was written: nothing above the highest ack is gone
        assert pending == [s for s in written if s > highest_accepted][:len(pending)] or not pending
        assert all(s in pending for s in written if s > highest_accepted)
        assert all(s in pending for s in written if s > sent), "an event never sent was acked away"
    store.ack(store.last_seq())  # leave the outbox empty for the next example


@FUZZ
@given(specs=st.lists(policy_specs, min_size=1, max_size=6))
def test_policies_never_go_back_and_bad_ones_change_nothing(edge: tuple[Any, Any],
                                                            specs: list[dict[str, Any]]) -> None:
    from shared.policy import PowerPolicy

    sync, daemon = edge
    for spec in specs:
        before = (daemon.policy, daemon.policy_source)
        rejected_before = sum(sync.rejected.values())
        handle(sync, cloud_topic(NODE, "policy"), envelope(NODE, "policy", {"policy": spec}))
        try:
            valid: PowerPolicy | None = PowerPolicy.model_validate(spec)
        except ValueError:
            valid = None
        if valid is None:
            assert sum(sync.rejected.values()) == rejected_before + 1, "an invalid policy is counted"
            assert (daemon.policy, daemon.policy_source) == before, "an invalid policy changes nothing"
        elif daemon.policy is not before[0]:
            assert daemon.policy == valid and daemon.policy_source == "cloud"
            assert before[1] == "config" or valid.version > before[0].version
        else:
            assert before[1] != "config" and valid.version <= before[0].version


commands = st.fixed_dictionaries({
    "command": st.sampled_from(["drain", "undrain", "migrate_away", "restart_check", "reboot", ""]),
}, optional={"gpu_uuid": st.one_of(st.just("GPU0"), st.just("GPU1"), short_text, st.none()),
             "args": st.one_of(st.dictionaries(short_text, junk, max_size=2), junk)})


@FUZZ
@given(sent=st.lists(st.tuples(st.sampled_from(["id-1", "id-2", "id-3", "id-4"]), commands), min_size=1, max_size=10))
def test_each_command_id_is_applied_at_most_once(edge: tuple[Any, Any], sent: list[tuple[str, dict[str, Any]]]) -> None:
    sync, daemon = edge
    uuids = {f"GPU{v.inventory.index}": v.inventory.uuid for v in daemon.gpus.values()}
    run = uuid.uuid4().hex[:8]  # ids are unique per example: the store outlives examples
    for command_id, body in sent:
        if body.get("gpu_uuid") in uuids:
            body = {**body, "gpu_uuid": uuids[body["gpu_uuid"]]}
        handle(sync, cloud_topic(NODE, "commands"), envelope(NODE, "command", body, msg_id=f"{run}-{command_id}"))
    results = [e for e in daemon.store.outbox_pending(limit=10_000) if e.kind is Kind.COMMAND_RESULT
               and e.body["command_id"].startswith(run)]
    ids = [e.body["command_id"] for e in results]
    assert len(ids) == len(set(ids)), f"a command id was applied twice: {ids}"
    for command_id in {f"{run}-{c}" for c, _ in sent}:
        assert ids.count(command_id) <= 1


# ---- the cloud: status, telemetry, events -----------------------------------------------------

gpu_samples = st.fixed_dictionaries({
    "index": st.integers(min_value=-1, max_value=70), "uuid": st.sampled_from(["GPU-1", "GPU-2", "", "x" * 200]),
}, optional={"temperature_c": numbers, "power_w": numbers, "power_limit_w": numbers, "utilization_gpu": numbers,
             "memory_used_mib": numbers, "ts": numbers, "processes": st.lists(junk, max_size=2), "extra": junk})
statuses = st.fixed_dictionaries({"state": st.sampled_from(["online", "offline", "maybe"])}, optional={
    "version": short_text, "gpus": st.lists(junk, max_size=3), "policy_name": maybe(short_text),
    "policy_version": maybe(numbers), "outbox_depth": maybe(numbers),
    "outbox_epoch": st.one_of(short_text, st.text(min_size=65, max_size=70)), "degraded": st.lists(short_text, max_size=2)})
event_bodies = st.one_of(
    st.fixed_dictionaries({"rule": short_text, "action": short_text,
                           "outcome": st.sampled_from(["applied", "recorded", "refused", "bogus"]),
                           "reason": short_text}, optional={"gpu_index": numbers, "value": numbers, "inputs": junk}),
    st.fixed_dictionaries({"level": st.sampled_from(["node", "gpu", "app", "x"]),
                           "previous": st.sampled_from(["healthy", "unhealthy", "lost", "?"]),
                           "current": st.sampled_from(["healthy", "unhealthy", "lost", "?"])},
                          optional={"reasons": st.lists(short_text, max_size=2)}),
    junk,
)
cloud_messages = st.one_of(
    st.builds(lambda node, body: (edge_topic(node, "status"), envelope(node, "status", body)),
              st.sampled_from(["n1", "n2"]), statuses),
    st.builds(lambda node, samples: (edge_topic(node, "telemetry"), envelope(node, "telemetry", {"samples": samples})),
              st.sampled_from(["n1", "n2"]), st.lists(gpu_samples, max_size=3)),
    st.builds(lambda node, kind, seq, body, ts: (edge_topic(node, "events"), envelope(node, kind, body, seq=seq, ts=ts)),
              st.sampled_from(["n1", "n2"]), st.sampled_from(["decision", "health", "xid", "command_result"]),
              st.one_of(st.integers(min_value=-1, max_value=12), st.just(2**63), st.none()), event_bodies,
              st.one_of(st.just(1_700_000_000.0), numbers)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(cloud_messages, min_size=1, max_size=30))
def test_ingest_stores_or_counts_every_well_formed_envelope(tmp_path: Path, messages: list[tuple[str, bytes]]) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / f'fuzz-{uuid.uuid4().hex}.db'}")
    try:
        ingestor, acked = ingest_all(store, messages)
        assert counted(ingestor) == len(messages)
        assert ingestor.store_errors == 0, "a well-formed message must never make the store fail"
        # whatever was stored reads back through the API's queries, and acks never pass a hole
        for node in ("n1", "n2"):
            seqs = sorted(e["seq"] for e in store.events(node=node, limit=10_000))
            assert len(seqs) == len(set(seqs)), "one event per (node, seq)"
            for acked_node, upto in acked:
                if acked_node == node:
                    assert all(s in seqs for s in range(1, upto + 1)), f"ack {upto} covers a hole in {seqs}"
            store.node(node)
        assert isinstance(store.nodes(), list)
    finally:
        store.close()


# ---- kgpu watch --------------------------------------------------------------------------------

watch_messages = st.one_of(
    cloud_messages,
    st.builds(lambda node, body: (cloud_topic(node, "ack"), envelope(node, "ack", body)),
              st.sampled_from(["n1", "n2"]), acks),
    st.builds(lambda node, spec: (cloud_topic(node, "policy"), envelope(node, "policy", {"policy": spec})),
              st.sampled_from(["n1", "n2"]), policy_specs),
    st.builds(lambda node, body: (cloud_topic(node, "commands"), envelope(node, "command", body)),
              st.sampled_from(["n1", "n2"]), commands),
    st.tuples(st.text(max_size=30), st.binary(max_size=60)),
)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(watch_messages, min_size=1, max_size=25), node=st.sampled_from([None, "n1"]))
def test_watch_takes_anything_and_still_renders(messages: list[tuple[str, bytes]], node: str | None) -> None:
    from rich.console import Console

    state = WatchState(node=node)
    for i, (topic, payload) in enumerate(messages):
        state.feed(topic, payload, 1_700_000_000.0 + i)
    assert state.total <= len(messages)
    assert sum(state.rejected_counts.values()) <= state.total
    Console(file=open("/dev/null", "w"), width=120).print(render(state, 1_700_000_100.0))
