"""Paged reads of the controller's API (cloud/http/api.py, cloud/http/dashboard.py,
cloud/store/queries.py): a cursor walks every node, event and decision exactly once; limits are
bounded; a bad cursor is a JSON 400; a node's GPU list is bounded however many GPUs it has; and
the dashboard's fleet call runs the same number of SQL statements whatever the fleet's size.

The fleet store is real (SQLite, and PostgreSQL where installed), filled through the real ingest core with the fleet
simulator's envelopes (tests/helpers/fleet_fill.py); the app is the real controller's, served by
aiohttp's test server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer

from cloud.app import ControllerApp
from cloud.config import CloudSettings
from cloud.store import FleetStore
from kgpu.lab.fleetsim.node import GPU_MODEL
from tests.helpers.fleet_fill import fill, ingest, node_messages, sim_nodes
from tests.helpers.postgres import create_database, drop_database, pg_url  # noqa: F401


async def _serve(db: str, setup: Callable[[FleetStore], None]) -> tuple[TestClient, ControllerApp]:
    settings = CloudSettings(db=db, no_kube=True)
    store = FleetStore(settings.db)
    setup(store)
    controller = ControllerApp(settings, kube=None, store=store)
    client = TestClient(TestServer(controller.http_app()))
    await client.start_server()
    return client, controller


@asynccontextmanager
async def _servers(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[TestClient, ControllerApp]] = []
    databases: list[str] = []

    async def make(setup: Callable[[FleetStore], None]) -> tuple[TestClient, ControllerApp]:
        if backend == "sqlite":
            db = f"sqlite:///{tmp_path / str(len(made)) / 'fleet.db'}"
        else:
            db = create_database(request.getfixturevalue("pg_url"))  # skips when PostgreSQL is not installed
            databases.append(db)
        made.append(await _serve(db, setup))
        return made[-1]

    try:
        yield make
    finally:
        for client, controller in made:
            await client.close()
            controller.store.close()
        for db in databases:
            drop_database(db)


@pytest.fixture(params=["sqlite", "postgresql"])
async def serve(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Serve the real controller's app over a fresh database that `setup` fills: SQLite, and
    PostgreSQL where installed."""
    async with _servers(request, tmp_path, request.param) as make:
        yield make


@pytest.fixture
async def serve_sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """As `serve`, on SQLite only (for what the database does not decide: parameter checks)."""
    async with _servers(request, tmp_path, "sqlite") as make:
        yield make


async def get(client: TestClient, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    return response.status, await response.json()


async def walk(client: TestClient, path: str, key: str) -> tuple[list[dict[str, Any]], int]:
    """Every row of a paged listing, following next_cursor; (rows, pages)."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        separator = "&" if "?" in path else "?"
        status, body = await get(client, path + (f"{separator}cursor={cursor}" if cursor else ""))
        assert status == 200, body
        rows += body[key]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, pages
        assert pages < 1000, "the walk does not end"


def _fleet(store: FleetStore) -> None:
    fill(store, 47, 2)
    big = sim_nodes(1, 40, prefix="big")[0]  # one node with many GPUs
    ingest(store, node_messages(big))


async def test_a_cursor_walks_every_node_exactly_once(serve: Any) -> None:
    client, controller = await serve(_fleet)
    names = sorted(controller.store.node_names())
    assert len(names) == 48

    rows, pages = await walk(client, "/api/v1/nodes?limit=10", "nodes")
    assert [r["name"] for r in rows] == names  # every node once, in name order
    assert pages == 5
    assert all("over_budget" in r and r["over_budget"] is None for r in rows)

    status, body = await get(client, "/api/v1/nodes")  # the default limit holds this fleet
    assert status == 200 and len(body["nodes"]) == 48 and body["next_cursor"] is None

    rows, pages = await walk(client, "/api/v1/dashboard/fleet?limit=7", "nodes")
    assert [r["name"] for r in rows] == names and pages == 7
    status, body = await get(client, "/api/v1/dashboard/fleet?limit=7")
    assert body["summary"] == {"nodes": 48, "online": 48, "gpus": 47 * 2 + 40, "unhealthy_gpus": 0,
                               "power_w": body["summary"]["power_w"], "over_budget": 0,
                               "as_of": body["summary"]["as_of"]}
    assert body["summary"]["power_w"] > 0


async def test_a_nodes_gpu_list_is_bounded(serve: Any) -> None:
    client, _ = await serve(_fleet)
    status, big = await get(client, "/api/v1/nodes/big-00000?gpu_limit=5")
    assert status == 200
    assert [g["index"] for g in big["gpus"]] == [0, 1, 2, 3, 4]
    assert big["gpus_truncated"] is True and big["gpu_summary"]["count"] == 40
    assert big["gpu_summary"]["healthy"] == 40
    status, whole = await get(client, "/api/v1/nodes/big-00000")
    assert len(whole["gpus"]) == 40 and whole["gpus_truncated"] is False
    status, page = await get(client, "/api/v1/dashboard/fleet?limit=1")
    (first,) = page["nodes"]
    assert first["name"] == "big-00000" and len(first["gpus"]) == 16 and first["gpus_truncated"] is True


@pytest.mark.parametrize("path", [
    "/api/v1/nodes?limit=0", "/api/v1/nodes?limit=2001", "/api/v1/nodes?limit=ten",
    "/api/v1/dashboard/fleet?limit=501", "/api/v1/dashboard/fleet?gpu_limit=65",
    "/api/v1/events?limit=10001", "/api/v1/decisions?limit=0", "/api/v1/nodes/node-00001?gpu_limit=1025",
])
async def test_limits_are_bounded(serve_sqlite: Any, path: str) -> None:
    client, _ = await serve_sqlite(lambda store: fill(store, 3, 1))
    status, body = await get(client, path)
    assert status == 400
    assert "must be" in body["error"]


async def test_a_bad_cursor_is_a_json_400(serve_sqlite: Any) -> None:
    client, _ = await serve_sqlite(lambda store: fill(store, 5, 1, events=3))
    _, page = await get(client, "/api/v1/nodes?limit=2")
    good = page["next_cursor"]
    _, events = await get(client, "/api/v1/events?limit=2")
    other = events["next_cursor"]
    forged = base64.urlsafe_b64encode(json.dumps(["nodes", 7]).encode()).decode()
    for path in (f"/api/v1/nodes?cursor={good[:-3]}", "/api/v1/nodes?cursor=%21%21%21",
                 f"/api/v1/nodes?cursor={other}", f"/api/v1/nodes?cursor={forged}",
                 f"/api/v1/dashboard/fleet?cursor={good}",  # another listing's
                 f"/api/v1/events?node=node-00001&cursor={other}",  # all nodes' cursor with a node filter
                 f"/api/v1/decisions?cursor={other}"):
        status, body = await get(client, path)
        assert status == 400, path
        assert body["error"] == "not a valid cursor", (path, body)
    status, _ = await get(client, f"/api/v1/nodes?cursor={good}")
    assert status == 200
    metrics = await (await client.get("/metrics")).text()
    assert 'kgpu_http_rejected_total{reason="invalid_query"} 7.0' in metrics


async def test_a_cursor_walks_every_event_once_across_epochs(serve: Any) -> None:
    def setup(store: FleetStore) -> None:
        node = sim_nodes(1, 1, prefix="ep")[0]
        ingest(store, node_messages(node, events=9, epoch="old-epoch"))
        ingest(store, node_messages(node, events=8, epoch="new-epoch"))  # restarted outbox: seqs again from 1
        fill(store, 4, 1, events=5)

    client, controller = await serve(setup)
    rows, pages = await walk(client, "/api/v1/events?node=ep-00000&limit=4", "events")
    assert [(r["epoch"], r["seq"]) for r in rows[:8]] == [("new-epoch", s) for s in range(8, 0, -1)]
    assert sorted(r["seq"] for r in rows[8:]) == list(range(1, 10)) and {r["epoch"] for r in rows[8:]} == {"old-epoch"}
    assert pages == 5
    assert rows == controller.store.events("ep-00000", limit=100)  # the same order as one big read

    everything, _ = await walk(client, "/api/v1/events?limit=3", "events")
    assert len(everything) == 17 + 4 * 5 and len({r["id"] for r in everything}) == len(everything)
    assert [(r["ts"], r["id"]) for r in everything] == sorted(((r["ts"], r["id"]) for r in everything), reverse=True)
    xids, _ = await walk(client, "/api/v1/events?kind=xid&limit=6", "events")
    assert len(xids) == len(everything)


async def test_the_fleet_call_runs_the_same_statements_whatever_the_fleet(serve: Any) -> None:
    """One query per node would grow with the fleet: count the SQL statements the dashboard's
    fleet call (figures and a page) and a node page run, on a fleet of 3 and one of 120 nodes."""

    async def statements(count: int) -> int:
        client, controller = await serve(lambda store: fill(store, count, 2))
        await get(client, "/api/v1/nodes?limit=1")  # the pool's first connection (its PRAGMAs) made
        seen: list[str] = []

        def count_it(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen.append(statement)  # BEGIN too: only the SELECTs are counted

        sa.event.listen(controller.store.engine, "before_cursor_execute", count_it)
        try:
            status, body = await get(client, "/api/v1/dashboard/fleet?limit=500")
            assert status == 200 and len(body["nodes"]) == count
            status, body = await get(client, "/api/v1/nodes?limit=2000")
            assert status == 200 and len(body["nodes"]) == count
        finally:
            sa.event.remove(controller.store.engine, "before_cursor_execute", count_it)
        return len([s for s in seen if s.lstrip().upper().startswith("SELECT")])

    small, large = await statements(3), await statements(120)
    assert small == large
    assert large == 7  # the figures (2), a page with GPUs (3), a page without (2)


async def test_the_fleet_call_searches_the_whole_fleet(serve: Any) -> None:
    """The overview's search over a fleet larger than its snapshot: `q` matches a node's name, a
    GPU's UUID or model, case aside; LIKE's wildcards match themselves; pages still page."""
    client, controller = await serve(lambda store: fill(store, 120, 2) + fill(store, 3, 1, prefix="site-b"))

    async def names(query: str) -> list[str]:
        status, body = await get(client, f"/api/v1/dashboard/fleet?limit=500&{query}")
        assert status == 200, body
        return [n["name"] for n in body["nodes"]]

    assert await names("q=node-0011") == [f"node-{i:05d}" for i in range(110, 120)]
    assert await names("q=GPU-node-00042-01") == ["node-00042"]  # a GPU's UUID
    assert await names("q=SITE-B") == ["site-b-00000", "site-b-00001", "site-b-00002"]  # case aside
    assert await names("q=%25") == [] and await names("q=node_0") == []  # % and _ are not wildcards
    assert len(await names(f"q={GPU_MODEL.split()[-1].lower()}")) == 123  # a GPU's model: every node
    status, page = await get(client, "/api/v1/dashboard/fleet?q=node-000&limit=4")
    assert [n["name"] for n in page["nodes"]] == [f"node-{i:05d}" for i in range(4)] and page["next_cursor"]
    status, body = await get(client, "/api/v1/dashboard/fleet?q=" + "x" * 201)
    assert status == 400 and "longer than 200" in body["error"]
