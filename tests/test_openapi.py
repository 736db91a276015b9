"""The OpenAPI descriptions (cloud/openapi.yaml, edge/openapi.yaml) stay true to the servers:

- they are valid OpenAPI 3.1 and every schema in them is valid JSON Schema 2020-12;
- every route a live app registers is described, with the same methods, and nothing else is
  (the cloud with all its subsystems, without and with a cluster; the edge with and without the
  simulated driver, whose fault endpoint exists only with it);
- real responses of real processes validate against the schema of their status code;
- the schemas derived from the code follow it (a column or field added shows up).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from cloud.http.api import openapi_spec as cloud_spec
from edge.api import openapi_spec as edge_spec
from kgpu.lab.processes import wait_for
from shared.openapi import OPENAPI, SPEC_PATH, OpenApi
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

# each description completed as its server completes it (the tables, models and enums it hands over)
SPECS: dict[str, Callable[[], OpenApi]] = {"cloud": cloud_spec, "edge-sim": lambda: edge_spec(("sim",)),
                                           "edge-nvml": edge_spec}


def _schemas(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON Schema object in an OpenAPI document (components, parameters, bodies, responses)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                yield f"{where}/{key}", value
            elif key == "schemas" and isinstance(value, dict):
                for name, schema in value.items():
                    yield f"{where}/schemas/{name}", schema
            else:
                yield from _schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schemas(value, f"{where}/{i}")


@pytest.mark.parametrize("which", sorted(SPECS))
def test_the_descriptions_are_valid_openapi_and_json_schema(which: str) -> None:
    spec = SPECS[which]()
    schemathesis.openapi.from_dict(spec.document).validate()  # OpenAPI 3.1's own schema
    schemas = list(_schemas(spec.document))
    assert len(schemas) > 20
    for where, schema in schemas:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            pytest.fail(f"{which} {where}: {exc.message}")
    # every $ref resolves
    text = json.dumps(spec.document)
    for ref in {r.split('"')[0] for r in text.split('"$ref": "')[1:]}:
        node: Any = spec.document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{which}: dangling $ref {ref}"
            node = node[part]


# ---- routes of live apps against the description --------------------------------------------


def _routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route; HEAD is aiohttp's automatic twin of GET."""
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"}


def cloud_app(tmp_path: Path, **settings: Any) -> tuple[web.Application, Any]:
    from cloud.app import build
    from cloud.config import CloudSettings

    controller = build(CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", **settings))
    return controller.http_app(), controller


def edge_app(tmp_path: Path, backend: str) -> tuple[web.Application, Any]:
    from edge import sim
    from edge.api import make_app
    from edge.config import EdgeSettings
    from edge.daemon import EdgeDaemon

    settings = EdgeSettings(node="edge-a", db=tmp_path / "edge.db", backend=backend)
    simulated = sim.install(1, "T4") if backend == "sim" else None
    daemon = EdgeDaemon(settings, sim=simulated)
    return make_app(daemon), (daemon, simulated)


def _assert_described(app: web.Application) -> OpenApi:
    spec = app[OPENAPI]
    routes, described = _routes(app), spec.operations()
    assert routes - described == set(), f"routes missing from the description: {sorted(routes - described)}"
    assert described - routes == set(), f"described but not served: {sorted(described - routes)}"
    return spec


def test_every_cloud_route_is_described_without_a_cluster(tmp_path: Path) -> None:
    app, controller = cloud_app(tmp_path, no_kube=True, api_insecure=True)
    try:
        spec = _assert_described(app)
        assert ("POST", "/api/v1/rollouts") in spec.operations() and ("PUT", "/api/v1/policies/{name}") in spec.operations()
        # every part added routes: commands, policies, migrations, rollouts, the dashboard
        assert {s.name for s in controller.parts} == {"edge-commands", "policies", "migration", "rollouts",
                                                      "memory-share", "partitioning", "node-labels", "reboots"}
        assert {("GET", "/api/v1/migrations"), ("GET", "/api/v1/commands"), ("GET", "/api/v1/dashboard/fleet"),
                ("GET", "/")} <= spec.operations()
    finally:
        controller.store.close()


def test_every_cloud_route_is_described_with_a_cluster(tmp_path: Path, kube: Any) -> None:
    app, controller = cloud_app(tmp_path, kubeconfig=kube.kubeconfig, api_token_secret="kgpu-api")
    try:
        assert controller.kube is not None
        _assert_described(app)
    finally:
        controller.store.close()
        controller.kube.close()


@pytest.mark.parametrize("backend", ["sim", "nvml"])
def test_every_edge_route_is_described_and_the_fault_endpoint_only_with_sim(tmp_path: Path, backend: str) -> None:
    app, (daemon, simulated) = edge_app(tmp_path, backend)
    try:
        spec = _assert_described(app)
        sim_route = ("POST", "/api/v1/sim/gpus/{index}")
        assert (sim_route in spec.operations()) == (backend == "sim")
        assert (sim_route in _routes(app)) == (backend == "sim")
    finally:
        daemon.store.close()
        if simulated is not None:
            simulated.uninstall()


def test_the_description_follows_the_code() -> None:
    from cloud.rollout import RolloutRequest
    from cloud.store import events_table, nodes_table
    from edge.sim import SimFault
    from shared.policy import PowerPolicy

    cloud = cloud_spec().document["components"]["schemas"]
    assert set(cloud["Node"]["properties"]) == {c.name for c in nodes_table.columns} | {"gpu_summary", "clockSkewSeconds",
                                                                                           "over_budget", "quarantined_until"}
    assert set(cloud["Event"]["required"]) == {c.name for c in events_table.columns}
    assert set(cloud["RolloutRequest"]["properties"]) == {f.alias or n for n, f in RolloutRequest.model_fields.items()}
    spec_fields = set(cloud["PolicySpec"]["properties"])
    assert spec_fields == {f.alias for n, f in PowerPolicy.model_fields.items() if n not in ("name", "version")} | {
        "nodeSelector", "priority"}
    # a duration takes seconds or "2m", as the model does
    sustain = cloud["PolicySpec_PowerSaving"]["properties"]["sustainPeriod"]
    assert {"type": "string", "pattern": sustain["anyOf"][1]["pattern"]} in sustain["anyOf"]
    assert "ge" not in sustain and sustain["minimum"] == 0 and sustain["maximum"] == 7 * 24 * 3600
    edge = edge_spec(("sim",)).document["components"]["schemas"]
    assert set(edge["SimFault"]["properties"]) == set(SimFault.model_fields)
    rollout_states = cloud["Rollout"]["properties"]["state"]["enum"]
    assert "running" in rollout_states and "cancelled" in rollout_states


def test_every_operation_documents_its_errors() -> None:
    for which, spec in SPECS.items():
        document = spec().document
        for route, item in document["paths"].items():
            for method, op in item.items():
                if method == "parameters":
                    continue
                codes = set(op["responses"])
                where = f"{which} {method.upper()} {route}"
                assert any(c.startswith("2") for c in codes), where
                if "requestBody" in op:
                    assert {"400", "413", "415"} <= codes, where
                if which == "cloud" and method != "get":
                    assert op["security"] == [{"bearer": []}], f"{where}: a change needs the token"
                    assert {"401", "403"} <= codes, where
                if which == "cloud" and route.startswith("/api/v1/") and route != SPEC_PATH:
                    assert "401" in codes, f"{where}: reads may need the token (--api-auth all)"


def test_the_spec_is_served_and_the_nvml_edge_has_no_fault_endpoint(tmp_path: Path) -> None:
    edge = EdgeProcess(tmp_path)
    edge.args[edge.args.index("sim")] = "nvml"  # this machine has no libnvidia-ml: an edge without GPUs
    edge.start()
    try:
        served = edge.get(SPEC_PATH)
        assert served["openapi"].startswith("3.1") and "/api/v1/gpus" in served["paths"]
        assert "/api/v1/sim/gpus/{index}" not in served["paths"]
        assert edge.request("POST", "/api/v1/sim/gpus/0", {"xid": 79})[0] in (404, 405)
    finally:
        edge.stop()


# ---- real responses against the schemas -----------------------------------------------------


class ResponseChecker:
    """Validates real answers against the description's schema for their status code."""

    def __init__(self, spec: OpenApi) -> None:
        self.spec = spec
        self.checked: set[tuple[str, str]] = set()

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.spec.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def check(self, process: EdgeProcess, method: str, template: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, answer = process.request(method, path, body)
        op = self.spec.document["paths"][template][method.lower()]
        assert str(status) in op["responses"], f"{method} {path}: {status} is not documented: {answer}"
        response = self._resolve(op["responses"][str(status)])
        content = response.get("content", {})
        if "application/json" in content:
            errors = sorted(self.spec.validator(content["application/json"]["schema"]).iter_errors(answer),
                            key=lambda e: list(map(str, e.absolute_path)))
            assert not errors, f"{method} {path} -> {status}: {[(list(e.absolute_path), e.message) for e in errors[:5]]}"
        else:
            assert isinstance(answer, str), (method, path, status)
        self.checked.add((method, template))
        return status, answer


@pytest.mark.slow
def test_real_responses_match_the_description(tmp_path: Path, broker: Any) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url, token="t0ken-for-tests",
                         env={"KGPU_HISTORY_RESOLUTION": "0"})
    edge = EdgeProcess(tmp_path / "edge", node="edge-a", gpus=2, mqtt=broker.url,
                       config={"ack_timeout": 3, "status_interval": 1})
    try:
        cloud.start()
        edge.start()
        wait_for(lambda: cloud.node_state("edge-a") and cloud.node_state("edge-a")["gpus"], what="edge-a at the cloud")
        edge.inject(0, xid=79)  # a health event, a decision, a migration trigger (needs-cluster)
        wait_for(lambda: cloud.get("/api/v1/events?node=edge-a")["events"], what="events at the cloud")
        wait_for(lambda: cloud.get("/api/v1/migrations")["migrations"], what="a migration record")

        c = ResponseChecker(cloud_spec())
        c.check(cloud, "PUT", "/api/v1/nodes/{node}/labels", "/api/v1/nodes/edge-a/labels", {"labels": {"zone": "a"}})
        policy = {"nodeSelector": {"zone": "a"}, "priority": 3, "powerCapWatts": 250,
                  "powerSaving": {"enabled": True, "sustainPeriod": "2m"}}
        assert c.check(cloud, "PUT", "/api/v1/policies/{name}", "/api/v1/policies/zone-a", policy)[0] == 201
        assert c.check(cloud, "PUT", "/api/v1/policies/{name}", "/api/v1/policies/zone-a", policy)[0] == 200
        assert c.check(cloud, "PUT", "/api/v1/policies/{name}", "/api/v1/policies/zone-a", {"powerCapWatts": -1})[0] == 400
        wait_for(lambda: cloud.get("/api/v1/nodes/edge-a/policy")["applied"], what="the policy applied on edge-a")
        migration_id = cloud.get("/api/v1/migrations")["migrations"][0]["id"]
        uuid = edge.gpu(1)["inventory"]["uuid"]
        assert c.check(cloud, "POST", "/api/v1/nodes/{node}/commands", "/api/v1/nodes/edge-a/commands",
                       {"command": "drain", "gpuUuid": uuid})[0] == 202
        assert c.check(cloud, "POST", "/api/v1/nodes/{node}/commands", "/api/v1/nodes/nobody/commands",
                       {"command": "drain"})[0] == 404
        wait_for(lambda: cloud.get("/api/v1/commands?node=edge-a")["commands"][0]["state"] == "done",
                 what="the drain answered")
        for template, path in [
            ("/api/v1/commands", "/api/v1/commands"), ("/api/v1/commands", "/api/v1/commands?node=edge-a&limit=1"),
            ("/healthz", "/healthz"), ("/metrics", "/metrics"), ("/metrics/fleet", "/metrics/fleet"),
            (SPEC_PATH, SPEC_PATH),
            ("/api/v1/nodes", "/api/v1/nodes"), ("/api/v1/nodes/{node}", "/api/v1/nodes/edge-a"),
            ("/api/v1/nodes/{node}", "/api/v1/nodes/nobody"),
            ("/api/v1/nodes/{node}/samples", "/api/v1/nodes/edge-a/samples?limit=5"),
            ("/api/v1/nodes/{node}/samples", "/api/v1/nodes/edge-a/samples?since=never"),
            ("/api/v1/nodes/{node}/policy", "/api/v1/nodes/edge-a/policy"),
            ("/api/v1/partitioning", "/api/v1/partitioning"),
            ("/api/v1/nodes/{node}/partitioning", "/api/v1/nodes/edge-a/partitioning"),
            ("/api/v1/nodes/{node}/partitioning", "/api/v1/nodes/nobody/partitioning"),
            ("/api/v1/events", "/api/v1/events?node=edge-a&limit=50"), ("/api/v1/events", "/api/v1/events?limit=0"),
            ("/api/v1/decisions", "/api/v1/decisions?node=edge-a"),
            ("/api/v1/policies", "/api/v1/policies"), ("/api/v1/policies/{name}", "/api/v1/policies/zone-a"),
            ("/api/v1/policies/{name}", "/api/v1/policies/none"),
            ("/api/v1/rollouts", "/api/v1/rollouts"), ("/api/v1/rollouts/{id}", "/api/v1/rollouts/1"),
            ("/api/v1/migrations", "/api/v1/migrations?node=edge-a"),
            ("/api/v1/migrations/{id}", f"/api/v1/migrations/{migration_id}"),
            ("/api/v1/migrations/{id}", "/api/v1/migrations/x"),
            ("/api/v1/dashboard/stream", "/api/v1/dashboard/stream"),
            ("/api/v1/reboots", "/api/v1/reboots"), ("/api/v1/reboots", "/api/v1/reboots?node=edge-a&verdict=hold"),
            ("/api/v1/reboots", "/api/v1/reboots?verdict=maybe"),
            ("/api/v1/dashboard/fleet", "/api/v1/dashboard/fleet"), ("/", "/"), ("/static/{name}", "/static/nope"),
        ]:
            c.check(cloud, "GET", template, path)
        assert c.check(cloud, "POST", "/api/v1/rollouts", "/api/v1/rollouts", {"image": "kgpu:2"})[0] == 409
        c.check(cloud, "POST", "/api/v1/rollouts/{id}/rollback", "/api/v1/rollouts/1/rollback")
        c.check(cloud, "POST", "/api/v1/rollouts/{id}/cancel", "/api/v1/rollouts/1/cancel")
        c.check(cloud, "DELETE", "/api/v1/policies/{name}", "/api/v1/policies/zone-a")
        assert c.checked >= {(m, p) for m, p in c.spec.operations() if m in ("GET", "PUT", "DELETE")}, \
            sorted({(m, p) for m, p in c.spec.operations()} - c.checked)

        e = ResponseChecker(edge_spec(("sim",)))
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}", "/api/v1/sim/gpus/1", {"utilization": 90})
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}", "/api/v1/sim/gpus/9", {"utilization": 90})
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}", "/api/v1/sim/gpus/1", {"utilization": "high"})
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}/diag", "/api/v1/sim/gpus/1/diag?level=2")
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}/diag", "/api/v1/sim/gpus/1/diag?level=9")
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}/reset", "/api/v1/sim/gpus/9/reset")
        e.check(edge, "POST", "/api/v1/sim/gpus/{index}/reset", "/api/v1/sim/gpus/1/reset")
        e.check(edge, "POST", "/api/v1/sim/reboot", "/api/v1/sim/reboot")
        for template, path in [
            ("/healthz", "/healthz"), ("/metrics", "/metrics"), (SPEC_PATH, SPEC_PATH), ("/api/v1/gpus", "/api/v1/gpus"),
            ("/api/v1/decisions", "/api/v1/decisions?limit=5"), ("/api/v1/decisions", "/api/v1/decisions?before=x"),
            ("/api/v1/events", "/api/v1/events"), ("/api/v1/policy", "/api/v1/policy"), ("/api/v1/energy", "/api/v1/energy"),
        ]:
            e.check(edge, "GET", template, path)
        assert e.checked == e.spec.operations()
    finally:
        edge.stop()
        cloud.stop()
