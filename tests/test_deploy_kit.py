"""The deploy kit (deploy/, Dockerfile): static checks that need no cluster and no docker engine.

- every Kubernetes manifest validates against the Kubernetes schema (kubernetes-validate, strict);
- kustomization.yaml lists every manifest and only files that exist (and renders, when kubectl is here);
- the Prometheus rules pass `promtool check rules` and their unit tests (`promtool test rules`), the
  GPU alerts name the node and page inside the edge's health quiet period;
- the example scrape configuration passes `promtool check config` and gives every edge series Hostname;
- the Grafana dashboard and the rules use only metric names the code exposes, and every dashboard
  panel outside the controller row selects by the node variable (tests/test_prometheus.py has a real
  Prometheus parse every expression);
- the edge DaemonSet has the properties the daemon and the controller rely on;
- the controller's RBAC grants exactly the API calls found in cloud/*.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.32.0"

# YAML files under deploy/ that are not Kubernetes objects, and why.
NOT_MANIFESTS = {
    "kustomization.yaml": "kustomize's own file (checked by the kustomization tests)",
    "edge-config.example.yaml": "an edge daemon config file (--config), not a Kubernetes object",
    "prometheus/kgpu-rules.yaml": "a Prometheus rules file (checked by promtool)",
    "prometheus/kgpu-rules.test.yaml": "promtool unit tests",
    "prometheus/kgpu-scrape.example.yaml": "a Prometheus configuration (checked by promtool check config)",
}
# Objects of these API groups have no schema in kubernetes-validate (they come from CRDs).
CRD_GROUPS = {
    "kgpu.io": "GPUPowerPolicy comes from our own CRD (its schema is the CRD's openAPIV3Schema)",
    "monitoring.coreos.com": "Prometheus Operator CRDs (PrometheusRule, PodMonitor) are not in the core schema",
}


# Manifests used instead of one the kustomization lists (validated like the others, not listed), and the
# manifest each one replaces.
VARIANTS = {
    "edge/daemonset-device-plugin.yaml": "edge/daemonset.yaml",  # the edge as device plugin (docs/device-plugin.md)
    # the other backends (docs/devices.md): Jetson modules, AMD and Intel GPU nodes
    "edge/daemonset-jetson.yaml": "edge/daemonset.yaml",
    "edge/daemonset-amd.yaml": "edge/daemonset.yaml",
    "edge/daemonset-intel.yaml": "edge/daemonset.yaml",
}


def _rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


def manifest_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [p for p in files if _rel(p) not in NOT_MANIFESTS and not _rel(p).startswith("mosquitto/")]


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    """The objects `kubectl apply -k deploy/` creates (the variants left out)."""
    return [(_rel(p), d) for p in manifest_files() if _rel(p) not in VARIANTS for d in load_docs(p)]


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [d for _, d in all_objects() if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


# ---- schema validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=_rel)
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = load_docs(path)
    assert docs, f"{_rel(path)} is empty"
    validated = 0
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: a document without apiVersion/kind"
        group = doc["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            continue  # reason: CRD_GROUPS[group]
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_rel(path)}: {doc['kind']} {doc['metadata'].get('name')}: {exc.message} at {list(exc.path)}")
        validated += 1
    if not validated:
        pytest.skip(f"{_rel(path)} holds only CRD-typed objects: " + "; ".join(CRD_GROUPS.values()))


def test_every_object_has_a_namespace_or_is_cluster_scoped() -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for rel, doc in all_objects():
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], f"{rel}: {doc['kind']} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == "kgpu", f"{rel}: {doc['kind']} {doc['metadata']['name']}"


# ---- kustomize ---------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def test_kustomization_lists_existing_files_and_every_manifest() -> None:
    k = kustomization()
    assert k["namespace"] == "kgpu"
    listed = [(DEPLOY / r).resolve() for r in k["resources"]]
    for path in listed:
        assert path.is_file(), f"kustomization.yaml lists {path}, which does not exist"
        assert DEPLOY.resolve() in path.parents, f"{path} is outside the kustomization root"
    unlisted = [_rel(p) for p in manifest_files() if p.resolve() not in listed and _rel(p) not in VARIANTS]
    variants_listed = [v for v in VARIANTS if (DEPLOY / v).resolve() in listed]
    assert not variants_listed, f"a variant is deployed instead of its manifest, never beside it: {variants_listed}"
    assert not unlisted, f"manifests not in kustomization.yaml resources: {unlisted}"
    assert (DEPLOY / "crds/gpupowerpolicy.yaml").resolve() in listed
    for generator in k.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (DEPLOY / file.partition("=")[2 if "=" in file else 0]).is_file(), file


def test_kustomize_renders_and_the_rendered_objects_validate() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomize build is not checked (the file checks above still run)")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("Namespace", "kgpu"), ("DaemonSet", "kgpu-edge"), ("Deployment", "kgpu-controller"),
                     ("Service", "kgpu-controller"), ("Deployment", "kgpu-mqtt"), ("Service", "kgpu-mqtt"),
                     ("PersistentVolumeClaim", "kgpu-mqtt-data"), ("ServiceAccount", "kgpu-controller"),
                     ("CustomResourceDefinition", "gpupowerpolicies.kgpu.io")]:
        assert expected in kinds, expected
    config = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kgpu-mqtt-config")]
    assert len(config) == 1 and set(config[0]["data"]) == {"mosquitto.conf", "acl"}
    assert config[0]["data"]["acl"] == (DEPLOY / "mosquitto/acl").read_text()
    broker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kgpu-mqtt")
    volumes = {v["name"]: v for v in broker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config[0]["metadata"]["name"], "generator hash not wired"
    for doc in docs:
        if doc["apiVersion"].rpartition("/")[0] not in CRD_GROUPS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- Prometheus rules -------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/test.sh installs it)")


@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", "kgpu-rules.yaml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    out = subprocess.run([PROMTOOL, "test", "rules", "kgpu-rules.test.yaml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "prometheus/kgpu-rules.yaml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_has_firing_and_quiet_cases() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus/kgpu-rules.test.yaml").read_text())["tests"]
    cases: dict[str, list[bool]] = defaultdict(list)
    for t in tests:
        for case in t.get("alert_rule_test", []):
            cases[case["alertname"]].append(bool(case.get("exp_alerts")))
    for rule in rules():
        name = rule["alert"]
        assert True in cases[name], f"{name}: no test where it fires"
        assert False in cases[name], f"{name}: no test where it stays quiet"
    expressions = {r["alert"]: r["expr"] for r in rules()}
    assert "DCGM_FI_DEV_GPU_TEMP > 80" in expressions["KgpuGpuHot"]
    assert "increase(kgpu_xid_errors_total[5m]) > 0" in expressions["KgpuXidErrors"]
    assert 'kgpu_gpu_health{state!="healthy"} == 1' in expressions["KgpuGpuUnhealthy"]
    assert "deriv(kgpu_outbox_depth[15m]) > 0" in expressions["KgpuOutboxBacklogGrowing"]


GPU_ALERTS = ("KgpuGpuHot", "KgpuXidErrors", "KgpuGpuUnhealthy")


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def test_gpu_alerts_work_on_either_source_and_name_the_node() -> None:
    by_name = {r["alert"]: r for r in rules()}
    for name in GPU_ALERTS:
        rule = by_name[name]
        # the edge scrape and the fleet exporter differ in job and instance: match neither by value
        assert not re.search(r"\b(job|instance)\s*(=|!=|=~|!~)", rule["expr"]), f"{name} matches job/instance"
        summary = rule["annotations"]["summary"]
        assert "$labels.Hostname" in summary, f"{name}: the summary does not name the node"
        assert "$labels.instance" not in summary.replace(
            "{{ else }}{{ $labels.instance }}", ""), f"{name}: instance only as the fallback for no Hostname"


def test_unhealthy_pages_inside_the_health_quiet_period() -> None:
    from edge.config import EdgeSettings

    quiet = EdgeSettings.model_fields["health_quiet_period"].default
    rule = {r["alert"]: r for r in rules()}["KgpuGpuUnhealthy"]
    # pending for `for`, then up to one evaluation (and one scrape) late: still well inside
    assert _seconds(rule["for"]) + 120 <= quiet, (rule["for"], quiet)


def test_xid_alert_fires_on_a_counter_born_at_one() -> None:
    """The first XID of a GPU makes its counter appear at 1: increase() alone reads 0 there. The
    unit tests must include such a series (no sample before the first XID) and see it fire."""
    expr = {r["alert"]: r for r in rules()}["KgpuXidErrors"]["expr"]
    assert "count_over_time(kgpu_xid_errors_total[5m])" in expr
    tests = yaml.safe_load((DEPLOY / "prometheus/kgpu-rules.test.yaml").read_text())["tests"]
    born_at_one = 0
    for t in tests:
        series = {s["series"]: s["values"] for s in t["input_series"]}
        fired = {tuple(sorted(a["exp_labels"].items())) for case in t.get("alert_rule_test", [])
                 if case["alertname"] == "KgpuXidErrors" for a in case.get("exp_alerts", [])}
        for name, values in series.items():
            if name.startswith("kgpu_xid_errors_total") and re.match(r"_x\d+ 1(?![\d.])", values):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
                if any(dict(f).items() >= labels.items() for f in fired):
                    born_at_one += 1
    assert born_at_one >= 2, "no promtool test where an XID counter born at 1 fires the alert"


SCRAPE_CONFIG = DEPLOY / "prometheus/kgpu-scrape.example.yaml"


def test_scrape_config_gives_every_edge_series_the_node() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert config["rule_files"] == ["kgpu-rules.yaml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    edge = jobs["kgpu-edge"]
    assert edge["honor_labels"] is True  # the daemon's own Hostname (the same name) wins
    assert {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "Hostname"} in edge[
        "relabel_configs"]
    assert "kgpu-controller" in jobs


@needs_promtool
def test_promtool_check_config() -> None:
    out = subprocess.run([str(PROMTOOL), "check", "config", SCRAPE_CONFIG.name], cwd=SCRAPE_CONFIG.parent,
                         capture_output=True, text=True, timeout=60, check=False)
    if "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert out.returncode == 0, out.stdout + out.stderr


# ---- metric names: dashboard and rules use only what the code exposes --------------------------

FAMILY_RE = re.compile(r'(Gauge|Counter)MetricFamily\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
DCGM_FIELD_RE = re.compile(r'DcgmField\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')  # shared/dcgm.py: names as written
# the gauge helpers: edge/metrics.py `gauge`, cloud/http/metrics.py `_by_node` (one series a node)
HELPER_GAUGE_RE = re.compile(r'\b(?:gauge|_by_node)\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"')
# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "bool", "offset", "inf", "nan", "atan2"}


def exposed_metric_names() -> set[str]:
    names: set[str] = set()
    sources = [*sorted((ROOT / "edge").glob("*metrics*.py")), *sorted((ROOT / "cloud").rglob("*.py")),
               *sorted((ROOT / "shared").glob("*.py"))]  # the dcgm and Kepler builders, kgpu_http_rejected_total
    for source in sources:
        text = source.read_text()
        for kind, name in FAMILY_RE.findall(text):
            names.add(name + "_total" if kind == "Counter" else name)
        names.update(HELPER_GAUGE_RE.findall(text))
        names.update(DCGM_FIELD_RE.findall(text))
    return names


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small lexer, enough for our expressions)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # dashboard variables
    expr = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"(\1)", expr)  # Grafana: label_values(metric, label)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_lexer() -> None:
    assert metric_names_in("label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)") == {"DCGM_FI_DEV_GPU_TEMP"}
    assert metric_names_in('sum by (pod_name) (rate(kgpu_pod_gpu_joules_total{a="x(y)"}[5m])) > 0 and up == 0') == {
        "kgpu_pod_gpu_joules_total", "up"}


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/kgpu-dashboard.json").read_text())


def panels_by_row(d: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Every panel that draws something, with the title of the row it sits under ("" above the
    first row); a collapsed row keeps its panels inside it."""
    found: list[tuple[str, dict[str, Any]]] = []
    row = ""
    for panel in (d or dashboard())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            found += [(row, p) for p in panel.get("panels", [])]
        else:
            found.append((row, panel))
    return found


def data_panels() -> list[dict[str, Any]]:
    return [p for _, p in panels_by_row()]


def test_dashboard_has_a_datasource_variable_used_by_every_panel() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert data_panels()
    for panel in data_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for row in (p for p in d["panels"] if p["type"] == "row"):
        assert not row.get("targets"), f"row {row['title']} has queries"


def test_dashboard_covers_the_required_views() -> None:
    exprs = " ".join(t["expr"] for p in data_panels() for t in p["targets"])
    for name in ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "kgpu_gpu_power_limit_watts",
                 "DCGM_FI_DEV_GPU_UTIL", "kgpu_xid_errors_total", "kgpu_gpu_health", "kgpu_pod_gpu_joules_total",
                 "kgpu_outbox_depth", "kgpu_decisions_total"]:
        assert name in exprs, name


# The controller row shows the controller itself: its counters have no node (a refused message may
# name none, or a false one). Every other panel selects by the node variable.
CONTROLLER_ROW = "Controller: the whole fleet (not filtered by node)"
CONTROLLER_WIDE = {"kgpu_ingest_messages_total", "kgpu_ingest_rejected_total", "kgpu_controller_leader"}
# A selector: a metric name, its label matchers, and what follows (a call's "(" tells a function).
SELECTOR_RE = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?")


def selectors_in(expr: str) -> list[tuple[str, str]]:
    """(metric, its matchers) of every series selector of a PromQL expression (ours: no strings
    with braces, no metric names in label lists other than by/on/without/ignoring)."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    found = []
    for name, matchers, call in SELECTOR_RE.findall(expr):
        if call or name.lower() in PROMQL_WORDS or name in {"group_left", "group_right"}:
            continue
        found.append((name, matchers))
    return found


def test_selector_lexer() -> None:
    assert selectors_in('sum by (a) (rate(x_total{Hostname=~"$node"}[5m])) or y unless z{a="b"} offset 5m') == [
        ("x_total", '{Hostname=~"$node"}'), ("y", ""), ("z", '{a="b"}')]


def test_dashboard_rows_and_every_panel_filtered_by_node() -> None:
    d = dashboard()
    node = {v["name"]: v for v in d["templating"]["list"]}["node"]
    assert node["multi"] and node["includeAll"]
    assert node["allValue"] == ".+"  # "All" still means "series of a node": no controller series mixed in
    rows: dict[str, list[str]] = defaultdict(list)
    for row, panel in panels_by_row(d):
        rows[row].append(panel["title"])
        for target in panel["targets"]:
            selectors = selectors_in(target["expr"])
            assert selectors, f"{panel['title']}: no selector in {target['expr']!r}"
            for name, matchers in selectors:
                if row == CONTROLLER_ROW:
                    assert name in CONTROLLER_WIDE, f"{panel['title']}: {name} has a node; filter it elsewhere"
                    continue
                assert re.search(r'\b(Hostname|node)=~"\$node"', matchers), (
                    f"{panel['title']}: {name}{matchers} is not filtered by the node variable in {target['expr']!r}")
    fleet = [r for r in rows if r.startswith("Fleet")]
    gpu = [r for r in rows if r.startswith("GPU")]
    assert len(fleet) == 1 and len(gpu) == 1, list(rows)
    assert len(rows[fleet[0]]) >= 4 and len(rows[gpu[0]]) >= 4
    assert "" not in rows, f"panels above the first row: {rows['']}"


def test_dashboard_counts_a_counter_from_its_first_event() -> None:
    """kgpu_xid_errors_total and kgpu_decisions_total are born at their first event: a per-5 m
    panel over increase() alone reads 0 there. Each such panel counts a young series in full."""
    for panel in data_panels():
        for target in panel["targets"]:
            for name in ("kgpu_xid_errors_total", "kgpu_decisions_total"):
                if name in target["expr"] and "increase(" in target["expr"]:
                    assert re.search(rf"{name}\{{[^}}]*\}} unless {name}\{{[^}}]*\}} offset 5m", target["expr"]), (
                        panel["title"], target["expr"])


def test_dashboard_and_rules_use_only_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    assert {"DCGM_FI_DEV_GPU_TEMP", "kgpu_xid_errors_total", "kgpu_outbox_depth", "kgpu_node_lag_seconds"} <= exposed
    d = dashboard()
    used = {(p["title"], t["expr"]) for p in data_panels() for t in p["targets"]}
    used |= {("variable " + v["name"], v["definition"]) for v in d["templating"]["list"] if v.get("definition")}
    used |= {("alert " + r["alert"], r["expr"]) for r in rules()}
    for where, expr in sorted(used):
        unknown = metric_names_in(expr) - exposed - PROMETHEUS_SERIES
        assert not unknown, f"{where}: {expr!r} uses metrics the code does not expose: {sorted(unknown)}"


# ---- the edge DaemonSet -----------------------------------------------------------------------


def edge_pod() -> dict[str, Any]:
    return find("DaemonSet", "kgpu-edge")["spec"]["template"]["spec"]


def test_daemonset_takes_no_gpu_and_sees_all_of_them() -> None:
    pod = edge_pod()
    for container in pod["containers"] + pod.get("initContainers", []):
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert not any(k.startswith("nvidia.com/") for k in resources.get(section, {})), container["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert pod["runtimeClassName"] == "nvidia"


def test_daemonset_rollout_scheduling_and_identity() -> None:
    ds = find("DaemonSet", "kgpu-edge")
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"  # cloud/rollout/manager.py refuses anything else
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    names = list(env)
    for dependent in ("KGPU_MQTT", "KGPU_MQTT_PASSWORD_FILE"):
        assert "$(NODE_NAME)" in env[dependent]["value"]
        assert names.index("NODE_NAME") < names.index(dependent), "$(VAR) only expands variables defined before"
    assert env["KGPU_MQTT_PASSWORD_FILE"]["value"] == "/etc/kgpu/mqtt/$(NODE_NAME).password"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert len(terms) == 1
    expressions = {e["key"]: e for e in terms[0]["matchExpressions"]}
    assert expressions["node-role.kubernetes.io/edge"]["operator"] == "Exists"
    assert expressions["nvidia.com/gpu.present"] == {"key": "nvidia.com/gpu.present", "operator": "In",
                                                     "values": ["true"]}
    tolerations = {(t["key"], t["effect"]): t for t in pod["tolerations"]}
    assert ("node-role.kubernetes.io/edge", "NoSchedule") in tolerations
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        assert "tolerationSeconds" not in tolerations[(key, "NoExecute")], "must stay on flaky nodes"


def test_daemonset_security_storage_and_probes() -> None:
    pod = edge_pod()
    container = pod["containers"][0]
    security = container["securityContext"]
    assert security.get("privileged") is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["state"] == "/var/lib/kgpu" and volumes["state"]["hostPath"]["path"] == "/var/lib/kgpu"
    assert mounts["mqtt"] == "/etc/kgpu/mqtt"
    assert volumes["mqtt"]["projected"]["sources"][0]["secret"]["name"] == "kgpu-edge-mqtt"
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 9410}
    liveness = container["livenessProbe"]
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 60, "liveness must be lenient"
    assert container["resources"]["requests"]


def test_controller_deployment() -> None:
    deployment = find("Deployment", "kgpu-controller")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kgpu-controller"
    container = pod["containers"][0]
    args = container["args"]
    assert args[:2] == ["cloud", "run"] and "--in-cluster" in args
    assert args[args.index("--shared-subscription") + 1] == "kgpu"
    env = {e["name"]: e for e in container["env"]}
    assert env["KGPU_DB"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert env["KGPU_API_TOKEN_SECRET"]["value"] == "kgpu-controller-api"  # read via the API (Role below)
    assert env["KGPU_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "KGPU_LEASE_NAME" in env
    # every KGPU_* variable set is a real setting of `kgpu cloud run`
    from cloud.config import CloudSettings

    settings = {f"KGPU_{name.upper()}" for name in CloudSettings.model_fields}
    assert {k for k in env if k.startswith("KGPU_")} <= settings
    service = find("Service", "kgpu-controller")
    assert [p["port"] for p in service["spec"]["ports"]] == [9420]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_device_plugin_daemonset_is_the_edge_daemonset_with_the_plugin() -> None:
    """deploy/edge/daemonset-device-plugin.yaml = deploy/edge/daemonset.yaml + --device-plugin, the
    kubelet's device-plugin directory mounted and its settings; nothing else differs."""
    from edge.config import EdgeSettings

    base = load_docs(DEPLOY / "edge/daemonset.yaml")[0]
    variant = load_docs(DEPLOY / "edge/daemonset-device-plugin.yaml")[0]
    pod = variant["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["edge", "run", "--device-plugin"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    directory = env["KGPU_KUBELET_DIR"]
    assert directory == str(EdgeSettings.model_fields["kubelet_dir"].default) == "/var/lib/kubelet/device-plugins"
    from edge.driver.nvml import NvmlDriver

    # the NVML backend's own resource (the setting's default is the backend's; this variant says it)
    assert env["KGPU_RESOURCE_NAME"] == NvmlDriver.resource_name == "nvidia.com/gpu"
    assert EdgeSettings.model_fields["resource_name"].default is None
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["device-plugins"] == directory
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["device-plugins"]["hostPath"]["path"] == directory
    # take the additions away: what is left is the base DaemonSet
    container["args"] = ["edge", "run"]
    container["env"] = [e for e in container["env"] if e["name"] not in ("KGPU_KUBELET_DIR", "KGPU_RESOURCE_NAME")]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "device-plugins"]
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "device-plugins"]
    assert variant == base


@pytest.mark.parametrize("backend", ["jetson", "amd", "intel"])
def test_vendor_daemonsets_run_their_backend_without_the_nvidia_runtime(backend: str) -> None:
    """deploy/edge/daemonset-<backend>.yaml: the base DaemonSet with the backend, no nvidia runtime or
    NVIDIA_* variables, scheduled on nodes labelled kgpu.io/backend=<backend>, with the host paths the
    backend reads (and writes: devfreq, hwmon) mounted where KGPU_SYSFS_ROOT says."""
    from edge.config import EdgeSettings

    (ds,) = load_docs(DEPLOY / f"edge/daemonset-{backend}.yaml")
    base = load_docs(DEPLOY / "edge/daemonset.yaml")[0]
    assert ds["metadata"] == base["metadata"] and ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    pod = ds["spec"]["template"]["spec"]
    assert "runtimeClassName" not in pod and pod["hostPID"] is True
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KGPU_BACKEND"] == backend
    assert not any(name.startswith("NVIDIA_") for name in env)
    assert {k for k in env if k.startswith("KGPU_")} <= {f"KGPU_{n.upper()}" for n in EdgeSettings.model_fields}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    expressions = {e["key"]: e for e in terms[0]["matchExpressions"]}
    assert expressions["kgpu.io/backend"]["values"] == [backend] and "nvidia.com/gpu.present" not in expressions
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    sys_mount = mounts[f"{env.get('KGPU_SYSFS_ROOT', '')}/sys"] if backend != "amd" else mounts["/sys"]
    assert volumes[sys_mount["name"]]["hostPath"]["path"] == "/sys"
    assert not sys_mount.get("readOnly"), "the backend writes its caps through sysfs"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    if backend == "amd":
        assert mounts["/opt/rocm"]["readOnly"] and env["ROCM_PATH"] == "/opt/rocm"
    else:
        assert container["securityContext"]["privileged"] is False
        assert mounts["/host/proc"]["readOnly"] is True


def test_edge_env_names_are_real_settings() -> None:
    from edge.config import EdgeSettings

    settings = {f"KGPU_{name.upper()}" for name in EdgeSettings.model_fields}
    env = [e["name"] for e in edge_pod()["containers"][0]["env"] if e["name"].startswith("KGPU_")]
    assert set(env) <= settings, set(env) - settings


# ---- RBAC: exactly what the code calls --------------------------------------------------------

CALL_RE = re.compile(r"kube\.(core|apps|custom|coordination)\.([a-z_]+)")
VERBS = {"read": "get", "list": "list", "create": "create", "patch": "patch", "delete": "delete",
         "replace": "update", "watch": "watch"}
RESOURCES = {"node": "nodes", "pod": "pods", "pod_eviction": "pods/eviction", "daemon_set": "daemonsets",
             "lease": "leases", "secret": "secrets"}
GROUPS = {"core": "", "apps": "apps", "coordination": "coordination.k8s.io"}


def required_permissions() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every Kubernetes API call in cloud/ (every package); a custom
    object call is for the plural of its own package (cloud/partitioning/ or cloud/policies/), or of
    both for the access they share (cloud/custom_resources.py)."""
    from cloud import partitioning, policies

    needed = set()
    sources = sorted((ROOT / "cloud").rglob("*.py"))
    assert len(sources) > 20, "the scan must see the cloud's packages, not only its top level"
    for source in sources:
        for api, method in CALL_RE.findall(source.read_text()):
            verb_word, _, rest = method.partition("_")
            assert verb_word in VERBS, f"{source.name}: unknown API method {api}.{method}: extend the test's map"
            rest = rest.replace("namespaced_", "").replace("_for_all_namespaces", "")
            if api == "custom":
                assert rest in ("cluster_custom_object", "cluster_custom_object_status"), method
                # cloud/custom_resources.py serves both CRDs' packages; any other caller its own
                packages = [partitioning if "partitioning" in source.parts else policies] \
                    if source.name != "custom_resources.py" else [partitioning, policies]
                for package in packages:
                    resource = package.PLURAL + ("/status" if rest.endswith("_status") else "")
                    needed.add((package.GROUP, resource, VERBS[verb_word]))
            else:
                assert rest in RESOURCES, f"{source.name}: unknown resource in {api}.{method}: extend the test's map"
                needed.add((GROUPS[api], RESOURCES[rest], VERBS[verb_word]))
    return needed


def granted_permissions() -> set[tuple[str, str, str]]:
    granted = set()
    for kind in ("ClusterRole", "Role"):
        for rule in find(kind, "kgpu-controller")["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, resource, verb), f"{kind}: no wildcards"
                        granted.add((group, resource, verb))
    return granted


def test_rbac_grants_exactly_what_the_controller_calls() -> None:
    needed, granted = required_permissions(), granted_permissions()
    assert needed - granted == set(), f"missing: {sorted(needed - granted)}"
    assert granted - needed == set(), f"granted but never used: {sorted(granted - needed)}"
    for key in [("", "pods/eviction", "create"), ("", "nodes", "patch"), ("coordination.k8s.io", "leases", "create"),
                ("coordination.k8s.io", "leases", "patch"), ("apps", "daemonsets", "patch"),
                ("kgpu.io", "gpupowerpolicies/status", "patch"), ("kgpu.io", "gpupowerpolicies", "list")]:
        assert key in granted, key


def test_rbac_scopes_and_bindings() -> None:
    role = find("Role", "kgpu-controller")
    assert role["metadata"]["namespace"] == "kgpu"
    namespaced = {r for rule in role["rules"] for r in rule["resources"]}
    assert namespaced == {"daemonsets", "leases", "secrets"}, "DaemonSet, Lease and Secret rights stay in kgpu"
    secrets = [rule for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["kgpu-controller-api"],
                        "verbs": ["get"]}], "only the API token's Secret, read only"
    cluster = {r for rule in find("ClusterRole", "kgpu-controller")["rules"] for r in rule["resources"]}
    assert not cluster & {"daemonsets", "leases", "secrets", "configmaps"}
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = find(kind, "kgpu-controller")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": "kgpu-controller"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kgpu-controller", "namespace": "kgpu"}]
    assert find("ServiceAccount", "kgpu-controller")


# ---- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_basics() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip()
             and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    # one image for both sides: the edge's and the cloud's extras, never the lab's
    assert any(re.match(r'RUN pip install "\.\[edge,cloud\]"', ln) for ln in lines)
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")
    assert 'ENTRYPOINT ["kgpu"]' in lines
    # every COPY source exists and is let through .dockerignore
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                if src.startswith("--"):
                    continue
                assert (ROOT / src).exists(), src
                assert src.rstrip("/").removeprefix("./") in allowed, f"{src} is excluded by .dockerignore"
    # the image ships the package's data (migrations, dashboard): the whole package directories go in
    for package in ("kgpu", "edge", "cloud", "shared"):
        assert any(ln.startswith(f"COPY {package} ") for ln in lines), package
