"""The shared wire protocol: envelopes, bodies, topics, and hostile payloads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.body_fit import fit_body
from shared.gpu import GpuSample
from shared.partitioning import NodePartitioning
from shared.policy import PowerPolicy, XidAction
from shared.protocol import (
    EVENT_KINDS,
    MAX_PAYLOAD_BYTES,
    ROUTES,
    AckBody,
    CommandBody,
    CommandResultBody,
    DecisionBody,
    Direction,
    GpuOfflineStats,
    HealthBody,
    Kind,
    MigrationRequestBody,
    OfflineSummaryBody,
    PartitioningBody,
    PolicyBody,
    Reason,
    RebootRequestBody,
    RejectedMessage,
    StatusBody,
    TelemetryBody,
    XidBody,
    decode,
    decode_and_check,
    make_envelope,
    route_of,
)
from shared.topics import CLOUD_KINDS, EDGE_KINDS, BadTopic, cloud_topic, edge_topic, parse_topic
from shared.wire import WireModel


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


# ---- the one contract: which kinds travel on which topic, and decode_and_check -----------------

# DESIGN.md's topic table, written out: topic, direction, QoS, retained, what it carries.
CONTRACT = {
    "status": (Direction.EDGE_TO_CLOUD, 1, True, {Kind.STATUS}),
    "telemetry": (Direction.EDGE_TO_CLOUD, 0, False, {Kind.TELEMETRY}),
    "events": (Direction.EDGE_TO_CLOUD, 1, False, {Kind.DECISION, Kind.HEALTH, Kind.XID, Kind.MIGRATION_REQUEST,
                                                  Kind.REBOOT_REQUEST, Kind.COMMAND_RESULT, Kind.OFFLINE_SUMMARY}),
    "ack": (Direction.CLOUD_TO_EDGE, 1, False, {Kind.ACK}),
    "policy": (Direction.CLOUD_TO_EDGE, 1, True, {Kind.POLICY}),
    "commands": (Direction.CLOUD_TO_EDGE, 1, False, {Kind.COMMAND}),
}

SAMPLE_BODIES: dict[Kind, WireModel] = {
    Kind.STATUS: StatusBody(state="online", version="0.1.0"),
    Kind.TELEMETRY: TelemetryBody(samples=[GpuSample(index=0, uuid="GPU-0", ts=1.0, temperature_c=50.0)]),
    Kind.DECISION: DecisionBody(rule="power_cap", action="set_power_limit", value=250.0, outcome="applied",
                                reason="cap"),
    Kind.HEALTH: HealthBody(level="gpu", gpu_index=0, previous="healthy", current="unhealthy"),
    Kind.XID: XidBody(gpu_index=0, gpu_uuid="GPU-0", xid=79, action="request_migration"),
    Kind.MIGRATION_REQUEST: MigrationRequestBody(gpu_uuid="GPU-0", trigger="xid", reason="xid 79"),
    Kind.REBOOT_REQUEST: RebootRequestBody(gpu_uuid="GPU-0", reason="xid 79 survived 2 resets"),
    Kind.COMMAND_RESULT: CommandResultBody(command_id="c1", command="drain", ok=True),
    Kind.OFFLINE_SUMMARY: OfflineSummaryBody(from_ts=1.0, to_ts=2.0,
                                             gpus=[GpuOfflineStats(index=0, uuid="GPU-0", samples=3)]),
    Kind.ACK: AckBody(upto=3, epoch="e1"),
    Kind.POLICY: PolicyBody(policy=PowerPolicy(name="p", version=2)),
    Kind.COMMAND: CommandBody(command="drain", gpu_uuid="GPU-0"),
    Kind.PARTITIONING: PartitioningBody(partitioning=NodePartitioning.model_validate(
        {"name": "a100-mig", "version": 3, "models": {"NVIDIA A100-SXM4-40GB": {"mig": {"mixed": {"1g.5gb": 2}}},
                                                       "*": {"timeSlicing": {"replicas": 4}}}})),
}


def _topic(route_topic: str, node: str = "edge-a") -> str:
    route = ROUTES[route_topic]
    return (edge_topic if route.direction is Direction.EDGE_TO_CLOUD else cloud_topic)(node, route_topic)  # type: ignore[arg-type]


def _payload(kind: Kind, node: str = "edge-a", seq: int | None = 5) -> bytes:
    return make_envelope(node, SAMPLE_BODIES[kind], kind, seq=seq).to_json()


def test_the_table_is_the_designs_topic_table() -> None:
    assert set(SAMPLE_BODIES) == set(Kind)
    assert tuple(ROUTES) == EDGE_KINDS + CLOUD_KINDS, "shared.topics and the table name the same topics"
    for topic, (direction, qos, retained, kinds) in CONTRACT.items():
        route = ROUTES[topic]
        assert (route.topic, route.direction, route.qos, route.retained, set(route.kinds)) == (
            topic, direction, qos, retained, kinds), topic
        assert route.side == ("edge" if topic in EDGE_KINDS else "cloud")
        assert route.sequenced == (topic == "events")
    assert ROUTES["events"].kinds == EVENT_KINDS
    # every kind travels on exactly one topic, and route_of finds it
    assert sorted(k for route in ROUTES.values() for k in route.kinds) == sorted(Kind)
    for kind in Kind:
        assert kind in route_of(kind).kinds


@pytest.mark.parametrize("topic", list(CONTRACT))
@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_on_every_topic(topic: str, kind: Kind) -> None:
    """A valid envelope passes on its own topic and is a kind_mismatch on every other one."""
    route = ROUTES[topic]
    if kind in route.kinds:
        checked = decode_and_check(_topic(topic), _payload(kind), direction=route.direction, node="edge-a")
        assert checked.route is route and checked.envelope.kind is kind
        assert checked.body == SAMPLE_BODIES[kind] and type(checked.body) is type(SAMPLE_BODIES[kind])
        assert (checked.topic.side, checked.topic.node, checked.topic.kind) == (route.side, "edge-a", topic)
    else:
        with pytest.raises(RejectedMessage) as caught:
            decode_and_check(_topic(topic), _payload(kind))
        assert caught.value.reason == "kind_mismatch" and caught.value.topic is not None
        assert kind.value in caught.value.detail and topic in caught.value.detail


def _reason(topic: str, payload: bytes, **kwargs: object) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as caught:
        decode_and_check(topic, payload, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_each_rejection_reason() -> None:
    events = _topic("events")
    decision = _payload(Kind.DECISION)
    # the topic
    for bad in ("kgpu/v1/edge/edge-a", "kgpu/v2/edge/edge-a/events", "kgpu/v1/edge/Bad_Node/events",
                "kgpu/v1/edge/edge-a/bogus", "kgpu/v1/cloud/edge-a/events", "x"):
        rejected = _reason(bad, decision)
        assert rejected.reason == Reason.BAD_TOPIC == "bad_topic" and rejected.topic is None, bad
    # the direction: the cloud takes only edge topics, the edge only cloud topics
    rejected = _reason(_topic("ack"), _payload(Kind.ACK), direction=Direction.EDGE_TO_CLOUD)
    assert rejected.reason == "bad_topic" and "not an edge topic" in rejected.detail
    assert _reason(events, decision, direction=Direction.CLOUD_TO_EDGE).reason == "bad_topic"
    # a receiver that takes only its own node's messages
    rejected = _reason(_topic("ack", "edge-b"), _payload(Kind.ACK, "edge-b"), node="edge-a")
    assert rejected.reason == "node_mismatch" and "edge-b" in rejected.detail
    # the payload (decode's reasons, now with the topic they came on)
    for payload, reason in [(b"x" * (MAX_PAYLOAD_BYTES + 1), "oversize"), (b"{nope", "not_json"),
                            (b'{"v": 2, "node": "edge-a", "kind": "ack", "body": {"upto": 1}}', "version"),
                            (b'{"v": 1, "node": "edge-a", "seq": 1, "kind": "xid", "body": {"xid": "x"}}', "schema")]:
        rejected = _reason(events, payload)
        assert rejected.reason == reason and rejected.topic is not None and rejected.topic.node == "edge-a"
    # a node speaks only for itself
    rejected = _reason(events, _payload(Kind.DECISION, "edge-b"))
    assert rejected.reason == "node_mismatch" and rejected.payload_node == "edge-b"
    assert "edge-a" in rejected.detail and "edge-b" in rejected.detail
    # a kind on the wrong topic
    assert _reason(_topic("status"), decision).reason == "kind_mismatch"
    # an event without the seq it is deduplicated by; other topics need none
    assert _reason(events, _payload(Kind.DECISION, seq=None)).reason == "missing_seq"
    assert decode_and_check(_topic("status"), _payload(Kind.STATUS, seq=None)).envelope.seq is None
    # every reason is a plain string label, and the set is closed
    assert {r.value for r in Reason} == {"oversize", "not_json", "schema", "version", "bad_topic",
                                         "bad_topic_node", "node_mismatch", "kind_mismatch", "missing_seq"}
    assert type(_reason("x", b"").reason) is str


def test_the_checks_run_in_order() -> None:
    """The topic is judged before the payload, so garbage on a wrong topic counts as bad_topic."""
    assert _reason("kgpu/v1/edge/edge-a/bogus", b"{nope").reason == "bad_topic"
    assert _reason(_topic("ack"), b"{nope", direction=Direction.EDGE_TO_CLOUD).reason == "bad_topic"
    assert _reason(_topic("ack", "edge-b"), b"{nope", node="edge-a").reason == "node_mismatch"
    # a payload for another node with the wrong kind is first a node mismatch
    assert _reason(_topic("status"), _payload(Kind.DECISION, "edge-b")).reason == "node_mismatch"
    # and a bad body is a schema problem before it is on the wrong topic
    bad_xid = b'{"v": 1, "node": "edge-a", "seq": 1, "kind": "xid", "body": {"xid": "x"}}'
    assert _reason(_topic("status"), bad_xid).reason == "schema"


@settings(max_examples=300, deadline=None)
@given(topic=st.one_of(st.sampled_from([_topic(t, n) for t in CONTRACT for n in ("edge-a", "edge-b")]),
                       st.text(max_size=40)),
       payload=st.one_of(st.sampled_from([_payload(k, n, s) for k in Kind for n in ("edge-a", "edge-b")
                                          for s in (None, 1)]), st.binary(max_size=64)),
       direction=st.sampled_from([None, *Direction]), node=st.sampled_from([None, "edge-a"]))
def test_decode_and_check_never_raises_anything_but_a_rejection(topic: str, payload: bytes,
                                                                direction: Direction | None,
                                                                node: str | None) -> None:
    try:
        checked = decode_and_check(topic, payload, direction=direction, node=node)
    except RejectedMessage as exc:
        assert exc.reason in {r.value for r in Reason}
    else:
        route = checked.route
        assert checked.envelope.kind in route.kinds and checked.envelope.node == checked.topic.node
        assert direction in (None, route.direction) and node in (None, checked.topic.node)
        assert not route.sequenced or checked.envelope.seq is not None
