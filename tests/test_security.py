"""Security with the real processes: the shipped broker kit (TLS, passwords, per-node ACL) under
a real controller and real edge daemons, a stolen node credential trying to reach further, and
secrets that must never show up in a log line, an error message or an HTTP answer.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kgpu.lab.broker import dynsec_plugin, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, Received, TlsOptions, parse_broker_url
from shared.policy import PowerPolicy
from shared.protocol import CommandBody, DecisionBody, Kind, PolicyBody, StatusBody, make_envelope
from shared.topics import cloud_topic, edge_topic
from tests.helpers.cloud_process import CloudProcess
from tests.helpers.edge_process import EdgeProcess
from tests.helpers.shipped_broker import ShippedBroker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None
                       or shutil.which("mosquitto_ctrl") is None,
                       reason="mosquitto not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(dynsec_plugin() is None, reason="mosquitto's dynamic-security plugin, which the shipped "
                       "conf loads, is not installed (Debian's mosquitto package has it)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]

API_TOKEN = "tok-Zq8v3LrW0pXy"  # looks like nothing else in a log: any hit is a leak


def http(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class Inbox:
    """A raw MQTT client with an inbox: the attacker, or the controller's hand for commands."""

    def __init__(self, url: str, client_id: str, *subscriptions: str, password_file: Path | None = None,
                 tls: TlsOptions | None = None) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.link = MqttLink(parse_broker_url(url, password_file=password_file), client_id,
                             subscriptions=[(s, 1) for s in subscriptions], tls=tls, on_message=self.messages.put,
                             backoff_min_s=0.1, backoff_max_s=0.5)
        self.link.start()
        wait_for(self.link.connected.is_set, timeout=10, what=f"{client_id} connected ({self.link.last_error})")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.link._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"no PUBACK for {topic}"

    def received(self) -> list[Received]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shipped broker kit; the controller and two edges on its TLS listener with the users
    make-users.sh made. edge-a reads its password from a file, edge-b has it in its URL."""
    kit = ShippedBroker(tmp_path / "kit").start()
    ca = kit.certs_dir / "ca.crt"
    token_file = tmp_path / "api-token"
    token_file.write_text(API_TOKEN + "\n")
    tls_url = f"mqtts://{{user}}@localhost:{kit.tls_port}"
    cloud = CloudProcess(tmp_path / "cloud", tls_url.format(user="kgpu-controller"), env={
        "KGPU_MQTT_PASSWORD_FILE": str(kit.password_file("kgpu-controller")), "KGPU_MQTT_CA_FILE": str(ca),
        "KGPU_API_TOKEN_FILE": str(token_file), "KGPU_LOG_LEVEL": "debug"})
    edge_b_password = kit.password_file("edge-b").read_text().strip()
    edges = {
        "edge-a": EdgeProcess(tmp_path / "edge-a", node="edge-a", gpus=1, mqtt=tls_url.format(user="edge-a"), env={
            "KGPU_MQTT_PASSWORD_FILE": str(kit.password_file("edge-a")), "KGPU_MQTT_CA_FILE": str(ca),
            "KGPU_LOG_LEVEL": "debug"}, config={"status_interval": 2, "ack_timeout": 2}),
        "edge-b": EdgeProcess(tmp_path / "edge-b", node="edge-b", gpus=1,
                              mqtt=f"mqtts://edge-b:{edge_b_password}@localhost:{kit.tls_port}",
                              env={"KGPU_MQTT_CA_FILE": str(ca), "KGPU_LOG_LEVEL": "debug"},
                              config={"status_interval": 2, "ack_timeout": 2}),
    }
    secrets = {user: kit.password_file(user).read_text().strip() for user in ("edge-a", "edge-b", "kgpu-controller")}
    parts = {"kit": kit, "cloud": cloud, "edges": edges, "ca": ca, "secrets": {**secrets, "api token": API_TOKEN}}
    try:
        cloud.start()
        for edge in edges.values():
            edge.start()
        yield parts
    finally:
        for process in [*edges.values(), cloud]:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
        kit.stop()


def decision(node: str, seq: int) -> bytes:
    body = DecisionBody(rule="forged", action="none", outcome="recorded", reason="stolen credentials")
    return make_envelope(node, body, Kind.DECISION, seq=seq).to_json()


def test_tls_passwords_and_acl_with_the_real_processes(fleet: dict[str, Any]) -> None:
    kit: ShippedBroker = fleet["kit"]
    cloud: CloudProcess = fleet["cloud"]
    a, b = fleet["edges"]["edge-a"], fleet["edges"]["edge-b"]

    # the whole path works over TLS with passwords and the shipped ACL
    for node in ("edge-a", "edge-b"):
        wait_for(lambda n=node: (s := cloud.node_state(n)) and s["online"], timeout=30, what=f"{node} online at the cloud")
    for edge in (a, b):
        edge.inject(0, xid=79)  # a decision and a health event each, through the outbox
    for edge in (a, b):
        wait_for(lambda e=edge: len(cloud.event_seqs(e.node)) >= 2, timeout=30, what=f"{edge.node}'s events at the cloud")
    policy = {"priority": 1, "nodeSelector": {}, "powerCapWatts": 333}
    assert http(cloud.base, "PUT", "/api/v1/policies/site", policy, token=API_TOKEN)[0] in (200, 201)
    for edge in (a, b):
        wait_for(lambda e=edge: e.get("/api/v1/policy")["policy"].get("powerCapWatts") == 333, timeout=30,
                 what=f"{edge.node} got the policy over TLS")
    seqs_b = cloud.event_seqs("edge-b")
    policy_a = a.get("/api/v1/policy")["policy"]["version"]

    # edge-a's credentials are stolen: the thief connects as edge-a (over TLS) and tries
    thief = Inbox(f"mqtts://edge-a@localhost:{kit.tls_port}", "edge-a-thief", "kgpu/v1/cloud/edge-b/#",
                  "kgpu/v1/cloud/+/commands", "kgpu/v1/edge/edge-b/#", "#",
                  password_file=kit.password_file("edge-a"), tls=TlsOptions(ca_file=fleet["ca"]))
    controller = Inbox(kit.url("kgpu-controller"), "controller-hand",
                       password_file=kit.password_file("kgpu-controller"))
    try:
        time.sleep(0.5)  # retained policy/status of edge-b would arrive now if the ACL let them
        # ... to read edge-b's commands: the controller sends edge-b a drain
        uuid_b = b.gpu(0)["inventory"]["uuid"]
        drain = make_envelope("edge-b", CommandBody(command="drain", gpu_uuid=uuid_b), Kind.COMMAND)
        controller.publish(cloud_topic("edge-b", "commands"), drain.to_json())
        wait_for(lambda: b.gpu(0)["draining"], timeout=20, what="edge-b drained by the real controller's command")
        # ... to speak as edge-b, both in events and in its retained status
        thief.publish(edge_topic("edge-b", "events"), decision("edge-b", 9999))
        offline = make_envelope("edge-b", StatusBody(state="offline", outbox_epoch="forged"), Kind.STATUS)
        thief.publish(edge_topic("edge-b", "status"), offline.to_json(), retain=True)
        # ... to command a node and to push itself a policy, as if it were the controller
        thief.publish(cloud_topic("edge-b", "commands"),
                      make_envelope("edge-b", CommandBody(command="undrain", gpu_uuid=uuid_b), Kind.COMMAND).to_json())
        forged = PowerPolicy(name="forged", version=policy_a + 100, power_cap_watts=100)
        thief.publish(cloud_topic("edge-a", "policy"),
                      make_envelope("edge-a", PolicyBody(policy=forged), Kind.POLICY).to_json(), retain=True)
        # a marker the thief may publish on its own topic: once the controller has it, everything
        # before it was routed. Far past edge-a's last ack, it is dropped by the events_ahead budget
        # (cloud/budget.py) where edge-a has been acked already, stored otherwise.
        thief.publish(edge_topic("edge-a", "events"), decision("edge-a", 100_000))
        wait_for(lambda: cloud.metric("kgpu_ingest_dropped_total", reason="events_ahead") >= 1
                 or 100_000 in cloud.event_seqs("edge-a"), timeout=20, what="the thief's own-topic marker received")
        time.sleep(1.0)

        assert cloud.event_seqs("edge-b")[:len(seqs_b)] == seqs_b and 9999 not in cloud.event_seqs("edge-b")
        assert cloud.node_state("edge-b")["online"], "a forged offline status must not reach the controller"
        assert b.gpu(0)["draining"], "the thief's undrain must not reach edge-b"
        assert a.get("/api/v1/policy")["policy"]["version"] == policy_a, "a node cannot push itself a policy"
        stolen = [m.topic for m in thief.received() if not m.topic.startswith("kgpu/v1/cloud/edge-a/")]
        assert stolen == [], f"the thief read other nodes' topics: {stolen}"
    finally:
        thief.link.stop()
        controller.link.stop()

    # wrong passwords and plain connections to the TLS port are refused
    wrong = fleet["kit"].workdir / "wrong-password"
    wrong.write_text("not-the-password\n")
    refused = MqttLink(parse_broker_url(f"mqtts://edge-a@localhost:{kit.tls_port}", password_file=wrong),
                       "edge-a-wrong", tls=TlsOptions(ca_file=fleet["ca"]), backoff_min_s=0.1, backoff_max_s=0.5)
    plain = MqttLink(parse_broker_url(f"mqtt://edge-a@localhost:{kit.tls_port}",
                                      password_file=kit.password_file("edge-a")), "edge-a-plain",
                     backoff_min_s=0.1, backoff_max_s=0.5)
    for link in (refused, plain):
        link.start()
    try:
        wait_for(lambda: refused.last_error is not None, timeout=10, what="the wrong password refused")
        time.sleep(1.0)  # a plain CONNECT to the TLS port is dropped in the handshake, with no CONNACK
        assert not refused.connected.is_set() and not plain.connected.is_set() and plain.connects == 0
        assert "not authorized" in refused.last_error.lower() or "refused" in refused.last_error.lower()
    finally:
        refused.stop()
        plain.stop()

    assert_no_secret_anywhere(fleet)


def assert_no_secret_anywhere(fleet: dict[str, Any]) -> None:
    """No password and no API token in any log of the run or any HTTP answer."""
    cloud: CloudProcess = fleet["cloud"]
    secrets: dict[str, str] = fleet["secrets"]
    assert http(cloud.base, "PUT", "/api/v1/policies/x", {"priority": 1}, token="wrong-" + API_TOKEN)[0] == 401
    texts = {f"{p.node} log": p.log_path.read_text(errors="replace") for p in [cloud, *fleet["edges"].values()]}
    assert all(len(t) > 1000 for t in texts.values()), "debug logs are expected to say a lot"
    for process in [cloud, *fleet["edges"].values()]:
        for path in ("/healthz", "/metrics", "/api/v1/nodes", "/api/v1/policy", "/api/v1/gpus", "/api/v1/events"):
            status, body = process.request("GET", path)
            texts[f"{process.node} {path}"] = json.dumps(body) if not isinstance(body, str) else body
    for where, text in texts.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} shows in the {where}"


def test_secrets_in_urls_never_reach_an_error_message(tmp_path: Path) -> None:
    """Bad settings that carry a secret: the one-line error names the setting, not the secret."""
    secret = "pw-Kx73Qa"
    runs = [
        ["edge", "run", "--node", "n1", "--backend", "sim", "--mqtt", f"mqtt://n1:{secret}@host:notaport",
         "--db", str(tmp_path / "e.db")],
        ["edge", "run", "--node", "n1", "--backend", "sim", "--mqtt", f"http://n1:{secret}@host:1883",
         "--db", str(tmp_path / "e.db")],
        ["cloud", "run", "--no-kube", "--mqtt", f"mqtt://ctl:{secret}@host:1883",
         "--db", f"postgresql+psycopg://kgpu:{secret}@127.0.0.1:1/kgpu", "--http", "127.0.0.1:0"],
        ["cloud", "run", "--no-kube", "--mqtt", f"mqtt://ctl:{secret}@host:-1"],
        ["watch", "--mqtt", f"mqtts://watch:{secret}@127.0.0.1:1", "--ca-file", str(tmp_path / "missing.crt")],
    ]
    for args in runs:
        result = subprocess.run([sys.executable, "-m", "kgpu", *args], capture_output=True, text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "KGPU_LOG_JSON": "true"})
        output = result.stdout + result.stderr
        assert result.returncode != 0, (args, output)
        assert "Traceback" not in output, output
        assert secret not in output, f"{args[0]} {args[1]} printed the secret:\n{output}"
        assert output.strip(), "an error must be said"
