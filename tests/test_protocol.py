"""The shared wire protocol: envelopes, bodies, topics, and hostile payloads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.policy import PowerPolicy, XidAction
from shared.protocol import (
    MAX_PAYLOAD_BYTES,
    CommandResultBody,
    DecisionBody,
    HealthBody,
    Kind,
    MigrationRequestBody,
    PolicyBody,
    RejectedMessage,
    decode,
    fit_body,
    make_envelope,
)
from shared.topics import BadTopic, cloud_topic, edge_topic, parse_topic


def test_round_trip_every_field() -> None:
    body = DecisionBody(gpu_index=0, gpu_uuid="GPU-1", rule="thermal_step_down", action="set_power_limit",
                        value=630.0, outcome="applied", reason="hot", inputs={"temperature_c": 88.0})
    envelope = make_envelope("edge-1", body, Kind.DECISION, seq=7)
    decoded, parsed = decode(envelope.to_json())
    assert decoded == envelope and parsed == body
    assert json.loads(envelope.to_json())["v"] == 1


def test_policy_travels_in_camel_case() -> None:
    policy = PowerPolicy(name="p", version=3, power_cap_watts=250)
    envelope = make_envelope("edge-1", PolicyBody(policy=policy), Kind.POLICY)
    raw = json.loads(envelope.to_json())
    assert raw["body"]["policy"]["powerCapWatts"] == 250
    assert decode(envelope.to_json())[1].policy == policy


@pytest.mark.parametrize("payload,reason", [
    (b"\xff\xfe", "not_json"),
    (b"[1,2]", "schema"),
    (b'{"v": 2, "node": "a", "kind": "ack", "body": {"upto": 1}}', "version"),
    (b'{"v": 1, "node": "a", "kind": "ack", "body": {"upto": -1}}', "schema"),
    (b'{"v": 1, "node": "A_B", "kind": "ack", "body": {"upto": 1}}', "schema"),
    (b'{"v": 1, "node": "a", "kind": "nope", "body": {}}', "schema"),
    (b'{"v": 1, "node": "a", "kind": "ack", "body": {"upto": 1}, "extra": 1}', "schema"),
    (b'{"v": 1, "node": "a", "kind": "ack", "body": {"upto": 1, "x": 2}}', "schema"),
    (b"[" * 200_000 + b"]" * 200_000, "oversize"),
    (b"[" * 100_000 + b"]" * 100_000, "not_json"),  # under the size limit, too deep to parse
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "not_json"),
    # numbers no database column holds: a poison message for the whole ingest batch otherwise
    (b'{"v": 1, "node": "a", "seq": 9223372036854775808, "kind": "ack", "body": {"upto": 1}}', "schema"),
    (b'{"v": 1, "node": "a", "kind": "ack", "body": {"upto": -9223372036854775809}}', "schema"),
    (b'{"v": 1, "node": "a", "kind": "ack", "body": {"upto": ' + b"9" * 5000 + b"}}", "not_json"),
    (b'{"v": 1, "node": "a", "ts": NaN, "kind": "ack", "body": {"upto": 1}}', "schema"),
    (b'{"v": 1, "node": "a", "ts": -Infinity, "kind": "ack", "body": {"upto": 1}}', "schema"),
    (b'{"v": 1, "node": "\xc3\x28", "kind": "ack", "body": {"upto": 1}}', "not_json"),  # not UTF-8
])
def test_bad_payloads_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RejectedMessage) as caught:
        decode(payload)
    assert caught.value.reason == reason


def test_the_largest_integers_that_fit_still_pass() -> None:
    envelope, body = decode(b'{"v": 1, "node": "a", "seq": 9223372036854775807, "kind": "ack", '
                            b'"body": {"upto": 9223372036854775807}}')
    assert envelope.seq == 2**63 - 1 and body.upto == 2**63 - 1


def test_oversize_limit_is_exact() -> None:
    with pytest.raises(RejectedMessage, match="oversize"):
        decode(b" " * (MAX_PAYLOAD_BYTES + 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"v": st.sampled_from([1, 1, 2, "1"]), "node": st.text(max_size=10),
                           "kind": st.sampled_from([k.value for k in Kind] + ["x"]),
                           "seq": st.one_of(st.none(), st.integers()), "body": json_values})
    .map(lambda v: json.dumps(v).encode()),
))
def test_decode_never_raises_anything_but_a_rejection(payload: bytes) -> None:
    try:
        envelope, body = decode(payload)
    except RejectedMessage as exc:
        assert exc.reason in {"oversize", "not_json", "schema", "version"}
    else:
        assert envelope.v == 1 and body is not None


def test_topics() -> None:
    assert edge_topic("n1", "events") == "kgpu/v1/edge/n1/events"
    assert cloud_topic("n1", "ack") == "kgpu/v1/cloud/n1/ack"
    parts = parse_topic("kgpu/v1/edge/n1/status")
    assert (parts.side, parts.node, parts.kind) == ("edge", "n1", "status")
    for bad in ("kgpu/v1/edge/n1", "kgpu/v2/edge/n1/status", "kgpu/v1/edge/+/status", "kgpu/v1/cloud/n1/status",
                "kgpu/v1/edge/N1/status", "kgpu/v1/edge/n1/status/x"):
        with pytest.raises(BadTopic):
            parse_topic(bad)


@pytest.mark.parametrize("spec,problem", [
    ({"thermalThrottling": {"maxTempC": 500}}, "maxTempC"),
    ({"powerCapWatts": -5}, "powerCapWatts"),
    ({"thermalThrottling": {"coolDownPeriod": "soon"}}, "coolDownPeriod"),
    ({"powerSaving": {"capPercent": 0}}, "capPercent"),
    ({"xidPolicy": {"defaultAction": "explode"}}, "defaultAction"),
    ({"unknownKnob": 1}, "unknownKnob"),
])
def test_absurd_policies_are_refused(spec: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        PowerPolicy.model_validate(spec)


def test_xid_policy_defaults_follow_the_device_plugin() -> None:
    xids = PowerPolicy().xid_policy
    assert all(xids.action_for(x) is None for x in (13, 31, 43, 45, 68, 109))
    assert xids.action_for(79) is XidAction.REQUEST_MIGRATION
    assert xids.action_for(62) is XidAction.MARK_UNHEALTHY


# ---- fit_body: an event the broker would drop is cut to fit instead ---------------------------


def _decision(reason: str, inputs: dict | None = None) -> DecisionBody:
    return DecisionBody(gpu_index=0, gpu_uuid="GPU-0", rule="xid", action="mark_unhealthy", outcome="recorded",
                        reason=reason, inputs=inputs or {}, policy_version=1)


def test_a_body_that_fits_is_left_alone() -> None:
    body = _decision("short")
    assert fit_body("edge-a", Kind.DECISION, body) is body


def test_a_body_too_big_for_the_broker_is_cut_to_fit_and_says_so() -> None:
    body = _decision("x" * 300_000 + "END", {f"k{i}": "y" * 1000 for i in range(1000)})
    assert len(make_envelope("edge-a", body, Kind.DECISION, 1).to_json()) > MAX_PAYLOAD_BYTES
    cut = fit_body("edge-a", Kind.DECISION, body)
    payload = make_envelope("edge-a", cut, Kind.DECISION, 2**63 - 1).to_json()
    assert len(payload) <= MAX_PAYLOAD_BYTES
    _, decoded = decode(payload)  # the cloud takes it
    assert isinstance(decoded, DecisionBody)
    assert decoded.reason.startswith("x" * 1000) and decoded.reason.endswith("characters cut]")
    assert "END" not in decoded.reason
    # what is not text is kept as it was
    assert (decoded.rule, decoded.action, decoded.gpu_uuid, decoded.policy_version) == ("xid", "mark_unhealthy",
                                                                                      "GPU-0", 1)


long_text = st.text(min_size=0, max_size=3000)


@settings(max_examples=60, deadline=None)
@given(st.one_of(
    st.builds(lambda r, i: (Kind.DECISION, _decision(r, i)), long_text,
              st.dictionaries(st.text(max_size=300), st.one_of(long_text, st.lists(long_text, max_size=30)),
                              max_size=40)),
    st.builds(lambda rs: (Kind.HEALTH, HealthBody(level="gpu", gpu_index=1, gpu_uuid="GPU-1", previous="healthy",
                                                   current="unhealthy", reasons=rs)),
              st.lists(long_text, max_size=60)),
    st.builds(lambda r: (Kind.MIGRATION_REQUEST, MigrationRequestBody(gpu_uuid="GPU-1", trigger="xid", reason=r)),
              long_text),
    st.builds(lambda d, c: (Kind.COMMAND_RESULT, CommandResultBody(command_id=c, command="drain", ok=False,
                                                                   detail=d)),
              long_text, st.text(min_size=1, max_size=64)),  # an envelope id: at most 64
))
def test_every_event_body_is_cut_to_any_limit_and_stays_valid(kind_and_body: tuple[Kind, object]) -> None:
    kind, body = kind_and_body
    limit = 4096  # small, so that hypothesis' modest bodies need cutting
    cut = fit_body("edge-a", kind, body, max_bytes=limit)  # type: ignore[arg-type]
    payload = make_envelope("edge-a", cut, kind, 2**63 - 1).to_json()
    assert len(payload) <= limit
    _, decoded = decode(payload)
    assert type(decoded) is type(body)
    if len(make_envelope("edge-a", body, kind, 2**63 - 1).to_json()) <= limit:  # type: ignore[arg-type]
        assert cut is body
