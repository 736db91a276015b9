"""`kgpu watch`'s state: what an operator asks about, folded from the raw messages.

`WatchState` is fed `(topic, payload, received_at)` and keeps the per-node table, message rates,
the latest events and the rejected messages. It is pure (no I/O, no clock of its own: every time
is passed in), so tests feed it real envelopes and fixed times. Each message is checked with
`shared.protocol.decode_and_check`, the contract the cloud and the edge receive with, so the
watcher shows as rejected exactly what they would refuse. Split from the rendering
(kgpu/watch_render.py) and the MQTT loop (kgpu/watch.py) so that this part stays pure.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from shared.gpu import GpuSample, Health
from shared.protocol import (
    EVENT_KINDS,
    ROUTES,
    AckBody,
    CommandBody,
    CommandResultBody,
    DecisionBody,
    Envelope,
    HealthBody,
    Kind,
    MigrationRequestBody,
    OfflineSummaryBody,
    PolicyBody,
    RejectedMessage,
    StatusBody,
    TelemetryBody,
    XidBody,
    decode_and_check,
)
from shared.topics import PREFIX, TopicParts
from shared.wire import WireModel

RATE_WINDOW_S = 10.0
DEFAULT_MAX_EVENTS = 20
SUMMARY_MAX_CHARS = 160
# A hostile or broken sender must not grow a node's GPU table without bound.
MAX_GPUS_PER_NODE = 256

# nvmlClocksEventReasons bits that mean the GPU is held back (idle, application clocks and
# sync boost are not): the name an operator knows each by.
THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x04, "power cap"), (0x08, "hw slowdown"), (0x20, "sw thermal"), (0x40, "hw thermal"),
    (0x80, "power brake"),
)

TOPIC_KINDS: tuple[str, ...] = tuple(ROUTES)  # every topic of the contract, edge's then cloud's

# Kinds that go into the event list when no --kind filter is given: the rare, meaningful ones.
# Telemetry and acks flow constantly and would push every real event out of a 20-line list.
NOTABLE_KINDS = EVENT_KINDS | {Kind.POLICY, Kind.COMMAND}


class WatchError(Exception):
    """A problem with the options (bad URL, unreadable file): the CLI prints it and exits 2."""


def valid_kind_filters() -> list[str]:
    """Every value `--kind` accepts: topic kinds and envelope kinds."""
    return sorted(set(TOPIC_KINDS) | {k.value for k in Kind})


# ---- observations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """A message that decoded, whose topic and payload agree."""

    topic: str
    parts: TopicParts
    envelope: Envelope
    body: WireModel
    received_at: float
    retained: bool = False

    @property
    def lag_s(self) -> float:
        """received_at − envelope.ts. Negative means the sender's clock is ahead of ours."""
        return self.received_at - self.envelope.ts


@dataclass(frozen=True)
class Rejected:
    """A message we could not accept, with the label counters use and a human detail."""

    topic: str
    reason: str  # RejectedMessage.reason (shared.protocol.Reason)
    detail: str
    received_at: float
    node: str | None = None  # from the topic, when it parsed
    topic_kind: str | None = None
    retained: bool = False
    payload_node: str | None = None  # for node_mismatch: the node the payload claims


Observation = Accepted | Rejected


def json_line(obs: Observation) -> dict[str, Any]:
    """The `--json` output for one message (one JSON object per line)."""
    if isinstance(obs, Accepted):
        line: dict[str, Any] = {
            "topic": obs.topic,
            "received_at": round(obs.received_at, 6),
            "lag_s": round(obs.lag_s, 6),
            "envelope": obs.envelope.model_dump(mode="json"),
        }
    else:
        line = {
            "topic": obs.topic,
            "received_at": round(obs.received_at, 6),
            "rejected": obs.reason,
            "detail": obs.detail,
        }
    if obs.retained:
        line["retained"] = True
    return line


# ---- state ----------------------------------------------------------------------------------


def throttle_names(mask: int | None) -> list[str]:
    """The throttling reasons set in an NVML clocks-event mask (empty when not throttled)."""
    if not mask:
        return []
    return [name for bit, name in THROTTLE_BITS if mask & bit]


@dataclass
class GpuView:
    """One GPU of a node: what the node's status says about it and its latest telemetry sample."""

    index: int
    uuid: str | None = None
    model: str | None = None
    vendor: str | None = None  # "amd", "nvidia jetson-orin": vendor and platform (an older edge: nvidia)
    status_limit_w: float | None = None  # the limit the last status reported
    draining: bool = False
    remediation: str | None = None
    pods: int = 0
    sample: GpuSample | None = None  # the latest by the edge's ts

    @property
    def power_limit_w(self) -> float | None:
        """The enforced limit: the latest sample's when it has one (it is newer), else the status's."""
        if self.sample is not None and self.sample.power_limit_w is not None:
            return self.sample.power_limit_w
        return self.status_limit_w


@dataclass
class NodeView:
    """What the watcher knows about one node, from its status and the traffic seen."""

    name: str
    state: str | None = None  # online / offline, from the latest status; None until one arrives
    last_seen: float | None = None  # when we last heard from the edge (not the cloud's messages)
    version: str | None = None
    outbox_depth: int | None = None
    outbox_epoch: str | None = None
    policy_name: str | None = None
    policy_version: int | None = None
    gpu_health: dict[int, Health] = field(default_factory=dict)
    gpus: dict[int, GpuView] = field(default_factory=dict)  # details for the per-node view
    degraded: list[str] = field(default_factory=list)
    last_lag_s: float | None = None
    max_event_seq: int | None = None
    ack_upto: int | None = None

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_health)

    @property
    def unhealthy(self) -> int:
        return sum(1 for h in self.gpu_health.values() if h != Health.HEALTHY)

    @property
    def max_temperature_c(self) -> float | None:
        temps = [g.sample.temperature_c for g in self.gpus.values()
                 if g.sample is not None and g.sample.temperature_c is not None]
        return max(temps) if temps else None

    @property
    def power_w(self) -> tuple[float, float | None] | None:
        """(draw, limit) summed over the GPUs with a power reading; limit None when one lacks it."""
        drawing = [g for g in self.gpus.values() if g.sample is not None and g.sample.power_w is not None]
        if not drawing:
            return None
        limits = [g.power_limit_w for g in drawing]
        draw = sum(g.sample.power_w or 0.0 for g in drawing if g.sample is not None)
        return draw, (None if any(lim is None for lim in limits) else sum(lim or 0.0 for lim in limits))

    def gpu(self, index: int) -> GpuView | None:
        """This GPU's view, made on first sight (None past MAX_GPUS_PER_NODE GPUs)."""
        view = self.gpus.get(index)
        if view is None and len(self.gpus) < MAX_GPUS_PER_NODE:
            view = self.gpus[index] = GpuView(index)
        return view


@dataclass(frozen=True)
class EventRow:
    received_at: float
    node: str
    kind: str
    seq: int | None
    summary: str


class WatchState:
    """Everything `kgpu watch` shows, fed one raw message at a time (pure: no I/O, no clock).

    Filters: `node` keeps only messages about that node (topic node, or payload node for a
    mismatch) everywhere, the node table included. `kind` (a topic kind such as `events`, or an
    envelope kind such as `decision`) is applied before counting into the rates, the event list,
    the rejected list and the JSON output; the node table still follows every message, because
    node state (online, lag, policy) is the context an operator reads the filtered events in.
    """

    def __init__(self, *, node: str | None = None, kind: str | None = None,
                 max_events: int = DEFAULT_MAX_EVENTS, max_rejected: int = DEFAULT_MAX_EVENTS,
                 rate_window_s: float = RATE_WINDOW_S) -> None:
        if kind is not None and kind not in valid_kind_filters():
            raise WatchError(f"unknown --kind {kind!r}; one of: {', '.join(valid_kind_filters())}")
        self.node_filter = node
        self.kind_filter = kind
        self.rate_window_s = rate_window_s
        self.nodes: dict[str, NodeView] = {}
        self.events: deque[EventRow] = deque(maxlen=max_events)
        self.rejected: deque[Rejected] = deque(maxlen=max_rejected)
        self.rejected_counts: Counter[str] = Counter()
        self.total = 0  # messages that passed the filters
        self._arrivals: dict[str, deque[float]] = {}

    # -- feeding --------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes, received_at: float, *,
             retained: bool = False) -> Observation | None:
        """Take one message. Returns what it was, or None when the filters leave it out."""
        obs = self._classify(topic, payload, received_at, retained)
        if self.node_filter is not None and not self._node_matches(obs):
            return None
        status_changed = self._update_node(obs) if isinstance(obs, Accepted) else False
        if not self._kind_matches(obs):
            return None
        self.total += 1
        rate_kind = obs.parts.kind if isinstance(obs, Accepted) else obs.topic_kind
        if rate_kind is not None:  # a bad topic has no kind to count under (it is in `rejected`)
            arrivals = self._arrivals.setdefault(rate_kind, deque())
            arrivals.append(received_at)
            self._prune(arrivals, received_at)
        if isinstance(obs, Rejected):
            self.rejected.append(obs)
            self.rejected_counts[obs.reason] += 1
        elif self._is_listed(obs, status_changed):
            self.events.append(EventRow(received_at, obs.envelope.node, obs.envelope.kind.value,
                                        obs.envelope.seq, summarize(obs.envelope.kind, obs.body)))
        return obs

    def _classify(self, topic: str, payload: bytes, received_at: float, retained: bool) -> Observation:
        try:
            checked = decode_and_check(topic, payload)
        except RejectedMessage as exc:
            parts = exc.topic
            if parts is None:
                # best effort, so that `--node` still shows a node publishing to a wrong topic
                pieces = topic.split("/")
                node = pieces[3] if len(pieces) >= 4 and "/".join(pieces[:2]) == PREFIX else None
                return Rejected(topic, exc.reason, exc.detail, received_at, node=node, retained=retained)
            return Rejected(topic, exc.reason, exc.detail, received_at, parts.node, parts.kind, retained,
                            payload_node=exc.payload_node)
        assert isinstance(checked.body, WireModel)  # (not `typed_body_only`: always the model)
        return Accepted(topic, checked.topic, checked.envelope, checked.body, received_at, retained)

    def _node_matches(self, obs: Observation) -> bool:
        if isinstance(obs, Accepted):
            return obs.parts.node == self.node_filter
        return self.node_filter in (obs.node, obs.payload_node)

    def _kind_matches(self, obs: Observation) -> bool:
        if self.kind_filter is None:
            return True
        if isinstance(obs, Accepted):
            return self.kind_filter in (obs.parts.kind, obs.envelope.kind.value)
        return obs.topic_kind == self.kind_filter

    def _is_listed(self, obs: Accepted, status_changed: bool) -> bool:
        if self.kind_filter is not None:
            return True  # the operator asked for exactly these: list them all
        if obs.envelope.kind == Kind.STATUS:
            return status_changed  # a change, not the periodic re-publication
        return obs.envelope.kind in NOTABLE_KINDS

    def _update_node(self, obs: Accepted) -> bool:
        """Fold one message into its node's row; True when it changed the node's online state."""
        node = self.nodes.setdefault(obs.parts.node, NodeView(obs.parts.node))
        env, body = obs.envelope, obs.body
        status_changed = False
        # An offline status may be the last will, made when the edge connected (its ts is old) and
        # sent by the broker, not the node: it says nothing about lag or when the node was heard.
        from_broker = isinstance(body, StatusBody) and body.state == "offline"
        if obs.parts.side == "edge" and not (from_broker and node.last_seen is not None):
            # A retained message may be days old: it tells when the node was last heard, not now.
            seen = min(env.ts, obs.received_at) if obs.retained or from_broker else obs.received_at
            node.last_seen = seen if node.last_seen is None else max(node.last_seen, seen)
            if not (obs.retained or from_broker):
                node.last_lag_s = obs.lag_s
        if isinstance(body, StatusBody):
            status_changed = body.state != node.state
            node.state = body.state
            node.degraded = list(body.degraded)
            if body.state == "online":
                node.version = body.version or node.version
                node.outbox_depth = body.outbox_depth
                node.policy_name, node.policy_version = body.policy_name, body.policy_version
                node.gpu_health = {g.index: g.health for g in body.gpus}
                self._update_gpus(node, body)
            # an offline status (the last will) is minimal: keep what the last online one said
            node.outbox_epoch = body.outbox_epoch or node.outbox_epoch
        elif isinstance(body, HealthBody) and body.level == "gpu" and body.gpu_index is not None:
            node.gpu_health[body.gpu_index] = body.current
        elif isinstance(body, AckBody):
            node.ack_upto = body.upto
        elif isinstance(body, TelemetryBody):
            for sample in body.samples:
                gpu = node.gpu(sample.index)
                if gpu is None or sample.lost:
                    continue
                if gpu.sample is None or sample.ts >= gpu.sample.ts:
                    gpu.sample = sample
                gpu.uuid = gpu.uuid or sample.uuid
        if obs.parts.kind == "events" and env.seq is not None:
            node.max_event_seq = env.seq if node.max_event_seq is None else max(node.max_event_seq, env.seq)
        return status_changed

    @staticmethod
    def _update_gpus(node: NodeView, body: StatusBody) -> None:
        listed = {g.index for g in body.gpus}
        for index in [i for i in node.gpus if i not in listed]:  # a GPU the node no longer has
            del node.gpus[index]
        for summary in body.gpus:
            gpu = node.gpu(summary.index)
            if gpu is None:
                continue
            gpu.uuid, gpu.model = summary.uuid, summary.name
            gpu.vendor = " ".join(p for p in (summary.vendor or "nvidia", summary.platform) if p)
            gpu.status_limit_w, gpu.draining = summary.power_limit_w, summary.draining
            gpu.remediation, gpu.pods = summary.remediation, len(summary.pods)

    def _prune(self, arrivals: deque[float], now: float) -> None:
        horizon = now - self.rate_window_s
        while arrivals and arrivals[0] < horizon:
            arrivals.popleft()

    # -- reading --------------------------------------------------------------------------------

    def rates(self, now: float) -> dict[str, float]:
        """Messages per second per topic kind over the last `rate_window_s` seconds."""
        out: dict[str, float] = {}
        for kind, arrivals in self._arrivals.items():
            self._prune(arrivals, now)
            out[kind] = sum(1 for t in arrivals if t <= now) / self.rate_window_s
        return out


# ---- one-line summaries ---------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


def _gpu(index: int | None, uuid: str | None = None) -> str:
    if index is not None:
        return f"GPU {index}"
    return f"GPU {uuid}" if uuid else "node"


_ACTION_UNITS = {"set_power_limit": "W", "lock_clocks": "MHz"}


def summarize(kind: Kind, body: WireModel) -> str:
    """One line an operator reads at a glance, e.g. "xid 79 on GPU 1 → request_migration"."""
    text = _summary(kind, body)
    return text if len(text) <= SUMMARY_MAX_CHARS else text[: SUMMARY_MAX_CHARS - 1] + "…"


def _summary(kind: Kind, body: WireModel) -> str:
    match body:
        case DecisionBody():
            value = ""
            if body.value is not None:
                unit = _ACTION_UNITS.get(body.action, "")
                value = f" {_num(body.value)}{' ' + unit if unit else ''}"
            where = ""
            if body.gpu_index is not None or body.gpu_uuid:
                where = f" ({_gpu(body.gpu_index, body.gpu_uuid)})"
            return f"decision {body.rule} {body.action}{value} {body.outcome.value}{where}"
        case XidBody():
            return f"xid {body.xid} on GPU {body.gpu_index} → {body.action}"
        case HealthBody():
            subject = _gpu(body.gpu_index, body.gpu_uuid) if body.level == "gpu" else body.level
            why = f" ({', '.join(body.reasons)})" if body.reasons else ""
            return f"health {subject} {body.previous.value}→{body.current.value}{why}"
        case MigrationRequestBody():
            gpu = _gpu(body.gpu_index, body.gpu_uuid)
            return f"migration request {gpu}: {body.trigger} ({body.reason})"
        case CommandResultBody():
            detail = f": {body.detail}" if body.detail else ""
            return f"command {body.command} {'ok' if body.ok else 'FAILED'}{detail}"
        case OfflineSummaryBody():
            minutes = max(0.0, body.to_ts - body.from_ts) / 60
            return f"offline summary {minutes:.1f} min, {len(body.gpus)} GPUs"
        case StatusBody():
            unhealthy = sum(1 for g in body.gpus if g.health != Health.HEALTHY)
            bits = [f"status {body.state}"]
            if body.version:
                bits.append(f"v{body.version}")
            bits.append(f"{len(body.gpus)} GPUs" + (f" ({unhealthy} unhealthy)" if unhealthy else ""))
            if body.policy_name:
                bits.append(f"policy {body.policy_name} v{body.policy_version}")
            if body.degraded:
                bits.append(f"degraded: {', '.join(body.degraded)}")
            return " ".join(bits)
        case TelemetryBody():
            temps = [s.temperature_c for s in body.samples if s.temperature_c is not None]
            power = [s.power_w for s in body.samples if s.power_w is not None]
            bits = [f"telemetry {len(body.samples)} samples"]
            if temps:
                bits.append(f"max {_num(max(temps))} °C")
            if power:
                bits.append(f"{_num(round(sum(power), 1))} W")
            return ", ".join(bits)
        case AckBody():
            return f"ack upto {body.upto}" + (f" (epoch {body.epoch})" if body.epoch else "")
        case PolicyBody():
            return f"policy {body.policy.name} v{body.policy.version}"
        case CommandBody():
            target = f" {body.gpu_uuid}" if body.gpu_uuid else ""
            return f"command {body.command}{target}"
    return kind.value


# ---- node names at a glance -----------------------------------------------------------------

NAME_SEPARATORS = "-._"


@dataclass(frozen=True)
class NameDisplay:
    """How the node names are shown: without the prefix and suffix they all share, each one
    shortened from the middle if it must be. `short` maps every full name to what is shown."""

    prefix: str
    suffix: str
    short: dict[str, str]

    @property
    def pattern(self) -> str:
        """What was left out, e.g. "factory-berlin-line-*"; empty when nothing was."""
        return f"{self.prefix}*{self.suffix}" if self.prefix or self.suffix else ""


def _common_prefix(names: list[str]) -> str:
    """The longest prefix of every name that ends on a separator and leaves each name something."""
    first, last = min(names), max(names)  # the common prefix of all is that of these two
    length = 0
    while length < min(len(first), len(last)) and first[length] == last[length]:
        length += 1
    shortest = min(len(n) for n in names)
    for end in range(min(length, shortest - 1), 0, -1):
        if first[end - 1] in NAME_SEPARATORS:
            return first[:end]
    return ""


def shorten_names(names: list[str], *, max_cells: int | None) -> NameDisplay:
    """Names that stay apart in as few cells as can be: with two or more nodes, the prefix and the
    suffix they all share (up to a separator) go; then, past `max_cells`, each name loses its
    middle (an ellipsis), at the one cut that keeps them all different. Names that no cut keeps
    apart are left whole: a long name that wraps is better than two that read the same."""
    unique = sorted(set(names))
    prefix = suffix = ""
    if len(unique) >= 2:
        prefix = _common_prefix(unique)
        rest = [n[len(prefix):] for n in unique]
        suffix = _common_prefix([n[::-1] for n in rest])[::-1]
        if len(suffix) < 2:  # a lone "-" or "0" is noise, not a domain
            suffix = ""
    stripped = {n: n[len(prefix): len(n) - len(suffix)] for n in unique}
    if max_cells is not None and any(len(s) > max_cells for s in stripped.values()):
        stripped = _cut_middles(stripped, max(3, max_cells))
    return NameDisplay(prefix, suffix, stripped)


def _cut_middles(names: dict[str, str], cells: int) -> dict[str, str]:
    keep = cells - 1  # the ellipsis takes one cell
    # the tail first (node numbers live at the end), then the head; the first cut that keeps
    # every name different wins
    for head in sorted(range(1, keep), key=lambda h: (abs(h - keep // 2), h)):
        tail = keep - head
        cut = {full: (s if len(s) <= cells else f"{s[:head]}…{s[-tail:]}") for full, s in names.items()}
        if len(set(cut.values())) == len(cut):
            return cut
    return names
