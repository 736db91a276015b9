"""Both HTTP servers are bounded (shared/http.py, cloud/http/api.py):

- a client that sends its request headers a byte at a time is cut off after the header timeout,
  on the controller and on the edge daemon, and the server keeps answering others;
- a request that runs past the request timeout is cancelled and answered 503 in JSON;
- a request whose client goes away is cancelled, and its read, waiting for one of the API's own
  read threads, is dropped and never runs;
- /healthz turns 503, naming the lag, while the ingest cannot write, and 200 again after.

The database locks are real: another SQLite connection holds the fleet store's file (exclusive
locking mode), or its write lock, so that the store's reads, or the ingest's writes, wait on
SQLite's busy handler.
The slow client is a raw socket; the server is the real app on a real port.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
import sqlalchemy as sa
from aiohttp import web

from cloud.app import ControllerApp
from cloud.config import CloudSettings
from cloud.http.api import READS
from cloud.store import FleetStore
from kgpu.lab.fleetsim.node import envelope_json, status_body
from shared.mqtt import parse_broker_url
from shared.protocol import Kind
from tests.helpers.fleet_fill import fill, sim_nodes

SLOW_HEAD = (b"GET /api/v1/nodes HTTP/1.1\r\nHost: localhost\r\nUser-Agent: one-byte-at-a-time\r\n"
             b"Accept: application/json\r\n\r\n")


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something truthy (generous: CI boxes are busy)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def request(port: int, path: str) -> tuple[int, Any]:
    """One HTTP/1.0 GET on a fresh connection: (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def slow_client(port: int, seconds_per_byte: float) -> int:
    """Send SLOW_HEAD one byte at a time; the number of bytes sent when the server closed the
    connection (len(SLOW_HEAD) if it never did)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for sent in range(len(SLOW_HEAD)):
            try:
                writer.write(SLOW_HEAD[sent:sent + 1])
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), seconds_per_byte) == b"":
                    return sent + 1  # EOF: the server closed it
            except TimeoutError:
                continue  # still open: the next byte
            except ConnectionError:
                return sent
        return len(SLOW_HEAD)
    finally:
        writer.close()


@contextmanager
def writes_locked(path: Path) -> Iterator[None]:
    """Another connection holds SQLite's write lock (a write transaction begun): every other
    writer waits on the busy handler until it lets go; readers go on (WAL)."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        holder.close()


SERVED: dict[int, web.Application] = {}  # id(controller) -> the app its fixture serves


@contextmanager
def fleet_file_locked(path: Path) -> Iterator[None]:
    """Another connection holds the database file (exclusive locking mode, a write begun): every
    other connection's read or write waits on SQLite's busy handler until it lets go."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE nodes SET gaps = gaps")
        yield
    finally:
        holder.close()


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[ControllerApp, int]]]]:
    """A real controller's HTTP app on a real port, over a fleet store of a few nodes whose
    connections wait up to a minute for a lock (the busy timeout): (controller, port), the app
    served in SERVED."""
    made: list[tuple[ControllerApp, web.AppRunner]] = []

    async def make(**settings: Any) -> tuple[ControllerApp, int]:
        db = tmp_path / f"fleet{len(made)}.db"
        config = CloudSettings(db=f"sqlite:///{db}", no_kube=True, **settings)
        store = FleetStore(config.db, busy_timeout_ms=60_000)
        fill(store, 3, 1, events=2)
        store.engine.dispose()  # no pooled connection left holding the file open
        app = ControllerApp(config, kube=None, store=store)
        runner, port = await serve(app.http_app())
        made.append((app, runner))
        SERVED[id(app)] = runner.app
        return app, port

    yield make
    for app, runner in made:
        await runner.cleanup()
        app.store.close()


async def test_a_slow_header_client_is_cut_off_by_the_controller(controller: Any) -> None:
    _, port = await controller(http_header_timeout=1.0)
    sent = await slow_client(port, seconds_per_byte=0.5)
    assert sent < len(SLOW_HEAD), "the connection stayed open until the whole head was sent"
    status, body = await request(port, "/api/v1/nodes")  # others are still served
    assert status == 200 and len(body["nodes"]) == 3


async def test_a_slow_header_client_is_cut_off_by_the_edge_daemon(tmp_path: Path) -> None:
    """The edge API takes the same bounds from shared/http.py (at most its default, 10 s, until
    edge/api.py passes --http-header-timeout on)."""
    from edge import sim
    from edge.api import make_app
    from edge.config import EdgeSettings
    from edge.daemon import EdgeDaemon

    simulated = sim.install(1, "T4")
    settings = EdgeSettings(node="edge-a", db=tmp_path / "edge.db", backend="sim", http_header_timeout=1.0)
    daemon = EdgeDaemon(settings, sim=simulated)
    runner, port = await serve(make_app(daemon))
    try:
        sent = await slow_client(port, seconds_per_byte=0.5)
        assert sent < len(SLOW_HEAD), "the connection stayed open until the whole head was sent"
        status, body = await request(port, "/api/v1/policy")
        assert status == 200
    finally:
        await runner.cleanup()
        await daemon.stop()
        simulated.uninstall()


async def test_a_request_past_its_time_is_a_json_503(controller: Any, tmp_path: Path) -> None:
    _, port = await controller(http_request_timeout=1.0)
    with fleet_file_locked(tmp_path / "fleet0.db"):
        status, body = await request(port, "/api/v1/nodes")
        assert status == 503
        assert body == {"error": "request timed out", "detail": {"timeout_s": 1.0}}
    # the lock gone, reads are answered again (the timed-out read's thread let go of its place)
    status, body = await until(lambda: request(port, "/api/v1/nodes"), "an answer after the lock")
    assert status == 200 and len(body["nodes"]) == 3


async def test_a_gone_clients_read_is_dropped_before_it_runs(controller: Any, tmp_path: Path) -> None:
    app, port = await controller(http_read_threads=1)
    pool = SERVED[id(app)][READS]
    statements: list[str] = []
    sa.event.listen(app.store.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: statements.append(statement))
    with fleet_file_locked(tmp_path / "fleet0.db"):
        first = asyncio.create_task(request(port, "/api/v1/nodes"))
        await until(lambda: pool.running == 1, "the nodes read in the only read thread, waiting for the lock")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        await until(lambda: pool.waiting == 1, "the events read waiting for the read thread")
        writer.close()  # the client goes away
        await until(lambda: pool.dropped == 1 and pool.waiting == 0, "the waiting read dropped")
    status, body = await asyncio.wait_for(first, 60)
    assert status == 200 and len(body["nodes"]) == 3
    assert not any("FROM events" in s for s in statements), "the gone client's read ran"
    assert any("FROM nodes" in s for s in statements)




async def test_healthz_turns_503_while_the_ingest_lags(tmp_path: Path, broker: Any) -> None:
    settings = CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", no_kube=True, mqtt=broker.url,
                             ingest_lag_unhealthy_s=1.0)
    store = FleetStore(settings.db, busy_timeout_ms=60_000)
    fill(store, 2, 1)
    store.engine.dispose()
    app = ControllerApp(settings, kube=None, store=store)
    runner, port = await serve(app.http_app())
    stop = asyncio.Event()
    running = asyncio.create_task(app.run(stop))
    host, mqtt_port = urllib.parse.urlsplit(broker.url).hostname, urllib.parse.urlsplit(broker.url).port
    node = sim_nodes(1, 1, prefix="lagging")[0]
    try:
        status, body = await until(lambda: _health(port, 200), "a healthy controller")
        assert body["ingest_lag_s"] == 0
        with writes_locked(tmp_path / "fleet.db"):
            payload = envelope_json(node.name, Kind.STATUS, status_body(node, "0.1.0"))
            await asyncio.to_thread(mqtt_publish.single, node.topics["status"], payload, qos=1,
                                    hostname=host, port=mqtt_port)
            status, body = await until(lambda: _health(port, 503), "/healthz unhealthy")
            assert any(r.startswith("ingest lagging") for r in body["reasons"]), body
            assert body["ingest_lag_s"] >= 1.0  # past the 1 s threshold, rounded to the millisecond
        status, body = await until(lambda: _health(port, 200), "healthy again once the store is writable")
        assert body["reasons"] == [] and body["ingest_lag_s"] == 0
        assert node.name in app.store.node_names()  # the message waited, and was written
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await runner.cleanup()


async def _health(port: int, wanted: int) -> tuple[int, Any] | None:
    status, body = await request(port, "/healthz")
    return (status, body) if status == wanted else None


async def test_healthz_names_a_shared_subscription_the_broker_ignores(tmp_path: Path, rabbitmq: Any) -> None:
    """RabbitMQ grants `$share/...` and delivers nothing through it: the controller is deaf to the
    fleet's events, so /healthz says 503 with the likely cause instead of 200 (issue 12)."""
    vhost = rabbitmq.vhost()
    settings = CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", no_kube=True, mqtt=vhost.url,
                             shared_subscription="kgpu", shared_subscription_check=1.0)
    app = ControllerApp(settings, kube=None, store=FleetStore(settings.db))
    runner, port = await serve(app.http_app())
    stop = asyncio.Event()
    running = asyncio.create_task(app.run(stop))
    node = sim_nodes(1, 1, prefix="deaf")[0]
    address = parse_broker_url(vhost.url)
    auth = {"username": address.username, "password": address.password}

    async def deaf() -> tuple[int, Any] | None:
        payload = envelope_json(node.name, Kind.STATUS, status_body(node, "0.1.0"))
        await asyncio.to_thread(mqtt_publish.single, node.topics["status"], payload, qos=1,
                                hostname=address.host, port=address.port, auth=auth)
        found = await _health(port, 503)
        # a 503 for "MQTT link down" comes first while the link is still connecting: wait past it
        return found if found and any("shared subscriptions" in r for r in found[1]["reasons"]) else None

    try:
        status, body = await until(deaf, "/healthz naming the silent $share group", timeout=60)
        assert any("shared subscriptions" in reason for reason in body["reasons"]), body
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
        await runner.cleanup()
        vhost.stop()
