"""What `kgpu get KIND` lists: for each kind, how to fetch its rows from the controller's API
(cloud/openapi.yaml), the key that identifies a row between two polls of `-w`, and its columns
(the default set fits 80 columns; `-o wide` adds the rest)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kgpu.client.http import EXIT_NOT_FOUND, Api, ClientError, pages
from kgpu.client.render import Column, age

Row = dict[str, Any]


@dataclass(frozen=True)
class Filters:
    name: str | None = None  # one object by name (nodes, policies, migrations, rollouts by id)
    node: str | None = None
    kind: str | None = None  # events only
    state: str | None = None  # migrations only
    limit: int | None = None
    full: bool = False  # every field (-o wide/json/yaml): gpus' whole samples, policies' per-vendor outcomes


@dataclass(frozen=True)
class Kind:
    fetch: Callable[[Api, Filters], list[Row]]
    key: Callable[[Row], str]
    columns: list[Column] = field(default_factory=list)


def _sample(gpu: Row, name: str) -> Any:
    return (gpu.get("sample") or {}).get(name)


def _watts(value: Any) -> str | None:
    return None if value is None else f"{float(value):.0f}W"


def _celsius(value: Any) -> str | None:
    return None if value is None else f"{float(value):.0f}C"


def _node_status(node: Row) -> str:
    words = ["Online" if node.get("online") else "Offline"]
    if node.get("degraded"):
        words.append("Degraded")
    if node.get("over_budget"):
        words.append("OverBudget")
    if node.get("quarantined_until"):
        words.append("Quarantined")  # shut out at the broker as a runaway (docs/broker.md section 9)
    return ",".join(words)


def _gpus_ready(node: Row) -> str:
    summary = node.get("gpu_summary") or {}
    return f"{summary.get('healthy', 0)}/{summary.get('count', 0)}"


def _fetch_nodes(api: Api, f: Filters) -> list[Row]:
    if f.name:
        return [api.get(f"/api/v1/nodes/{f.name}", gpu_limit=0)]
    return pages(api, "/api/v1/nodes", "nodes")


NODE_COLUMNS = [
    Column("NAME", lambda n: n.get("name"), floor=16),
    Column("STATUS", _node_status),
    Column("GPUS", _gpus_ready, shrink=False),
    Column("POWER", lambda n: _watts((n.get("gpu_summary") or {}).get("power_w")), shrink=False),
    Column("MAXTEMP", lambda n: _celsius((n.get("gpu_summary") or {}).get("max_temperature_c")), shrink=False),
    Column("POLICY", lambda n: n.get("policy_name") and f"{n['policy_name']}@{n.get('policy_version')}",
           optional=True),
    Column("VERSION", lambda n: n.get("daemon_version"), optional=True),
    Column("SEEN", lambda n: age(n.get("last_seen")), shrink=False, volatile=True),
    Column("OUTBOX", lambda n: n.get("outbox_depth"), wide_only=True),
    Column("GAPS", lambda n: n.get("gaps"), wide_only=True),
    Column("SKEW", lambda n: n.get("clockSkewSeconds"), wide_only=True),
    Column("DEGRADED", lambda n: ",".join(n.get("degraded") or []), wide_only=True),
    Column("AGE", lambda n: age(n.get("first_seen")), wide_only=True, shrink=False, volatile=True),
    Column("LABELS", lambda n: ",".join(f"{k}={v}" for k, v in (n.get("labels") or {}).items()), wide_only=True),
]


def _fetch_gpus(api: Api, f: Filters) -> list[Row]:
    """Each node's GPUs with their latest samples: one node's detail, or the dashboard's fleet pages
    (500 nodes a request, not one request per node)."""
    if f.node or f.full:
        names = [f.node] if f.node else [str(n["name"]) for n in pages(api, "/api/v1/nodes", "nodes")]
        details = [api.get(f"/api/v1/nodes/{name}") for name in names]
        return [{**gpu, "node": node["name"]} for node in details for gpu in node.get("gpus") or []]
    rows: list[Row] = []
    cursor = None
    while True:
        try:
            body = api.get("/api/v1/dashboard/fleet", limit=500, gpu_limit=64, cursor=cursor)
        except ClientError as exc:  # a controller without the dashboard's overview: a request per node
            if exc.exit_code != EXIT_NOT_FOUND or cursor is not None:
                raise
            return _fetch_gpus(api, Filters(full=True))
        for node in body.get("nodes") or []:
            rows.extend({**gpu, "node": node["name"]} for gpu in node.get("gpus") or [])
        cursor = body.get("next_cursor")
        if not cursor:
            return rows


def _health(gpu: Row) -> str:
    words = [str(gpu.get("health") or "unknown")]
    if gpu.get("remediation"):
        words.append("Remediating")
    if (_sample(gpu, "throttle_reasons") or 0) & ~0x1:  # bit 0 is "GPU idle": not a throttle
        words.append("Throttled")
    return ",".join(words)


def _memory(gpu: Row) -> str | None:
    used = _sample(gpu, "memory_used_bytes")
    return None if used is None else f"{used / 2**30:.1f}Gi"


def gpu_vendor(gpu: Row) -> str | None:
    """The GPU's vendor; an older edge (no `vendor` in its status) runs NVIDIA GPUs on NVML. None
    while only telemetry has been seen (no status: no name either)."""
    if gpu.get("vendor"):
        return str(gpu["vendor"])
    return "nvidia" if gpu.get("name") else None


def _vendor_platform(gpu: Row) -> str | None:
    vendor = gpu_vendor(gpu)
    return vendor if vendor is None or not gpu.get("platform") else f"{vendor}/{gpu['platform']}"


GPU_COLUMNS = [
    Column("NODE", lambda g: g.get("node"), floor=16),
    Column("IDX", lambda g: g.get("index"), shrink=False),
    Column("UUID", lambda g: g.get("uuid"), floor=13, optional=True),
    Column("HEALTH", _health),
    Column("TEMP", lambda g: _celsius(_sample(g, "temperature_c")), shrink=False),
    Column("POWER", lambda g: _watts(_sample(g, "power_w")), shrink=False),
    Column("LIMIT", lambda g: _watts(g.get("power_limit_w")), shrink=False),
    Column("UTIL", lambda g: None if _sample(g, "utilization_pct") is None else f"{_sample(g, 'utilization_pct'):.0f}%",
           shrink=False),
    Column("MODEL", lambda g: g.get("name"), wide_only=True),
    Column("VENDOR", _vendor_platform, wide_only=True),
    Column("MEM", _memory, wide_only=True, shrink=False),
    Column("SM-MHZ", lambda g: _sample(g, "sm_clock_mhz"), wide_only=True, shrink=False),
    Column("PCI", lambda g: g.get("pci_bus_id"), wide_only=True),
    Column("PODS", lambda g: ",".join(g.get("pods") or []), wide_only=True),
    Column("REMEDIATION", lambda g: g.get("remediation"), wide_only=True),
]


def _fetch_migrations(api: Api, f: Filters) -> list[Row]:
    if f.name:
        return [api.get(f"/api/v1/migrations/{f.name}")]
    return pages(api, "/api/v1/migrations", "migrations", f.limit, node=f.node, state=f.state)


MIGRATION_COLUMNS = [
    Column("ID", lambda m: m.get("id"), shrink=False),
    Column("NODE", lambda m: m.get("node"), floor=16),
    Column("TRIGGER", lambda m: m.get("trigger")),
    Column("STATE", lambda m: m.get("state")),
    Column("PODS", lambda m: len(m.get("pods") or {}), shrink=False, optional=True),
    Column("AGE", lambda m: age(m.get("created_at")), shrink=False, volatile=True),
    Column("GPU", lambda m: m.get("gpu_uuid"), wide_only=True),
    Column("STEPS", lambda m: " > ".join(str(s.get("step")) for s in m.get("steps") or []), wide_only=True),
    Column("REASON", lambda m: m.get("reason"), wide_only=True, text=True),
]


def _fetch_rollouts(api: Api, f: Filters) -> list[Row]:
    if f.name:
        return [api.get(f"/api/v1/rollouts/{f.name}")]
    return list(api.get("/api/v1/rollouts", limit=f.limit).get("rollouts") or [])


def _counts(rollout: Row) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((rollout.get("counts") or {}).items()) if v)


ROLLOUT_COLUMNS = [
    Column("ID", lambda r: r.get("id"), shrink=False),
    Column("STATE", lambda r: r.get("state"), shrink=False),
    Column("VERSION", lambda r: r.get("version")),
    Column("WAVE", lambda r: f"{r.get('wave')}/{r.get('waveCount')}", shrink=False),
    Column("NODES", lambda r: r.get("nodeCount"), shrink=False),
    Column("AGE", lambda r: age(r.get("createdAt")), shrink=False, volatile=True),
    Column("PROGRESS", _counts, text=True),
    Column("IMAGE", lambda r: r.get("image"), wide_only=True),
    Column("REASON", lambda r: r.get("reason"), wide_only=True, text=True),
]


def _fetch_policies(api: Api, f: Filters) -> list[Row]:
    if f.name:
        return [api.get(f"/api/v1/policies/{f.name}")]
    listed = list(api.get("/api/v1/policies").get("policies") or [])
    if f.full:  # the per-vendor outcomes are in each policy's own object (a request per policy: few)
        return [api.get(f"/api/v1/policies/{p['name']}") for p in listed]
    return listed


def _vendors(policy: Row) -> str | None:
    """`amd 2/2 advisory, nvidia 4/4 applied`: per GPU vendor of the selected nodes, the GPUs whose
    newest policy action was applied or recorded advisory, of all its GPUs."""
    vendors = policy.get("vendors")
    if not isinstance(vendors, dict):
        return None
    parts = []
    for vendor, v in sorted(vendors.items()):
        counts = [f"{v.get(k)}/{v.get('gpus')} {k}" for k in ("applied", "advisory") if v.get(k)]
        acted = ", ".join(counts) or f"0/{v.get('gpus')} acted"
        parts.append(f"{vendor} {acted}")
    return "; ".join(parts) or None


def _selector(policy: Row) -> str:
    selector = policy.get("node_selector")
    if isinstance(selector, dict):
        return ",".join(f"{k}={v}" for k, v in selector.items()) or "(all)"
    return str(selector)


POLICY_COLUMNS = [
    Column("NAME", lambda p: p.get("name")),
    Column("VALID", lambda p: p.get("valid"), shrink=False),
    Column("PRIORITY", lambda p: p.get("priority"), shrink=False),
    Column("SELECTOR", _selector),
    Column("NODES", lambda p: (p.get("status") or {}).get("nodesMatched"), shrink=False),
    Column("APPLIED", lambda p: (p.get("status") or {}).get("applied"), shrink=False),
    Column("GEN", lambda p: p.get("generation"), shrink=False),
    Column("SOURCE", lambda p: p.get("source"), wide_only=True),
    Column("VENDORS", _vendors, wide_only=True),
    Column("REASON", lambda p: p.get("reason") or "; ".join(
        f"{e.get('field')}: {e.get('problem')}" for e in p.get("errors") or []), wide_only=True),
]


def _fetch_events(api: Api, f: Filters) -> list[Row]:
    return pages(api, "/api/v1/events", "events", f.limit or 50, node=f.node, kind=f.kind)


def event_summary(event: Row) -> str:
    """The body in a few words: the fields an operator reads first, then the rest as k=v."""
    body = event.get("body") or {}
    if not isinstance(body, dict):
        return str(body)
    if event.get("kind") == "command_result":  # "drain ok: draining GPU 1"
        return f"{body.get('command')} {'ok' if body.get('ok') else 'FAILED'}: {body.get('detail') or ''}".strip()
    first = [k for k in ("command", "ok", "gpu_index", "reason", "detail", "xid", "state") if k in body]
    rest = [k for k in body if k not in first and not k.endswith("_id") and not isinstance(body[k], dict | list)]
    return " ".join(f"{k}={body[k]}" for k in first + rest)


EVENT_COLUMNS = [
    Column("AGE", lambda e: age(e.get("ts")), shrink=False, volatile=True),
    Column("NODE", lambda e: e.get("node"), floor=16),
    Column("KIND", lambda e: e.get("kind")),
    Column("SEQ", lambda e: e.get("seq"), shrink=False, optional=True),
    Column("MESSAGE", event_summary, text=True),
    Column("EPOCH", lambda e: e.get("epoch"), wide_only=True),
    Column("MSG-ID", lambda e: e.get("msg_id"), wide_only=True),
]

KINDS: dict[str, Kind] = {
    "nodes": Kind(_fetch_nodes, lambda n: str(n.get("name")), NODE_COLUMNS),
    "gpus": Kind(_fetch_gpus, lambda g: str(g.get("uuid")), GPU_COLUMNS),
    "migrations": Kind(_fetch_migrations, lambda m: str(m.get("id")), MIGRATION_COLUMNS),
    "rollouts": Kind(_fetch_rollouts, lambda r: str(r.get("id")), ROLLOUT_COLUMNS),
    "policies": Kind(_fetch_policies, lambda p: str(p.get("name")), POLICY_COLUMNS),
    "events": Kind(_fetch_events, lambda e: str(e.get("id")), EVENT_COLUMNS),
}
ALIASES = {"node": "nodes", "no": "nodes", "gpu": "gpus", "migration": "migrations", "mig": "migrations",
           "rollout": "rollouts", "ro": "rollouts", "policy": "policies", "pol": "policies", "event": "events",
           "ev": "events"}


def resolve_gpu(api: Api, node: str, gpu: str) -> tuple[str | None, str]:
    """A GPU given by index or UUID → (its UUID, how to name it); `all` → (None, "all GPUs")."""
    if gpu.lower() == "all":
        return None, "all GPUs"
    detail = api.get(f"/api/v1/nodes/{node}")
    for row in detail.get("gpus") or []:
        if (gpu.isdigit() and row.get("index") == int(gpu)) or row.get("uuid") == gpu:
            return str(row["uuid"]), f"GPU {row.get('index')} ({row['uuid']})"
    known = ", ".join(f"{g.get('index')}={g.get('uuid')}" for g in detail.get("gpus") or []) or "none reported"
    raise ClientError(f"node {node} has no GPU {gpu!r} (its GPUs: {known})", EXIT_NOT_FOUND)
