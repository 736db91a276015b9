"""The controller's HTTP API and its bearer token (cloud/auth.py).

Every route a live app registers is walked: each change (every method but GET) refuses a
request without the token or with a wrong one and lets the right one through; with
`--api-auth all` every /api/v1 read does too, while probes, metrics, the description and the
dashboard's files stay open. The token comes from a file or from a Kubernetes Secret (through the
emulated API server), and a rotated token works without a restart. With no token configured,
changes are refused unless --api-insecure. The token never reaches a log line.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.openapi import SPEC_PATH
from shared.settings import ConfigError, load_settings
from tests.helpers.cloud_process import CloudProcess

TOKEN, OTHER = "s3cret-token-AAAA", "n3w-token-BBBB"
NS = "kgpu"
SAMPLE_PARAMS = {"node": "edge-a", "name": "p1", "id": "1", "index": "0"}
OPEN = {"/healthz", "/metrics", SPEC_PATH, "/", "/static/{name}"}


def _fill(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE_PARAMS[m.group(1)], template)


def routes(app: web.Application, *, changes: bool) -> list[tuple[str, str]]:
    found = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    return sorted((m, p) for m, p in found if (m not in ("GET", "HEAD")) == changes and m != "HEAD")


async def _client(tmp_path: Path, **settings: Any) -> tuple[TestClient, Any]:
    from cloud.app import build
    from cloud.config import CloudSettings

    controller = build(CloudSettings(db=f"sqlite:///{tmp_path / 'fleet.db'}", namespace=NS, **settings))
    client = TestClient(TestServer(controller.http_app()))
    await client.start_server()
    return client, controller


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[TestClient, Any]] = []

    async def make(**settings: Any) -> TestClient:
        client, controller = await _client(tmp_path / str(len(made)), **settings)
        made.append((client, controller))
        return client

    yield make
    for client, controller in made:
        await client.close()
        controller.store.close()
        if controller.kube is not None:
            controller.kube.close()


async def send(client: TestClient, method: str, path: str, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = b"{}" if method in ("PUT", "POST", "PATCH") else None
    if body is not None:
        headers["Content-Type"] = "application/json"
    response = await client.request(method, path, data=body, headers=headers)
    try:
        payload = await response.json()
    except Exception:
        payload = await response.text()
    return response.status, payload, response.headers


async def assert_changes_need(client: TestClient, good: str, bad: str) -> int:
    changes = routes(client.server.app, changes=True)
    assert len(changes) == 7, changes  # policies (PUT, DELETE), labels, node commands, rollouts and 2 actions
    for method, template in changes:
        path = _fill(template)
        status, body, headers = await send(client, method, path)
        assert status == 401 and body["error"] and "Bearer" in headers["WWW-Authenticate"], (method, path, status)
        status, body, _ = await send(client, method, path, bad)
        assert status == 401 and "not valid" in body["error"], (method, path, status, body)
        status, body, _ = await send(client, method, path, good)
        assert status not in (401, 403), (method, path, status, body)
    return len(changes)


async def test_every_change_needs_the_token_from_a_file(tmp_path: Path, make_client: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    client = await make_client(no_kube=True, api_token_file=token_file)
    await assert_changes_need(client, TOKEN, OTHER)
    # reads stay open by default
    for method, template in routes(client.server.app, changes=False):
        assert (await send(client, method, _fill(template)))[0] != 401, template
    # rotation: a second token alongside, then the old one dropped; no restart
    token_file.write_text(f"{TOKEN}\n{OTHER}\n")
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER))[0] == 404
    token_file.write_text(f"{OTHER}\n")
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", TOKEN))[0] == 401
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER))[0] == 404
    # a token file gone or empty: changes fail closed with a clear 503, reads still work
    token_file.write_text("\n")
    status, body, _ = await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER)
    assert status == 503 and "no token" in body["detail"]
    token_file.unlink()
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER))[0] == 503
    assert (await send(client, "GET", "/api/v1/nodes"))[0] == 200


def _secret(kube: Any, name: str, value: str, key: str = "token") -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {key: base64.b64encode(value.encode()).decode()}}
    try:
        kube.core.create_namespaced_secret(NS, body)
    except Exception:
        kube.core.patch_namespaced_secret(name, NS, {"data": body["data"]})


async def test_every_change_needs_the_token_from_a_secret_and_rotation_works(
    kube: Any, make_client: Any
) -> None:
    from cloud.auth import SECRET_MIN_REFRESH_S

    _secret(kube, "kgpu-api", TOKEN)
    client = await make_client(kubeconfig=kube.kubeconfig, api_token_secret="kgpu-api")
    await assert_changes_need(client, TOKEN, OTHER)
    reads = [r for r in kube.requests() if "/secrets/" in str(r.url)]
    assert len(reads) <= 3, f"the Secret is cached, not read per request ({len(reads)} reads)"

    _secret(kube, "kgpu-api", OTHER)  # rotated: the new token works within seconds, the old one stops
    await asyncio.sleep(SECRET_MIN_REFRESH_S + 0.2)
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER))[0] == 404
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", TOKEN))[0] == 401

    # a Secret in another namespace and key: NAMESPACE/NAME:KEY
    kube.core.create_namespaced_secret("ops", {"apiVersion": "v1", "kind": "Secret",
                                               "metadata": {"name": "api", "namespace": "ops"},
                                               "data": {"bearer": base64.b64encode(b"ops-token").decode()}})
    other = await make_client(kubeconfig=kube.kubeconfig, api_token_secret="ops/api:bearer")
    assert (await send(other, "POST", "/api/v1/rollouts/1/cancel", "ops-token"))[0] == 404

    # the Secret gone: fail closed (503), never open
    missing = await make_client(kubeconfig=kube.kubeconfig, api_token_secret="kgpu-nothing")
    status, body, _ = await send(missing, "POST", "/api/v1/rollouts/1/cancel", TOKEN)
    assert status == 503 and "kgpu-nothing" in body["detail"] and TOKEN not in str(body)
    _secret(kube, "kgpu-nothing", TOKEN)  # created later: picked up within seconds
    await asyncio.sleep(SECRET_MIN_REFRESH_S + 0.2)
    assert (await send(missing, "POST", "/api/v1/rollouts/1/cancel", TOKEN))[0] == 404


async def test_tokens_from_a_secret_stay_valid_while_the_api_server_cannot_answer(
    kube: Any, make_client: Any
) -> None:
    """A control-plane blip must not lock operators out: the tokens read before stay valid while
    the API server answers 5xx or not at all (a token that does not match asks it again at once,
    which is the same path as the 30 s cache running out)."""
    from cloud.auth import SECRET_MIN_REFRESH_S

    _secret(kube, "kgpu-api", TOKEN)
    client = await make_client(kubeconfig=kube.kubeconfig, api_token_secret="kgpu-api")
    assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", TOKEN))[0] == 404

    def secret_reads() -> int:
        return len([r for r in kube.requests() if "/secrets/" in str(r.url)])

    async def still_guarded_by_the_old_token() -> None:
        await asyncio.sleep(SECRET_MIN_REFRESH_S + 0.2)
        assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", OTHER))[0] == 401  # asks again, in vain
        assert (await send(client, "POST", "/api/v1/rollouts/1/cancel", TOKEN))[0] == 404  # still valid
        assert (await send(client, "POST", "/api/v1/rollouts/1/cancel"))[0] == 401  # and still needed

    # the API server answers 503
    kube.react(f"get /api/v1/namespaces/{NS}/secrets/kgpu-api", 503,
               {"kind": "Status", "status": "Failure", "code": 503, "message": "etcdserver: leader changed"})
    before = secret_reads()
    await still_guarded_by_the_old_token()
    assert secret_reads() > before, "the Secret was asked for again"
    # the API server is gone: nothing listens
    kube.stop()
    await still_guarded_by_the_old_token()


async def test_without_a_token_changes_are_refused_unless_insecure(make_client: Any) -> None:
    closed = await make_client(no_kube=True)
    for method, template in routes(closed.server.app, changes=True):
        status, body, _ = await send(closed, method, _fill(template), TOKEN)
        assert status == 403 and "no API token is configured" in body["error"], (method, template, status)
    assert (await send(closed, "GET", "/api/v1/policies"))[0] == 200
    metrics = (await send(closed, "GET", "/metrics"))[1]
    assert re.search(r'kgpu_http_rejected_total\{reason="forbidden"\} [1-9]', metrics)

    insecure = await make_client(no_kube=True, api_insecure=True)
    for method, template in routes(insecure.server.app, changes=True):
        assert (await send(insecure, method, _fill(template)))[0] not in (401, 403), (method, template)


async def test_protected_reads(tmp_path: Path, make_client: Any) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    client = await make_client(no_kube=True, api_token_file=token_file, api_auth="all")
    reads = routes(client.server.app, changes=False)
    assert len(reads) >= 15
    for method, template in reads:
        path = _fill(template)
        status, _, _ = await send(client, method, path)
        if template in OPEN:
            assert status in (200, 404, 503), (template, status)  # 404: no such file; 503: no MQTT here
        else:
            assert status == 401, (template, status)
            assert (await send(client, method, path, TOKEN))[0] in (200, 404), template
    await assert_changes_need(client, TOKEN, OTHER)


@pytest.mark.parametrize("settings, problem", [
    ({"no_kube": True, "api_token_file": "/t", "api_token_secret": "s"}, "not both"),
    ({"no_kube": True, "api_token_secret": "kgpu-api"}, "needs a cluster"),
    ({"no_kube": True, "api_token_file": "/t", "api_insecure": True}, "cannot be combined"),
    ({"no_kube": True, "api_auth": "all"}, "needs api_token_file or api_token_secret"),
    ({"no_kube": True, "api_auth": "everything"}, "api_auth"),
    ({"kubeconfig": "/k", "api_token_secret": "Not/A:Secret!"}, "[NAMESPACE/]NAME[:KEY]"),
])
def test_auth_settings_are_checked(settings: dict[str, Any], problem: str) -> None:
    from cloud.config import CloudSettings

    with pytest.raises(ConfigError) as err:
        load_settings(CloudSettings, settings, None)
    assert problem in str(err.value), str(err.value)


def test_secret_reference_defaults() -> None:
    from cloud.config import CloudSettings

    settings = load_settings(CloudSettings, {"kubeconfig": "/k", "namespace": "edge", "api_token_secret": "api"}, None)
    assert settings.token_secret() == ("edge", "api", "token")
    settings = load_settings(CloudSettings, {"kubeconfig": "/k", "api_token_secret": "ops/api.v2:key_1"}, None)
    assert settings.token_secret() == ("ops", "api.v2", "key_1")


@pytest.mark.slow
def test_the_token_is_never_logged_and_the_start_says_how_changes_are_guarded(tmp_path: Path, broker: Any) -> None:
    guarded = CloudProcess(tmp_path / "guarded", broker.url, token=TOKEN).start()
    open_ = CloudProcess(tmp_path / "open", broker.url, extra_args=["--api-insecure"]).start()
    closed = CloudProcess(tmp_path / "closed", broker.url, env={"KGPU_API_INSECURE": "false"},
                          extra_args=[]).start()
    try:
        assert guarded.request("PUT", "/api/v1/policies/p1", {"powerCapWatts": 300})[0] == 201
        guarded.token = OTHER
        assert guarded.request("PUT", "/api/v1/policies/p1", {"powerCapWatts": 300})[0] == 401
        status, body = guarded.request("PUT", "/api/v1/policies/p1", {"powerCapWatts": 300},
                                       headers={"Authorization": f"Bearer {TOKEN}x"})
        assert status == 401 and TOKEN not in str(body)
        assert closed.request("PUT", "/api/v1/policies/p1", {"powerCapWatts": 300})[0] == 403
    finally:
        for process in (guarded, open_, closed):
            process.stop()
    guarded_log, open_log, closed_log = (p.log_path.read_text() for p in (guarded, open_, closed))
    assert "API changes need a bearer token" in guarded_log and "file" in guarded_log
    assert TOKEN not in guarded_log and OTHER not in guarded_log
    assert "API SECURITY" in open_log and "--api-insecure given" in open_log
    assert "API SECURITY" in closed_log and "refused" in closed_log
    assert "HTTP request rejected" in guarded_log and "unauthorized" in guarded_log


@pytest.mark.slow
def test_the_dashboard_asks_for_the_token_when_reads_are_protected(tmp_path: Path, broker: Any) -> None:
    from tests.test_dashboard import _launch, _playwright

    sync_playwright = _playwright()
    cloud = CloudProcess(tmp_path / "cloud", broker.url, token=TOKEN, extra_args=["--api-auth", "all"]).start()
    try:
        with sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page()
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(cloud.base + "/#/policies")
                page.wait_for_selector("body[data-ready='token'] #token-form")
                assert "API token needed" in page.inner_text("#main")
                page.fill("#token", "wrong")
                page.click("#token-form button")
                page.locator("#token-form", has_text="was refused").wait_for()
                page.fill("#token", TOKEN)
                page.click("#token-form button")
                page.wait_for_selector("body[data-ready='policies']")
                assert page.evaluate("sessionStorage.getItem('kgpu-api-token')") == TOKEN
                page.reload()  # kept for the tab: no second prompt
                page.wait_for_selector("body[data-ready='policies']")
                assert not problems, problems
            finally:
                browser.close()
    finally:
        cloud.stop()
