"""Hostile HTTP input against the live servers.

1. schemathesis (hypothesis underneath) fuzzes every operation of each server's own OpenAPI
   description, served by a real process: an edge daemon with the simulated driver, and a
   controller without a cluster and with the emulated Kubernetes API (its token in a Secret).
   Valid and invalid data alike: no 5xx, every status code documented, every response of the
   documented content type and schema, invalid data refused, and changes refused without the
   token (`ignored_auth`). A modest number of examples keeps each run to seconds.
2. Hand-made abuse that a generator is unlikely to produce: oversized, deeply nested, non-UTF-8,
   NaN and wrongly typed bodies, control characters in parameters. Each gets a clear 4xx JSON
   error, is counted in kgpu_http_rejected_total{reason}, and the process keeps serving.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from kgpu.lab.manifests import daemon_pod_manifest, daemonset_manifest
from shared.http import MAX_BODY_BYTES, MAX_JSON_DEPTH
from shared.openapi import SPEC_PATH
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess

# schemathesis.specs.openapi.schemas: what `schemathesis.openapi.from_url` imports on its first call,
# imported here at collection while the process has one thread: CPython 3.11.7's AST builder keeps
# its recursion depth in state the threads share (python/cpython#106905), and pytest's assertion
# rewriting of those modules, done while a fixture's server threads ran, failed once with "AST
# constructor recursion depth mismatch".

Server = TypeVar("Server", bound=EdgeProcess)  # an edge or a controller process
TOKEN = "fuzz-token-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# per operation and mode: seconds per server on a 2-core machine; KGPU_FUZZ_EXAMPLES=200 digs deeper
MAX_EXAMPLES = int(os.environ.get("KGPU_FUZZ_EXAMPLES", "12"))


def health_is_an_answer(ctx: Any, response: Any, case: Any) -> bool | None:
    """`not_a_server_error` for GET /healthz: its 503 is the documented "unhealthy, and why"
    (say the MQTT link dropped for a moment), not a server error. Anything else 5xx still is."""
    if response.status_code == 503:
        body = response.json()
        assert body["status"] == "unhealthy" and body["reasons"], f"a 503 from /healthz says why: {body}"
        return None
    return not_a_server_error(ctx, response, case)


def _checks_for(operation: Any, checks: list[Any]) -> list[Any]:
    if (operation.method.lower(), operation.path) != ("get", "/healthz"):
        return checks
    return [health_is_an_answer if check is not_a_server_error else check for check in checks]


def _alive(process: EdgeProcess) -> None:
    assert process.proc is not None and process.proc.poll() is None, f"the server died:\n{process.log()}"
    assert process.request("GET", "/healthz")[0] in (200, 503)


def fuzz(process: EdgeProcess, checks: list[Any], headers: dict[str, str] | None = None) -> list[str]:
    """Run schemathesis over every operation the live server describes, positive and negative data.

    schemathesis' own pytest plugin does not run on pytest 9.2 (it reads a node attribute that
    pytest removed), so its Python API drives hypothesis here: one strategy per operation and
    mode, each example sent to the server and checked. Returns the failures, one line each."""
    schema = schemathesis.openapi.from_url(process.base + SPEC_PATH)
    schema.config.update(base_url=process.base)
    failures: list[str] = []
    fuzzed: set[tuple[str, str]] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        fuzzed.add((operation.method.lower(), operation.path))
        operation_checks = _checks_for(operation, checks)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any, checks: list[Any]) -> None:
                case.call_and_validate(headers=headers, checks=checks, timeout=15)

            try:
                run(checks=operation_checks)
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to get wrong: no input
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} [{mode.value}]: {type(exc).__name__}: {_short(str(exc))}")
    # schemathesis leaves out the operation it loaded the description from (GET /api/v1/openapi.json)
    assert fuzzed == load_served(process) - {("get", SPEC_PATH)}, "every described operation was fuzzed"
    return failures


def _short(text: str, limit: int = 1200) -> str:
    """Failure reports quote whole requests (a fuzzed query can be kilobytes): keep them readable."""
    lines = [line if len(line) < 300 else line[:300] + "..." for line in text.splitlines()]
    joined = "\n".join(lines)
    return joined if len(joined) < limit else joined[:limit] + "..."


def load_served(process: EdgeProcess) -> set[tuple[str, str]]:
    served = process.get(SPEC_PATH)["paths"]
    return {(m, p) for p, item in served.items() for m in item if m in ("get", "put", "post", "delete", "patch")}


def serving(process: Server) -> Iterator[Server]:
    """A fixture's body: the started server, checked alive after the test, then stopped."""
    yield process
    try:
        _alive(process)
    finally:
        process.stop()


def fuzz_controller(cloud: CloudProcess) -> None:
    """Every controller operation, with the token, plus changes without it (`ignored_auth`)."""
    failures = fuzz(cloud, [*CHECKS, ignored_auth], {"Authorization": f"Bearer {TOKEN}"})
    assert not failures, "\n\n".join(failures)


# ---- the edge daemon ------------------------------------------------------------------------


@pytest.fixture
def edge_api(tmp_path: Path) -> Iterator[EdgeProcess]:
    edge = EdgeProcess(tmp_path / "edge", node="fuzz-edge", gpus=2).start()
    yield from serving(edge)


@pytest.mark.slow
def test_edge_api_under_schemathesis(edge_api: EdgeProcess) -> None:
    failures = fuzz(edge_api, CHECKS)
    assert not failures, "\n\n".join(failures)


# ---- the controller, without a cluster ------------------------------------------------------


@pytest.fixture
def cloud_api(tmp_path: Path, broker: Any) -> Iterator[CloudProcess]:
    cloud = CloudProcess(tmp_path / "cloud", broker.url, token=TOKEN).start().wait_healthy()
    yield from serving(cloud)


@pytest.mark.slow
def test_cloud_api_without_a_cluster_under_schemathesis(cloud_api: CloudProcess) -> None:
    fuzz_controller(cloud_api)


# ---- the controller with the emulated Kubernetes API, its token in a Secret -----------------


NS, DS = "kgpu", "kgpu-edge"
LABELS = {"app.kubernetes.io/name": "kgpu-edge"}


@pytest.fixture
def kube_cloud_api(tmp_path: Path, broker: Any, kube: Any) -> Iterator[CloudProcess]:
    kube.core.create_namespaced_secret(NS, {"apiVersion": "v1", "kind": "Secret",
                                            "metadata": {"name": "kgpu-controller-api", "namespace": NS},
                                            "data": {"token": base64.b64encode(TOKEN.encode()).decode()}})
    kube.add_node("fuzz-node")
    kube.apps.create_namespaced_daemon_set(NS, daemonset_manifest(NS, DS, LABELS, "kgpu:0.1.0"))
    kube.core.create_namespaced_pod(NS, daemon_pod_manifest(NS, DS, LABELS, f"{DS}-1", "fuzz-node", "kgpu:0.1.0"))
    cloud = CloudProcess(tmp_path / "cloud", broker.url, kubeconfig=kube.kubeconfig,
                         env={"KGPU_NAMESPACE": NS, "KGPU_DAEMONSET": DS, "KGPU_LEASE_DURATION": "4",
                              "KGPU_LEASE_RENEW_INTERVAL": "1"},
                         extra_args=["--api-token-secret", "kgpu-controller-api"]).start().wait_healthy()
    cloud.token = TOKEN
    yield from serving(cloud)


@pytest.mark.slow
def test_cloud_api_with_a_cluster_under_schemathesis(kube_cloud_api: CloudProcess) -> None:
    fuzz_controller(kube_cloud_api)


# ---- hand-made abuse ------------------------------------------------------------------------


def raw_request(base: str, method: str, path: str, data: bytes | None, content_type: str | None,
                token: str | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {} if content_type is None else {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, payload, got = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, payload, got = exc.code, exc.read(), dict(exc.headers)
    return status, json.loads(payload), got


def rejected(process: EdgeProcess) -> dict[str, float]:
    text = process.request("GET", "/metrics")[1]
    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "kgpu_http_rejected_total"}


ABUSE: list[tuple[str, bytes | None, str | None, int, str, str]] = [
    # (name, body, content type, status, reason, words in the error)
    ("oversized", b'{"a": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}', "application/json", 413, "body_too_large", "too large"),
    ("deeply nested", b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "application/json", 400,
     "too_deeply_nested", "nested"),
    ("very deeply nested", b"[" * 30000 + b"]" * 30000, "application/json", 400, "too_deeply_nested",
     "nested"),
    ("not UTF-8", b'{"utilization": "\xff\xfe\xfa"}', "application/json", 400, "not_utf8", "UTF-8"),
    ("latin-1 charset", b'{"utilization": 5}', "application/json; charset=latin-1", 415, "unsupported_media_type",
     "UTF-8"),
    ("form encoded", b"utilization=5", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "JSON"),
    ("no content type", b'{"utilization": 5}', None, 415, "unsupported_media_type", "JSON"),
    ("not JSON", b"{utilization: 5", "application/json", 400, "invalid_json", "JSON"),
    ("NaN", b'{"utilization": NaN}', "application/json", 400, "invalid_json", "JSON"),
    ("a boolean for a number", b'{"utilization": true}', "application/json", 400, "invalid_body", "invalid"),
    ("a string for a number", b'{"utilization": "50"}', "application/json", 400, "invalid_body", "invalid"),
    ("absurd value", b'{"temperature_c": 500}', "application/json", 400, "invalid_body", "invalid"),
]


@pytest.mark.parametrize("name, body, content_type, status, reason, words", ABUSE, ids=[a[0] for a in ABUSE])
def test_bad_bodies_are_refused_counted_and_survived_by_the_edge(
    edge_api: EdgeProcess, name: str, body: bytes | None, content_type: str | None, status: int, reason: str,
    words: str,
) -> None:
    before = rejected(edge_api)
    got, answer, _ = raw_request(edge_api.base, "POST", "/api/v1/sim/gpus/0", body, content_type)
    assert got == status and set(answer) == {"error", "detail"} and words in answer["error"], (name, got, answer)
    after = rejected(edge_api)
    assert after[reason] == before[reason] + 1, (name, before, after)
    assert edge_api.get("/api/v1/gpus")["gpus"][0]["index"] == 0


def test_bad_input_to_the_controller_is_refused_counted_and_survived(tmp_path: Path, broker: Any) -> None:
    cloud = CloudProcess(tmp_path / "cloud", broker.url, token=TOKEN).start().wait_healthy()
    try:
        policy = "/api/v1/policies/fuzz"
        cases = [
            ("PUT", policy, b'{"powerCapWatts": ' + b"[" * 100 + b"]" * 100 + b"}", "application/json", 400,
             "too_deeply_nested"),
            ("PUT", policy, b"\xc3\x28", "application/json", 400, "not_utf8"),
            ("PUT", policy, b'{"powerCapWatts": 300}', "text/plain", 415, "unsupported_media_type"),
            ("PUT", policy, b"x" * (MAX_BODY_BYTES + 1), "application/json", 413, "body_too_large"),
            ("PUT", policy, b'{"powerCapWatts": true}', "application/json", 400, "invalid_body"),
            ("PUT", policy, b'{"thermalThrottling": {"maxTempC": 500}}', "application/json", 400, "invalid_body"),
            ("PUT", policy, b'{"powerCapWatts": -50}', "application/json", 400, "invalid_body"),
            ("PUT", policy, b'{"powerCapWatts": Infinity}', "application/json", 400, "invalid_json"),
            ("POST", "/api/v1/rollouts", b'{"image": "x:1"}', "application/json", 409, None),
            ("GET", "/api/v1/events?kind=%00", None, None, 400, "invalid_query"),
            ("GET", "/api/v1/events?since=inf", None, None, 400, "invalid_query"),
            ("GET", "/api/v1/events?limit=" + "9" * 5000, None, None, 400, "invalid_query"),
            ("GET", "/api/v1/nodes/%00", None, None, 400, "invalid_path"),
            ("GET", "/api/v1/migrations/%C2%B2", None, None, 400, "invalid_request"),
            ("GET", "/api/v1/rollouts/%C2%B2", None, None, 404, None),
            ("GET", "/api/v1/nope", None, None, 404, "no_route"),
            ("PATCH", policy, b"{}", "application/json", 405, "method_not_allowed"),
        ]
        for method, path, body, content_type, status, reason in cases:
            before = rejected(cloud)
            got, answer, _ = raw_request(cloud.base, method, path, body, content_type, token=TOKEN)
            assert got == status and set(answer) == {"error", "detail"}, (method, path, got, answer)
            after = rejected(cloud)
            if reason is not None:
                assert after[reason] == before[reason] + 1, (method, path, reason, after)
            else:
                assert after == before, (method, path)
        assert cloud.get("/api/v1/policies")["policies"] == []  # nothing bad was stored
        _alive(cloud)
    finally:
        cloud.stop()
