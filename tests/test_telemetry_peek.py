"""The controller's peek at telemetry (cloud/telemetry_peek.py): on what it reads, it agrees with
the full validation; what it cannot read goes to the full validation (None); what it lets through
and the full validation refuses is the sample writer process's to refuse (tests/test_sample_writer.py)."""

from __future__ import annotations

import json
import time

import pytest

from cloud.telemetry_peek import peek_telemetry
from kgpu.lab.fleetsim.node import envelope_json
from shared.protocol import Direction, Kind, StatusBody, TelemetryBody, decode_and_check
from shared.topics import edge_topic
from tests.test_fleet_store import NODE, sample


def telemetry(ts: float, indexes: tuple[int, ...] = (0, 1, 2)) -> bytes:
    return envelope_json(NODE, Kind.TELEMETRY, TelemetryBody(samples=[sample(i, ts) for i in indexes]), ts=ts)


def test_what_the_peek_reads_is_what_the_full_validation_reads() -> None:
    now = time.time()
    payload = telemetry(now)
    peeked = peek_telemetry(payload, NODE)
    checked = decode_and_check(edge_topic(NODE, "telemetry"), payload, direction=Direction.EDGE_TO_CLOUD,
                               typed_body_only=True)
    assert peeked is not None
    assert (peeked.node, peeked.ts, peeked.id) == (checked.envelope.node, checked.envelope.ts, checked.envelope.id)
    assert [(s.uuid, s.index) for s in peeked.body.samples] == [(s.uuid, s.index) for s in checked.body.samples]


def edited(payload: bytes, **changes: object) -> bytes:
    message = json.loads(payload)
    message.update(changes)
    return json.dumps(message).encode()


@pytest.mark.parametrize("why,payload", [
    ("another node's message on this node's topic", lambda p: edited(p, node="someone-else")),
    ("a status on the telemetry topic", lambda _p: envelope_json(NODE, Kind.STATUS, StatusBody(state="online"))),
    ("another schema version", lambda p: edited(p, v=2)),
    ("a time that is not a number", lambda p: edited(p, ts="now")),
    ("a time past what a float holds", lambda p: p.replace(b'"ts":', b'"ts":1e999,"x":', 1)),
    ("an id over 64 characters", lambda p: edited(p, id="x" * 65)),
    ("a negative GPU index", lambda p: p.replace(b'"index":0', b'"index":-1', 1)),
    ("not JSON", lambda _p: b"{not json"),
    ("over the payload limit", lambda p: p + b" " * (256 * 1024)),
])
def test_the_peek_leaves_to_the_full_validation_what_it_cannot_read(why: str, payload: object) -> None:
    made = payload(telemetry(time.time()))  # type: ignore[operator]
    assert peek_telemetry(made, NODE) is None, why


def test_figures_the_peek_does_not_read_are_not_its_to_refuse() -> None:
    message = json.loads(telemetry(time.time()))
    message["body"]["samples"][0]["temperature_c"] = "hot"
    assert peek_telemetry(json.dumps(message).encode(), NODE) is not None  # the sample writer process refuses it
