"""Hostile input on both sides' MQTT handlers (hypothesis): no crash, every message counted.

The cloud side runs the real validation and the real Ingestor into a real SQLite fleet store; the
edge side runs EdgeSync's handler against a real EdgeDaemon on the simulated driver.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.ingest import validate
from cloud.store import FleetStore
from shared.mqtt import Received
from shared.protocol import (
    DecisionBody,
    Envelope,
    Kind,
    RejectedMessage,
    TelemetryBodyStruct,
    _int64,
    _no_constant,
    _parse_fast,
    decode_and_check,
    envelope_of,
    make_envelope,
)
from tests.helpers.ingest import counted, ingest_all

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
nodes = st.sampled_from(["edge-a", "edge-b", "EDGE", "", "+", "a/b"])
topic_kinds = st.sampled_from(["status", "telemetry", "events", "ack", "policy", "commands", "x"])
topics = st.one_of(
    st.builds(lambda side, node, kind: f"kgpu/v1/{side}/{node}/{kind}", st.sampled_from(["edge", "cloud", "x"]),
              nodes, topic_kinds),
    st.text(max_size=40),
)
envelopes = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 1, 2, "1", None]),
    "node": nodes,
    "seq": st.one_of(st.none(), st.integers(min_value=-3, max_value=2**70)),
    "id": st.text(max_size=70),
    "ts": st.one_of(st.floats(allow_nan=False), st.text(max_size=5)),
    "kind": st.sampled_from([k.value for k in Kind] + ["nope"]),
    "body": json_values,
})
payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=6).map(
        lambda seq: make_envelope("edge-a", DecisionBody(rule="r", action="a", outcome="recorded", reason="x"),
                                  Kind.DECISION, seq=seq).to_json()),
)


@settings(max_examples=400, deadline=None)
@given(topic=topics, payload=payloads)
def test_validate_accepts_or_rejects_with_a_reason(topic: str, payload: bytes) -> None:
    try:
        incoming = validate(topic, payload, 0.0)
    except RejectedMessage as exc:
        assert exc.reason in {"bad_topic", "oversize", "not_json", "schema", "version", "node_mismatch",
                              "kind_mismatch", "missing_seq"}
    else:
        assert topic == f"kgpu/v1/edge/{incoming.envelope.node}/" + topic.rsplit("/", 1)[1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(topics, payloads), min_size=1, max_size=25))
def test_ingestor_counts_every_message_and_keeps_running(tmp_path: Path, messages: list[tuple[str, bytes]]) -> None:
    store = FleetStore(f"sqlite:///{tmp_path / 'fuzz.db'}")
    try:
        ingestor, acks = ingest_all(store, messages)
    finally:
        store.close()
    assert counted(ingestor) == len(messages)
    assert ingestor.store_errors == 0
    assert all(upto >= 0 for _, upto in acks)


@pytest.fixture
def edge_sync(tmp_path: Path):
    from edge import sim
    from edge.config import EdgeSettings
    from edge.daemon import EdgeDaemon
    from edge.sync import EdgeSync

    settings_ = EdgeSettings(node="edge-a", db=tmp_path / "e.db", backend="sim", mqtt="mqtt://127.0.0.1:1")
    simulated = sim.install(1, "T4")
    daemon = EdgeDaemon(settings_, sim=simulated)
    yield EdgeSync(daemon, settings_), daemon
    daemon.store.close()
    simulated.uninstall()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=topics, payload=payloads)
def test_edge_handler_never_crashes_and_counts_rejections(edge_sync, topic: str, payload: bytes) -> None:
    sync, daemon = edge_sync
    before = sum(sync.rejected.values())
    policy_before = daemon.policy.version
    asyncio.run(sync._handle(Received(topic, payload, False)))
    # nothing valid for edge-a can come out of this generator except by chance; if it was
    # refused it was counted, and no policy sneaked in from a bad message
    if sum(sync.rejected.values()) == before:
        assert topic.startswith("kgpu/v1/cloud/edge-a/")
    assert daemon.policy.version >= policy_before


def _reference(payload: bytes) -> object:
    """What the reference parser (json.loads with the 64-bit and no-NaN hooks) makes of it, or
    the reason it refuses it."""
    try:
        return json.loads(payload, parse_int=_int64, parse_constant=_no_constant)
    except Exception as exc:  # any refusal is one outcome
        return type(exc)


hostile_json = st.one_of(
    payloads,
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    json_values.map(lambda v: json.dumps(v).encode("utf-16")),
    st.sampled_from([b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":1e400}', b'{"a":"\\ud800"}', b'[' * 300 + b']' * 300,
                     b'{"a":12345678901234567890}', b'{"a":-9223372036854775809}', b'{"a":9223372036854775807}',
                     b'\xef\xbb\xbf{"a":1}', b'{"a":1,"a":2}', b'{"a":1} x', b'{"a":"x\ny"}']),
)


@settings(max_examples=500, deadline=None)
@given(payload=hostile_json)
def test_the_fast_json_parser_accepts_only_what_the_reference_accepts_and_the_same(payload: bytes) -> None:
    """shared.protocol decodes with pydantic-core's parser first and falls back to json.loads for
    everything it refuses: a message it accepts must be one json.loads accepts, parsed the same,
    so every counted rejection reason is still json.loads's."""
    fast = _parse_fast(payload)
    if fast is not None:
        assert fast == _reference(payload)  # (it refuses NaN: no value here is unequal to itself)


def _valid_telemetry_body() -> dict[str, object]:
    sample = {"index": 0, "uuid": "GPU-0", "ts": 1.5, "temperature_c": 40.0, "power_w": 100.5,
              "utilization_pct": 12.0, "memory_used_bytes": 10**9, "energy_mj": 10**10, "processes": [{"pid": 4}]}
    return {"samples": [sample, {**sample, "index": 1, "uuid": "GPU-1"}]}


def _mutated(body: dict[str, object], field: str, value: object) -> dict[str, object]:
    samples = [dict(s) for s in body["samples"]]  # type: ignore[attr-defined]
    samples[0][field] = value
    return {"samples": samples}


sample_fields = st.sampled_from(["index", "uuid", "ts", "temperature_c", "power_w", "memory_used_bytes",
                                 "energy_mj", "processes", "lost", "missing", "nope"])
VALID_TELEMETRY_ENVELOPE = {"v": 1, "node": "edge-a", "seq": None, "id": "m-1", "ts": 1.5, "kind": "telemetry"}
telemetry_envelopes = st.one_of(
    st.builds(lambda field, value: {**VALID_TELEMETRY_ENVELOPE, "body": _mutated(_valid_telemetry_body(), field,
                                                                                 value)},
              st.sampled_from(["index", "ts", "temperature_c", "power_w", "utilization_pct", "memory_used_bytes",
                               "energy_mj", "lost"]),
              st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False) | st.booleans()
              | st.sampled_from(["1", "1.5", "1e3", "inf", "true", " 2 "])),
    st.builds(lambda field, value: {**VALID_TELEMETRY_ENVELOPE, "body": _mutated(_valid_telemetry_body(), field,
                                                                                 value)},
              sample_fields, json_values | st.integers(min_value=-2**70, max_value=2**70)),
    st.builds(lambda field, value: {**VALID_TELEMETRY_ENVELOPE, field: value, "body": _valid_telemetry_body()},
              st.sampled_from(["v", "node", "seq", "id", "ts", "kind", "extra"]), json_values),
    st.builds(lambda env, field, value: {**env, "kind": "telemetry", "body": _mutated(_valid_telemetry_body(),
                                                                                        field, value)},
              envelopes, sample_fields, json_values | st.integers(min_value=-2**70, max_value=2**70)),
    st.builds(lambda env: {**env, "kind": "telemetry", "body": _valid_telemetry_body()}, envelopes),
    envelopes,
)


@settings(max_examples=500, deadline=None)
@given(envelope=telemetry_envelopes)
def test_telemetry_validated_from_json_accepts_and_refuses_as_decode(envelope: dict[str, object]) -> None:
    """The ingest validates telemetry straight from its JSON into msgspec Structs (`typed_body_only`):
    every message it accepts, the reference path accepts with the same envelope and body; any
    other gets the reference's reason."""
    topic = f"kgpu/v1/edge/{envelope['node']}/telemetry"
    payload = json.dumps(envelope).encode()
    try:
        reference = decode_and_check(topic, payload)
    except RejectedMessage as exc:
        reference_reason: str | None = exc.reason
    else:
        reference_reason = None
    try:
        fast = decode_and_check(topic, payload, typed_body_only=True)
    except RejectedMessage as exc:
        assert exc.reason == reference_reason
    else:
        assert reference_reason is None
        assert isinstance(fast.body, TelemetryBodyStruct)  # msgspec's Struct (shared/wire_structs.py)
        assert msgspec.to_builtins(fast.body) == reference.body.model_dump(mode="json")
        assert fast.envelope.model_dump(exclude={"body"}) == reference.envelope.model_dump(exclude={"body"})
        assert fast.envelope.body == {}  # not built: the ingest reads the typed body only


def test_the_hot_path_envelope_is_the_one_model_construct_makes() -> None:
    """The ingest builds telemetry envelopes without pydantic's `model_construct` (shared/protocol.py
    `envelope_of`, for speed): what it makes must stay what `model_construct` makes, through
    pydantic upgrades (fields, fields set, extras, private state, equality, dumps, copies)."""
    made = envelope_of("edge-a", 7, "m-1", 1.5, Kind.TELEMETRY)
    reference = Envelope.model_construct(None, v=1, node="edge-a", seq=7, id="m-1", ts=1.5,
                                         kind=Kind.TELEMETRY, body={})
    assert made == reference
    assert made.model_fields_set == reference.model_fields_set
    assert made.__pydantic_extra__ == reference.__pydantic_extra__
    assert made.__pydantic_private__ == reference.__pydantic_private__
    assert made.model_dump_json() == reference.model_dump_json()
    assert made.model_copy(update={"seq": 8}) == reference.model_copy(update={"seq": 8})


@pytest.mark.parametrize(("power", "accepted"), [
    ("1e19", True),  # a float literal beyond the Structs' bounds: the reference takes it
    ("-1e300", True),
    ("9223372036854775807", True),  # the largest 64-bit integer (read as a float at the bound: the reference)
    ("9223372036854775808", False),  # one past it: the reference's 64-bit check refuses any such integer
    ("-9223372036854775809", False),
    ("123456789012345678901234567890", False),
])
def test_a_float_field_beyond_64_bits_gets_the_references_answer_without_a_scan(power: str, accepted: bool) -> None:
    """The hot path no longer scans each payload for runs of 19 digits: float fields are bounded
    inside +-2**63 in the Structs (shared/wire_structs.py `_float_bounds`), so what lies beyond
    goes to the reference decoder, which refuses an integer past 64 bits and takes a float."""
    envelope = {"v": 1, "node": "edge-a", "seq": None, "id": "m1", "ts": 1.5, "kind": "telemetry",
                "body": _valid_telemetry_body()}
    payload = json.dumps(envelope).encode().replace(b'"power_w": 100.5', b'"power_w": ' + power.encode(), 1)
    topic = "kgpu/v1/edge/edge-a/telemetry"
    if not accepted:
        with pytest.raises(RejectedMessage) as refused:
            decode_and_check(topic, payload, typed_body_only=True)
        assert refused.value.reason == "schema"
        with pytest.raises(RejectedMessage):
            decode_and_check(topic, payload)
        return
    fast = decode_and_check(topic, payload, typed_body_only=True)
    reference = decode_and_check(topic, payload)
    assert isinstance(fast.body, TelemetryBodyStruct)
    assert fast.body.samples[0].power_w == float(power) == reference.body.samples[0].power_w  # type: ignore[attr-defined]
    assert msgspec.to_builtins(fast.body) == reference.body.model_dump(mode="json")
