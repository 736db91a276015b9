"""The wire contract: the envelope every MQTT message travels in, the body of each message
kind, which kinds travel on which topic (`ROUTES`, the one table), and the one function every
receiver checks a message with (`decode_and_check`).

`{"v": 1, "node": ..., "seq": ..., "id": ..., "ts": ..., "kind": ..., "body": {...}}`

`seq` is assigned by the edge's SQLite outbox, per node, monotonic; messages that do not go
through the outbox (status, telemetry, and everything the cloud sends) carry `seq: null`.

The cloud's ingest, the edge's sync, `kgpu watch` and the fleet simulator all receive through
`decode_and_check`, so a message one of them refuses is refused by all of them, with the same
reason (the `reason` label of the `*_rejected_total` counters).
"""

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

import msgspec
from pydantic import Field, SerializerFunctionWrapHandler, ValidationError, field_validator, model_serializer
from pydantic_core import from_json

from shared.gpu import GpuSample, Health
from shared.partitioning import NodePartitioning
from shared.policy import PowerPolicy
from shared.topics import NODE_NAME_RE, BadTopic, BadTopicNode, TopicParts, parse_topic
from shared.wire import WireModel
from shared.wire_structs import TelemetryRecord, UnsupportedModel, built_as_is, struct_of, takes_any_value

SCHEMA_VERSION: Literal[1] = 1
MAX_PAYLOAD_BYTES = 256 * 1024


class Kind(StrEnum):
    # edge -> cloud, `status` topic
    STATUS = "status"
    # edge -> cloud, `telemetry` topic
    TELEMETRY = "telemetry"
    # edge -> cloud, `events` topic (through the outbox)
    DECISION = "decision"
    HEALTH = "health"
    XID = "xid"
    MIGRATION_REQUEST = "migration_request"
    REBOOT_REQUEST = "reboot_request"
    COMMAND_RESULT = "command_result"
    OFFLINE_SUMMARY = "offline_summary"
    # cloud -> edge
    ACK = "ack"
    POLICY = "policy"
    COMMAND = "command"
    PARTITIONING = "partitioning"


EVENT_KINDS = frozenset(
    {
        Kind.DECISION,
        Kind.HEALTH,
        Kind.XID,
        Kind.MIGRATION_REQUEST,
        Kind.REBOOT_REQUEST,
        Kind.COMMAND_RESULT,
        Kind.OFFLINE_SUMMARY,
    }
)


class ActionOutcome(StrEnum):
    APPLIED = "applied"  # the driver took it
    ADVISORY = "advisory"  # the driver refused (no permission, not supported): recorded only
    FAILED = "failed"  # the driver errored for another reason
    RECORDED = "recorded"  # nothing to apply (health marks, migration requests)


# ---- bodies ---------------------------------------------------------------------------------


class MigDeviceSummary(WireModel):
    """One MIG device of a GPU (a GPU instance with its compute instance), as the edge made it."""

    uuid: str  # MIG-... (what NVIDIA_VISIBLE_DEVICES and the device plugin name it by)
    profile: str  # 1g.10gb (dcgm-exporter's GPU_I_PROFILE)
    gi_id: int = Field(ge=0)  # GPU instance id (dcgm-exporter's GPU_I_ID)
    ci_id: int = Field(0, ge=0)
    memory_total_bytes: int | None = Field(None, ge=0)
    health: Health = Health.HEALTHY


class GpuSummary(WireModel):
    index: int
    uuid: str
    name: str
    health: Health
    power_limit_w: float | None = None
    draining: bool = False  # the cloud asked for work to be moved off this GPU
    # inventory the cloud's fleet exporter labels series with (dcgm-exporter's `pci_bus_id` and
    # `DCGM_FI_DRIVER_VERSION`); None from an edge older than the fleet exporter
    pci_bus_id: str | None = None
    driver_version: str | None = None
    # for the GFD-style node labels and placement (None from an edge older than issue 13)
    memory_total_bytes: int | None = Field(None, ge=0)
    cuda_version: str | None = None
    architecture: str | None = None  # hopper, ampere, ... (GFD's nvidia.com/gpu.family)
    mig_mode: bool | None = None  # None: MIG not supported
    mig_devices: list[MigDeviceSummary] = Field(default_factory=list)
    replicas: int | None = Field(None, ge=1)  # time-slicing: devices advertised for this GPU
    # The pods using this GPU (whole, one of its MIG devices or a time-slicing replica), as
    # "namespace/name", from the kubelet's pod-resources API or NVML's processes (the status's
    # `pod_map_source`); a fault moves only these (issue 14). Empty from an older edge.
    pods: list[str] = Field(default_factory=list, max_length=1000)
    # Where the remediation ladder stands for this GPU (edge/remediation/): None when in service.
    remediation: str | None = Field(None, max_length=200)
    # The device layer (issue 16), from the inventory; None from an older edge (an NVIDIA GPU on NVML).
    vendor: Literal["nvidia", "amd", "intel"] | None = None
    backend: Literal["nvml", "jetson", "amd", "intel"] | None = None
    platform: str | None = Field(None, max_length=64)
    resource_name: str | None = Field(None, max_length=253)
    capabilities: list[str] | None = Field(None, max_length=32)


class StatusBody(WireModel):
    state: Literal["online", "offline"]
    version: str | None = None
    gpus: list[GpuSummary] = Field(default_factory=list)
    policy_name: str | None = None
    policy_version: int | None = None
    outbox_depth: int | None = None
    # Random id of the edge's outbox, made when its database is created. If a node's database is
    # re-created its seq starts again at 1; the epoch tells the cloud so, and acks name it.
    outbox_epoch: str | None = Field(None, max_length=64)
    degraded: list[str] = Field(default_factory=list)
    # The edge's own acked_upto in `outbox_epoch`: every seq up to here was stored by a cloud
    # before. A fleet database that holds less was restored or replaced: the cloud moves its
    # acked_seq up to here instead of waiting forever for events the edge has deleted.
    outbox_acked: int | None = Field(None, ge=0)
    # The partitioning (shared.partitioning.NodePartitioning) the edge has applied: its name and
    # version, and one line on where it stands (applied, waiting for a drain, refused: why).
    partitioning_name: str | None = None
    partitioning_version: int | None = None
    partitioning_state: str | None = Field(None, max_length=1000)
    # Where `GpuSummary.pods` came from: "pod-resources" (the kubelet's API: every allocated
    # device), "processes" (NVML's processes -> cgroup -> pod: only pods running GPU work now);
    # None: unknown, so the cloud moves every GPU pod of the node on a fault.
    pod_map_source: Literal["pod-resources", "processes"] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_outbox_acked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An edge without the figure (its last will) stays readable by an older controller.
        data: dict[str, Any] = handler(self)
        if data.get("outbox_acked") is None:
            data.pop("outbox_acked", None)
        return data


class TelemetryBody(WireModel):
    samples: list[GpuSample]


class DecisionBody(WireModel):
    """One decision of the edge's power policy or health checks, and what came of it."""

    gpu_index: int | None = None
    gpu_uuid: str | None = None
    rule: str  # e.g. thermal_step_down, thermal_restore, power_saving, power_cap, xid, ecc_dbe
    action: str  # set_power_limit, lock_clocks, reset_clocks, mark_unhealthy, ...
    value: float | None = None
    outcome: ActionOutcome
    reason: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    policy_version: int | None = None


class HealthBody(WireModel):
    level: Literal["node", "gpu", "app"]
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    previous: Health
    current: Health
    reasons: list[str] = Field(default_factory=list)


class XidBody(WireModel):
    gpu_index: int
    gpu_uuid: str
    xid: int
    action: str  # the XidAction taken, or "ignored"


class MigrationRequestBody(WireModel):
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    trigger: str  # critical_temperature, xid, ecc_dbe, ...
    reason: str


class RebootRequestBody(WireModel):
    """The remediation ladder's last step: the edge asks the cloud to reboot its node, which
    grants it under the circuit breaker (cloud/reboots/) with a `reboot` command."""

    gpu_index: int | None = None
    gpu_uuid: str | None = None
    reason: str = Field(max_length=2000)
    attempt: int = Field(1, ge=1)  # the ladder's escalation count for this fault


class CommandResultBody(WireModel):
    command_id: str
    command: str
    ok: bool
    detail: str = ""


class GpuOfflineStats(WireModel):
    index: int
    uuid: str
    samples: int
    temperature_c: tuple[float, float, float] | None = None  # min, max, mean
    power_w: tuple[float, float, float] | None = None
    utilization_pct: tuple[float, float, float] | None = None


class OfflineSummaryBody(WireModel):
    from_ts: float
    to_ts: float
    gpus: list[GpuOfflineStats]


class AckBody(WireModel):
    upto: int = Field(ge=0)  # every event with seq <= upto is stored by the cloud
    epoch: str | None = Field(None, max_length=64)  # the outbox epoch this ack is for
    # The cloud holds different events (another envelope id) under seqs the edge just sent in
    # this epoch: the edge's store went back in time. The edge starts a new epoch (renumbering
    # what it has not had acked) before it sends again. Only `upto` is acked, never past them.
    conflict: bool = False
    # Seconds the cloud's ingest is behind: the edge waits longer to re-send (edge/sync.py
    # `resend_wait`). Only for edges that read it: an older edge refuses the whole ack.
    behind_s: float | None = Field(None, ge=0, le=86_400)

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when set, so that an edge older than a field accepts every other ack.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v or k not in ("conflict", "behind_s")}


class PolicyBody(WireModel):
    policy: PowerPolicy


class PartitioningBody(WireModel):
    partitioning: NodePartitioning


class CommandBody(WireModel):
    command: Literal["drain", "migrate_away", "restart_check", "undrain", "reboot"]
    gpu_uuid: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)


BODY_MODELS: dict[Kind, type[WireModel]] = {
    Kind.STATUS: StatusBody,
    Kind.TELEMETRY: TelemetryBody,
    Kind.DECISION: DecisionBody,
    Kind.HEALTH: HealthBody,
    Kind.XID: XidBody,
    Kind.MIGRATION_REQUEST: MigrationRequestBody,
    Kind.REBOOT_REQUEST: RebootRequestBody,
    Kind.COMMAND_RESULT: CommandResultBody,
    Kind.OFFLINE_SUMMARY: OfflineSummaryBody,
    Kind.ACK: AckBody,
    Kind.POLICY: PolicyBody,
    Kind.COMMAND: CommandBody,
    Kind.PARTITIONING: PartitioningBody,
}


# ---- the envelope ---------------------------------------------------------------------------


class Envelope(WireModel):
    v: Literal[1] = SCHEMA_VERSION
    node: str
    seq: int | None = Field(None, ge=0)
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    ts: float = Field(default_factory=time.time)  # unix seconds, sender's clock
    kind: Kind
    body: dict[str, Any]

    @field_validator("node")
    @classmethod
    def _node_name(cls, node: str) -> str:
        if not NODE_NAME_RE.match(node):
            raise ValueError(f"not a valid node name: {node!r}")
        return node

    def parsed_body(self) -> WireModel:
        """The body validated against its kind's model (raises pydantic's ValidationError)."""
        return BODY_MODELS[self.kind].model_validate(self.body)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def make_envelope(node: str, body: WireModel, kind: Kind, seq: int | None = None) -> Envelope:
    if not isinstance(body, BODY_MODELS[kind]):
        raise TypeError(f"{kind} expects {BODY_MODELS[kind].__name__}, got {type(body).__name__}")
    return Envelope(node=node, seq=seq, kind=kind, body=body.model_dump(mode="json", by_alias=True))


class Reason(StrEnum):
    """Why a message is refused: the `reason` label of `kgpu_*_rejected_total` (a fixed set)."""

    OVERSIZE = "oversize"  # over MAX_PAYLOAD_BYTES
    NOT_JSON = "not_json"  # not UTF-8, not JSON, or nested too deeply to parse
    SCHEMA = "schema"  # JSON, but not a valid envelope or not a valid body for its kind
    VERSION = "version"  # an envelope version this kgpu does not speak
    BAD_TOPIC = "bad_topic"  # not a kgpu/v1 topic, or a topic of the other direction
    BAD_TOPIC_NODE = "bad_topic_node"  # the node spans several topic levels that form no node name
    NODE_MISMATCH = "node_mismatch"  # the payload's node is not the topic's (or not the receiver)
    KIND_MISMATCH = "kind_mismatch"  # a kind that does not travel on this topic
    MISSING_SEQ = "missing_seq"  # an event without the outbox seq it is deduplicated by


class RejectedMessage(ValueError):
    """A payload we refuse. `reason` is a short label for counters (`kgpu_*_rejected_total`).

    `topic` is the parsed topic when it parsed; `payload_node` the node the payload claims (set
    for node_mismatch), so a monitor can show the message under both nodes it names."""

    def __init__(self, reason: str, detail: str, *, topic: TopicParts | None = None,
                 payload_node: str | None = None) -> None:
        reason = str(reason)  # a plain str for counters and metric labels, even from a Reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.topic = topic
        self.payload_node = payload_node


class _OutOfRange(ValueError):
    """A JSON number no store column can hold."""


def _int64(text: str) -> int:
    """Every integer on the wire must fit a BIGINT: one that does not would make the fleet store's
    write fail for the whole batch, again and again (a poison message)."""
    value = int(text)
    if len(text) > 18 and not -(2**63) <= value < 2**63:
        raise _OutOfRange(f"integer {text[:24]}... does not fit in 64 bits")
    return value


def _no_constant(name: str) -> float:
    raise _OutOfRange(f"{name} is not a number JSON allows")


# Any integer that may not fit 64 bits has at least 19 digits in a row (so do some long floats:
# they merely take the reference parser). Digits are mapped to one, then that run is looked for.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def _parse_fast(payload: bytes) -> Any:
    """The payload parsed by pydantic-core's JSON parser (in Rust, 3x json.loads with our hooks),
    or None where the reference parser must decide: anything it refuses (NaN, not UTF-8, a UTF-16
    payload, lone surrogates, deep nesting: the reference gives the reason), and any payload with
    a number of 19 digits or more (the 64-bit check). Where it succeeds it gives what
    `json.loads` gives, so a message accepted here is accepted there, the same."""
    if not isinstance(payload, bytes | bytearray) or _LONG_NUMBER in payload.translate(_DIGITS_AS_ZERO):
        return None
    try:
        return from_json(payload, allow_inf_nan=False, cache_strings="keys")
    except Exception:  # noqa: BLE001 - whatever it refuses, the reference parser decides why
        return None


class _TelemetryEnvelope(Envelope):
    """A telemetry envelope with its body typed: the model its msgspec Struct is derived from."""

    body: TelemetryBody  # type: ignore[assignment]


# The Structs of the controller's hot path (shared/wire_structs.py): the envelope's node-name
# validator is applied by `_decode_telemetry_fast` itself.
# (Typed Any: mypy cannot see the fields of a class made at run time; TelemetryRecord describes them.)
TelemetryEnvelopeStruct: Any = struct_of(_TelemetryEnvelope, checked_by_caller=frozenset({"node"}))
TelemetryBodyStruct: Any = struct_of(TelemetryBody)
GpuSampleStruct: Any = struct_of(GpuSample)
_TELEMETRY_DECODER = msgspec.json.Decoder(TelemetryEnvelopeStruct)
if takes_any_value(TelemetryEnvelopeStruct):  # _decode_telemetry_fast's 64-bit check is the Structs' bounds
    raise UnsupportedModel("a telemetry field typed Any: _decode_telemetry_fast would keep an integer beyond 64 bits")


def _decode_telemetry_fast(payload: bytes, topic_node: str) -> tuple[Envelope, Any] | None:
    """A telemetry message validated straight from its JSON into Structs (msgspec; its body a
    `TelemetryBodyStruct`, its samples `GpuSampleStruct`s), or None where `decode` must decide
    (anything this refuses, another kind): what this accepts, `decode` accepts the same
    (tests/test_ingest_fuzz.py). The envelope's `body` is left empty: only the typed body is
    kept. `topic_node`: the topic's node, a valid name already. An integer beyond 64 bits is
    refused by the Structs' own bounds, floats' included (shared/wire_structs.py
    `_float_bounds`), and `decode` then gives the reason."""
    if not isinstance(payload, bytes | bytearray):
        return None
    try:
        typed: Any = _TELEMETRY_DECODER.decode(payload)
    except msgspec.MsgspecError:  # whatever it refuses, `decode` decides why
        return None
    if typed.kind is not Kind.TELEMETRY or typed.node != topic_node and not NODE_NAME_RE.match(typed.node):
        return None
    return envelope_of(typed.node, typed.seq, typed.id, typed.ts, Kind.TELEMETRY), typed.body


def _telemetry_struct_of(body: TelemetryBody) -> Any:
    """A telemetry body pydantic accepted as the ingest's Struct: converted (checked again), or,
    where a float is beyond the Structs' +-2**63 (shared/wire_structs.py `_float_bounds`: the
    model has no such bound), built from its values as they are."""
    values = body.model_dump()
    try:
        return msgspec.convert(values, TelemetryBodyStruct)
    except msgspec.ValidationError:
        return built_as_is(TelemetryBodyStruct, values)


_ENVELOPE_FIELDS = frozenset(Envelope.model_fields)


def envelope_of(node: str, seq: int | None, msg_id: str, ts: float, kind: Kind) -> Envelope:
    """An Envelope of values validated already (its body left empty), without pydantic's
    `model_construct` (a Python loop over the fields: 15 µs, a quarter of the hot path's decode).
    What `model_construct` would set, and nothing else: tests/test_ingest_fuzz.py compares."""
    envelope = Envelope.__new__(Envelope)
    object.__setattr__(envelope, "__dict__", {"v": SCHEMA_VERSION, "node": node, "seq": seq, "id": msg_id,
                                              "ts": ts, "kind": kind, "body": {}})
    object.__setattr__(envelope, "__pydantic_fields_set__", set(_ENVELOPE_FIELDS))
    object.__setattr__(envelope, "__pydantic_extra__", None)
    object.__setattr__(envelope, "__pydantic_private__", None)
    return envelope


def decode(payload: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[Envelope, WireModel]:
    """Validate a raw payload into an envelope and its typed body, or raise RejectedMessage."""
    if len(payload) > max_bytes:
        raise RejectedMessage(Reason.OVERSIZE, f"{len(payload)} bytes > {max_bytes}")
    try:
        raw = _parse_fast(payload)
        if raw is None:  # the reference parser: every refusal's reason comes from it
            raw = json.loads(payload, parse_int=_int64, parse_constant=_no_constant)
    except _OutOfRange as exc:
        raise RejectedMessage(Reason.SCHEMA, str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise RejectedMessage(Reason.NOT_JSON, str(exc)[:200]) from None
    if not isinstance(raw, dict):
        raise RejectedMessage(Reason.SCHEMA, "payload is not a JSON object")
    if raw.get("v") != SCHEMA_VERSION:
        raise RejectedMessage(Reason.VERSION, f"unsupported schema version {raw.get('v')!r}")
    try:
        envelope = Envelope.model_validate(raw)
        body = envelope.parsed_body()
    except (ValidationError, RecursionError) as exc:
        raise RejectedMessage(Reason.SCHEMA, str(exc)[:500]) from None
    return envelope, body


# ---- the contract: which kinds travel on which topic ----------------------------------------


class Direction(StrEnum):
    EDGE_TO_CLOUD = "edge->cloud"  # topics kgpu/v1/edge/{node}/...
    CLOUD_TO_EDGE = "cloud->edge"  # topics kgpu/v1/cloud/{node}/...

    @property
    def side(self) -> Literal["edge", "cloud"]:
        """The topic segment a message in this direction is published under."""
        return "edge" if self is Direction.EDGE_TO_CLOUD else "cloud"


@dataclass(frozen=True)
class Route:
    """One topic of the wire contract (DESIGN.md's topic table): who sends on it, which envelope
    kinds may travel on it, and how it is published."""

    topic: str  # the last topic segment: kgpu/v1/<side>/<node>/<topic>
    direction: Direction
    kinds: frozenset[Kind]
    qos: Literal[0, 1]
    retained: bool
    sequenced: bool = False  # every envelope carries its outbox seq (deduplicated by node and seq)

    @property
    def side(self) -> Literal["edge", "cloud"]:
        return self.direction.side


ROUTES: Mapping[str, Route] = MappingProxyType({route.topic: route for route in (
    Route("status", Direction.EDGE_TO_CLOUD, frozenset({Kind.STATUS}), qos=1, retained=True),
    Route("telemetry", Direction.EDGE_TO_CLOUD, frozenset({Kind.TELEMETRY}), qos=0, retained=False),
    Route("events", Direction.EDGE_TO_CLOUD, EVENT_KINDS, qos=1, retained=False, sequenced=True),
    Route("ack", Direction.CLOUD_TO_EDGE, frozenset({Kind.ACK}), qos=1, retained=False),
    Route("policy", Direction.CLOUD_TO_EDGE, frozenset({Kind.POLICY}), qos=1, retained=True),
    Route("commands", Direction.CLOUD_TO_EDGE, frozenset({Kind.COMMAND}), qos=1, retained=False),
    Route("partitioning", Direction.CLOUD_TO_EDGE, frozenset({Kind.PARTITIONING}), qos=1, retained=True),
)})
"""Topic -> its route, for the topics of shared.topics (EDGE_KINDS + CLOUD_KINDS). Every kind
travels on exactly one topic (`route_of`); tests/test_protocol.py holds the table to both."""

_ROUTE_OF_KIND: Mapping[Kind, Route] = MappingProxyType(
    {kind: route for route in ROUTES.values() for kind in route.kinds})



def route_of(kind: Kind) -> Route:
    """The route an envelope of `kind` is published on."""
    return _ROUTE_OF_KIND[kind]


@dataclass(frozen=True)
class Checked:
    """A message that passed `decode_and_check`: its topic, route, envelope and typed body."""

    topic: TopicParts
    route: Route
    envelope: Envelope
    body: WireModel | TelemetryRecord  # a TelemetryBodyStruct: telemetry decoded with `typed_body_only`


def decode_and_check(topic: str, payload: bytes, *, direction: Direction | None = None,
                     node: str | None = None, max_bytes: int = MAX_PAYLOAD_BYTES,
                     typed_body_only: bool = False) -> Checked:
    """Check one received message against the whole contract, or raise RejectedMessage with a
    `Reason`, in this order: the topic is a kgpu/v1 topic (bad_topic), of `direction` when given
    (bad_topic), about `node` when given (node_mismatch: a receiver that takes only its own
    messages); the payload is a valid envelope with a body valid for its kind (oversize,
    not_json, version, schema); the payload's node is the topic's (node_mismatch: a node speaks
    only for itself); its kind travels on this topic (kind_mismatch); an event carries its seq
    (missing_seq).

    `typed_body_only`: the receiver reads the typed body only (the cloud's ingest), so telemetry
    is validated from its JSON in one pass into a `TelemetryBodyStruct` (the same fields as
    `TelemetryBody`, shared/wire_structs.py; also when only the reference decoder took it) and its
    envelope's `body` dict is left empty (`{}`); what is accepted or refused, and why, is the same."""
    try:
        parts = parse_topic(topic)
    except BadTopicNode as exc:  # a broker that rewrote the topic in a way parse_topic cannot undo
        raise RejectedMessage(Reason.BAD_TOPIC_NODE, f"{exc}: the node cannot be recovered; does the broker "
                              "rewrite topic levels (RabbitMQ maps '.' to '/')? docs/broker.md") from None
    except BadTopic as exc:
        raise RejectedMessage(Reason.BAD_TOPIC, str(exc)) from None
    route = ROUTES[parts.kind]
    if direction is not None and route.direction is not direction:
        side = "an edge" if direction.side == "edge" else "a cloud"
        raise RejectedMessage(Reason.BAD_TOPIC, f"not {side} topic: {topic}", topic=parts)
    if node is not None and parts.node != node:
        raise RejectedMessage(Reason.NODE_MISMATCH, f"a topic for node {parts.node!r}, not {node!r}",
                              topic=parts)
    try:
        fast = (_decode_telemetry_fast(payload, parts.node) if typed_body_only and parts.kind == "telemetry"
                and len(payload) <= max_bytes else None)
        envelope, body = fast if fast is not None else decode(payload, max_bytes=max_bytes)
        if typed_body_only and isinstance(body, TelemetryBody):  # what pydantic's lax mode took
            body = _telemetry_struct_of(body)  # one body type for the ingest
            envelope = envelope.model_copy(update={"body": {}})
    except RejectedMessage as exc:
        raise RejectedMessage(exc.reason, exc.detail, topic=parts) from None
    if envelope.node != parts.node:
        raise RejectedMessage(Reason.NODE_MISMATCH,
                              f"topic node {parts.node!r} but payload node {envelope.node!r}",
                              topic=parts, payload_node=envelope.node)
    if envelope.kind not in route.kinds:
        raise RejectedMessage(Reason.KIND_MISMATCH, f"{envelope.kind} on the {parts.kind} topic", topic=parts)
    if route.sequenced and envelope.seq is None:
        raise RejectedMessage(Reason.MISSING_SEQ, "an event without seq cannot be deduplicated", topic=parts)
    return Checked(parts, route, envelope, body)
