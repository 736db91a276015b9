"""`kgpu watch`: a live, read-only monitor of everything under `kgpu/v1/` for operators.

Three layers, so the part worth testing is pure:

* `WatchState` is fed `(topic, payload, received_at)` and keeps what an operator asks about
  (per-node table, message rates, latest events, rejected messages). No I/O, no clock of its own:
  every time is passed in, so tests feed it real envelopes and fixed times.
* `render()` turns a state into rich renderables; `json_line()` turns one observation into the
  `--json` line.
* `run_watch()` owns the MQTT link (shared.mqtt, never paho directly), the loop and the output.

The watcher never publishes: it subscribes to `kgpu/v1/#` with a clean session, so it leaves no
queued messages or retained state behind on the broker.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shared.gpu import Health
from shared.mqtt import MqttLink, Received, TlsOptions, parse_broker_url, redact
from shared.protocol import (
    EVENT_KINDS,
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
    decode,
)
from shared.topics import CLOUD_KINDS, EDGE_KINDS, PREFIX, BadTopic, TopicParts, parse_topic
from shared.wire import WireModel

SUBSCRIPTION = f"{PREFIX}/#"
RATE_WINDOW_S = 10.0
DEFAULT_MAX_EVENTS = 20
REFRESH_PER_S = 4.0
SUMMARY_MAX_CHARS = 160

TOPIC_KINDS: tuple[str, ...] = EDGE_KINDS + CLOUD_KINDS

# Which envelope kinds may travel on which topic: anything else is a sender bug worth showing.
KINDS_ON_TOPIC: dict[str, frozenset[Kind]] = {
    "status": frozenset({Kind.STATUS}),
    "telemetry": frozenset({Kind.TELEMETRY}),
    "events": EVENT_KINDS,
    "ack": frozenset({Kind.ACK}),
    "policy": frozenset({Kind.POLICY}),
    "commands": frozenset({Kind.COMMAND}),
}

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
    reason: str  # RejectedMessage.reason, or bad_topic / node_mismatch / kind_mismatch
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
            parts = parse_topic(topic)
        except BadTopic as exc:
            # best effort, so that `--node` still shows a node publishing to a wrong topic
            pieces = topic.split("/")
            node = pieces[3] if len(pieces) >= 4 and "/".join(pieces[:2]) == PREFIX else None
            return Rejected(topic, "bad_topic", str(exc), received_at, node=node, retained=retained)

        def reject(reason: str, detail: str) -> Rejected:
            return Rejected(topic, reason, detail, received_at, parts.node, parts.kind, retained)

        try:
            envelope, body = decode(payload)
        except RejectedMessage as exc:
            return reject(exc.reason, exc.detail)
        if envelope.node != parts.node:
            detail = f"topic node {parts.node!r} ≠ payload node {envelope.node!r}"
            return Rejected(topic, "node_mismatch", detail, received_at, parts.node, parts.kind, retained,
                            payload_node=envelope.node)
        if envelope.kind not in KINDS_ON_TOPIC[parts.kind]:
            return reject("kind_mismatch", f"{envelope.kind.value!r} message on the {parts.kind!r} topic")
        return Accepted(topic, parts, envelope, body, received_at, retained)

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
            # an offline status (the last will) is minimal: keep what the last online one said
            node.outbox_epoch = body.outbox_epoch or node.outbox_epoch
        elif isinstance(body, HealthBody) and body.level == "gpu" and body.gpu_index is not None:
            node.gpu_health[body.gpu_index] = body.current
        elif isinstance(body, AckBody):
            node.ack_upto = body.upto
        if obs.parts.kind == "events" and env.seq is not None:
            node.max_event_seq = env.seq if node.max_event_seq is None else max(node.max_event_seq, env.seq)
        return status_changed

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


# ---- rendering ------------------------------------------------------------------------------


@dataclass
class LinkView:
    """The watcher's own connection, shown on top of the display."""

    broker: str
    connected: bool = False
    error: str | None = None


def format_ago(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def format_lag(lag: float | None) -> Text:
    if lag is None:
        return Text("—")
    text = f"{lag:+.2f}s" if abs(lag) < 100 else ("+" if lag > 0 else "-") + format_ago(abs(lag))
    if lag < 0:
        return Text(f"{text} clock ahead", style="yellow")
    return Text(text, style="red" if lag > 30 else "")


def render(state: WatchState, now: float, link: LinkView | None = None) -> RenderableType:
    """The whole display for one refresh; `now` is wall-clock unix seconds."""
    parts: list[RenderableType] = []
    if link is not None:
        header = Text("kgpu watch ", style="bold")
        header.append(link.broker)
        if link.connected:
            header.append("  ● connected", style="green")
        else:
            header.append("  ✗ not connected", style="bold red")
            if link.error:
                header.append(f": {link.error}", style="red")
            header.append(" — retrying")
        filters = [f"node={state.node_filter}" if state.node_filter else "",
                   f"kind={state.kind_filter}" if state.kind_filter else ""]
        if any(filters):
            header.append(f"  filter: {' '.join(f for f in filters if f)}", style="cyan")
        parts.append(header)
    parts.append(render_nodes(state, now))
    parts.append(render_rates(state, now))
    parts.append(render_events(state, now))
    if state.rejected_counts:
        parts.append(render_rejected(state, now))
    return Group(*parts)


_STATE_STYLES = {"online": "green", "offline": "bold red"}


def render_nodes(state: WatchState, now: float) -> Table:
    table = Table(title="nodes", title_justify="left", expand=False)
    for column in ("node", "state", "version", "last seen", "lag", "outbox", "seq/ack", "policy",
                   "GPUs"):
        table.add_column(column, no_wrap=True)
    if not state.nodes:
        table.add_row(Text("waiting for messages…", style="dim"), *[""] * 8)
    for name in sorted(state.nodes):
        node = state.nodes[name]
        status = Text(node.state or "?", style=_STATE_STYLES.get(node.state or "", "dim"))
        if node.degraded:
            status.append(" degraded", style="yellow")
        seen = format_ago(None if node.last_seen is None else now - node.last_seen)
        seq = "—" if node.max_event_seq is None else str(node.max_event_seq)
        ack = "—" if node.ack_upto is None else str(node.ack_upto)
        policy = "—" if node.policy_name is None else f"{node.policy_name} v{node.policy_version}"
        gpus = Text(str(node.gpu_count))
        if node.unhealthy:
            gpus.append(f" / {node.unhealthy} unhealthy", style="bold red")
        outbox = "—" if node.outbox_depth is None else str(node.outbox_depth)
        table.add_row(Text(name, style="bold"), status, Text(node.version or "—"), seen,
                      format_lag(node.last_lag_s), outbox, f"{seq}/{ack}", Text(policy), gpus)
    return table


def render_rates(state: WatchState, now: float) -> Text:
    rates = state.rates(now)
    text = Text(f"msg/s ({state.rate_window_s:g}s window): ", style="bold")
    kinds = [k for k in TOPIC_KINDS if k in rates or state.kind_filter is None]
    for i, kind in enumerate(kinds):
        if i:
            text.append("  ")
        text.append(f"{kind} {rates.get(kind, 0.0):.1f}")
    text.append(f"   total {state.total}", style="dim")
    return text


def render_events(state: WatchState, now: float) -> Table:
    table = Table(title=f"latest events (of {state.events.maxlen})", title_justify="left")
    for column in ("ago", "node", "kind", "seq", "summary"):
        table.add_column(column, no_wrap=column != "summary")
    for row in reversed(state.events):
        table.add_row(format_ago(now - row.received_at), Text(row.node), Text(row.kind),
                      "" if row.seq is None else str(row.seq), Text(row.summary))
    return table


def render_rejected(state: WatchState, now: float) -> Table:
    counts = ", ".join(f"{reason} {n}" for reason, n in state.rejected_counts.most_common())
    table = Table(title=f"rejected: {counts}", title_justify="left", title_style="bold red")
    for column in ("ago", "reason", "topic", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for rej in reversed(state.rejected):
        table.add_row(format_ago(now - rej.received_at), Text(rej.reason, style="red"), Text(rej.topic),
                      Text(rej.detail[:200]))
    return table


# ---- running --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchOptions:
    mqtt: str | None
    node: str | None = None
    kind: str | None = None
    json_lines: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    password_file: Path | None = None
    max_events: int = DEFAULT_MAX_EVENTS


def make_link(opts: WatchOptions, on_message: Any) -> MqttLink:
    """Check the options and build the (not yet started) link; WatchError says what is wrong."""
    if not opts.mqtt:
        raise WatchError("no broker given: use --mqtt mqtt://host:port (or set KGPU_MQTT)")
    if opts.password_file is not None and not opts.password_file.is_file():
        raise WatchError(f"password file not found: {opts.password_file}")
    try:
        address = parse_broker_url(opts.mqtt, password_file=opts.password_file)
    except ValueError as exc:
        raise WatchError(str(exc)) from None
    except OSError as exc:
        raise WatchError(f"cannot read password file {opts.password_file}: {exc.strerror or exc}") from None
    tls_flags = opts.ca_file or opts.cert_file or opts.key_file or opts.tls_insecure
    if tls_flags and not address.tls:
        raise WatchError(f"TLS options need an mqtts:// URL, got {redact(opts.mqtt)!r}")
    files = (("CA file", opts.ca_file), ("certificate file", opts.cert_file), ("key file", opts.key_file))
    for label, path in files:
        if path is not None and not path.is_file():
            raise WatchError(f"{label} not found: {path}")
    if opts.max_events < 1:
        raise WatchError("--events must be at least 1")
    tls = TlsOptions(ca_file=opts.ca_file, cert_file=opts.cert_file, key_file=opts.key_file,
                     insecure=opts.tls_insecure) if address.tls else None
    # A unique id: two operators watching at once must not kick each other off the broker.
    client_id = f"kgpu-watch-{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        return MqttLink(address, client_id, subscriptions=[(SUBSCRIPTION, 1)], tls=tls, clean_session=True,
                        backoff_min_s=0.5, backoff_max_s=5.0, on_message=on_message)
    except (OSError, ValueError) as exc:  # e.g. an unreadable CA bundle
        raise WatchError(f"cannot set up the MQTT connection: {exc}") from None


def run_watch(opts: WatchOptions, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None,
              console: Console | None = None, stop: threading.Event | None = None,
              refresh_per_s: float = REFRESH_PER_S) -> int:
    """Watch until Ctrl-C (or `stop` is set); returns the exit code. Raises WatchError on bad options."""
    import sys

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    stop = stop or threading.Event()
    state = WatchState(node=opts.node, kind=opts.kind, max_events=opts.max_events)
    inbox: queue.Queue[tuple[float, Received]] = queue.Queue()
    # received_at is taken on the network thread, when the message arrives, not when we get to it
    link = make_link(opts, lambda message: inbox.put((time.time(), message)))
    # shared.mqtt logs its connection troubles; we report them ourselves, in one place
    mqtt_logger = logging.getLogger("shared.mqtt")
    saved_level = mqtt_logger.level
    mqtt_logger.setLevel(logging.CRITICAL)
    view = LinkView(broker=link.address.display)
    link.start()
    try:
        if opts.json_lines:
            _run_json(state, link, view, inbox, stdout, stderr, stop)
        else:
            _run_live(state, link, view, inbox, console or Console(), stop, refresh_per_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `kgpu watch --json | head`: the reader left; that is a normal way to stop
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
    finally:
        link.stop(timeout_s=2.0)
        mqtt_logger.setLevel(saved_level)
    return 0


def _link_changed(link: MqttLink, view: LinkView) -> bool:
    connected, error = link.connected.is_set(), link.last_error
    if connected == view.connected and (connected or error == view.error):
        return False
    view.connected, view.error = connected, (None if connected else error)
    return True


def _drain(inbox: queue.Queue[tuple[float, Received]], timeout: float) -> Iterable[tuple[float, Received]]:
    """What arrived, waiting up to `timeout` for the first message."""
    try:
        yield inbox.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return
    for _ in range(10_000):  # bounded: a flood must not starve the display or the link check
        try:
            yield inbox.get_nowait()
        except queue.Empty:
            return


def _run_json(state: WatchState, link: MqttLink, view: LinkView, inbox: queue.Queue[tuple[float, Received]],
              stdout: IO[str], stderr: IO[str], stop: threading.Event) -> None:
    while not stop.is_set():
        for received_at, message in _drain(inbox, 0.25):
            obs = state.feed(message.topic, message.payload, received_at, retained=message.retain)
            if obs is not None:
                stdout.write(json.dumps(json_line(obs), ensure_ascii=False, separators=(",", ":")) + "\n")
                stdout.flush()
        if _link_changed(link, view):
            if view.connected:
                say = f"connected to {view.broker}, watching {SUBSCRIPTION}"
                print(f"kgpu watch: {say}", file=stderr, flush=True)
            elif view.error:
                print(f"kgpu watch: {view.error}; retrying", file=stderr, flush=True)
            else:
                print(f"kgpu watch: lost {view.broker}; retrying", file=stderr, flush=True)


def _run_live(state: WatchState, link: MqttLink, view: LinkView, inbox: queue.Queue[tuple[float, Received]],
              console: Console, stop: threading.Event, refresh_per_s: float) -> None:
    period = 1.0 / refresh_per_s
    # We refresh from this thread ourselves (auto_refresh off): rich's refresh thread would read
    # the state while this one changes it.
    with Live(render(state, time.time(), view), console=console, auto_refresh=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        next_refresh = time.monotonic()
        while not stop.is_set():
            for received_at, message in _drain(inbox, next_refresh - time.monotonic()):
                state.feed(message.topic, message.payload, received_at, retained=message.retain)
            if time.monotonic() >= next_refresh:
                _link_changed(link, view)
                live.update(render(state, time.time(), view), refresh=True)
                next_refresh = time.monotonic() + period
