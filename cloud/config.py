"""The cloud controller's settings (flags > KGPU_* env > config file > defaults)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from shared.policy import Seconds, parse_duration
from shared.settings import HostPort, HttpHeaderTimeout, HttpRequestTimeout, KgpuSettings, MqttUrl, parse_host_port

# [NAMESPACE/]NAME[:KEY]: a namespace (DNS label), a Secret name (DNS subdomain), a data key
SECRET_REF_RE = re.compile(
    r"^(?:(?P<namespace>[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/)?"
    r"(?P<name>[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)"
    r"(?::(?P<key>[-._a-zA-Z0-9]{1,253}))?$"
)

# an equality-based label selector term: key (optionally prefixed) = value
_SELECTOR_TERM_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_./]{0,252})\s*==?\s*([-A-Za-z0-9_.]{0,63})$")


def parse_label_selector(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (equality terms only, `==` allowed) as a dict; ValueError otherwise."""
    terms: dict[str, str] = {}
    for part in text.split(","):
        match = _SELECTOR_TERM_RE.match(part.strip())
        if not match:
            raise ValueError(f"not an equality label selector term: {part.strip()[:100]!r} (use k=v,k2=v2)")
        terms[match[1]] = match[2]
    return terms


_HISTORY_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_HISTORY_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, None: 1.0}


def _history_seconds(text: str) -> float:
    """"10m" or "30d" or "600" as seconds (the history tiers reach past Seconds' 7 days)."""
    match = _HISTORY_DURATION_RE.match(text)
    if not match:
        raise ValueError(f"not a duration: {text.strip()[:50]!r} (seconds, or e.g. '90s', '10m', '1h', '30d')")
    return float(match[1]) * _HISTORY_UNITS[match[2]]


def _parse_history_tiers(text: str) -> list[tuple[int, float]]:
    """"1m:1d,10m:30d" as [(60, 86400.0), (600, 2592000.0)]; ValueError with the reason."""
    tiers: list[tuple[int, float]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        resolution_text, sep, retention_text = term.partition(":")
        if not sep:
            raise ValueError(f"history tier {term[:50]!r}: write RESOLUTION:RETENTION, e.g. 1m:1d")
        resolution, retention = _history_seconds(resolution_text), _history_seconds(retention_text)
        if resolution < 1 or not resolution.is_integer():
            raise ValueError(f"history tier {term[:50]!r}: the resolution is whole seconds, at least 1")
        if tiers and resolution <= tiers[-1][0]:
            raise ValueError(f"history tier {term[:50]!r}: list the tiers finest first, each coarser")
        if retention <= 0:
            raise ValueError(f"history tier {term[:50]!r}: the retention must be positive")
        tiers.append((int(resolution), retention))
    return tiers


class CloudSettings(KgpuSettings):
    """Everything `kgpu cloud run` can be told. Field `foo_bar` is flag `--foo-bar` and env
    `KGPU_FOO_BAR`; the config file uses the field names as keys."""

    mqtt: MqttUrl = Field("mqtt://127.0.0.1:1883", description="Broker URL mqtt://[user:pass@]host:port or mqtts://")
    mqtt_ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (default: the system's)")
    mqtt_cert_file: Path | None = Field(None, description="Client certificate for mutual TLS")
    mqtt_key_file: Path | None = Field(None, description="Client key for mutual TLS")
    mqtt_tls_insecure: bool = Field(False, description="Skip the broker's hostname check (explicit opt-in only)")
    mqtt_password_file: Path | None = Field(None, description="File holding the MQTT password; overrides the URL's")
    mqtt_client_id: str | None = Field(None, description="MQTT client id [kgpu-controller-<hostname>]")
    shared_subscription: str | None = Field(
        None, description="Group name: subscribe as $share/<group>/... so that replicas split the ingest"
    )
    shared_subscription_check: Seconds = Field(
        60.0, ge=1.0, le=3600.0,
        description="Report a $share group that delivers nothing this long after connecting while nodes publish",
    )
    mqtt_receive_queue: int = Field(
        10_000, ge=10, le=1_000_000,
        description="Messages received and not yet handled, at most; beyond, the broker holds them (back-pressure)",
    )
    mqtt_receive_queue_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024,
        description="Payload bytes received and not yet handled, at most, per connection (a message larger than "
                    "this still goes through alone); beyond, the broker holds them (back-pressure)",
    )
    db: str = Field("sqlite:///kgpu-cloud.db", description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://...")
    http: HostPort = Field("0.0.0.0:9420", description="HOST:PORT (or PORT) of the API, dashboard and /metrics")
    batch_size: int = Field(
        5000, ge=1, le=100_000,
        description="Messages written in one transaction, at most (a batch takes what is queued, up to this: large "
                    "while the controller catches up, so that a node's several messages share one row write)")
    batch_interval: Seconds = Field(0.1, ge=0.0, le=10.0, description="Longest wait to fill a batch")
    latest_sample_every: Seconds = Field(
        0.0, ge=0.0, le=60.0, description="A GPU's latest sample (what the API, the dashboard and the fleet exporter "
        "show) is written at most once per this many seconds; a newer one waits at most this long (0: every one at "
        "once). Edges sampling this often or less are never held back; the history keeps every sample either way. "
        "Off by default: it saves store time, but a saturated controller measured slower with it (docs/benchmarks.md)")
    sample_process: bool = Field(
        True, description="Write telemetry from a process of its own (cloud/sample_writer.py), so that the "
        "controller uses a second core; events and statuses are written by the controller itself. Off: one "
        "process, for a controller limited to one core")
    # -- the sample history, in tiers (cloud/store/history.py): raw, then means of coarser buckets --
    history_resolution: Seconds = Field(
        0.0, ge=0.0, description="Raw history: at most one stored sample per GPU per this long "
        "(0: every sample, at the edges' sampling interval); a sample closer than that to its GPU's last "
        "one is left out of its message's row")
    history_raw_retention: Seconds = Field(
        3600.0, ge=60.0, description="Every sample is kept this long (the raw tier of the history: one row "
        "per telemetry message, its GPUs' samples together, aged by the message's earliest sample)")
    history_tiers: str = Field(
        "1m:1d,10m:30d", description="The history's coarser tiers, RESOLUTION:RETENTION,... finest first: "
        "per GPU, the mean of every RESOLUTION bucket kept RETENTION (units s, m, h, d); empty: none")
    history_retention: Annotated[float, BeforeValidator(lambda v: _history_seconds(v) if isinstance(v, str) else v)] \
        = Field(30 * 86_400.0, gt=0.0, description="No tier keeps history longer than this (an upper bound "
                "over history_raw_retention and history_tiers; kept from before the tiers)")

    @field_validator("history_tiers")
    @classmethod
    def _history_tiers(cls, value: str) -> str:
        _parse_history_tiers(value)  # a clear error now rather than when the store opens
        return value

    @model_validator(mode="after")
    def _history_tiers_keep_longer(self) -> CloudSettings:
        keep = self.history_raw_retention
        for resolution, retention in _parse_history_tiers(self.history_tiers):
            if retention < keep:
                raise ValueError(f"history_tiers: the {resolution} s tier keeps {retention:g} s, less than a "
                                 f"finer tier ({keep:g} s): each coarser tier keeps at least as long")
            keep = retention
        return self

    @property
    def history_tier_spec(self) -> tuple[float, tuple[tuple[int, float], ...]]:
        """(raw retention, ((resolution, retention), ...)) with history_retention as the bound:
        cloud.store.HistoryTiers(*settings.history_tier_spec)."""
        cap = self.history_retention
        tiers = tuple((res, min(keep, cap)) for res, keep in _parse_history_tiers(self.history_tiers))
        return min(self.history_raw_retention, cap), tiers
    fleet_metrics_max_age: Seconds = Field(
        30.0, gt=0.0, le=86400.0, description="GET /metrics/fleet leaves out a GPU whose latest sample is older "
        "than this (a few telemetry intervals; an offline node's GPUs are left out whatever their age)")
    kubeconfig: Path | None = Field(None, description="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    in_cluster: bool = Field(False, description="Use the pod's service account instead of a kubeconfig")
    no_kube: bool = Field(
        False, description="Run without a cluster: policies from the REST API only; migration and rollout unavailable"
    )
    namespace: str = Field("kgpu", description="Namespace of the edge DaemonSet and the leader Lease")
    lease_name: str = Field("kgpu-controller", description="coordination.k8s.io Lease used for leader election")
    lease_duration: Seconds = Field(
        15.0, ge=2.0, le=600.0, description="A leader that does not renew loses the lease after this"
    )
    lease_renew_interval: Seconds = Field(5.0, ge=0.5, le=300.0, description="How often the leader renews its lease")
    daemonset: str = Field("kgpu-edge", description="Name of the edge daemon's DaemonSet (for rollouts)")
    migration_grace: Seconds = Field(120.0, description="Migrate work off a GPU unhealthy longer than this")
    offline_threshold: Seconds = Field(
        300.0, description="A node offline longer than this is unreachable for migration: only its pods that opted in "
        "(annotation kgpu.io/migrate-when-offline, or offline_migration_selector) move, each after its own wait too")
    offline_migration_selector: str | None = Field(
        None, description="Label selector (k=v,k2=v2) of pods moved off a node offline past offline_threshold "
        "without the kgpu.io/migrate-when-offline annotation; default: none (pods stay on an unreachable node)")
    offline_zone_max_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Zone guard: when more than this share of a zone's nodes "
        "(topology.kubernetes.io/zone) are offline at once, nothing moves off that zone's offline nodes")
    migration_max_concurrent: int = Field(3, ge=1, le=1000, description="Migrations running at once, at most")
    migration_node_cooldown: Seconds = Field(600.0, description="No new migration from the same node within this")
    # -- node reboots the edges' remediation ladders ask for (cloud/reboots/) --
    reboot_max_per_site: int = Field(
        1, ge=0, le=1000, description="Reboots granted per site (topology.kubernetes.io/zone; a node without "
        "one is its own site) within reboot_window; 0: none, every request stays advised")
    reboot_window: Seconds = Field(3600.0, ge=60.0, description="The circuit breaker's window")
    reboot_timeout: Seconds = Field(
        900.0, ge=30.0, description="A granted reboot counts as in progress until the node is back online or "
        "this long has passed")
    command_resend_interval: Seconds = Field(
        30.0, ge=1.0, le=3600.0, description="Send an edge command again after this long without its result"
    )
    command_ttl: Seconds = Field(3600.0, ge=10.0, description="Stop sending an unanswered edge command after this")
    api_token_file: Path | None = Field(
        None, description="File holding the API bearer token (one per line, any of them is accepted); "
        "re-read when it changes, so a mounted Secret rotates without a restart")
    api_token_secret: str | None = Field(
        None, description="[NAMESPACE/]NAME[:KEY] of a Kubernetes Secret holding the API bearer token "
        "(namespace: --namespace, key: token); re-read every 30 s and on a token that does not match")
    api_auth: Literal["reads-open", "all"] = Field(
        "reads-open", description="reads-open: only changes (PUT/POST/DELETE/PATCH) need the token; "
        "all: every /api/v1 request does (/healthz, /metrics, the spec and the dashboard's files stay open)")
    api_insecure: bool = Field(
        False, description="Without a token configured, allow changes to anyone who reaches the API "
        "(a lab only); otherwise changes are refused until a token is configured")
    # -- ingest bounds (docs/robustness.md): queues, per-node budgets, retention, shutdown --------
    ingest_queue_max: int = Field(
        10_000, ge=1, le=1_000_000, description="Messages accepted and waiting to be written, at most; "
        "when full the MQTT link stops reading (back-pressure to the broker)")
    ingest_queue_max_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="Payload bytes waiting to be written, at most (0: no byte bound); "
        "about 6x this in controller memory; with sample_process, twice this more in the payload ring shared with "
        "the sample writer process (cloud/payload_area.py)")
    node_max_messages_per_second: float = Field(
        200.0, ge=0.0, description="Per-node budget: telemetry messages a second (events and statuses "
        "have their own); the excess is dropped and counted, the node flagged (0: no limit)")
    node_max_bytes_per_second: float = Field(
        2 * 1024 * 1024, ge=0.0, description="Per-node budget: payload bytes a second (0: no limit)")
    node_max_events_per_minute: float = Field(
        60_000.0, ge=0.0, description="Per-node budget: outbox events a minute, after node_event_burst at "
        "full speed; a dropped event is not acked, so the edge sends it again later (0: no limit)")
    node_event_burst: int = Field(
        100_000, ge=1, description="Events a node may send at full speed before node_max_events_per_minute "
        "paces it (an edge catching up an outage)")
    node_max_gpus: int = Field(
        128, ge=0, description="Per-node budget: distinct GPU UUIDs (MIG instances included); samples of "
        "further UUIDs are dropped, never those of the known GPUs (0: no limit)")
    node_max_backlog: int = Field(
        3_000, ge=0, description="Per-node budget: messages accepted and not yet written; beyond, the node's "
        "telemetry and events are dropped until the store catches up, so that no other node's message waits "
        "behind more of them (0: no limit; keep it above the edges' outbox_window)")
    node_burst: Seconds = Field(
        10.0, gt=0.0, le=3600.0, description="The message and byte budgets allow bursts of this many "
        "seconds of their rate")
    node_max_events_ahead: int = Field(
        2_000, ge=0, description="Per-node budget: an event more than this far past the last ack this "
        "controller published to its node is dropped (the edge sends it again); an edge never sends more "
        "than its outbox_window past its ack, so keep this at least twice the edges' outbox_window. Doubled "
        "with shared_subscription (a replica knows the others' acks as of its last write); 0: off")
    node_runaway_drops_per_second: float = Field(
        2_000.0, ge=0.0, description="A node whose messages are dropped this many times within a second "
        "is a runaway: it is quarantined at the broker when broker_admin_username is set, logged otherwise "
        "(0: never)")
    node_quarantine: Seconds = Field(
        300.0, ge=1.0, le=86400.0, description="A runaway node is shut out of the broker this long; each "
        "further quarantine within node_quarantine_max doubles it")
    node_quarantine_max: Seconds = Field(
        3600.0, ge=1.0, le=7 * 86400.0, description="The longest quarantine of a repeat runaway")
    broker_admin_username: str | None = Field(
        None, description="A mosquitto dynamic-security admin (docs/broker.md): with it the controller "
        "quarantines runaway nodes at the broker (kicks them and refuses their logins for node_quarantine)")
    broker_admin_password_file: Path | None = Field(
        None, description="File holding broker_admin_username's password")
    reject_log_interval: Seconds = Field(
        10.0, ge=0.0, le=3600.0, description="At most one log line per rejection reason this often "
        "(the others are counted in the next line)")
    event_retention: Annotated[float, BeforeValidator(parse_duration)] = Field(
        30 * 24 * 3600.0, gt=0.0, le=10 * 365 * 24 * 3600.0,
        description="Stored edge events and decisions older than this are deleted (only those already acked)")
    event_retention_rows: int = Field(
        1_000_000, ge=1000, description="Stored edge events, and decisions, at most each: the oldest acked "
        "ones are deleted beyond this")
    shutdown_timeout: Seconds = Field(
        10.0, ge=0.0, le=600.0, description="On SIGTERM, wait at most this long to write what was accepted "
        "(the rest is not acked: the edges send it again)")
    # -- HTTP reads (docs/api.md): their own threads, timeouts, and when ingest lag is unhealthy --
    http_read_threads: int = Field(
        2, ge=1, le=64, description="Threads that serve the HTTP API's database reads (apart from the "
        "ingest's writer): at most this many reads run at once, the others wait for one (few: reads "
        "share the process, and its interpreter lock, with the ingest)")
    http_header_timeout: HttpHeaderTimeout
    http_request_timeout: HttpRequestTimeout
    ingest_lag_unhealthy_s: Seconds = Field(
        30.0, gt=0.0, le=86400.0, description="/healthz answers 503 while the oldest message waiting to "
        "be written is older than this")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = Field(None, description="JSON log lines; default: when stderr is not a terminal")

    @field_validator("db")
    @classmethod
    def _db(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql")):
            raise ValueError(f"db must be a sqlite:/// or postgresql+psycopg:// URL, got {value.split('@')[-1]!r}")
        return value

    @model_validator(mode="after")
    def _one_kube_source(self) -> CloudSettings:
        if self.no_kube and (self.in_cluster or self.kubeconfig):
            raise ValueError("no_kube cannot be combined with in_cluster or kubeconfig")
        if self.in_cluster and self.kubeconfig:
            raise ValueError("choose in_cluster or kubeconfig, not both")
        if self.lease_renew_interval >= self.lease_duration:
            raise ValueError("lease_renew_interval must be shorter than lease_duration")
        if self.api_token_file is not None and self.api_token_secret is not None:
            raise ValueError("choose api_token_file or api_token_secret, not both")
        if self.api_token_secret is not None and self.no_kube:
            raise ValueError("api_token_secret needs a cluster: use api_token_file with no_kube")
        has_token = self.api_token_file is not None or self.api_token_secret is not None
        if self.api_insecure and has_token:
            raise ValueError("api_insecure cannot be combined with an API token")
        if self.api_auth == "all" and not has_token:
            raise ValueError("api_auth=all needs api_token_file or api_token_secret")
        return self

    @field_validator("offline_migration_selector")
    @classmethod
    def _offline_selector(cls, value: str | None) -> str | None:
        if value is not None:
            parse_label_selector(value)  # a clear error at start, not at the first offline node
        return value

    @field_validator("api_token_secret")
    @classmethod
    def _secret_ref(cls, value: str | None) -> str | None:
        if value is not None and not SECRET_REF_RE.match(value):
            raise ValueError(f"expected [NAMESPACE/]NAME[:KEY] of a Secret, got {value[:300]!r}")
        return value

    def token_secret(self) -> tuple[str, str, str] | None:
        """(namespace, name, key) of the token's Secret, or None."""
        if self.api_token_secret is None:
            return None
        match = SECRET_REF_RE.match(self.api_token_secret)
        assert match is not None
        return match["namespace"] or self.namespace, match["name"], match["key"] or "token"

    @property
    def offline_selector(self) -> dict[str, str] | None:
        """`offline_migration_selector` as label -> value (None: no pod selected)."""
        if self.offline_migration_selector is None:
            return None
        return parse_label_selector(self.offline_migration_selector)

    @property
    def client_id(self) -> str:
        return self.mqtt_client_id or f"kgpu-controller-{socket.gethostname()}"

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_host_port(self.http)
