"""The policies' HTTP API: `/api/v1/policies[/{name}]`, node labels and a node's policy.

Reads work in both modes; writes only without a cluster (--no-kube): with one, the
`GPUPowerPolicy` objects and the Kubernetes nodes are the source, so PUT/DELETE answer 409."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from cloud.kube import Kube
from cloud.policies.repository import PolicyRepository
from cloud.policies.resolution import POLICY_NAME_RE, ValidPolicy, validate_labels, validate_spec
from cloud.policies.sources import SOURCE_API
from shared.http import invalid_body, json_error, read_json
from shared.logs import get_logger
from shared.openapi import conform_body
from shared.topics import NODE_NAME_RE

log = get_logger(__name__)

MODE_CONFLICT = "policies come from GPUPowerPolicy objects in this mode"
LABELS_CONFLICT = "node labels come from the Kubernetes nodes in this mode"


class Policies(Protocol):
    """What the routes use of the part (cloud/policies/manager.py)."""

    tables: PolicyRepository
    kube: Kube | None

    @property
    def source(self) -> str: ...

    def wake(self) -> None: ...


def add_routes(app: web.Application, manager: Policies) -> None:
    tables = manager.tables

    async def list_policies(_: web.Request) -> web.Response:
        rows = await asyncio.to_thread(tables.policies)
        return web.json_response({"source": manager.source, "policies": [policy_out(r) for r in rows]})

    async def get_policy(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        row = await asyncio.to_thread(tables.policy, name) if POLICY_NAME_RE.match(name) else None
        if row is None:
            return json_error(404, "no such policy", name)
        nodes = await asyncio.to_thread(tables.node_rows, name)
        vendors = await asyncio.to_thread(tables.store.policy_outcomes, [n["node"] for n in nodes])
        return web.json_response({**policy_out(row), "nodes": nodes, "vendors": vendors})

    async def put_policy(request: web.Request) -> web.Response:
        if manager.kube is not None:
            return json_error(409, MODE_CONFLICT, "kubectl apply a GPUPowerPolicy instead")
        name = request.match_info["name"]
        body = await read_json(request)
        spec = _unwrap(body, name)
        checked = validate_spec(name, spec)
        if not isinstance(checked, ValidPolicy):
            raise invalid_body([e.as_dict() for e in checked.errors], "invalid policy")
        conform_body(request, body, "invalid policy")  # types exactly as described: no lax "300" or true
        row, created = await asyncio.to_thread(tables.put_policy, name, dict(spec), SOURCE_API, time.time())
        log.info("policy %s over the API", "created" if created else "written",
                 extra={"policy": name, "generation": row["generation"]})
        manager.wake()
        return web.json_response(policy_out(row), status=201 if created else 200)

    async def delete_policy(request: web.Request) -> web.Response:
        if manager.kube is not None:
            return json_error(409, MODE_CONFLICT, "kubectl delete the GPUPowerPolicy instead")
        name = request.match_info["name"]
        if not POLICY_NAME_RE.match(name) or not await asyncio.to_thread(tables.delete_policy, name):
            return json_error(404, "no such policy", name)
        log.info("policy deleted over the API", extra={"policy": name})
        manager.wake()
        return web.json_response({"deleted": name})

    async def put_labels(request: web.Request) -> web.Response:
        if manager.kube is not None:
            return json_error(409, LABELS_CONFLICT, "label the Kubernetes node instead")
        node = request.match_info["node"]
        if not NODE_NAME_RE.match(node):
            return json_error(400, "not a valid node name", node)
        body = await read_json(request)
        labels, errors = validate_labels(body.get("labels") if isinstance(body, dict) else None)
        if labels is None or not isinstance(body, dict) or set(body) - {"labels"}:
            detail = [e.as_dict() for e in errors] or [{"field": "", "problem": 'expected {"labels": {...}}'}]
            raise invalid_body(detail, "invalid labels")
        conform_body(request, body, "invalid labels")
        await asyncio.to_thread(tables.set_labels, node, labels, time.time())
        manager.wake()
        return web.json_response({"node": node, "labels": labels})

    async def node_policy(request: web.Request) -> web.Response:
        node = request.match_info["node"]
        rows = await asyncio.to_thread(tables.node_rows, None, node) if NODE_NAME_RE.match(node) else []
        if not rows:
            return json_error(404, "no such node for policies", node)
        return web.json_response(rows[0])

    app.router.add_get("/api/v1/policies", list_policies)
    app.router.add_get("/api/v1/policies/{name}", get_policy)
    app.router.add_put("/api/v1/policies/{name}", put_policy)
    app.router.add_delete("/api/v1/policies/{name}", delete_policy)
    app.router.add_put("/api/v1/nodes/{node}/labels", put_labels)
    app.router.add_get("/api/v1/nodes/{node}/policy", node_policy)


def policy_out(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored policy as the API shows it: validity, priority, selector and the policy itself."""
    checked = validate_spec(row["name"], row["spec"], int(row["generation"]))
    spec = row["spec"] if isinstance(row["spec"], Mapping) else {}
    out = {
        "name": row["name"], "source": row["source"], "generation": row["generation"],
        "spec": row["spec"], "status": row["status"] or {},
        "created_at": row["created_at"], "updated_at": row["updated_at"],
    }
    if isinstance(checked, ValidPolicy):
        policy = checked.policy.dump()
        policy.pop("version", None)
        out.update(valid=True, reason=None, errors=[], priority=checked.priority,
                   node_selector=dict(checked.node_selector), policy=policy)
    else:
        out.update(valid=False, reason=checked.reason, errors=[e.as_dict() for e in checked.errors],
                   priority=spec.get("priority"), node_selector=spec.get("nodeSelector"), policy=None)
    return out


def _unwrap(body: Any, name: str) -> Any:
    """Accept the spec itself, or a whole object `{"apiVersion", "kind", "metadata", "spec"}`."""
    if isinstance(body, dict) and "spec" in body and set(body) <= {"apiVersion", "kind", "metadata", "spec"}:
        given = (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
        if given not in (None, name):
            raise invalid_body([{"field": "metadata.name", "problem": f"{str(given)[:300]!r} is not {name!r}"}],
                               "invalid policy")
        return body["spec"]
    return body
