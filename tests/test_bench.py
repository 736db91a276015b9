"""The fleet simulator speaks the real protocol, and `python -m bench --quick` runs end to end.

No timing is asserted (figures come from bench/, not from tests): only that the simulator's
payloads are what the cloud accepts, that it follows the cloud's acks, policies and commands,
and that the runner's quick mode produces its table with sane, loss-free rows.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from cloud.ingest import validate
from kgpu.lab.broker import mosquitto_binary
from kgpu.lab.fleetsim import (
    FleetOptions,
    FleetSim,
    decision_body,
    envelope_json,
    offline_status_body,
    status_body,
    telemetry_body,
)
from shared.policy import PowerPolicy
from shared.protocol import (
    AckBody,
    CommandBody,
    CommandResultBody,
    DecisionBody,
    Kind,
    PolicyBody,
    StatusBody,
    TelemetryBody,
    TelemetryBodyStruct,
    make_envelope,
)
from shared.topics import cloud_topic

ROOT = Path(__file__).resolve().parents[1]


def test_every_payload_the_simulator_sends_is_accepted_by_the_cloud_validator() -> None:
    sim = FleetSim(FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=2, gpus=8, seed=1))
    node = sim.nodes[1]
    now = time.time()
    sent = [
        (node.topics["status"], envelope_json(node.name, "status", status_body(node, "9.9.9"))),
        (node.topics["status"], envelope_json(node.name, "status", offline_status_body(node))),
        (node.topics["telemetry"], envelope_json(node.name, "telemetry", telemetry_body(node, sim.rng, now), ts=now)),
        (node.topics["events"], envelope_json(node.name, "decision", decision_body(node, sim.rng), seq=1)),
        (node.topics["events"], envelope_json(node.name, "command_result",
                                              CommandResultBody(command_id="c1", command="drain", ok=True, detail=""),
                                              seq=2)),
    ]
    kinds = []
    for topic, payload in sent:
        incoming = validate(topic, payload, now)  # raises RejectedMessage if the cloud would refuse it
        assert incoming.envelope.node == node.name
        kinds.append(incoming.envelope.kind)
    assert kinds == [Kind.STATUS, Kind.STATUS, Kind.TELEMETRY, Kind.DECISION, Kind.COMMAND_RESULT]
    telemetry = validate(*sent[2], now).body
    # the ingest decodes telemetry into the Struct derived from TelemetryBody (shared/wire_structs.py)
    assert isinstance(telemetry, TelemetryBodyStruct) and len(telemetry.samples) == 8
    assert len({s.uuid for s in telemetry.samples}) == 8 and all(s.ts == now for s in telemetry.samples)
    # built with the protocol's own models (make_envelope checks the body's model against the kind)
    assert isinstance(status_body(node, "9.9.9"), StatusBody) and isinstance(decision_body(node, sim.rng), DecisionBody)


def test_the_simulators_telemetry_is_the_bytes_the_protocols_models_write() -> None:
    """Telemetry is kept as the Struct of a TelemetryBody and written by msgspec (for speed): the
    bytes must be those `make_envelope(...).to_json()` writes for the same body, id and ts."""
    sim = FleetSim(FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=2, gpus=8, seed=4))
    node = sim.nodes[0]
    for step in range(3):  # figures moved in place between messages
        now = time.time() + step
        body = telemetry_body(node, sim.rng, now)
        assert isinstance(body, TelemetryBodyStruct)
        payload = envelope_json(node.name, "telemetry", body, ts=now)
        sent = json.loads(payload)
        model = TelemetryBody.model_validate(msgspec.to_builtins(body))  # what the body is, as the model
        reference = make_envelope(node.name, model, Kind.TELEMETRY)
        reference.id, reference.ts = sent["id"], now
        assert payload == reference.to_json()
        assert sent["body"]["samples"][0]["ts"] == now and len(sent["body"]["samples"]) == 8
    with pytest.raises(ValueError, match="telemetry body"):
        envelope_json(node.name, "status", body)
    with pytest.raises(ValueError, match="bad node name"):
        envelope_json("Not A Node", "telemetry", body)


def test_the_simulator_follows_acks_policies_and_commands_like_an_edge() -> None:
    sim = FleetSim(FleetOptions(mqtt="mqtt://127.0.0.1:1", nodes=3, seed=2))
    node = sim.nodes[0]
    carried = {n.name: n for n in sim.nodes}
    for _ in range(5):
        sim.add_event(node, "decision", decision_body(node, random.Random(3)))
    assert sorted(node.outbox) == [1, 2, 3, 4, 5]

    def deliver(kind: str, body: object, node_name: str = node.name) -> None:
        envelope = make_envelope(node_name, body, {"ack": Kind.ACK, "policy": Kind.POLICY,  # type: ignore[arg-type]
                                                   "commands": Kind.COMMAND}[kind])
        sim.handle(carried, cloud_topic(node_name, kind), envelope.to_json())  # type: ignore[arg-type]

    deliver("ack", AckBody(upto=3, epoch=node.epoch))
    assert sorted(node.outbox) == [4, 5] and node.acked_upto == 3
    deliver("ack", AckBody(upto=5, epoch="another-epoch"))  # not ours: refused, nothing deleted
    assert sorted(node.outbox) == [4, 5] and sim.counters.rejected == {"ack_epoch": 1}
    deliver("ack", AckBody(upto=2, epoch=node.epoch))  # older: nothing changes
    assert node.acked_upto == 3 and sim.counters.stale_acks == 1

    deliver("policy", PolicyBody(policy=PowerPolicy(name="fleet", version=7)))
    assert (node.policy_name, node.policy_version) == ("fleet", 7)
    deliver("policy", PolicyBody(policy=PowerPolicy(name="fleet", version=6)))  # older: kept 7
    assert node.policy_version == 7

    command = make_envelope(node.name, CommandBody(command="drain", gpu_uuid=node.uuids[2]), Kind.COMMAND)
    for _ in range(2):  # a repeat of the same id is applied once
        sim.handle(carried, cloud_topic(node.name, "commands"), command.to_json())
    assert sim.counters.commands == 1 and sim.counters.commands_repeated == 1
    assert node.uuids[2] in node.draining
    result = json.loads(node.outbox[6].payload)
    assert result["kind"] == "command_result" and result["body"]["command_id"] == command.id

    # another node's message on this node's connection, and garbage: refused and counted
    sim.handle({node.name: node}, cloud_topic(sim.nodes[1].name, "ack"), b"{}")
    sim.handle(carried, cloud_topic(node.name, "ack"), b"\xff not json")
    assert sim.counters.rejected["node_mismatch"] == 1 and sim.counters.rejected["not_json"] == 1


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")
def test_bench_quick_runs_the_fleet_and_catch_up_benchmarks_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "fleet,catchup", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["benchmark"], r["figure"]): r for r in json.loads(out.read_text())["rows"]}
    table = run.stdout
    assert "| benchmark" in table and "reproduce" in table
    for (benchmark, figure), row in rows.items():
        assert benchmark in table and figure in table and row["command"].startswith("python -m bench.")

    fleet = {figure: r for (benchmark, figure), r in rows.items() if benchmark.startswith("fleet 20x2@1s")}
    lag = fleet["ingest lag, worst (events and telemetry)"]
    assert math.isfinite(lag["value"]) and lag["value"] > 0 and lag["unit"] == "s"
    assert fleet["messages dropped"]["value"] == 0
    assert fleet["controller CPU"]["value"] > 0

    catchup = {figure: r for (benchmark, figure), r in rows.items() if benchmark.startswith("outbox catch-up")}
    assert catchup["events lost"]["value"] == 0
    [backlog] = [r for figure, r in catchup.items() if figure.startswith("backlog of")]
    assert int(backlog["figure"].split()[2]) > 0 and backlog["value"] > 0  # there was a backlog, and it took time


def test_bench_thermal_settling_prints_each_case() -> None:
    """The thermal bench runs (simulated time: a second or two) and reports every model and start."""
    run = subprocess.run([sys.executable, "-m", "bench.thermal_settling"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if " now:" in line]
    assert len(lines) == 4 and all("step-downs" in line and "restores" in line for line in lines), run.stdout
