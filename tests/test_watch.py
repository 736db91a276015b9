"""`kgpu watch`: the pure WatchState fed real envelopes, then the real CLI against a real mosquitto
(--json lines, --node filter, Ctrl-C, an unreachable broker, the rich display under a pty); the
screen at 80 and 120 columns with many long, similar node names, and the per-node GPU view, also
from real edges."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kgpu.cli import app
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.processes import wait_for
from kgpu.watch import WatchOptions, make_link, run_watch
from kgpu.watch_render import LinkView, key_presses, move_focus, render
from kgpu.watch_state import Accepted, WatchError, WatchState, json_line, shorten_names
from shared.gpu import GpuSample, Health
from shared.mqtt import MqttLink, parse_broker_url
from shared.policy import PowerPolicy
from shared.protocol import (
    AckBody,
    CommandBody,
    DecisionBody,
    Envelope,
    GpuSummary,
    HealthBody,
    Kind,
    PolicyBody,
    StatusBody,
    TelemetryBody,
    XidBody,
    make_envelope,
)
from shared.topics import cloud_topic, edge_topic
from tests.helpers.edge_process import EdgeProcess

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


# ---- envelopes ------------------------------------------------------------------------------


def gpus(*health: Health) -> list[GpuSummary]:
    return [GpuSummary(index=i, uuid=f"GPU-{i}", name="NVIDIA H100", health=h) for i, h in enumerate(health)]


def status(node: str, state: str = "online", *, ts: float | None = None, **kw: Any) -> Envelope:
    kw.setdefault("gpus", gpus(Health.HEALTHY, Health.HEALTHY))
    env = make_envelope(node, StatusBody(state=state, **kw), Kind.STATUS)  # type: ignore[arg-type]
    return env.model_copy(update={"ts": ts}) if ts is not None else env


def at(env: Envelope, ts: float) -> Envelope:
    return env.model_copy(update={"ts": ts})


def decision(node: str, seq: int) -> Envelope:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-0", rule="thermal_step_down", action="set_power_limit",
                        value=560.0, outcome="applied", reason="88 °C > 83 °C")
    return make_envelope(node, body, Kind.DECISION, seq=seq)


def xid(node: str, seq: int) -> Envelope:
    return make_envelope(node, XidBody(gpu_index=1, gpu_uuid="GPU-1", xid=79, action="request_migration"),
                         Kind.XID, seq=seq)


def health(node: str, seq: int, index: int = 0) -> Envelope:
    body = HealthBody(level="gpu", gpu_index=index, gpu_uuid=f"GPU-{index}", previous=Health.HEALTHY,
                      current=Health.UNHEALTHY)
    return make_envelope(node, body, Kind.HEALTH, seq=seq)


def telemetry(node: str) -> Envelope:
    sample = GpuSample(index=0, uuid="GPU-0", ts=time.time(), temperature_c=71.0, power_w=640.0)
    return make_envelope(node, TelemetryBody(samples=[sample]), Kind.TELEMETRY)


def feed(state: WatchState, topic: str, env: Envelope | bytes, received_at: float, **kw: Any) -> Any:
    payload = env if isinstance(env, bytes) else env.to_json()
    return state.feed(topic, payload, received_at, **kw)


# ---- WatchState -----------------------------------------------------------------------------


def test_node_table_from_status_events_and_acks() -> None:
    state = WatchState()
    feed(state, edge_topic("edge-a", "status"),
         status("edge-a", version="0.3.0", outbox_depth=4, policy_name="eco", policy_version=7,
                gpus=gpus(Health.HEALTHY, Health.UNHEALTHY, Health.HEALTHY), ts=T0 - 0.25), T0)
    feed(state, edge_topic("edge-a", "events"), at(decision("edge-a", 41), T0 + 1), T0 + 1.5)
    feed(state, edge_topic("edge-a", "events"), at(xid("edge-a", 42), T0 + 2), T0 + 2.1)
    feed(state, cloud_topic("edge-a", "ack"), make_envelope("edge-a", AckBody(upto=41), Kind.ACK), T0 + 3)

    node = state.nodes["edge-a"]
    assert (node.state, node.version, node.outbox_depth, node.policy_name, node.policy_version) == (
        "online", "0.3.0", 4, "eco", 7)
    assert (node.gpu_count, node.unhealthy) == (3, 1)
    assert (node.max_event_seq, node.ack_upto) == (42, 41)
    assert node.last_seen == T0 + 2.1  # the cloud's ack says nothing about when the edge was heard
    assert node.last_lag_s == pytest.approx(0.1)

    # the event list: the status change, the decision and the xid; not the ack
    assert [(e.kind, e.seq) for e in state.events] == [("status", None), ("decision", 41), ("xid", 42)]
    assert state.events[1].summary.startswith("decision thermal_step_down set_power_limit 560 W applied")
    assert state.events[2].summary == "xid 79 on GPU 1 → request_migration"

    # a health event moves a GPU to unhealthy in the table
    feed(state, edge_topic("edge-a", "events"), health("edge-a", 43), T0 + 4)
    assert state.events[-1].summary == "health GPU 0 healthy→unhealthy"
    assert (node.unhealthy, node.max_event_seq) == (2, 43)


def test_offline_status_and_the_retained_one_at_start() -> None:
    state = WatchState()
    # the retained status the broker hands over on subscribe: an hour old
    retained = status("edge-b", version="0.3.0", ts=T0 - 3600)
    obs = feed(state, edge_topic("edge-b", "status"), retained, T0, retained=True)
    node = state.nodes["edge-b"]
    assert node.state == "online" and node.last_seen == T0 - 3600  # last heard an hour ago, not now
    assert node.last_lag_s is None  # a retained message's age is not link lag
    assert json_line(obs)["retained"] is True

    feed(state, edge_topic("edge-b", "telemetry"), at(telemetry("edge-b"), T0 + 0.5), T0 + 0.6)
    assert node.last_seen == T0 + 0.6 and node.last_lag_s == pytest.approx(0.1)
    # the last will, made when the edge connected long ago and sent by the broker now: offline,
    # minimal; it is neither lag nor a sign of life, and what the online status said is kept
    will = status("edge-b", "offline", gpus=[], ts=T0 - 7200)
    feed(state, edge_topic("edge-b", "status"), will, T0 + 1)
    assert node.state == "offline" and node.gpu_count == 2 and node.version == "0.3.0"
    assert node.last_seen == T0 + 0.6 and node.last_lag_s == pytest.approx(0.1)
    assert [e.summary.split()[:2] for e in state.events] == [["status", "online"], ["status", "offline"]]
    # the periodic re-publication of the same state is not an event
    feed(state, edge_topic("edge-b", "status"), status("edge-b", "offline", gpus=[], ts=T0 + 2), T0 + 2)
    assert len(state.events) == 2


def test_lag_positive_and_negative() -> None:
    state = WatchState()
    obs = feed(state, edge_topic("edge-a", "telemetry"), at(telemetry("edge-a"), T0 - 2.5), T0)
    assert obs.lag_s == pytest.approx(2.5) and state.nodes["edge-a"].last_lag_s == pytest.approx(2.5)
    # the edge's clock is 3 s ahead of ours: shown, not clamped to zero
    obs = feed(state, edge_topic("edge-a", "telemetry"), at(telemetry("edge-a"), T0 + 4), T0 + 1)
    assert obs.lag_s == pytest.approx(-3.0) and state.nodes["edge-a"].last_lag_s == pytest.approx(-3.0)
    assert json_line(obs)["lag_s"] == pytest.approx(-3.0)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render(state, T0 + 1))
    assert "-3.00s clock ahead" in console.export_text()
    # telemetry flows all the time: it is counted, not listed
    assert len(state.events) == 0 and state.total == 2


def test_rates_over_a_sliding_window() -> None:
    state = WatchState()
    for i in range(20):  # 2 telemetry messages per second for 10 s
        feed(state, edge_topic("edge-a", "telemetry"), telemetry("edge-a"), T0 + i * 0.5)
    feed(state, edge_topic("edge-a", "events"), decision("edge-a", 1), T0 + 9)
    rates = state.rates(T0 + 9.5)
    assert rates["telemetry"] == pytest.approx(2.0) and rates["events"] == pytest.approx(0.1)
    assert state.rates(T0 + 14.6)["telemetry"] == pytest.approx(1.0)  # the first half left the window
    assert state.rates(T0 + 30) == {"telemetry": 0.0, "events": 0.0}


def test_rejected_messages_with_their_reasons() -> None:
    state = WatchState()
    topic = edge_topic("edge-a", "events")
    obs = [
        feed(state, topic, b"definitely not json {", T0),
        feed(state, topic, b'{"v": 2, "node": "edge-a", "kind": "ack", "body": {"upto": 1}}', T0),
        feed(state, topic, decision("edge-b", 1), T0),  # edge-b's event on edge-a's topic
        feed(state, "kgpu/v1/edge/edge-a/bogus", decision("edge-a", 1), T0),
        feed(state, "kgpu/v1/edge/Bad_Node/events", decision("edge-a", 1), T0),
        feed(state, topic, b'{"v": 1, "node": "edge-a", "kind": "xid", "body": {"xid": "x"}}', T0),
        feed(state, edge_topic("edge-a", "status"), decision("edge-a", 1), T0),  # an event on status
    ]
    assert [o.reason for o in obs] == ["not_json", "version", "node_mismatch", "bad_topic", "bad_topic",
                                       "schema", "kind_mismatch"]
    assert state.rejected_counts == {"bad_topic": 2, "not_json": 1, "version": 1, "node_mismatch": 1,
                                     "schema": 1, "kind_mismatch": 1}
    assert "edge-b" in obs[2].detail and "edge-a" in obs[2].detail
    assert not state.nodes and not state.events  # nothing rejected updates a node
    line = json_line(obs[0])
    assert line["rejected"] == "not_json" and line["topic"] == topic and "envelope" not in line
    # a rejected message with a known topic still counts in the rates; a bad topic cannot
    assert state.rates(T0)["events"] == pytest.approx(0.4)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render(state, T0 + 5))
    text = console.export_text()
    assert "rejected: bad_topic 2" in text and "node_mismatch" in text


def test_node_filter() -> None:
    state = WatchState(node="edge-a")
    assert feed(state, edge_topic("edge-b", "status"), status("edge-b"), T0) is None
    assert feed(state, edge_topic("edge-a", "status"), status("edge-a"), T0) is not None
    assert feed(state, cloud_topic("edge-a", "ack"), make_envelope("edge-a", AckBody(upto=3), Kind.ACK), T0)
    # a mismatch counts for both nodes it names
    assert feed(state, edge_topic("edge-b", "events"), decision("edge-a", 1), T0).reason == "node_mismatch"
    assert feed(state, "kgpu/v1/nope", b"x", T0) is None  # no node to match
    assert feed(state, "kgpu/v1/edge/edge-a/bogus", b"x", T0).reason == "bad_topic"  # but this one names it
    assert list(state.nodes) == ["edge-a"] and state.nodes["edge-a"].ack_upto == 3
    assert state.total == 4 and state.rejected_counts == {"node_mismatch": 1, "bad_topic": 1}


def test_kind_filter_by_topic_kind_and_by_envelope_kind() -> None:
    by_topic = WatchState(kind="events")
    by_envelope = WatchState(kind="xid")
    messages = [
        (edge_topic("edge-a", "status"), status("edge-a")),
        (edge_topic("edge-a", "telemetry"), telemetry("edge-a")),
        (edge_topic("edge-a", "events"), decision("edge-a", 1)),
        (edge_topic("edge-a", "events"), xid("edge-a", 2)),
        (cloud_topic("edge-a", "policy"),
         make_envelope("edge-a", PolicyBody(policy=PowerPolicy(name="eco", version=2)), Kind.POLICY)),
        (cloud_topic("edge-a", "commands"),
         make_envelope("edge-a", CommandBody(command="drain"), Kind.COMMAND)),
    ]
    kept_topic = [feed(by_topic, t, e, T0) is not None for t, e in messages]
    kept_envelope = [feed(by_envelope, t, e, T0) is not None for t, e in messages]
    assert kept_topic == [False, False, True, True, False, False]
    assert kept_envelope == [False, False, False, True, False, False]
    assert [e.kind for e in by_topic.events] == ["decision", "xid"]
    assert [e.kind for e in by_envelope.events] == ["xid"]
    assert set(by_topic.rates(T0)) == {"events"}
    # the node table still follows everything: the status gave the online state
    assert by_envelope.nodes["edge-a"].state == "online"
    # asking for telemetry lists telemetry, with a summary
    tele = WatchState(kind="telemetry")
    feed(tele, edge_topic("edge-a", "telemetry"), telemetry("edge-a"), T0)
    assert tele.events[0].summary == "telemetry 1 samples, max 71 °C, 640 W"
    with pytest.raises(WatchError, match="unknown --kind"):
        WatchState(kind="bogus")


def test_event_list_keeps_the_latest_n() -> None:
    state = WatchState(max_events=5)
    for seq in range(1, 13):
        feed(state, edge_topic("edge-a", "events"), decision("edge-a", seq), T0 + seq)
    assert [e.seq for e in state.events] == [8, 9, 10, 11, 12]
    assert state.nodes["edge-a"].max_event_seq == 12


def test_render_shows_nodes_rates_events_and_the_link() -> None:
    state = WatchState()
    feed(state, edge_topic("edge-a", "status"), status("edge-a", version="0.3.0", policy_name="eco",
                                                     policy_version=7), T0)
    feed(state, edge_topic("edge-z", "status"), status("edge-z", "offline"), T0)
    feed(state, edge_topic("edge-a", "events"), xid("edge-a", 9), T0 + 1)
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(render(state, T0 + 2, LinkView("mqtt://127.0.0.1:1883", connected=True)))
    text = console.export_text()
    for expected in ("edge-a", "online", "edge-z", "offline", "eco v7", "xid 79 on GPU 1", "events 0.1",
                     "connected", "1.0s"):
        assert expected in text, (expected, text)
    console = Console(record=True, width=200, file=io.StringIO())
    down = LinkView("mqtt://h:1", error="cannot connect to mqtt://h:1: refused")
    console.print(render(WatchState(), T0, down))
    text = console.export_text()
    assert "not connected: cannot connect to mqtt://h:1: refused — retrying" in text
    assert "waiting for messages" in text


# ---- readable at 80 columns, and one node's GPUs ---------------------------------------------------

FACTORY = "factory-berlin-line-"
FLEET = [f"{FACTORY}{line:02d}-gpu-node-{n:02d}" for line in (7, 8, 12) for n in range(1, 17)]


def gpu_status(node: str, n: int = 8, *, unhealthy: tuple[int, ...] = (), ts: float = T0, **kw: Any) -> Envelope:
    summaries = [GpuSummary(index=i, uuid=f"GPU-{node[-5:]}-{i}", name="NVIDIA H100 80GB HBM3",
                            health=Health.UNHEALTHY if i in unhealthy else Health.HEALTHY, power_limit_w=700.0,
                            **kw.pop(f"gpu{i}", {})) for i in range(n)]
    return status(node, version="0.3.0", policy_name="eco", policy_version=7, outbox_depth=0, gpus=summaries,
                  ts=ts, **kw)


def gpu_telemetry(node: str, n: int = 8, *, ts: float = T0, **per_gpu: dict[str, Any]) -> Envelope:
    samples = [GpuSample(**{"index": i, "uuid": f"GPU-{node[-5:]}-{i}", "ts": ts, "temperature_c": 60.0 + i,
                            "power_w": 300.0 + 10 * i, "power_limit_w": 700.0, "utilization_pct": 50.0,
                            "memory_used_bytes": 20 * 2**30, "memory_free_bytes": 60 * 2**30,
                            **per_gpu.get(f"gpu{i}", {})}) for i in range(n)]
    return at(make_envelope(node, TelemetryBody(samples=samples), Kind.TELEMETRY), ts)


def fleet_state(**kw: Any) -> WatchState:
    state = WatchState(**kw)
    for i, name in enumerate(FLEET):
        feed(state, edge_topic(name, "status"), gpu_status(name, unhealthy=(1,) if i == 20 else ()), T0 + 0.1)
        feed(state, edge_topic(name, "telemetry"), gpu_telemetry(name, ts=T0 + 1), T0 + 1.1)
    return state


def screen(state: WatchState, width: int, *, height: int | None = None, now: float = T0 + 2) -> list[str]:
    """The display as the lines a terminal of `width` (and `height`, when given) shows."""
    console = Console(record=True, width=width, height=height or 25, file=io.StringIO(),
                      force_terminal=height is not None)
    console.print(render(state, now, LinkView("mqtt://broker.plant.example:1883", connected=True)))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_node_view_names_each_gpus_vendor_where_there_is_room() -> None:
    """Issue 16: the vendor and platform from the status; an older edge's GPUs are NVIDIA's."""
    node = FLEET[7]
    state = WatchState(node=node)
    feed(state, edge_topic(node, "status"), gpu_status(node, 2, gpu1={"vendor": "amd", "platform": "instinct"}), T0)
    wide = [line for line in screen(state, 160) if re.match(r" *\d+  healthy", line)]
    assert re.search(r"H100 80GB HBM3 +nvidia ", wide[0]) and re.search(r"H100 80GB HBM3 +amd instinct ", wide[1])
    assert max(len(line) for line in screen(state, 80)) <= 80


def node_rows(lines: list[str]) -> dict[str, str]:
    """The node table's rows, by the name as shown (the rows before the rates line)."""
    end = next(i for i, line in enumerate(lines) if line.startswith("msg/s"))
    rows = [line for line in lines[:end] if re.match(r"\S+ +(online|offline)", line)]
    return {row.split()[0]: row for row in rows}


@pytest.mark.parametrize("width", [80, 120])
def test_many_long_similar_names_stay_apart(width: int) -> None:
    lines = screen(fleet_state(), width)
    assert max(len(line) for line in lines) <= width
    # the prefix all 48 share is said once; every row names its node by what sets it apart
    assert f"nodes (48) named {FACTORY}*" in "\n".join(lines)
    rows = node_rows(lines)
    assert sorted(rows) == sorted(name.removeprefix(FACTORY) for name in FLEET)
    assert "…" not in "".join(rows)  # nothing had to be cut from a name
    assert "online  8 (1 unhealthy)" in rows["08-gpu-node-05"]
    header = next(line for line in lines if line.startswith("node "))
    kept = header.split()
    assert kept[:3] == ["node", "state", "GPUs"] and "°C" in kept and "seen" in kept
    assert re.search(r"\b67 ", rows["12-gpu-node-16"])  # the hottest GPU
    assert "2680/5600 W" in rows["07-gpu-node-01"]  # power against the limits, in all
    if width == 120:  # 120 columns have room for every column
        assert kept[-4:] == ["policy", "seq/ack", "outbox", "version"] and "eco v7" in rows["07-gpu-node-01"]
        assert "--node NAME" not in lines[1]
    else:  # 80: what is left out is one --node away
        assert "policy" not in kept and "version" not in kept and "(--node NAME: one node's GPUs)" in lines[1]
    # the events name nodes the way the table does
    events = lines[lines.index(next(line for line in lines if line.startswith("latest events"))):]
    assert any(line.split()[1:3] == ["12-gpu-node-16", "status"] for line in events[3:])


def test_names_lose_their_middle_only_when_they_must_and_never_collide() -> None:
    # one node: nothing is shared with anyone, nothing goes
    assert shorten_names([FLEET[0]], max_cells=None).short == {FLEET[0]: FLEET[0]}
    # a shared domain goes like a shared prefix; a name that is the whole prefix keeps it
    shown = shorten_names(["gpu-a.plant.example", "gpu-b.plant.example"], max_cells=None)
    assert (shown.pattern, sorted(shown.short.values())) == ("gpu-*.plant.example", ["a", "b"])
    assert shorten_names(["edge", "edge-a"], max_cells=None).short == {"edge": "edge", "edge-a": "edge-a"}
    # 48 names in 9 cells: cut in the middle, each still its own
    cut = shorten_names(FLEET, max_cells=9)
    assert len(set(cut.short.values())) == 48 and all(len(v) <= 9 and "…" in v for v in cut.short.values())
    assert cut.short[f"{FACTORY}12-gpu-node-16"] == "12-g…e-16"
    # no cut keeps these apart in 5 cells: they stay whole (and wrap) rather than read the same
    alike = [f"rack-{x}-node-{n}" for x in ("alpha", "alpine") for n in range(10, 30)]
    assert shorten_names(alike, max_cells=5).short == {n: n.removeprefix("rack-") for n in alike}
    # really long names in an 80-column table are shortened to the room left, still apart
    sites = ("tempelhof-schoeneberg", "marienfelde-lichtenrade", "spandau-haselhorst-siemensstadt")
    long = [f"{FACTORY}{site}-building-{h}-hall-{h}-rack-{r:02d}-gpu-node-{n:02d}.eu-central-1.compute.internal"
            for site in sites for h in "ab" for r in (3, 17) for n in (1, 12)]
    state = WatchState()
    for name in long:
        feed(state, edge_topic(name, "status"), gpu_status(name), T0)
    lines = screen(state, 80)
    rows = node_rows(lines)
    assert len(rows) == len(long)  # all apart; only the names too long for the room lost their middle
    assert {"…" in name for name in rows} == {True, False}
    assert all("…" in name for name in rows if not name.startswith(("tempelhof", "marienfelde")))
    assert max(len(line) for line in lines) <= 80


def test_gpu_details_follow_status_and_the_newest_telemetry() -> None:
    state = WatchState()
    name = FLEET[0]
    feed(state, edge_topic(name, "status"), gpu_status(name, 3), T0)
    feed(state, edge_topic(name, "telemetry"), gpu_telemetry(name, 3, ts=T0 + 5), T0 + 5)
    late = gpu_telemetry(name, 3, ts=T0 + 2, gpu0={"temperature_c": 20.0})  # older than what we have
    feed(state, edge_topic(name, "telemetry"), late, T0 + 6)
    lost = gpu_telemetry(name, 3, ts=T0 + 7, gpu1={"lost": True, "temperature_c": None})
    feed(state, edge_topic(name, "telemetry"), lost, T0 + 7)
    node = state.nodes[name]
    assert [node.gpus[i].sample.temperature_c for i in range(3)] == [60.0, 61.0, 62.0]  # type: ignore[union-attr]
    assert node.max_temperature_c == 62.0 and node.power_w == (930.0, 2100.0)
    # a status without GPU 2 (it left the node): its row goes too
    feed(state, edge_topic(name, "status"), gpu_status(name, 2), T0 + 8)
    assert sorted(node.gpus) == [0, 1] and node.gpu_count == 2
    # a sender making up GPU indexes cannot grow the table without bound
    for first in range(0, 400, 100):  # in messages small enough to be accepted
        flood = [GpuSample(index=i, uuid=f"GPU-{i}", ts=T0, temperature_c=50.0) for i in range(first, first + 100)]
        envelope = make_envelope(name, TelemetryBody(samples=flood), Kind.TELEMETRY)
        assert isinstance(feed(state, edge_topic(name, "telemetry"), envelope, T0 + 9), Accepted)
    assert len(node.gpus) == 256


def test_keys_move_the_focus_from_node_to_node() -> None:
    assert key_presses("nj\x1b[B\x1b[Ax\x1b") == ["n", "j", "\x1b[B", "\x1b[A", "x", "\x1b"]
    nodes = ["c", "a", "b"]
    focus = None
    seen = []
    for key in ["n", "n", "\t", "n", "p", "p", "x", "\x1b[A"]:
        focus = move_focus(nodes, focus, key)
        seen.append(focus)
    assert seen == ["a", "b", "c", "a", "c", "b", "b", "a"]
    assert move_focus(nodes, "b", "a") is None and move_focus([], None, "n") is None
    # the focused node's view: its GPUs, its events only; the rest of the fleet still watched
    state = fleet_state()
    feed(state, edge_topic(FLEET[3], "events"), xid(FLEET[3], 4), T0 + 1.5)
    console = Console(record=True, width=80, file=io.StringIO())
    console.print(render(state, T0 + 2, LinkView("mqtt://b:1883", connected=True), focus=FLEET[3], keys=True))
    text = console.export_text()
    assert "node 4 of 48 · n/p: next/previous node · a: all nodes" in text and f"{FLEET[3]}  online" in text
    assert "xid 79 on GPU 1" in text and "12-gpu-node-16" not in text  # the latest other events are not
    assert "12-gpu-node-16  status" in "\n".join(screen(state, 80))  # (they are in the fleet view)


def test_a_short_window_lists_the_nodes_that_need_attention_first() -> None:
    state = fleet_state()
    feed(state, edge_topic(FLEET[-1], "status"), status(FLEET[-1], "offline", gpus=[], ts=T0 - 60), T0 + 1.5)
    lines = screen(state, 80, height=24)
    rows = node_rows(lines)
    assert len(rows) == 24 - 14 - 1  # the rest of the window is the header, rates and events
    assert "12-gpu-node-16" in rows and "offline" in rows["12-gpu-node-16"]
    assert "8 (1 unhealthy)" in rows["08-gpu-node-05"]
    assert any(line.startswith("… 39 more, all online and healthy") for line in lines)
    assert len(screen(state, 80)) > 48  # printed to a file (not a window): every node


def test_node_view_shows_each_gpu_health_temperature_power_and_limit() -> None:
    node = FLEET[7]
    state = WatchState(node=node)
    feed(state, edge_topic(FLEET[8], "status"), gpu_status(FLEET[8]), T0)  # another node: not shown
    feed(state, edge_topic(node, "status"),
         gpu_status(node, gpu2={"draining": True, "pods": ["ml/train-0", "ml/train-1"]},
                    gpu5={"remediation": "reset pending"}), T0 + 0.1)
    feed(state, edge_topic(node, "telemetry"),
         gpu_telemetry(node, ts=T0 + 1, gpu3={"temperature_c": 91.0, "power_w": 420.5, "power_limit_w": 450.0,
                                               "throttle_reasons": 0x20 | 0x04}), T0 + 1.1)
    feed(state, edge_topic(node, "events"), health(node, 12, index=6), T0 + 1.2)
    for width in (80, 120):
        lines = screen(state, width)
        text = "\n".join(lines)
        assert max(len(line) for line in lines) <= width
        assert f"{node}  online  version 0.3.0" in text and "policy eco v7" in text
        assert FLEET[8] not in text
        assert "GPUs (8) — 2770/5350 W in all" in text
        gpu = {int(line.split()[0]): line.split() for line in lines if re.match(r" *\d+  (healthy|unhealthy)", line)}
        assert sorted(gpu) == list(range(8))
        # GPU, health, °C, power W, limit W: the enforced limit from telemetry, else the status's
        assert gpu[3][:5] == ["3", "healthy", "91", "420", "450"] and "throttled:" in gpu[3]
        assert gpu[6][:5] == ["6", "unhealthy", "66", "360", "700"]
        assert gpu[0][:5] == ["0", "healthy", "60", "300", "700"]
        assert "draining;" in gpu[2] and "reset" in gpu[5]
        assert ("NVIDIA" in gpu[0]) is (width == 120)  # the model only where there is room
        assert "throttled: power cap" in text and "thermal" in text  # folded onto a second line at 80
        assert not any(line.split()[1:2] == ["node"] for line in lines)  # events: all this node's
    # before anything arrives about it
    assert "waiting for messages about edge-q…" in "\n".join(screen(WatchState(node="edge-q"), 80))


# ---- options --------------------------------------------------------------------------------


def test_bad_options_are_one_line_and_exit_2(tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="mqtt://host:port"):
        make_link(WatchOptions(mqtt="http://broker"), print)
    with pytest.raises(WatchError, match="no broker given"):
        make_link(WatchOptions(mqtt=None), print)
    with pytest.raises(WatchError, match="password file not found"):
        make_link(WatchOptions(mqtt="mqtt://h", password_file=tmp_path / "nope"), print)
    with pytest.raises(WatchError, match="need an mqtts:// URL"):
        make_link(WatchOptions(mqtt="mqtt://h", tls_insecure=True), print)
    with pytest.raises(WatchError, match="CA file not found"):
        make_link(WatchOptions(mqtt="mqtts://h", ca_file=tmp_path / "ca.pem"), print)
    (tmp_path / "pw").write_text("s3cret\n")
    link = make_link(WatchOptions(mqtt="mqtt://ops@h", password_file=tmp_path / "pw"), print)
    assert link.address.password == "s3cret" and link.client_id.startswith("kgpu-watch-")

    runner = CliRunner()
    result = runner.invoke(app, ["watch", "--mqtt", "http://u:pw@broker"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("kgpu: MQTT URL must look like") and "pw" not in result.output
    result = runner.invoke(app, ["watch", "--kind", "bogus"], env={"KGPU_MQTT": "mqtt://h"})
    assert result.exit_code == 2 and "kgpu: unknown --kind 'bogus'" in result.output


# ---- the real thing, against a real broker ------------------------------------------------------


class WatchProcess:
    """`python -m kgpu watch ...` with its stdout and stderr read into queues (every read bounded)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("KGPU_MQTT", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "kgpu", "watch", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: queue.Queue[str] = queue.Queue()
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, sink: queue.Queue[str]) -> None:
        for line in stream:
            sink.put(line)

    def line(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            return json.loads(self.stdout.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no JSON line in {timeout}s; stderr: {self.drain(self.stderr)}") from None

    def stderr_line(self, containing: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.stderr.get(timeout=left)
            except queue.Empty:
                break
            if containing in line:
                return line
        raise AssertionError(f"no stderr line with {containing!r} in {timeout}s")

    @staticmethod
    def drain(sink: queue.Queue[str]) -> str:
        out = []
        while not sink.empty():
            out.append(sink.get_nowait())
        return "".join(out)

    def interrupt(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def watchers() -> Iterator[list[WatchProcess]]:
    started: list[WatchProcess] = []
    yield started
    for w in started:
        w.kill()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[MqttLink]:
    link = MqttLink(parse_broker_url(broker.url), "test-publisher", backoff_min_s=0.1, backoff_max_s=0.5)
    link.start()
    wait_for(link.connected.is_set, timeout=10, what="publisher connected")
    yield link
    link.stop()


def publish(link: MqttLink, topic: str, payload: Envelope | bytes, *, retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else payload.to_json()
    assert link.publish(topic, data, qos=1, retain=retain)


@needs_mosquitto
def test_json_lines_end_to_end_with_node_filter_and_ctrl_c(broker: Mosquitto, publisher: MqttLink,
                                                           watchers: list[WatchProcess]) -> None:
    # retained before any watcher runs: each watcher's first line, and proof it is subscribed
    publish(publisher, edge_topic("edge-a", "status"), status("edge-a", version="0.3.0"), retain=True)
    publish(publisher, edge_topic("edge-b", "status"), status("edge-b"), retain=True)
    time.sleep(0.2)
    everything = WatchProcess("--mqtt", broker.url, "--json")
    only_b = WatchProcess("--mqtt", broker.url, "--json", "--node", "edge-b")
    watchers += [everything, only_b]
    first = sorted([everything.line(), everything.line()], key=lambda line: line["topic"])
    assert [line["envelope"]["node"] for line in first] == ["edge-a", "edge-b"]
    assert all(line["retained"] for line in first) and first[0]["envelope"]["body"]["version"] == "0.3.0"
    assert only_b.line()["envelope"]["node"] == "edge-b"

    ahead = at(xid("edge-a", 5), time.time() + 30)  # edge-a's clock runs 30 s ahead
    publish(publisher, edge_topic("edge-a", "events"), ahead)
    publish(publisher, edge_topic("edge-b", "events"), decision("edge-b", 8))
    publish(publisher, edge_topic("edge-a", "telemetry"), b"\x00garbage")
    publish(publisher, edge_topic("edge-b", "events"), decision("edge-a", 9))  # node mismatch
    publish(publisher, "kgpu/v1/edge/edge-b/nonsense", decision("edge-b", 1))

    lines = [everything.line() for _ in range(5)]
    assert lines[0]["topic"] == edge_topic("edge-a", "events") and "retained" not in lines[0]
    assert Envelope.model_validate(lines[0]["envelope"]) == ahead
    assert -31 < lines[0]["lag_s"] < -29 and lines[0]["received_at"] == pytest.approx(time.time(), abs=10)
    assert lines[1]["envelope"]["kind"] == "decision" and lines[1]["envelope"]["seq"] == 8
    assert lines[2]["rejected"] == "not_json" and lines[2]["topic"] == edge_topic("edge-a", "telemetry")
    assert lines[2]["detail"]
    assert (lines[3]["rejected"], lines[4]["rejected"]) == ("node_mismatch", "bad_topic")

    # --node edge-b: edge-a's xid and garbage are not there, both edge-b rejections are
    filtered = [only_b.line() for _ in range(3)]
    assert filtered[0]["envelope"]["seq"] == 8
    assert [line.get("rejected") for line in filtered[1:]] == ["node_mismatch", "bad_topic"]
    time.sleep(0.3)
    assert only_b.stdout.empty()

    assert everything.interrupt() == 0 and only_b.interrupt() == 0
    assert "Traceback" not in everything.drain(everything.stderr)


@needs_mosquitto
def test_unreachable_broker_is_retried_and_said(tmp_path: Path, watchers: list[WatchProcess]) -> None:
    later = Mosquitto(tmp_path / "later")  # its port is chosen, nothing listens yet
    watcher = WatchProcess("--mqtt", later.url, "--json")
    watchers.append(watcher)
    line = watcher.stderr_line("cannot connect")
    assert line.startswith("kgpu watch: cannot connect to mqtt://127.0.0.1:") and "retrying" in line
    assert watcher.proc.poll() is None  # still trying
    later.start()
    try:
        watcher.stderr_line("connected to", timeout=15)
        assert watcher.interrupt() == 0
    finally:
        later.stop()


@needs_mosquitto
def test_live_display_in_process(broker: Mosquitto, publisher: MqttLink) -> None:
    publish(publisher, edge_topic("edge-live", "status"), status("edge-live", version="0.3.0"), retain=True)
    out = io.StringIO()
    console = Console(file=out, record=True, force_terminal=True, width=180, height=60)
    stop = threading.Event()
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(
        run_watch(WatchOptions(mqtt=broker.url), console=console, stop=stop, refresh_per_s=20)))
    runner.start()
    try:
        wait_for(lambda: "edge-live" in console.export_text(clear=False), timeout=10, what="the node row")
        publish(publisher, edge_topic("edge-live", "events"), xid("edge-live", 3))
        wait_for(lambda: "xid 79 on GPU 1" in console.export_text(clear=False), timeout=10, what="the event")
    finally:
        stop.set()
        runner.join(10)
    assert codes == [0]
    text = console.export_text()
    assert "online" in text and "connected" in text and "0.3.0" in text


def _read_pty(fd: int, until: list[str], timeout: float) -> str:
    """Read a pty until every string in `until` appeared (ANSI codes stripped), or time out."""
    buf = b""
    deadline = time.monotonic() + timeout
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            text = ansi.sub("", buf.decode(errors="replace"))
            if all(s in text for s in until):
                return text
    raise AssertionError(f"pty output lacks {until} after {timeout}s: {buf[-3000:]!r}")


@needs_mosquitto
def test_live_display_under_a_pty_and_ctrl_c(broker: Mosquitto, publisher: MqttLink) -> None:
    publish(publisher, edge_topic("edge-tty", "status"), status("edge-tty"), retain=True)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 180, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "180", "LINES": "50"}
    proc = subprocess.Popen([sys.executable, "-m", "kgpu", "watch", "--mqtt", broker.url], cwd=REPO, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        text = _read_pty(master, ["edge-tty", "online", "connected"], timeout=15)
        assert "msg/s" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


REAL_FLEET = [f"{FACTORY}07-gpu-node-01", f"{FACTORY}07-gpu-node-12", f"{FACTORY}12-gpu-node-01"]


@needs_mosquitto
def test_real_edges_at_80_columns_then_one_nodes_gpus(broker: Mosquitto, tmp_path: Path) -> None:
    edges = [EdgeProcess(tmp_path / name[-14:], node=name, gpus=2, mqtt=broker.url, config={"status_interval": 2})
             for name in REAL_FLEET]
    master = proc = None
    try:
        with ThreadPoolExecutor(len(edges)) as pool:  # side by side: each takes seconds to come up
            list(pool.map(lambda edge: edge.start(), edges))
        # the fleet in a real 80x24 terminal: each node by what sets it apart, the shared prefix once
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
        proc = subprocess.Popen([sys.executable, "-m", "kgpu", "watch", "--mqtt", broker.url], cwd=REPO, env=env,
                                stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        text = _read_pty(master, [f"nodes (3) named {FACTORY}*", "07-gpu-node-01  online", "07-gpu-node-12  online",
                                  "12-gpu-node-01  online", "(n/p: each node's GPUs)"], timeout=40)
        assert "edge-…" not in text and "factory-berlin-line-0…" not in text
        # keys: n shows the first node's GPUs, arrow down the next one's, a all nodes again
        os.write(master, b"n")
        _read_pty(master, ["node 1 of 3 · n/p", f"{REAL_FLEET[0]}  online", "GPUs (2)", "limit W"], timeout=15)
        os.write(master, b"\x1b[B")
        _read_pty(master, ["node 2 of 3", f"{REAL_FLEET[1]}  online", "limit W"], timeout=15)
        os.write(master, b"a")
        _read_pty(master, [f"nodes (3) named {FACTORY}*", "12-gpu-node-01  online"], timeout=15)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0

        # one node's GPUs, from its real status and telemetry, at 80 columns
        out = io.StringIO()
        console = Console(file=out, record=True, force_terminal=True, width=80, height=40)
        stop = threading.Event()
        runner = threading.Thread(target=run_watch, args=(WatchOptions(mqtt=broker.url, node=REAL_FLEET[1]),),
                                  kwargs={"console": console, "stop": stop, "refresh_per_s": 20})
        runner.start()
        row = r"^ +{} +healthy +(\d+) +(\d+) +(\d+) "
        try:
            wait_for(lambda: all(re.search(row.format(i), console.export_text(clear=False), re.M) for i in (0, 1)),
                     timeout=30, what="both GPUs with temperature, power and limit")
        finally:
            stop.set()
            runner.join(10)
        text = console.export_text()
        if os.environ.get("KGPU_SHOW_WATCH"):
            print(text[-3000:])
        assert f"{REAL_FLEET[1]}  online" in text and "GPUs (2)" in text
        for i in (0, 1):
            temperature, power, limit = map(int, re.findall(row.format(i), text, re.M)[-1])
            assert 0 < temperature < 120 and 0 < power <= limit
        assert REAL_FLEET[0] not in text and REAL_FLEET[2] not in text
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if master is not None:
            os.close(master)
        for edge in edges:
            edge.stop()
