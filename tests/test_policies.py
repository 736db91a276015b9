"""GPU power policies end to end: GPUPowerPolicy objects (or the REST API without a cluster) →
a real `kgpu cloud run` → retained MQTT messages on a real mosquitto → real edge daemons.

Also: the CRD manifest's schema agrees with shared/policy.py's PowerPolicy (names, bounds,
defaults, enums), so the two cannot drift apart.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, BeforeValidator
from pydantic.alias_generators import to_camel

from cloud.policies import GROUP, PLURAL, VERSION, PolicyRepository
from cloud.policies.resolution import NodeView, Placement, PolicySource, policy_statuses, resolve
from cloud.store import FleetStore, Incoming
from kgpu.lab.broker import Mosquitto, mosquitto_binary
from kgpu.lab.kube import KubeEmulator
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, Received, parse_broker_url
from shared.policy import PowerPolicy, XidAction
from shared.protocol import Kind, StatusBody, make_envelope
from shared.topics import cloud_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401

CRD_PATH = Path(__file__).resolve().parent.parent / "deploy" / "crds" / "gpupowerpolicy.yaml"
needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")


# ---- the CRD manifest against PowerPolicy ---------------------------------------------------


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_version() -> dict[str, Any]:
    [version] = crd()["spec"]["versions"]
    return version


def python_bounds(info: Any) -> dict[str, Any]:
    """A pydantic field's numeric bounds, spelled as OpenAPI v3 (Kubernetes) writes them."""
    out: dict[str, Any] = {}
    for m in info.metadata:
        if isinstance(m, Ge):
            out["minimum"] = m.ge
        elif isinstance(m, Gt):
            out.update(minimum=m.gt, exclusiveMinimum=True)
        elif isinstance(m, Le):
            out["maximum"] = m.le
        elif isinstance(m, Lt):
            out.update(maximum=m.lt, exclusiveMaximum=True)
    return out


def schema_bounds(schema: dict[str, Any]) -> dict[str, Any]:
    keys = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    return {k: schema[k] for k in keys if k in schema and schema[k] is not False}


def compare_model(model: type[BaseModel], schema: dict[str, Any], defaults: dict[str, Any], path: str,
                  skip: frozenset[str] = frozenset()) -> list[str]:
    """Every difference between a pydantic model and its OpenAPI object schema."""
    problems: list[str] = []
    fields = {(info.alias or to_camel(name)): info for name, info in model.model_fields.items()}
    fields = {alias: info for alias, info in fields.items() if alias not in skip}
    props = schema.get("properties", {})
    if set(props) != set(fields):
        problems.append(f"{path}: CRD has {sorted(set(props) - set(fields))} extra, "
                        f"lacks {sorted(set(fields) - set(props))}")
    for alias, info in fields.items():
        if alias not in props:
            continue
        s, where, default = props[alias], f"{path}.{alias}", defaults.get(alias)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if s.get("type") != "object" or s.get("default") != {}:
                problems.append(f"{where}: expected an object defaulting to {{}}")
            problems += compare_model(annotation, s, default or {}, where)
            continue
        if any(isinstance(m, BeforeValidator) for m in info.metadata):  # a duration (Seconds)
            if not s.get("x-kubernetes-int-or-string"):
                problems.append(f"{where}: a duration must be int-or-string")
            number = next(b for b in s["anyOf"] if b.get("type") == "integer")
            if schema_bounds(number) != python_bounds(info):
                problems.append(f"{where}: bounds {schema_bounds(number)} != {python_bounds(info)}")
        elif schema_bounds(s) != python_bounds(info):
            problems.append(f"{where}: bounds {schema_bounds(s)} != {python_bounds(info)}")
        expected_type = {bool: "boolean", float: "number", int: "integer", str: "string"}.get(annotation)  # type: ignore[call-overload]
        if annotation == float | None:
            expected_type = "number"
            if not s.get("nullable"):
                problems.append(f"{where}: optional in PowerPolicy, so nullable")
        if annotation is XidAction or annotation == dict[int, XidAction]:
            enum = s["enum"] if annotation is XidAction else s["additionalProperties"]["enum"]
            if enum != [a.value for a in XidAction]:
                problems.append(f"{where}: enum {enum}")
            expected_type = "string" if annotation is XidAction else "object"
        if annotation == list[int]:
            expected_type = "array"
            if s.get("items", {}).get("type") != "integer":
                problems.append(f"{where}: items must be integers")
        if expected_type and s.get("type", "number" if "anyOf" in s else None) != expected_type:
            problems.append(f"{where}: type {s.get('type')} != {expected_type}")
        if default is None:
            if "default" in s:
                problems.append(f"{where}: no default in PowerPolicy, {s['default']!r} in the CRD")
        elif s.get("default") != default:
            problems.append(f"{where}: default {s.get('default')!r} != {default!r}")
    return problems


def test_crd_schema_agrees_with_power_policy() -> None:
    spec_schema = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    policy_props = {k: v for k, v in spec_schema["properties"].items() if k not in ("nodeSelector", "priority")}
    defaults = PowerPolicy().dump()
    problems = compare_model(PowerPolicy, {"properties": policy_props}, defaults, "spec",
                             skip=frozenset({"name", "version"}))
    placement = {k: spec_schema["properties"][k] for k in ("nodeSelector", "priority")}
    problems += compare_model(Placement, {"properties": placement}, {"priority": 0, "nodeSelector": {}}, "spec")
    assert problems == []


def test_crd_schema_comparison_catches_drift() -> None:
    """The comparison itself finds a changed bound, a missing field and a changed default."""
    spec_schema = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = {k: v for k, v in spec_schema["properties"].items() if k not in ("nodeSelector", "priority")}
    props["thermalThrottling"]["properties"]["maxTempC"]["maximum"] = 500
    del props["powerSaving"]["properties"]["capPercent"]
    props["xidPolicy"]["properties"]["ignored"]["default"] = [13]
    problems = compare_model(PowerPolicy, {"properties": props}, PowerPolicy().dump(), "spec",
                             skip=frozenset({"name", "version"}))
    text = "\n".join(problems)
    assert "maxTempC: bounds" in text and "capPercent" in text and "ignored: default" in text


def test_crd_shape_status_and_columns() -> None:
    doc = crd()
    assert doc["kind"] == "CustomResourceDefinition" and doc["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert (doc["spec"]["group"], doc["spec"]["scope"], doc["spec"]["names"]["kind"]) == (GROUP, "Cluster", "GPUPowerPolicy")
    version = crd_version()
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Priority"] == ".spec.priority" and columns["Applied"] == ".status.applied"
    assert columns["Pending"] == ".status.pending" and "Valid" in columns["Valid"]
    # what the controller writes fits the status schema
    status_schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    res = resolve([PolicySource("p", {"powerCapWatts": 300}), PolicySource("bad", {"powerCapWatts": -1})],
                  [NodeView("n")], {})
    for status in policy_statuses(res, {}, "2026-01-01T00:00:00Z").values():
        assert set(status) <= set(status_schema["properties"])
        condition_props = status_schema["properties"]["conditions"]["items"]["properties"]
        for condition in status["conditions"]:
            assert set(condition) <= set(condition_props)
            assert condition["status"] in condition_props["status"]["enum"]


# ---- the tables, on both databases ----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    if request.param == "sqlite":
        store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
        yield store
        store.close()
        return
    url = create_database(request.getfixturevalue("pg_url"))  # skips without PostgreSQL
    store = FleetStore(url)
    yield store
    store.close()
    drop_database(url)


def status_from(node: str, name: str, version: int) -> Incoming:
    body = StatusBody(state="online", policy_name=name, policy_version=version, outbox_epoch="e1")
    envelope = make_envelope(node, body, Kind.STATUS)
    return Incoming(envelope=envelope, body=body, received_at=time.time())


def test_policy_tables_round_trip(fleet_store: FleetStore) -> None:
    tables = PolicyRepository(fleet_store)
    east = {"priority": 1, "nodeSelector": {"zone": "east"}, "powerCapWatts": 300}
    row, created = tables.put_policy("east", east, "api", 1.0)
    assert created and row["generation"] == 1
    assert tables.put_policy("east", east, "api", 2.0)[0]["generation"] == 1  # same spec: same generation
    assert tables.put_policy("east", {**east, "powerCapWatts": 280}, "api", 3.0) == (
        {**row, "spec": {**east, "powerCapWatts": 280}, "generation": 2, "updated_at": 3.0}, False)

    # nodes: labelled over REST before its edge ever spoke, and one the fleet store knows
    tables.set_labels("n1", {"zone": "east"}, 4.0)
    fleet_store.ingest([status_from("n1", "default", 0), status_from("n2", "default", 0)])
    tables.adopt_fleet_nodes(5.0)
    assert {n["name"]: n["labels"] for n in fleet_store.nodes()} == {"n1": {"zone": "east"}, "n2": {}}

    snap = tables.snapshot()
    assert [p.name for p in snap.policies] == ["east"] and snap.policies[0].generation == 2
    assert sorted((n.name, n.reported_name, n.reported_version) for n in snap.nodes) == [
        ("n1", "default", 0), ("n2", "default", 0)]
    res = resolve(snap.policies, snap.nodes, snap.records)
    assert res.nodes["n1"].version == 1 and res.nodes["n2"].policy is None
    tables.save_resolution([r for r in res.nodes.values() if r.changed], [], 6.0)
    tables.mark_published({"n1": 1}, 6.0)
    tables.save_statuses(policy_statuses(res, {}, "2026-01-01T00:00:00Z"))

    fleet_store.ingest([status_from("n1", "east", 1)])
    snap = tables.snapshot()
    again = resolve(snap.policies, snap.nodes, snap.records)
    assert again.nodes["n1"].applied and not again.nodes["n1"].changed
    assert snap.published["n1"][0] == 1 and snap.statuses["east"]["nodesMatched"] == 1
    [n1] = tables.node_rows(policy_name="east")
    assert (n1["node"], n1["version"], n1["applied"], n1["policy"]["powerCapWatts"]) == ("n1", 1, True, 280)

    # a cluster takes over: its objects replace the table, its node list decides who is present
    tables.sync_policies([("west", {"nodeSelector": {"zone": "west"}}, None)], "kubernetes", 7.0)
    tables.sync_policies([("west", {"nodeSelector": {"zone": "west"}, "priority": 2}, None)], "kubernetes", 8.0)
    assert [(p["name"], p["source"], p["generation"]) for p in tables.policies()] == [("west", "kubernetes", 2)]
    tables.sync_nodes({"n2": {"zone": "west"}}, 9.0)
    snap = tables.snapshot()
    assert [n.name for n in snap.nodes] == ["n2"] and snap.absent_published == ["n1"]
    tables.save_resolution([], snap.absent_published, 10.0)
    tables.mark_published({"n1": None}, 10.0)
    snap = tables.snapshot()
    assert snap.absent_published == [] and snap.records["n1"].version == 1  # the counter is kept
    assert tables.delete_policy("west") and not tables.delete_policy("west")


# ---- helpers for the process tests ----------------------------------------------------------


def http(base: str, method: str, path: str, body: Any = None, *, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return status, json.loads(payload) if payload else None


def edge_policy(edge: EdgeProcess) -> tuple[str, str, int, dict[str, Any]]:
    body = edge.get("/api/v1/policy")
    return body["source"], body["policy"]["name"], body["policy"]["version"], body["policy"]


def wait_policy(edge: EdgeProcess, name: str, version: int | None = None, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        source, got, got_version, policy = edge_policy(edge)
        ok = source == "cloud" and got == name and (version is None or got_version == version)
        return policy if ok else None
    return wait_for(check, timeout=timeout, what=f"{edge.node} to apply {name} v{version}")


def create_policy(kube: KubeEmulator, name: str, spec: dict[str, Any]) -> None:
    # as an API server does: a new object is generation 1
    kube.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "GPUPowerPolicy",
        "metadata": {"name": name, "generation": 1}, "spec": spec})


def update_policy(kube: KubeEmulator, name: str, spec: dict[str, Any], generation: int) -> None:
    # kmock merges the patch; a real API server bumps metadata.generation on a spec change itself
    kube.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name,
                                            {"metadata": {"generation": generation}, "spec": spec})


def crd_status(kube: KubeEmulator, name: str) -> dict[str, Any]:
    return kube.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name).get("status") or {}


def wait_status(kube: KubeEmulator, name: str, timeout: float = 20, **expected: Any) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = crd_status(kube, name)
        return status if all(status.get(k) == v for k, v in expected.items()) else None
    return wait_for(check, timeout=timeout, what=f"status of {name} to have {expected}")


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def stop_all(*processes: EdgeProcess) -> None:
    for process in processes:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)


# ---- with a cluster -------------------------------------------------------------------------


@pytest.mark.slow
@needs_broker
def test_gpupowerpolicies_reach_the_selected_nodes(tmp_path: Path, broker: Mosquitto, kube: KubeEmulator) -> None:
    kube.add_node("gpu-a", {"zone": "east", "gpu": "h100"})
    kube.add_node("gpu-b", {"zone": "east", "gpu": "a100"})
    kube.add_node("gpu-c", {"zone": "west"})
    kube.add_node("gpu-d", {"zone": "east", "gpu": "a100"})  # its edge has never connected yet
    cloud = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig)
    edges = {n: EdgeProcess(tmp_path / n, node=n, gpus=1, mqtt=broker.url) for n in ("gpu-a", "gpu-b", "gpu-c", "gpu-d")}
    try:
        cloud.start()
        for n in ("gpu-a", "gpu-b", "gpu-c"):
            edges[n].start()
        a, b, c, d = (edges[n] for n in ("gpu-a", "gpu-b", "gpu-c", "gpu-d"))

        # 1. a policy for zone=east reaches a and b, not c; d (offline) is pending
        create_policy(kube, "east", {"priority": 10, "nodeSelector": {"zone": "east"}, "powerCapWatts": 400})
        assert wait_policy(a, "east", 1)["powerCapWatts"] == 400
        wait_policy(b, "east", 1)
        status = wait_status(kube, "east", nodesMatched=3, applied=2, pending=1, observedGeneration=1)
        assert condition(status, "Valid")["status"] == "True"
        assert condition(status, "Applied")["reason"] == "Pending" and "gpu-d" in condition(status, "Applied")["message"]
        assert edge_policy(c)[:2] == ("config", "default"), "a node no policy selects keeps its config policy"
        # the labels used for matching are in the fleet store for the dashboard
        # (besides the GFD-style nvidia.com/ labels the controller itself writes from the node's status)
        assert wait_for(lambda: (n := cloud.node_state("gpu-a")) and {
            k: v for k, v in n["labels"].items() if not k.startswith("nvidia.com/")} == {"zone": "east", "gpu": "h100"},
                        what="labels of gpu-a in the fleet store")
        listed = cloud.get("/api/v1/policies")
        assert listed["source"] == "kubernetes" and [p["name"] for p in listed["policies"]] == ["east"]
        # one source of truth: the REST API does not write policies in this mode
        status_code, body = http(cloud.base, "PUT", "/api/v1/policies/other", {"powerCapWatts": 300})
        assert status_code == 409 and "GPUPowerPolicy objects" in body["error"]

        # 2. a higher-priority policy wins on the nodes it selects, with a new version there
        create_policy(kube, "h100", {"priority": 20, "nodeSelector": {"gpu": "h100"},
                                     "thermalThrottling": {"maxTempC": 75, "criticalTempC": 85}})
        policy = wait_policy(a, "h100", 2)
        assert policy["thermalThrottling"]["maxTempC"] == 75 and policy["powerCapWatts"] is None
        wait_status(kube, "h100", nodesMatched=1, applied=1, pending=0)
        wait_status(kube, "east", nodesMatched=2, nodesShadowed=1, applied=1, pending=1)
        assert edge_policy(b)[1:3] == ("east", 1), "b is not selected by h100: untouched"

        # 3. an invalid policy is reported invalid and changes nothing for anyone
        create_policy(kube, "broken", {"priority": 100, "nodeSelector": {},
                                       "thermalThrottling": {"maxTempC": 95, "criticalTempC": 92}})
        status = wait_status(kube, "broken", nodesMatched=0, observedGeneration=1)
        valid = condition(status, "Valid")
        assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
        assert "criticalTempC (92.0) must be above maxTempC (95.0)" in valid["message"]
        got = cloud.get("/api/v1/policies/broken")
        assert got["valid"] is False and got["errors"][0]["field"] == "thermalThrottling"
        assert edge_policy(a)[1:3] == ("h100", 2) and edge_policy(b)[1:3] == ("east", 1)
        assert edge_policy(c)[0] == "config"
        assert crd_status(kube, "east")["applied"] == 1 and crd_status(kube, "h100")["applied"] == 1

        # 4. updates: a (online) applies at once; b is stopped and gets it when it comes back
        b.stop()
        update_policy(kube, "h100", {"powerCapWatts": 300}, generation=2)
        update_policy(kube, "east", {"powerCapWatts": 350}, generation=2)
        assert wait_policy(a, "h100", 3)["powerCapWatts"] == 300
        wait_status(kube, "h100", observedGeneration=2, applied=1, pending=0)
        wait_status(kube, "east", observedGeneration=2, nodesMatched=2, applied=0, pending=2)
        b.start()  # no one does anything for it: the retained message is there
        assert wait_policy(b, "east", 2)["powerCapWatts"] == 350
        # d has never connected: no session at the broker, only the retained message
        d.start()
        assert wait_policy(d, "east", 2)["powerCapWatts"] == 350
        status = wait_status(kube, "east", applied=2, pending=0)
        assert condition(status, "Applied")["status"] == "True"
        assert edge_policy(c)[0] == "config"
        node = cloud.get("/api/v1/nodes/gpu-b/policy")
        assert (node["policy_name"], node["version"], node["reported_version"], node["applied"]) == ("east", 2, 2, True)
    finally:
        stop_all(*edges.values(), cloud)


# ---- without a cluster ----------------------------------------------------------------------


@pytest.mark.slow
@needs_broker
def test_rest_policies_without_a_cluster(tmp_path: Path, broker: Mosquitto) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    cloud = CloudProcess(tmp_path / "cloud", broker.url, env={"KGPU_API_TOKEN_FILE": str(token_file)})
    a = EdgeProcess(tmp_path / "rest-a", node="rest-a", gpus=1, mqtt=broker.url)
    b = EdgeProcess(tmp_path / "rest-b", node="rest-b", gpus=1, mqtt=broker.url)
    listener: MqttLink | None = None
    try:
        cloud.start()
        a.start()
        b.start()
        api = cloud.base
        east = {"priority": 5, "nodeSelector": {"zone": "east"}, "powerCapWatts": 300}

        # changes need the token
        assert http(api, "PUT", "/api/v1/policies/east", east)[0] == 401
        assert http(api, "PUT", "/api/v1/policies/east", east, token="wrong")[0] == 401
        assert http(api, "PUT", "/api/v1/nodes/rest-a/labels", {"labels": {"zone": "east"}})[0] == 401
        assert http(api, "DELETE", "/api/v1/policies/east")[0] == 401

        # bad bodies: 400 with the fields at fault
        def bad(path: str, body: Any = None, raw: bytes | None = None) -> list[dict[str, str]]:
            code, reply = http(api, "PUT", path, body, raw=raw, token="s3cret")
            assert code == 400, (code, reply)
            return reply["detail"]
        assert bad("/api/v1/policies/east", raw=b"{not json") is not None
        fields = {e["field"] for e in bad("/api/v1/policies/east", {
            "thermalThrottling": {"maxTempC": 90, "criticalTempC": 85}, "powerCapWatts": -5,
            "nodeSelector": {"zone": 1}, "priority": "high", "surprise": True})}
        assert fields == {"thermalThrottling", "powerCapWatts", "nodeSelector.zone", "priority", "surprise"}
        assert bad("/api/v1/policies/east", {"thermalThrottling": {"maxTempC": 500}})[0]["field"] == \
            "thermalThrottling.maxTempC"
        assert bad("/api/v1/policies/Not_A_Name", {})[0]["field"] == "name"
        assert bad("/api/v1/policies/east", ["a list"])[0]["problem"].endswith("JSON object")
        assert bad("/api/v1/nodes/rest-a/labels", {"labels": {"zone": "no spaces"}})[0]["field"] == "labels.zone"
        assert bad("/api/v1/nodes/rest-a/labels", {"zone": "east"})
        assert cloud.get("/api/v1/policies")["policies"] == []

        # labels and a policy for them: a gets it, b (no labels) does not
        assert http(api, "PUT", "/api/v1/nodes/rest-a/labels", {"labels": {"zone": "east"}}, token="s3cret")[0] == 200
        code, created = http(api, "PUT", "/api/v1/policies/east", east, token="s3cret")
        assert code == 201 and created["generation"] == 1 and created["valid"] and created["source"] == "api"
        assert wait_policy(a, "east", 1)["powerCapWatts"] == 300
        wait_for(lambda: cloud.get("/api/v1/policies/east")["status"].get("applied") == 1, what="east applied on a")
        assert edge_policy(b)[0] == "config"
        assert wait_for(lambda: cloud.node_state("rest-a")["labels"] == {"zone": "east"}, what="labels mirrored")

        # an empty selector takes every node (unlabelled ones included); priority keeps a on east
        code, _ = http(api, "PUT", "/api/v1/policies/everyone", {"spec": {"powerSaving": {"enabled": True}}},
                       token="s3cret")
        assert code == 201
        assert wait_policy(b, "everyone", 1)["powerSaving"]["enabled"] is True
        assert edge_policy(a)[1:3] == ("east", 1)

        # the same body again changes nothing; a new one bumps generation and the node's version
        code, same = http(api, "PUT", "/api/v1/policies/east", east, token="s3cret")
        assert (code, same["generation"]) == (200, 1)
        code, changed = http(api, "PUT", "/api/v1/policies/east", {**east, "powerCapWatts": 280}, token="s3cret")
        assert (code, changed["generation"]) == (200, 2)
        assert wait_policy(a, "east", 2)["powerCapWatts"] == 280
        got = wait_for(lambda: (p := cloud.get("/api/v1/policies/east"))["status"].get("applied") == 1
                       and p["status"]["observedGeneration"] == 2 and p, what="east v2 applied")
        assert [(n["node"], n["version"], n["applied"]) for n in got["nodes"]] == [("rest-a", 2, True)]
        listed = cloud.get("/api/v1/policies")
        assert listed["source"] == "api" and [p["name"] for p in listed["policies"]] == ["east", "everyone"]

        # delete: the retained message is cleared, the edge keeps the last policy it had
        code, _ = http(api, "DELETE", "/api/v1/policies/everyone", token="s3cret")
        assert code == 200
        assert http(api, "GET", "/api/v1/policies/everyone")[0] == 404
        assert http(api, "DELETE", "/api/v1/policies/everyone", token="s3cret")[0] == 404
        wait_for(lambda: cloud.get("/api/v1/nodes/rest-b/policy")["published_version"] is None,
                 what="retained policy of rest-b cleared")
        received: list[Received] = []
        listener = MqttLink(parse_broker_url(broker.url), "policy-probe", clean_session=True,
                            subscriptions=[(cloud_topic("rest-b", "policy"), 1), (cloud_topic("rest-a", "policy"), 1)],
                            on_message=received.append)
        listener.start()
        wait_for(lambda: any(m.topic == cloud_topic("rest-a", "policy") for m in received),
                 what="rest-a's retained policy (it still has one)")
        time.sleep(0.5)
        assert not [m for m in received if m.topic == cloud_topic("rest-b", "policy")], "nothing retained for rest-b"
        assert edge_policy(b)[:3] == ("cloud", "everyone", 1)
    finally:
        if listener is not None:
            listener.stop()
        stop_all(a, b, cloud)
