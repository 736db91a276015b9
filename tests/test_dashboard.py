"""The web dashboard: static routes in-process, and the whole app in a real Chromium against a real
broker, a real `kgpu cloud run --no-kube` and two real edges on simulated GPUs."""

from __future__ import annotations

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

from cloud.http.dashboard import STATIC_DIR, add_dashboard_routes
from kgpu.lab.processes import wait_for
from shared.http import error_middleware
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

CHROMIUM = "/usr/bin/chromium"
# KGPU_UPDATE_SCREENSHOT=1 refreshes the picture in docs/; otherwise a run leaves the tree alone.
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


# ---- static routes, in process ------------------------------------------------------------


@pytest.fixture
async def client() -> Iterator[TestClient]:
    app = web.Application(middlewares=[error_middleware])
    add_dashboard_routes(app)
    async with TestClient(TestServer(app)) as c:
        yield c


@pytest.mark.parametrize("name", ["index.html", "app.js", "style.css"])
def test_the_static_files_ship(name: str) -> None:
    assert (STATIC_DIR / name).is_file()


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


def test_the_app_never_uses_innerhtml() -> None:
    source = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink
    html = (STATIC_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN


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
    # one stored sample per GPU per second (the default, 60 s, would leave the charts a single point)
    cloud = CloudProcess(tmp_path / "cloud", broker.url, env={"KGPU_HISTORY_RESOLUTION": "1"}).start()
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


@pytest.mark.slow
def test_dashboard_in_a_real_browser(fleet: dict[str, Any], tmp_path: Path) -> None:
    screenshot = DOCS_SCREENSHOT if os.environ.get("KGPU_UPDATE_SCREENSHOT") == "1" else tmp_path / "dashboard.png"
    sync_playwright = _playwright()
    cloud: CloudProcess = fleet["cloud"]
    edge_a, edge_b = fleet["edges"]
    edge_a.inject(1, xid=79)
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
        return len(counts) == 2 and min(counts.values()) >= 3 and bool(
            cloud.get("/api/v1/events?node=edge-a&kind=xid")["events"])

    wait_for(ready, timeout=40, interval=0.5, what="both nodes online, the XID stored and some sample history")

    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))

            # fleet overview
            page.goto(cloud.base + "/")
            page.wait_for_selector("#nodes-table tr[data-node='edge-b'] .gpu")
            rows = page.locator("#nodes-table tbody tr")
            assert rows.count() == 2
            for name in ("edge-a", "edge-b"):
                row = page.locator(f"#nodes-table tr[data-node='{name}']")
                assert row.locator(".pill").first.inner_text() == "online"
                assert row.locator(".gpu").count() == 2
            bad = page.locator("#nodes-table tr[data-node='edge-a'] .gpu[data-index='1']")
            assert bad.get_attribute("data-health") == "unhealthy"
            assert bad.locator(".health-label").inner_text().lower() == "unhealthy"
            assert "health-unhealthy" in (bad.get_attribute("class") or "")
            assert page.locator("#nodes-table tr[data-node='edge-b'] .gpu[data-health='healthy']").count() == 2
            assert page.locator(".stat").filter(has_text="offline").locator(".stat-value").inner_text() == "0"
            assert page.locator(".stat").filter(has_text="unhealthy").locator(".stat-value").inner_text() == "1"
            assert page.locator("#live").inner_text().startswith("live")
            time.sleep(0.3)  # let the fonts settle before the picture
            page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.read_bytes().startswith(b"\x89PNG")

            # node page, reached by clicking
            page.click("#nodes-table a[href='#/nodes/edge-a']")
            page.wait_for_selector(".gpu-card svg.chart polyline")
            assert page.locator(".gpu-card").count() == 2
            lines = page.locator(".gpu-card svg.chart polyline.s-temp")
            assert lines.count() == 2
            for i in range(lines.count()):
                points = (lines.nth(i).get_attribute("points") or "").split()
                assert len(points) >= 2, points
            assert page.locator(".gpu-card svg.chart polyline.s-power").count() == 2
            assert page.locator(".gpu-card svg.chart polyline.s-limit").count() == 2
            page.wait_for_selector("#timeline li[data-kind='xid']")
            assert "XID 79" in page.locator("#timeline li[data-kind='xid']").first.inner_text()
            assert page.locator("#timeline li[data-kind='decision']").count() >= 1
            assert page.locator(".gpu-card[data-uuid] .pill.h-unhealthy").count() == 1
            if shots := os.environ.get("KGPU_DASHBOARD_SHOTS"):  # extra pictures for a human to look at
                page.screenshot(path=f"{shots}/node.png", full_page=True)

            # migrations: --no-kube records the XID's migration as needs-cluster (or nothing yet)
            page.click("#nav a[data-route='migrations']")
            page.wait_for_selector("#migrations, main .empty:has-text('No migrations')")
            page.wait_for_function("document.querySelector('#migrations article[data-state]') !== null", timeout=15000)
            card = page.locator("#migrations article").first
            assert card.get_attribute("data-state") == "needs-cluster"
            assert "edge-a" in card.inner_text()
            assert "--no-kube" in page.locator("main .note").inner_text()
            if shots:
                page.screenshot(path=f"{shots}/migrations.png", full_page=True)

            # rollouts (none without a cluster) and policies (none yet): clear empty states
            page.click("#nav a[data-route='rollouts']")
            page.wait_for_selector("main .empty:has-text('No rollouts yet')")
            page.click("#nav a[data-route='policies']")
            page.wait_for_selector("main .empty:has-text('No policies yet')")

            # an unknown node and an unknown page
            page.goto(cloud.base + "/#/nodes/nobody")
            page.wait_for_selector("main .empty:has-text('No such node')")
            problems = [p for p in problems if "/api/v1/nodes/nobody" not in p and "404" not in p]

            page.goto(cloud.base + "/#/")
            page.wait_for_selector("#nodes-table")
            assert not problems, problems
        finally:
            browser.close()


@pytest.mark.slow
def test_the_overview_polls_for_changes(fleet: dict[str, Any]) -> None:
    """A fault injected while the page is open shows up without a reload."""
    sync_playwright = _playwright()
    cloud: CloudProcess = fleet["cloud"]
    edge_b = fleet["edges"][1]
    wait_for(lambda: len([n for n in cloud.get("/api/v1/nodes")["nodes"] if n["online"]]) == 2, timeout=30,
             what="both nodes online")
    with sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            page.goto(cloud.base + "/")
            page.wait_for_selector("#nodes-table tr[data-node='edge-b'] .gpu[data-index='0'][data-health='healthy']")
            edge_b.inject(0, xid=79)
            page.wait_for_selector("#nodes-table tr[data-node='edge-b'] .gpu[data-index='0'][data-health='unhealthy']",
                                   timeout=20000)
        finally:
            browser.close()


def test_dashboard_is_served_by_the_real_controller(tmp_path: Path, broker: Any) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url).start()
    try:
        with urllib.request.urlopen(cloud.base + "/", timeout=10) as response:
            assert response.status == 200 and b"kgpu" in response.read()
        assert cloud.get("/api/v1/dashboard/fleet")["nodes"] == []
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(cloud.base + "/static/../store.py", timeout=10)
        assert err.value.code == 404
    finally:
        cloud.proc.kill()
        cloud.proc.wait()

