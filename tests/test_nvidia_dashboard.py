"""NVIDIA's own dcgm-exporter Grafana dashboard (kept unchanged in deploy/reference/dcgm-exporter/)
fills every panel from kgpu alone, checked by a real Prometheus (Debian package `prometheus`).

Two sources, each scraped by a Prometheus of its own (so that an "All" selection sees one source
only, as it would at a site that has only that one):
- a real edge daemon over the simulated H100 (`kgpu edge run --backend sim`), its `/metrics`;
- a real controller's fleet exporter (`/metrics/fleet`), fed by that edge over a real mosquitto.

For every panel, every target's `expr` gets the dashboard's template variables substituted as
Grafana does when each is set to "All": the variable's own query (`label_values(metric, label)`)
is asked of Prometheus, and with no `allValue` the values go in as Grafana's Prometheus data
source writes a multi-value selection, a regex `(v1|v2)` of the escaped values. The expression then
runs as Grafana runs it: a range query, or an instant one for a target marked `instant`. A panel is
filled when it returns at least one series with a finite value above 0: with the GPUs loaded (90 %)
every figure this dashboard shows is positive on a simulated H100 (temperature, power, SM clock,
utilisation, framebuffer used, tensor pipe activity), so an all-zero panel counts as empty too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab.broker import Mosquitto
from kgpu.lab.processes import Child, TimedOut, get_json, wait_for
from kgpu.lab.prometheus import PROMETHEUS
from kgpu.lab.prometheus import start_prometheus as lab_prometheus
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/reference/dcgm-exporter/dcgm-exporter-dashboard.json"
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (scripts/test.sh installs Debian's prometheus package)")
SCRAPE_S = 1
# Grafana's built-in interval variables for a 1 s scrape ($__rate_interval: 4 scrape intervals at least)
BUILTINS = {"__rate_interval": f"{4 * SCRAPE_S}s", "__interval": f"{SCRAPE_S}s", "__interval_ms": str(1000 * SCRAPE_S)}
# Grafana's Prometheus data source escapes these in a multi-value regex (prometheusSpecialRegexEscape)
REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|]")


# ---- the dashboard --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    expr: str
    instant: bool


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries, rows opened (a collapsed row keeps its panels inside it)."""
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found += [p for p in panel.get("panels", []) if p.get("targets")]
        elif panel.get("targets"):
            found.append(panel)
    return found


def targets(panel: dict[str, Any]) -> list[Target]:
    return [Target(panel["title"], t["expr"], bool(t.get("instant")) and not t.get("range"))
            for t in panel["targets"] if not t.get("hide") and t.get("expr")]


def label_values(prometheus: Prometheus, query: str) -> list[str]:
    """What Grafana's `label_values(metric, label)` / `label_values(label)` variable query returns."""
    match = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query)
    if match is None:
        raise AssertionError(f"a variable query this test cannot evaluate: {query!r}")
    selector, label = match.groups()
    params = {"match[]": selector} if selector else {}
    values: list[str] = prometheus.api(f"label/{label}/values", **params)["data"]
    return sorted(values)


def grafana_regex_escape(value: str) -> str:
    return REGEX_SPECIAL.sub(lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\"))


def all_selections(board: dict[str, Any], prometheus: Prometheus) -> dict[str, str]:
    """Each template variable's text when set to "All" (or its only/default value), as Grafana would
    interpolate it into a Prometheus query."""
    chosen: dict[str, str] = {}
    for variable in board.get("templating", {}).get("list", []):
        name, kind = variable["name"], variable.get("type")
        if kind == "datasource":  # picks the data source, never appears in an expression
            continue
        if kind == "query":
            query = variable.get("query")
            query = query.get("query", "") if isinstance(query, dict) else str(query)
            values = label_values(prometheus, query)
            if variable.get("regex"):
                pattern = re.compile(variable["regex"].strip("/"))
                values = [m.group(1) if m.groups() else m.group(0)
                          for v in values if (m := pattern.search(v))]
        elif kind in ("custom", "constant", "textbox", "interval"):
            values = [o["value"] for o in variable.get("options", []) if o.get("value") != "$__all"] or \
                     [str(variable.get("query", ""))]
        else:
            raise AssertionError(f"variable {name}: type {kind!r} not handled by this test")
        assert values, f"variable {name} ({variable.get('query')}) finds no value"
        if variable.get("includeAll") and variable.get("allValue"):
            chosen[name] = str(variable["allValue"])
        elif variable.get("includeAll") or variable.get("multi"):
            escaped = [grafana_regex_escape(v) for v in values]
            chosen[name] = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        else:
            chosen[name] = values[0]  # a single-value variable: its first option, Grafana's default
    return chosen


def interpolate(expr: str, values: dict[str, str]) -> str:
    """Grafana's `$var`, `${var}`, `${var:format}` and `[[var]]` forms (the format is Grafana's
    default for Prometheus, the regex form, whatever is asked)."""
    every = {**BUILTINS, **values}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in every:
            raise AssertionError(f"unknown variable {name!r} in {expr!r}")
        return every[name]

    return re.sub(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


# ---- a real Prometheus ----------------------------------------------------------------------------


class Prometheus:
    def __init__(self, port: int, child: Child, started: float, scraped: int) -> None:
        self.port, self.child, self.started = port, child, started
        self.scraped = scraped  # the port of the one target it scrapes

    def api(self, path: str, **params: str) -> Any:
        return get_json(f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)

    def run(self, target: Target, expr: str) -> list[dict[str, Any]]:
        """The series the panel's query returns, as Grafana asks for them."""
        if target.instant:
            answer = self.api("query", query=expr)
        else:
            answer = self.api("query_range", query=expr, start=f"{self.started:.3f}", end=f"{time.time():.3f}",
                              step=f"{SCRAPE_S}s")
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


def filled(series: list[dict[str, Any]]) -> bool:
    """At least one series with a finite value above 0 (vector or matrix)."""
    def positive(raw: str) -> bool:
        value = float(raw)
        return math.isfinite(value) and value > 0

    return any(positive(s["value"][1]) if "value" in s else any(positive(v) for _, v in s["values"]) for s in series)


def start_prometheus(workdir: Path, job: str, port: int, metrics_path: str) -> Prometheus:
    """A Prometheus scraping the one target every second, with the target's own labels kept."""
    config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
              "scrape_configs": [{"job_name": job, "honor_labels": True, "metrics_path": metrics_path,
                                  "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}
    started = time.time()
    listen, child = lab_prometheus(workdir, config, name=f"prometheus-{job}")
    return Prometheus(listen, child, started, port)


# ---- the dashboard in Grafana's hands, offline ------------------------------------------------------


def test_the_kept_dashboard_is_nvidias_and_its_variables_interpolate_as_grafana_does() -> None:
    board = dashboard()
    found = panels(board)
    assert found and all(targets(p) for p in found)
    # the kept copy is NVIDIA's file unchanged: the digest its README records
    readme = (DASHBOARD.parent / "README.md").read_text()
    assert f"sha256 `{hashlib.sha256(DASHBOARD.read_bytes()).hexdigest()}`" in readme
    assert not filled([]) and not filled([{"metric": {}, "value": [0, "0"]}, {"metric": {}, "values": [[0, "NaN"]]}])
    assert filled([{"metric": {}, "values": [[0, "0"], [1, "0.63"]]}])
    assert grafana_regex_escape("127.0.0.1:9400") == "127\\\\.0\\\\.0\\\\.1:9400"
    assert interpolate('x{instance=~"$instance", gpu=~"${gpu}"}[$__rate_interval]',
                       {"instance": "(a|b)", "gpu": "0"}) == 'x{instance=~"(a|b)", gpu=~"0"}[4s]'


# ---- both sources, a real Prometheus each ------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Prometheus]]:
    """A loaded simulated H100 edge feeding a real controller over mosquitto; one Prometheus on the
    edge's /metrics, one on the controller's /metrics/fleet."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (scripts/test.sh installs Debian's prometheus package)")
    cloud = CloudProcess(tmp_path / "cloud", broker.url).start()
    edge = EdgeProcess(tmp_path / "edge", node="edge-1", mqtt=broker.url, gpus=2, model="H100").start()
    servers: list[Prometheus] = []
    try:
        for index in range(2):  # load: utilisation, and with it the tensor pipe, above 0
            edge.inject(index, utilization=90)
        servers.append(start_prometheus(tmp_path / "prometheus-edge", "kgpu-edge", edge.port, "/metrics"))
        servers.append(start_prometheus(tmp_path / "prometheus-fleet", "kgpu-fleet", cloud.port, "/metrics/fleet"))
        yield {"edge": servers[0], "fleet": servers[1]}
    finally:
        for server in servers:
            server.child.stop()
        for process in (edge, cloud):
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait(timeout=10)


def empty_panels(board: dict[str, Any], prometheus: Prometheus) -> dict[str, str]:
    """Panel title -> why it is empty, for each panel that a target leaves empty."""
    try:
        values = all_selections(board, prometheus)
    except AssertionError as exc:  # a variable with no value yet: every panel waits on it
        return {p["title"]: str(exc) for p in panels(board)}
    empty: dict[str, str] = {}
    for panel in panels(board):
        for target in targets(panel):
            expr = interpolate(target.expr, values)
            series = prometheus.run(target, expr)
            if not filled(series):
                empty[panel["title"]] = f"{expr} -> {series}"
    return empty


@pytest.mark.slow
@needs_prometheus
def test_every_panel_of_nvidias_dashboard_fills_from_the_edge_and_from_the_fleet_exporter(
        sources: dict[str, Prometheus]) -> None:
    board = dashboard()
    found = panels(board)
    assert found
    failures: list[str] = []
    for name, prometheus in sources.items():
        last: dict[str, str] = {}

        def all_filled(prometheus: Prometheus = prometheus) -> bool:
            nonlocal last
            last = empty_panels(board, prometheus)
            return not last

        try:  # GPM figures come from a board's second sample, a rate from a second scrape
            wait_for(all_filled, timeout=45, interval=0.5, what=f"every panel filled from the {name} source")
        except TimedOut:
            failures.append(f"{len(last)} of {len(found)} panels of NVIDIA's dashboard stay empty from the {name} "
                            "source:\n" + "\n".join(f"  {title}: {why}" for title, why in last.items()))
            continue
        # the "All" selection is the source's own: its one target, both GPUs
        values = all_selections(board, prometheus)
        assert values == {"instance": grafana_regex_escape(f"127.0.0.1:{prometheus.scraped}"), "gpu": "(0|1)"}, values
    assert not failures, "\n".join(failures)
