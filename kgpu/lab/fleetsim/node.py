"""One simulated edge node's wire state and the payloads it sends, plus the simulator's options and
measurements. Pure data and pure functions: no socket, no loop.

Payloads are built with the protocol's own pydantic models (`shared.protocol.make_envelope` and
the body models), so that a simulated node can only send what a real edge could. Telemetry, sent
by every node every interval, is the exception for speed: each node builds its body once with the
models, keeps it as the msgspec Struct derived from them (shared/wire_structs.py: the same fields,
in the same order) and moves its figures in place; msgspec writes the envelope. The bytes are the
ones `make_envelope(...).to_json()` writes for the same body (tests/test_bench.py); the simulator
took 44-54 % of a core at 2,500 messages a second so, against 71-80 % (docs/benchmarks.md): a
simulator sharing the machine with the controller it measures must not take its core.
"""

from __future__ import annotations

import math
import os
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from shared.gpu import GpuSample, Health, ProcessSample
from shared.protocol import (
    ActionOutcome,
    DecisionBody,
    GpuSummary,
    Kind,
    StatusBody,
    TelemetryBody,
    TelemetryBodyStruct,
    TelemetryEnvelopeStruct,
    make_envelope,
)
from shared.topics import NODE_NAME_RE, edge_topic
from shared.wire import WireModel
from shared.wire_structs import TelemetryRecord

GPU_MODEL = "NVIDIA H100 80GB HBM3"
GPU_MEMORY_BYTES = 80 * 1024**3
DEFAULT_LIMIT_W = 700.0


@dataclass(frozen=True)
class FleetOptions:
    """What to simulate. Defaults follow `kgpu edge run`'s defaults where there is one."""

    mqtt: str
    nodes: int = 100
    gpus: int = 8
    interval_s: float = 10.0  # telemetry per node
    event_every_s: float = 60.0  # mean gap between two events of one node; 0: no events
    status_interval_s: float = 30.0
    nodes_per_connection: int = 1
    prefix: str = "sim"
    outbox_window: int = 100
    ack_timeout_s: float = 15.0
    # unacked events wait `resend_wait` (edge/sync.py) before they are sent again, as on the edge;
    # equal to ack_timeout_s: the fixed timeout of before issue 17
    ack_timeout_max_s: float = 120.0
    connect_rate: float = 500.0  # new connections per second at start (a fleet does not arrive at once)
    keepalive_s: int = 60
    daemon_version: str = "fleetsim"
    cloud: str | None = None  # controller's HTTP base URL: enables telemetry lag probes
    probes: int = 10  # nodes whose telemetry is probed (spread over the fleet)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus < 1:
            raise ValueError("nodes and gpus must be at least 1")
        if self.nodes_per_connection < 1:
            raise ValueError("nodes_per_connection must be at least 1")
        if self.interval_s <= 0 or self.status_interval_s <= 0 or self.event_every_s < 0:
            raise ValueError("interval and status_interval must be positive, event_every not negative")

    @property
    def connections(self) -> int:
        return math.ceil(self.nodes / self.nodes_per_connection)


# ---- measurements ---------------------------------------------------------------------------


class LagRecorder:
    """(when, lag) pairs in two compact arrays; percentiles over any time window."""

    def __init__(self) -> None:
        self.at = array("d")
        self.lag = array("d")

    def record(self, at: float, lag: float) -> None:
        self.at.append(at)
        self.lag.append(lag)

    def window(self, since: float = float("-inf"), until: float = float("inf")) -> list[float]:
        return sorted(lag for at, lag in zip(self.at, self.lag, strict=True) if since <= at <= until)

    def __len__(self) -> int:
        return len(self.lag)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class FleetCounters:
    published: dict[str, int] = field(default_factory=lambda: {"status": 0, "telemetry": 0, "events": 0})
    events_created: int = 0
    events_acked: int = 0
    resent_events: int = 0  # publishes of a seq that was published before
    resend_timeouts: int = 0  # nodes whose unacked events were sent again after ack_timeout
    telemetry_skipped: int = 0  # due while the node's link was down
    acks: int = 0
    stale_acks: int = 0  # acks not newer than what we had
    policies: int = 0
    commands: int = 0
    commands_repeated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # messages from the cloud we refused
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    schedule_late_max_s: float = 0.0  # how far behind its own schedule the simulator fell


# ---- one simulated node ---------------------------------------------------------------------


class NodeLink(Protocol):
    """What a node needs of the MQTT connection carrying it (SimConnection)."""

    up: bool

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool: ...


@dataclass
class OutboxEntry:
    payload: bytes
    created: float  # monotonic
    first_sent: float | None = None
    last_sent: float | None = None  # monotonic, of its latest publish (a re-send too)


class SimNode:
    """The wire-level state of one edge: outbox, acks, policy, applied commands, GPU figures."""

    def __init__(self, index: int, name: str, gpus: int, rng: random.Random) -> None:
        self.index = index
        self.name = name
        self.epoch = os.urandom(8).hex()
        self.topics = {k: edge_topic(name, k) for k in ("status", "telemetry", "events")}
        self.next_seq = 1
        self.outbox: dict[int, OutboxEntry] = {}
        self.acked_upto = 0
        self.highest_sent = 0
        self.oldest_unacked_sent_at: float | None = None
        self.cloud_behind_s = 0.0  # how far behind the cloud was at this node's last ack (edge/sync.py)
        self.policy_name: str | None = None
        self.policy_version: int | None = None
        self.applied_commands: set[str] = set()
        self.draining: set[str] = set()
        self.conn: NodeLink | None = None
        self.version: str | None = None  # None: the fleet's daemon_version; set by FleetSim.restart()
        self.probe_busy = False
        self.uuids = [f"GPU-{name}-{i:02d}" for i in range(gpus)]
        self.util = [rng.uniform(20, 90) for _ in range(gpus)]
        self.energy_mj = [rng.randrange(10**9, 10**10) for _ in range(gpus)]
        self.last_sample_at = time.time()
        model = TelemetryBody(samples=[
            GpuSample(index=i, uuid=uuid, ts=self.last_sample_at, lost=False, power_limit_w=DEFAULT_LIMIT_W,
                      sm_clock_mhz=1980, memory_clock_mhz=2619, throttle_reasons=0, ecc_sbe_volatile=0,
                      ecc_dbe_volatile=0, remapped_rows_correctable=0, remapped_rows_uncorrectable=0,
                      remap_pending=False, remap_failure=False, processes=[ProcessSample(pid=4000 + i)], missing=[])
            for i, uuid in enumerate(self.uuids)])
        # the Struct of `model` (a TelemetryRecord whose figures move in place; see the top)
        self.telemetry: Any = msgspec.convert(model.model_dump(), TelemetryBodyStruct)

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.up


# ---- payloads: the protocol's models ----------------------------------------------------------


_ENCODE = msgspec.json.Encoder().encode


def envelope_json(node: str, kind: Kind | str, body: WireModel | TelemetryRecord, seq: int | None = None,
                  ts: float | None = None) -> bytes:
    """The envelope of `body` as the edge sends it (`make_envelope`), `ts` now unless given. A
    telemetry body's Struct (`telemetry_body`) is written by msgspec, to the same bytes."""
    if isinstance(body, TelemetryBodyStruct):
        if Kind(kind) is not Kind.TELEMETRY:
            raise ValueError(f"a telemetry body for a {kind} envelope")
        if not NODE_NAME_RE.match(node):  # what the Envelope model's validator refuses
            raise ValueError(f"a bad node name: {node!r}")
        return _ENCODE(TelemetryEnvelopeStruct(node=node, seq=seq, kind=Kind.TELEMETRY, body=body,
                                               **({} if ts is None else {"ts": ts})))
    assert isinstance(body, WireModel)
    envelope = make_envelope(node, body, Kind(kind), seq=seq)
    if ts is not None:
        envelope.ts = ts
    return envelope.to_json()


def status_body(node: SimNode, version: str, state: str = "online") -> StatusBody:
    return StatusBody(
        state=state,  # online or offline
        version=node.version or version,
        gpus=[GpuSummary(index=i, uuid=uuid, name=GPU_MODEL, health=Health.HEALTHY, power_limit_w=DEFAULT_LIMIT_W,
                         draining=uuid in node.draining)
              for i, uuid in enumerate(node.uuids)],
        policy_name=node.policy_name,
        policy_version=node.policy_version,
        outbox_depth=len(node.outbox),
        outbox_epoch=node.epoch,
        degraded=[],
    )


def offline_status_body(node: SimNode) -> StatusBody:
    """What the node's last will says (as the edge's: state and epoch only)."""
    return StatusBody(state="offline", outbox_epoch=node.epoch)


def telemetry_body(node: SimNode, rng: random.Random, now: float) -> TelemetryRecord:
    """One sample of every GPU, every figure the real edge reports, moving a little each time.
    The node's own body (the Struct of a `TelemetryBody`), its figures updated in place (see the
    module docstring)."""
    elapsed = max(0.0, now - node.last_sample_at)
    node.last_sample_at = now
    for i, sample in enumerate(node.telemetry.samples):
        util = min(100.0, max(0.0, node.util[i] + rng.uniform(-5, 5)))
        node.util[i] = util
        power = 90.0 + 5.5 * util
        node.energy_mj[i] += int(power * elapsed * 1000)
        used = int(GPU_MEMORY_BYTES * util / 130)
        sample.ts = now
        sample.utilization_pct = round(util, 1)
        sample.memory_util_pct = round(util * 0.6, 1)
        sample.memory_used_bytes = used
        sample.memory_free_bytes = GPU_MEMORY_BYTES - used
        sample.temperature_c = round(32.0 + power * 0.07, 1)
        sample.power_w = round(power, 1)
        sample.energy_mj = node.energy_mj[i]
        process = sample.processes[0]
        process.used_memory_bytes = used
        process.sm_util_pct = round(util, 1)
    return node.telemetry


def decision_body(node: SimNode, rng: random.Random) -> DecisionBody:
    gpu = rng.randrange(len(node.uuids))
    temperature = round(rng.uniform(84, 89), 1)
    return DecisionBody(
        gpu_index=gpu, gpu_uuid=node.uuids[gpu], rule="thermal_step_down", action="set_power_limit",
        value=630.0, outcome=ActionOutcome.APPLIED, reason=f"GPU {gpu} at {temperature} °C >= maxTempC 83.0",
        inputs={"temperature_c": temperature, "power_limit_w": DEFAULT_LIMIT_W},
        policy_version=node.policy_version,
    )
