"""The shipped dashboard and alert rules in a real Prometheus (Debian package `prometheus`, which
scripts/test.sh installs with promtool), and the labelled counters they read pre-filled.

- every expression of deploy/grafana/kgpu-dashboard.json, with the node variable filled in, and
  of deploy/prometheus/kgpu-rules.yaml parses and runs (`promtool` cannot parse one expression;
  Prometheus' query API can);
- the shipped rules, loaded unchanged, fire KgpuXidErrors on a GPU's first XID (its counter born
  at 1) scraped from an exposition shaped like the edge's, and name the node;
- scraping a real simulated edge daemon, the GPU alerts fire after injected faults (heat, an XID
  79) and name the node; their `for:` shortened in a test copy (the production values are tested
  by promtool, kgpu-rules.test.yaml);
- kgpu_ingest_rejected_total and kgpu_http_rejected_total exist for every reason before the first
  rejection, so a rate over them reads 0 and not nothing.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml

from kgpu.lab.processes import Child, free_port, get_json, wait_for
from kgpu.lab.prometheus import PROMETHEUS
from kgpu.lab.prometheus import start_prometheus as lab_prometheus
from tests.helpers.edge_process import EdgeProcess

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/kgpu-dashboard.json"
RULES = ROOT / "deploy/prometheus/kgpu-rules.yaml"
NODE_VALUES = ("edge-1", ".+", "edge-1|edge-2")  # one node, "All" (allValue), a multi-selection


# ---- pre-filled counters (no Prometheus needed) ---------------------------------------------------


def _samples(collector: Any, name: str) -> dict[str, float]:
    return {s.labels["reason"]: s.value for family in collector.collect() for s in family.samples if s.name == name}


def test_ingest_rejections_exist_for_every_reason_from_zero() -> None:
    import asyncio

    from cloud.http.metrics import ControllerCollector
    from cloud.ingest import REJECTION_REASONS, Ingestor
    from shared.protocol import Reason

    ingestor = Ingestor(cast(Any, None), lambda *_: None)  # no store: nothing is written here
    link = SimpleNamespace(connected=True, acks_waiting={}, acks_resent=0)
    collector = ControllerCollector(ingestor=ingestor, link=cast(Any, link),
                                    leading=asyncio.Event(), command_resends=lambda: 0)
    before = _samples(collector, "kgpu_ingest_rejected_total")
    assert set(before) == {r.value for r in Reason} | {"refused_by_store"} == set(REJECTION_REASONS)
    assert set(before.values()) == {0.0}
    ingestor.rejected["not_json"] += 2
    after = _samples(collector, "kgpu_ingest_rejected_total")
    assert after["not_json"] == 2 and sum(after.values()) == 2 and set(after) == set(before)


def test_a_scrape_of_a_few_names_does_not_collect_the_per_node_series() -> None:
    """The benches poll `/metrics?name[]=...` ten times a second: at a fleet's scale the per-node
    series were most of each scrape's cost. Here a per-node value that cannot be written out
    shows whether they were collected at all."""
    import asyncio

    from prometheus_client import generate_latest

    from cloud.http.metrics import make_registry
    from cloud.ingest import Ingestor

    ingestor = Ingestor(cast(Any, None), lambda *_: None)
    ingestor.accepted["telemetry"] += 3
    ingestor.lag_seconds["edge-a"] = cast(float, "not a number")  # collecting kgpu_node_lag_seconds fails
    link = SimpleNamespace(connected=True, acks_waiting={}, acks_resent=0, receive_queues=dict)
    registry = make_registry(ingestor=ingestor, link=cast(Any, link), leading=asyncio.Event(),
                             command_resends=lambda: 0)
    only = generate_latest(registry.restricted_registry(["kgpu_ingest_messages_total"])).decode()
    assert 'kgpu_ingest_messages_total{kind="telemetry"} 3.0' in only
    assert "kgpu_node_" not in only and "kgpu_ingest_batches_total" not in only
    with pytest.raises(ValueError, match="not a number"):
        generate_latest(registry)  # every series: the per-node ones too


def test_http_rejections_exist_for_every_reason_from_zero() -> None:
    from shared.http import HttpRejections, Rejection, RejectionCollector

    counts = _samples(RejectionCollector(HttpRejections()), "kgpu_http_rejected_total")
    assert counts == {r.value: 0.0 for r in Rejection}


# ---- a real Prometheus ------------------------------------------------------------------------------

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/test.sh installs Debian's prometheus package)")


class Exposition:
    """A /metrics page whose text a test changes between scrapes."""

    def __init__(self) -> None:
        self.text = ""
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    body = outer.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="exposition", daemon=True)

    def set(self, text: str) -> None:
        with self.lock:
            self.text = text


@pytest.fixture
def exposition() -> Iterator[Exposition]:
    page = Exposition()
    page.thread.start()
    yield page
    page.server.shutdown()
    page.server.server_close()


class Prometheus:
    def __init__(self, port: int, child: Child) -> None:
        self.port, self.child = port, child

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        return get_json(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}", timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        """The API's whole answer; a parse or evaluation error is a 400/422, raised as ValueError."""
        answer: dict[str, Any] = self.api("query", query=expr)
        return answer


def start_prometheus(workdir: Path, targets: dict[int, str], rules: str) -> Prometheus:
    """A real Prometheus evaluating `rules` every second and scraping each loopback port of
    `targets` every second as the edge job of kgpu-scrape.example.yaml would: honor_labels, and the
    node's name (the value) as Hostname on the target. Stop its `child` when done."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name],
        "scrape_configs": [{
            "job_name": "kgpu-edge", "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"Hostname": node}}
                               for port, node in targets.items()],
        }],
    }
    port, child = lab_prometheus(workdir, config, files={RULES.name: rules})
    return Prometheus(port, child)


@pytest.fixture
def prometheus(tmp_path: Path, exposition: Exposition) -> Iterator[Prometheus]:
    """The shipped rules, unchanged, over `exposition` (the node edge-1)."""
    server = start_prometheus(tmp_path / "prometheus", {exposition.port: "edge-1"}, RULES.read_text())
    yield server
    server.child.stop()


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def rule_expressions() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


EDGE_PAGE = """\
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a",device="nvidia0",modelName="H100",Hostname="edge-1"} 50
DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-b",device="nvidia1",modelName="H100",Hostname="edge-1"} 51
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-a",device="nvidia0",modelName="H100",Hostname="edge-1"} LAST_XID
DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-a",device="nvidia0",modelName="H100",Hostname="edge-1",pod="p",namespace="n",container="c"} LAST_XID
DCGM_FI_DEV_XID_ERRORS{gpu="1",UUID="GPU-b",device="nvidia1",modelName="H100",Hostname="edge-1"} 0
# TYPE kgpu_gpu_health gauge
kgpu_gpu_health{gpu="0",uuid="GPU-a",Hostname="edge-1",state="healthy"} 1
kgpu_gpu_health{gpu="1",uuid="GPU-b",Hostname="edge-1",state="healthy"} 1
# TYPE kgpu_xid_errors_total counter
"""


@needs_prometheus
def test_every_dashboard_and_rule_expression_runs(prometheus: Prometheus, exposition: Exposition) -> None:
    exposition.set(EDGE_PAGE.replace("LAST_XID", "0"))
    wait_for(lambda: prometheus.query("DCGM_FI_DEV_GPU_TEMP")["data"]["result"], timeout=30,
             what="the first scrape")
    failures = []
    for where, expr in dashboard_expressions():
        assert "$node" in expr or where == "Controller ingest", (where, expr)
        for node in NODE_VALUES:
            query = expr.replace("$node", node)
            try:
                answer = prometheus.query(query)
            except ValueError as exc:
                failures.append(f"{where}: {query}\n  {exc}")
                continue
            if answer.get("status") != "success":
                failures.append(f"{where}: {query}\n  {answer}")
    for where, expr in rule_expressions():
        try:
            prometheus.query(expr)
        except ValueError as exc:
            failures.append(f"rule {where}: {expr}\n  {exc}")
    assert not failures, "\n".join(failures)
    # the node variable's query (label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)) finds the node
    assert prometheus.api("label/Hostname/values", **{"match[]": "DCGM_FI_DEV_GPU_TEMP"})["data"] == ["edge-1"]


def _alerts(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in prometheus.api("alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]


@needs_prometheus
def test_the_first_xid_of_a_gpu_fires_in_a_real_prometheus(prometheus: Prometheus, exposition: Exposition) -> None:
    exposition.set(EDGE_PAGE.replace("LAST_XID", "0"))
    wait_for(lambda: len(prometheus.query("DCGM_FI_DEV_XID_ERRORS")["data"]["result"]) == 3, timeout=30,
             what="the first scrape")
    time.sleep(3)  # a few scrapes of the GPUs before their first XID, as on a running node
    # every rule evaluates cleanly on the page (no many-to-one surprise from the pod series)
    groups = prometheus.api("rules")["data"]["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} >= {"KgpuGpuHot", "KgpuXidErrors", "KgpuGpuUnhealthy"}
    assert not _alerts(prometheus, "KgpuXidErrors")
    # GPU 0's first XID 79: the edge's counter for (0, 79) appears, at 1
    exposition.set(EDGE_PAGE.replace("LAST_XID", "79") + 'kgpu_xid_errors_total{gpu="0",xid="79"} 1\n')
    fired = wait_for(lambda: [a for a in _alerts(prometheus, "KgpuXidErrors") if a["state"] == "firing"],
                     timeout=30, what="KgpuXidErrors to fire on the first XID")
    assert len(fired) == 1, fired
    alert = fired[0]
    assert alert["labels"]["gpu"] == "0" and alert["labels"]["xid"] == "79" and alert["labels"]["Hostname"] == "edge-1"
    assert alert["annotations"]["summary"] == "XID 79 on GPU 0 of edge-1"
    groups = prometheus.api("rules")["data"]["groups"]
    unhealthy = [r for g in groups for r in g["rules"] if r.get("health") not in ("ok", "unknown")]
    assert not unhealthy, [(r["name"], r.get("lastError")) for r in unhealthy]


def shortened_for(rules: str, seconds: int) -> str:
    """The rules with every `for:` of the GPU group cut to `seconds` (a test copy only: the shipped
    durations are covered by kgpu-rules.test.yaml)."""
    doc = yaml.safe_load(rules)
    for group in doc["groups"]:
        if group["name"] == "kgpu-gpu":
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{seconds}s"
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [a for a in _alerts(prometheus, name) if a["state"] == "firing"]


@pytest.mark.slow
@needs_prometheus
def test_gpu_alerts_fire_on_a_real_edge_daemon(tmp_path: Path, edge_factory: Callable[..., EdgeProcess]) -> None:
    edge = edge_factory(node="edge-alert", gpus=2, config={"health_quiet_period": 600})
    rules = shortened_for(RULES.read_text(), 3)
    assert re.search(r"\bfor: 3s\b", rules)
    prometheus = start_prometheus(tmp_path / "prometheus", {edge.port: edge.node}, rules)
    try:
        wait_for(lambda: len(prometheus.query('DCGM_FI_DEV_XID_ERRORS{Hostname="edge-alert"}')["data"]["result"]) >= 2,
                 timeout=30, what="the edge's GPUs scraped")
        time.sleep(3)  # the GPUs are scraped a few times before their first fault, as on a running node
        assert not [a for a in prometheus.api("alerts")["data"]["alerts"] if a["state"] == "firing"]
        edge.inject(0, utilization=100, ambient_c=70, temperature_c=86)
        edge.inject(1, xid=79)

        def summaries(name: str) -> set[tuple[str, str]]:
            return {(a["labels"]["gpu"], a["annotations"]["summary"]) for a in _firing(prometheus, name)}

        xid = wait_for(lambda: summaries("KgpuXidErrors"), timeout=30, what="KgpuXidErrors on the first XID")
        assert xid == {("1", "XID 79 on GPU 1 of edge-alert")}
        unhealthy = wait_for(lambda: summaries("KgpuGpuUnhealthy"), timeout=30, what="KgpuGpuUnhealthy")
        uuid = edge.gpu(1)["inventory"]["uuid"]
        assert unhealthy == {("1", f"GPU 1 ({uuid}) of edge-alert is unhealthy")}
        hot = wait_for(lambda: summaries("KgpuGpuHot"), timeout=30, what="KgpuGpuHot")
        assert {gpu for gpu, _ in hot} == {"0"}
        assert all(s.startswith("GPU 0 on edge-alert is at ") for _, s in hot), hot
        groups = prometheus.api("rules")["data"]["groups"]
        broken = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r.get("health") == "err"]
        assert not broken, broken
    finally:
        prometheus.child.stop()
