"""`kgpu describe node NAME`: one node from every side the controller knows it (its row and GPUs,
its resolved policy, the commands sent to it, its migrations and latest events), as kubectl's
describe prints: `Key: value` lines, then a table per section."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kgpu.client.http import Api, ClientError
from kgpu.client.render import Column, age, table
from kgpu.client.resources import EVENT_COLUMNS, MIGRATION_COLUMNS, gpu_vendor

RECENT = 10


def gather_node(api: Api, name: str) -> dict[str, Any]:
    """Everything describe shows, as one document (what `-o json` prints)."""
    node = api.get(f"/api/v1/nodes/{name}")
    try:
        policy = api.get(f"/api/v1/nodes/{name}/policy")
    except ClientError:  # a node the policy part has not seen yet: describe the rest
        policy = None
    commands = api.get("/api/v1/commands", node=name, limit=RECENT).get("commands") or []
    migrations = api.get("/api/v1/migrations", node=name, limit=RECENT).get("migrations") or []
    events = api.get("/api/v1/events", node=name, limit=RECENT).get("events") or []
    return {"node": node, "policy": policy, "commands": commands, "migrations": migrations, "events": events}


def _fields(pairs: Sequence[tuple[str, Any]], wrap: int = 80) -> list[str]:
    """`Key:  value` lines; a value that would pass `wrap` columns goes on at the value's column,
    split after its commas (a list: labels, capabilities)."""
    width = max(len(k) for k, _ in pairs) + 2
    lines: list[str] = []
    for k, v in pairs:
        line = f"{(k + ':').ljust(width)}{'-' if v in (None, '', [], {}) else v}"
        while len(line) > wrap and ", " in line[width:wrap]:
            cut = line.rindex(", ", width, wrap) + 1
            lines.append(line[:cut])
            line = " " * width + line[cut:].lstrip()
        lines.append(line)
    return lines


def _policy_line(policy: dict[str, Any] | None) -> str:
    if not policy or not policy.get("policy_name"):
        return "none selects this node"
    applied = "applied" if policy.get("applied") else (
        f"not applied yet (edge reports {policy.get('reported_name')}@{policy.get('reported_version')})")
    return f"{policy['policy_name']}@{policy.get('version')}, {applied}"


def _vendor_line(gpus: Sequence[dict[str, Any]]) -> str | None:
    """`amd (backend amd, platform instinct)`, one part per distinct vendor, backend and platform."""
    parts: list[str] = []
    for g in gpus:
        vendor = gpu_vendor(g)
        if vendor is None:
            continue
        backend = g.get("backend") or ("nvml" if vendor == "nvidia" and not g.get("vendor") else None)
        detail = ", ".join(f"{k} {v}" for k, v in (("backend", backend), ("platform", g.get("platform"))) if v)
        text = f"{vendor} ({detail})" if detail else vendor
        if text not in parts:
            parts.append(text)
    return "; ".join(parts) or None


def _capabilities_line(gpus: Sequence[dict[str, Any]]) -> str | None:
    """The capabilities the GPUs declare: one list when they all declare the same, else per GPU."""
    declared = [(g.get("index"), sorted(g["capabilities"])) for g in gpus if g.get("capabilities") is not None]
    if not declared:
        return None
    if all(caps == declared[0][1] for _, caps in declared):
        return ", ".join(declared[0][1]) or "none"
    return "; ".join(f"GPU {index}: {', '.join(caps) or 'none'}" for index, caps in declared)


COMMAND_COLUMNS = [
    Column("AGE", lambda c: age(c.get("created_at")), shrink=False, volatile=True),
    Column("COMMAND", lambda c: c.get("command")),
    Column("STATE", lambda c: c.get("state")),
    Column("SENDS", lambda c: c.get("sends"), shrink=False),
    Column("DETAIL", lambda c: c.get("detail"), text=True),
]


def describe_node(found: dict[str, Any], gpu_columns: Sequence[Column], width: int | None) -> list[str]:
    node = found["node"]
    summary = node.get("gpu_summary") or {}
    lines = _fields([
        ("Name", node.get("name")),
        ("Status", ("Online" if node.get("online") else "Offline")
         + (f", degraded: {', '.join(node['degraded'])}" if node.get("degraded") else "")),
        ("Last seen", f"{age(node.get('last_seen'))} ago"),
        ("First seen", f"{age(node.get('first_seen'))} ago"),
        ("Daemon version", node.get("daemon_version")),
        ("Policy", _policy_line(found.get("policy"))),
        ("Labels", ", ".join(f"{k}={v}" for k, v in (node.get("labels") or {}).items())),
        ("GPUs", f"{summary.get('count', 0)} ({summary.get('healthy', 0)} healthy, {summary.get('unhealthy', 0)} "
                 f"unhealthy, {summary.get('lost', 0)} lost)"),
        ("Vendor", _vendor_line(node.get("gpus") or [])),
        ("Capabilities", _capabilities_line(node.get("gpus") or [])),
        ("Outbox", f"depth {node.get('outbox_depth')}, acked seq {node.get('acked_seq')}, gaps {node.get('gaps')}"),
        ("Clock skew", None if node.get("clockSkewSeconds") is None else f"{node['clockSkewSeconds']:+.1f} s"),
        ("Over budget", node.get("over_budget")),
        ("Quarantined until", None if not node.get("quarantined_until") else
         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(node["quarantined_until"])))),
    ])
    inner = None if width is None else width - 2
    sections: list[tuple[str, list[dict[str, Any]], Sequence[Column]]] = [
        ("GPU devices", [{**g, "node": node.get("name")} for g in node.get("gpus") or []],
         [c for c in gpu_columns if c.header != "NODE"]),
        (f"Commands (latest {RECENT})", found.get("commands") or [], COMMAND_COLUMNS),
        (f"Migrations (latest {RECENT})", found.get("migrations") or [],
         [c for c in MIGRATION_COLUMNS if c.header != "NODE"]),
        (f"Events (latest {RECENT})", found.get("events") or [],
         [Column(c.header, c.value, shrink=c.shrink) for c in EVENT_COLUMNS if c.header not in ("NODE",)
          and not c.wide_only]),
    ]
    for title, rows, columns in sections:
        lines.append(f"{title}:")
        if not rows:
            lines.append("  <none>")
            continue
        lines.extend("  " + line for line in table(rows, columns, wide=False, width=inner))
    return lines
