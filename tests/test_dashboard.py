"""The web dashboard: static routes and the server-push stream in-process (over real SQLite and
PostgreSQL stores), and the whole app in a real Chromium against a real broker, a real
`kgpu cloud run --no-kube` and two real edges on simulated GPUs."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud.http.dashboard import STATIC_DIR, THROTTLE_MASK, add_dashboard_routes
from cloud.store import FleetStore
from kgpu.lab.processes import wait_for
from shared.http import REQUEST_TIMEOUT, ReadPool, error_middleware
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.fleet_fill import fill
from tests.helpers.postgres import create_database, pg_url  # noqa: F401  (pg_url: fixture)
from tests.test_fleet_exporter import status, telemetry

CHROMIUM = "/usr/bin/chromium"
# KGPU_UPDATE_SCREENSHOT=1 refreshes the pictures in docs/ (docs/dashboard.md shows them); otherwise
# a run leaves the tree alone.
DOCS = Path(__file__).resolve().parent.parent / "docs"
UPDATE_SCREENSHOTS = os.environ.get("KGPU_UPDATE_SCREENSHOT") == "1"


# ---- static routes, in process ------------------------------------------------------------


@pytest.fixture
async def client() -> Iterator[TestClient]:
    app = web.Application(middlewares=[error_middleware])
    add_dashboard_routes(app)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize("name", ["index.html", "app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css",
                                  "uPlot.LICENSE", "VENDORED.md"])
def test_the_static_files_ship(name: str) -> None:
    assert (STATIC_DIR / name).is_file()


def test_the_vendored_chart_library_is_noted_with_its_version_and_licence() -> None:
    header = (STATIC_DIR / "uPlot.iife.min.js").read_text()[:200]
    version = header.split("(v", 1)[1].split(")", 1)[0]
    note = (STATIC_DIR / "VENDORED.md").read_text()
    assert f"| {version} | MIT" in note, (version, note)
    assert "MIT License" in (STATIC_DIR / "uPlot.LICENSE").read_text()
    index = (STATIC_DIR / "index.html").read_text()
    assert index.index("/static/uPlot.iife.min.js") < index.index("/static/app.js")  # app.js needs it


async def test_index_and_static_files_have_types_and_cache_headers(client: TestClient) -> None:
    index = await client.get("/")
    assert index.status == 200
    assert index.headers["Content-Type"].startswith("text/html")
    assert index.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in index.headers["Content-Security-Policy"]
    assert "/static/app.js" in await index.text()
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        response = await client.get(f"/static/{name}")
        assert response.status == 200 and response.headers["Content-Type"].startswith(kind)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        etag = response.headers["ETag"]
        again = await client.get(f"/static/{name}", headers={"If-None-Match": etag})
        assert again.status == 304 and await again.read() == b""


@pytest.mark.parametrize("path", [
    "/static/../store.py", "/static/..%2fstore.py", "/static/%2e%2e/store.py", "/static/..%2F..%2Fpyproject.toml",
    "/static/../../pyproject.toml", "/static/", "/static/nope.js", "/static/.%2E/dashboard.py",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/static/__init__.py",
])
async def test_path_traversal_is_impossible(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 404, path
    assert b"import" not in await response.read()


def test_raw_traversal_over_a_socket_is_a_404(tmp_path: Path) -> None:
    """The same, with the request line exactly as written (no client-side normalisation)."""
    import asyncio
    import threading

    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            app = web.Application(middlewares=[error_middleware])
            add_dashboard_routes(app)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            box["port"] = runner.addresses[0][1]
            box["stop"] = asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await runner.cleanup()

        box["loop"] = asyncio.new_event_loop()
        box["loop"].run_until_complete(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        for target in ["/static/../store.py", "/static/../../pyproject.toml", "/static/..\\store.py"]:
            with socket.create_connection(("127.0.0.1", box["port"]), timeout=5) as s:
                s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.split(b"\r\n", 1)[0].split(b" ")[1] in (b"404", b"400"), (target, data[:200])
            assert b"sqlalchemy" not in data.lower() and b"[project]" not in data
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


async def test_notes_and_licences_are_not_served(client: TestClient) -> None:
    for name in ("VENDORED.md", "uPlot.LICENSE"):
        assert (await client.get(f"/static/{name}")).status == 404
    assert (await client.get("/static/uPlot.iife.min.js")).status == 200


def test_the_app_never_uses_innerhtml() -> None:
    source = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink
    html = (STATIC_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN


# ---- the server push, in process over a real store -------------------------------------------


async def _events(response: Any, count: int) -> list[dict[str, Any]]:
    """The next `count` snapshot events of an SSE response (comments and heartbeats skipped)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        block = (await response.content.readuntil(b"\n\n")).decode()
        if "event: snapshot" in block:
            found.append(json.loads(block.split("data: ", 1)[1]))
    return found


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    url = (f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite"
           else create_database(request.getfixturevalue("pg_url")))
    store = FleetStore(url)
    yield store
    store.close()


async def test_the_stream_pushes_one_shared_snapshot_with_the_controllers_health(fleet_store: FleetStore) -> None:
    """Two pages get the same snapshot (one computation for both): the fleet's figures, the hottest
    GPUs across the fleet, the throttled ones (a slowdown bit, not idle), the trend, and the
    health /healthz knows, which says the broker link is down; then the database goes, and the
    stream says so instead of dying; a stream ends by itself before the request timeout."""
    t0 = time.time() - 5
    fleet_store.ingest([status("edge-a", ts=t0), status("edge-b", ts=t0)])
    fleet_store.ingest([telemetry("edge-a", t0 + 1, temperature_c=91.0, throttle_reasons=0x40 | 0x1),
                        telemetry("edge-b", t0 + 1, temperature_c=55.0, throttle_reasons=0x1)])
    reasons = ["MQTT link down: [Errno 111] Connection refused"]
    app = web.Application(middlewares=[error_middleware])
    app[REQUEST_TIMEOUT] = 8.0  # streams end after 3 s
    pool = ReadPool(2, "test-dashboard")
    add_dashboard_routes(app, store=fleet_store, reads=pool, health=lambda: {"status": "unhealthy", "reasons": reasons})
    try:
        async with TestClient(TestServer(app)) as client:
            stream = {"Accept": "text/event-stream"}
            one = await client.get("/api/v1/dashboard/stream", headers=stream)
            two = await client.get("/api/v1/dashboard/stream", headers=stream)
            assert one.status == 200 and one.headers["Content-Type"].startswith("text/event-stream")
            (a,), (b,) = await _events(one, 1), await _events(two, 1)
            if a["generated_at"] != b["generated_at"]:  # one page joined just as a snapshot was made
                (a,), (b,) = await _events(one, 1), await _events(two, 1)
            assert a == b
            assert a["summary"]["nodes"] == 2 and a["summary"]["gpus"] == 4 and a["summary"]["throttled"] == 2
            assert [n["name"] for n in a["nodes"]] == ["edge-a", "edge-b"]
            assert [(g["node"], g["temperature_c"]) for g in a["hottest"][:2]] == [("edge-a", 91.0), ("edge-a", 91.0)]
            assert {(g["node"], g["index"]) for g in a["throttled"]} == {("edge-a", 0), ("edge-a", 1)}
            assert all(g["throttle_reasons"] & THROTTLE_MASK for g in a["throttled"])
            assert a["trend"]["points"] and a["trend"]["fields"][0] == "ts"
            assert a["health"] == {"ok": False, "broker": False, "database": True, "reasons": reasons}

            single = await client.get("/api/v1/dashboard/stream")  # no Accept: one snapshot, then the end
            body = (await single.read()).decode()
            assert body.count("event: snapshot") == 1 and json.loads(body.split("data: ", 1)[1])["summary"]["nodes"] == 2

            reasons.clear()
            fleet_store.close()
            later = (await _events(one, 1))[0]
            while "stale" not in later:
                later = (await _events(one, 1))[0]
            assert later["health"]["database"] is False and later["health"]["broker"] is True
            assert any("fleet store not readable" in r for r in later["health"]["reasons"])
            rest = await one.content.read()  # the stream ends by itself (its lifetime) and the answer is whole
            assert one.content.at_eof(), rest[-200:]
            two.close()
    finally:
        pool.close()


# ---- the whole app in Chromium ------------------------------------------------------------


def _playwright() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (scripts/test.sh installs Debian's chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (python) not installed: pip install -e '.[test]'")
    return sync_playwright


def _launch(p: Any) -> Any:
    """The system Chromium (never a downloaded one); skip when it or playwright's driver can't run."""
    from playwright.sync_api import Error as PlaywrightError

    try:
        return p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
    except PlaywrightError as exc:
        pytest.skip(f"cannot launch {CHROMIUM} through playwright: {exc}")


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[dict[str, Any]]:
    # the default history: every sample for the last hour (a chart has a point per sampling interval)
    cloud = CloudProcess(tmp_path / "cloud", broker.url).start()
    edges: list[EdgeProcess] = []
    try:
        for name in ("edge-a", "edge-b"):
            workdir = tmp_path / name
            workdir.mkdir()
            edges.append(EdgeProcess(workdir, node=name, mqtt=broker.url,
                                     config={"ack_timeout": 3, "status_interval": 2}).start())
        yield {"cloud": cloud, "edges": edges}
    finally:
        for process in [*edges, cloud]:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def _shot(page: Any, name: str, tmp_path: Path) -> None:
    """A full-page picture: docs/NAME with KGPU_UPDATE_SCREENSHOT=1, else under tmp_path (checked)."""
    path = DOCS / name if UPDATE_SCREENSHOTS else tmp_path / name
    page.evaluate("document.fonts.ready")
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG")


def _chart_points(page: Any, gpu_uuid: str, chart: str) -> int:
    box = page.locator(f".gpu-card[data-uuid='{gpu_uuid}'] figure[data-chart='{chart}']")
    return int(box.get_attribute("data-points") or 0)


@pytest.mark.slow
def test_dashboard_in_a_real_browser(fleet: dict[str, Any], broker: Any, tmp_path: Path) -> None:
    """The overview follows the server push (no polling), shows the fleet at a glance and filters,
    sorts and searches; a node's page charts every GPU over a chosen range with uPlot; migrations
    are a table with their steps; a banner says when the controller loses its broker."""
    sync_playwright = _playwright()
    cloud: CloudProcess = fleet["cloud"]
    edge_a, edge_b = fleet["edges"]
    edge_a.inject(1, xid=79, recovery="reboot")  # stays unhealthy: a GPU reset does not clear it
    edge_a.inject(0, utilization=85)
    edge_b.inject(1, utilization=60)

    def ready() -> bool:
        nodes = {n["name"]: n for n in cloud.get("/api/v1/dashboard/fleet")["nodes"]}
        if set(nodes) != {"edge-a", "edge-b"} or not all(n["online"] and len(n["gpus"]) == 2 for n in nodes.values()):
            return False
        if nodes["edge-a"]["gpus"][1]["health"] != "unhealthy":
            return False
        counts: dict[str, int] = {}
        for s in cloud.get("/api/v1/nodes/edge-a/samples")["samples"]:
            counts[s["uuid"]] = counts.get(s["uuid"], 0) + 1
        return len(counts) == 2 and min(counts.values()) >= 4 and bool(
            cloud.get("/api/v1/events?node=edge-a&kind=xid")["events"])

    wait_for(ready, timeout=60, interval=0.5, what="both nodes online, the XID stored and some sample history")

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            reads: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}")
                    if "/dashboard/stream" not in r.url else None)  # a stream cut when the page leaves
            page.on("request", lambda r: reads.append(r.url) if "/api/" in r.url else None)

            # ---- the overview, from the stream
            page.goto(cloud.base + "/")
            page.wait_for_selector("#nodes-table tr[data-node='edge-b'] .gpu")
            assert page.locator("#nodes-table tbody tr").count() == 2
            for name in ("edge-a", "edge-b"):
                row = page.locator(f"#nodes-table tr[data-node='{name}']")
                assert row.locator(".pill").first.inner_text() == "online"
                assert row.locator(".gpu").count() == 2
            bad = page.locator("#nodes-table tr[data-node='edge-a'] .gpu[data-index='1']")
            assert bad.get_attribute("data-health") == "unhealthy"
            assert "health-unhealthy" in (bad.get_attribute("class") or "")
            assert page.locator(".stat[data-stat='offline'] .stat-value").inner_text() == "0"
            assert page.locator(".stat[data-stat='unhealthy'] .stat-value").inner_text() == "1"
            assert page.locator("#live").inner_text().startswith("live")
            assert page.locator("#banner").is_hidden()
            page.wait_for_selector("#hottest tbody tr")
            assert page.locator("#attention tr[data-node='edge-a']").count() >= 1  # the unhealthy GPU
            page.wait_for_selector("#fleet-trend figure[data-drawn='1'] canvas")

            # server push, not polling: a fault shows without a reload, and nothing but the stream was read
            edge_b.inject(0, xid=79, recovery="reboot")
            page.wait_for_selector("#nodes-table tr[data-node='edge-b'] .gpu[data-index='0'][data-health='unhealthy']",
                                   timeout=30000)
            assert {u.split("?")[0].split("/api/", 1)[1] for u in reads} == {"v1/dashboard/stream"}, reads

            # search, filter and sort
            page.fill("#search", "edge-b")
            page.wait_for_function("document.querySelectorAll('#nodes-table tbody tr').length === 1")
            assert page.locator("#nodes-table tbody tr").get_attribute("data-node") == "edge-b"
            page.fill("#search", "nobody-here")
            page.wait_for_selector("#nodes-wrap .empty:has-text('No node matches')")
            page.fill("#search", "")
            page.select_option("#filter", "offline")
            page.wait_for_selector("#nodes-wrap .empty:has-text('No node matches')")
            page.select_option("#filter", "all")
            page.select_option("#sort", "seen")
            page.wait_for_function("document.querySelectorAll('#nodes-table tbody tr').length === 2")
            _shot(page, "dashboard.png", tmp_path)

            # ---- 800 px: nothing wider than the window (wide tables scroll in their own box)
            page.set_viewport_size({"width": 800, "height": 900})
            page.wait_for_timeout(400)  # the charts follow the window after a short debounce
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            _shot(page, "dashboard-800.png", tmp_path)
            page.set_viewport_size({"width": 1400, "height": 900})

            # ---- a node's page: charts with a point per sample, over a chosen range
            page.click("#nodes-table a[href='#/nodes/edge-a']")
            page.wait_for_selector(".gpu-card figure[data-chart='temperature'][data-drawn='1'] canvas")
            cards = page.locator(".gpu-card")
            assert cards.count() == 2
            for i in range(2):
                uuid = cards.nth(i).get_attribute("data-uuid") or ""
                for chart in ("temperature", "power", "utilization", "memory", "clocks"):
                    assert _chart_points(page, uuid, chart) >= 4, (uuid, chart)
            assert page.locator(".gpu-card figure[data-drawn='1']").count() >= 10
            legend = page.locator(".gpu-card figure[data-chart='temperature']").first.inner_text().lower()
            assert "maxtempc" in legend and "critical" in legend and "83 °c" in legend  # the default policy's line
            assert "limit" in page.locator(".gpu-card figure[data-chart='power']").first.inner_text().lower()
            page.click("#range button[data-range='15m']")
            page.wait_for_selector("#range button.active[data-range='15m']")
            page.wait_for_selector(".gpu-card figure[data-chart='temperature'][data-drawn='1'] canvas")
            page.wait_for_selector("#timeline li[data-kind='xid']")
            assert "XID 79" in page.locator("#timeline li[data-kind='xid']").first.inner_text()
            assert page.locator(".gpu-card[data-uuid] .pill.h-unhealthy").count() == 1
            _shot(page, "dashboard-node.png", tmp_path)

            # ---- migrations: a table with each one's steps (--no-kube: needs-cluster)
            page.click("#nav a[data-route='migrations']")
            page.wait_for_selector("#migrations tr.migration[data-state]", timeout=20000)
            assert page.locator("#migrations tr.migration").first.get_attribute("data-state") == "needs-cluster"
            assert page.locator("#migrations tr.steps-row").count() == page.locator("#migrations tr.migration").count()
            assert "--no-kube" in page.locator("main .note").inner_text()
            assert page.evaluate("document.documentElement.scrollWidth") <= 1400
            page.click("#nav a[data-route='rollouts']")
            page.wait_for_selector("main .empty:has-text('No rollouts yet')")
            page.click("#nav a[data-route='policies']")
            page.wait_for_selector("main .empty:has-text('No policies yet')")
            page.goto(cloud.base + "/#/nodes/nobody")
            page.wait_for_selector("main .empty:has-text('No such node')")
            problems = [p for p in problems if "/api/v1/nodes/nobody" not in p and "404" not in p]

            # ---- the broker goes: a banner, not a site outage; it comes back: the banner goes
            page.goto(cloud.base + "/#/")
            page.wait_for_selector("#nodes-table")
            broker.stop()
            page.wait_for_selector("#banner[data-kind='broker']", state="visible", timeout=60000)
            assert "broker" in page.locator("#banner").inner_text()
            assert page.locator("#live").inner_text() == "degraded"
            _shot(page, "dashboard-broker-down.png", tmp_path)
            broker.start()
            page.wait_for_selector("#banner", state="hidden", timeout=90000)
            assert not problems, problems
        finally:
            browser.close()


@pytest.mark.slow
def test_the_overview_searches_a_fleet_larger_than_its_snapshot(tmp_path: Path, broker: Any) -> None:
    """520 nodes: the stream's snapshot lists the first 500 by name; a search for one beyond them
    asks the controller (`?q=`) and shows it, and says it searched the whole fleet."""
    sync_playwright = _playwright()
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    with FleetStore(db) as store:
        fill(store, 520, 1)
    cloud = CloudProcess(tmp_path / "cloud", broker.url, db=db).start()
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(cloud.base + "/")
                page.wait_for_selector("#nodes-table tr[data-node='node-00000']")
                assert "the first 500 of 520" in page.locator("#shown").inner_text()
                assert page.locator("#nodes-table tr[data-node='node-00515']").count() == 0  # beyond the snapshot
                page.fill("#search", "node-0051")
                page.wait_for_selector("#nodes-table tr[data-node='node-00515']")
                shown = sorted(page.locator("#nodes-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.node)"))
                assert shown == [f"node-{i:05d}" for i in range(510, 520)], shown
                assert "whole fleet" in page.locator("#shown").inner_text()
                page.fill("#search", "")
                page.wait_for_function("document.querySelectorAll('#nodes-table tbody tr').length === 500")
                assert not problems, problems
            finally:
                browser.close()
    finally:
        cloud.stop()


def test_dashboard_is_served_by_the_real_controller(tmp_path: Path, broker: Any) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url).start()
    try:
        with urllib.request.urlopen(cloud.base + "/", timeout=10) as response:
            assert response.status == 200 and b"kgpu" in response.read()
        assert cloud.get("/api/v1/dashboard/fleet")["nodes"] == []

        def snapshot() -> dict[str, Any]:  # without Accept: text/event-stream, one snapshot and the end
            with urllib.request.urlopen(cloud.base + "/api/v1/dashboard/stream", timeout=30) as stream:
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                events = [line for line in stream.read().splitlines() if line.startswith(b"data: ")]
            assert len(events) == 1
            return dict(json.loads(events[0][len(b"data: "):]))

        assert snapshot()["nodes"] == []
        # /healthz's view, wired in: the link is up (a snapshot made as the controller started may say not yet)
        wait_for(lambda: snapshot()["health"] == {"ok": True, "broker": True, "database": True, "reasons": []},
                 timeout=30, what="a snapshot with the controller healthy")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(cloud.base + "/static/../store.py", timeout=10)
        assert err.value.code == 404
    finally:
        cloud.proc.kill()
        cloud.proc.wait()

