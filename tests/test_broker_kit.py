"""The broker kit in deploy/mosquitto/ against a real mosquitto.

What runs here is the shipped kit itself: `mosquitto.conf` with only its paths and listener ports
rewritten (every other line byte for byte), the shipped `acl` copied unchanged, users and the
dynamic-security seed made by running `make-users.sh`, certificates made by running `make-certs.sh`,
and clients that connect with the URLs and password files `make-users.sh` wrote.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kgpu.lab.broker import dynsec_plugin, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.mqtt import MqttLink, TlsOptions, Will, parse_broker_url
from shared.protocol import MAX_PAYLOAD_BYTES
from tests.helpers.dynsec import NOT_AUTHORISED, DynsecAdmin, connack
from tests.helpers.shipped_broker import (
    BROKER_ADMIN,
    SHIPPED_ACL,
    SHIPPED_CONF,
    SHIPPED_PLUGIN,
    Client,
    ShippedBroker,
    leave,
    make_certs,
    make_users,
    payloads,
    unique,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None
                       or shutil.which("mosquitto_ctrl") is None,
                       reason="mosquitto not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(dynsec_plugin() is None, reason="mosquitto's dynamic-security plugin, which the shipped "
                       "conf loads, is not installed (Debian's mosquitto package has it)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedBroker]:
    broker = ShippedBroker(tmp_path_factory.mktemp("kit")).start()
    yield broker
    broker.stop()


# ---- clients ---------------------------------------------------------------------------------

@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    started: list[Client] = []

    def connect(url: str, client_id: str, *subscriptions: str, wait: bool = True, password_file: Path | None = None,
                **options: object) -> Client:
        client = Client(None)  # type: ignore[arg-type]
        client.link = MqttLink(parse_broker_url(url, password_file=password_file), client_id,
                               subscriptions=[(s, 1) for s in subscriptions], backoff_min_s=0.1, backoff_max_s=0.5,
                               on_message=client.inbox.put, **options)  # type: ignore[arg-type]
        client.link._client.on_subscribe = (
            lambda _c, _u, _mid, codes, _p: client.subacks.append([c.value for c in codes]))
        client.link.start()
        started.append(client)
        if wait:
            wait_for(client.link.connected.is_set, timeout=10, interval=0.02,
                     what=f"{client_id} connected (last error: {client.link.last_error})")
            client.wait_subscribed()
        return client

    yield connect
    for client in started:
        client.stop()


# ---- the shipped files -----------------------------------------------------------------------

def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


def test_shipped_conf_is_production_ready() -> None:
    conf = directives(SHIPPED_CONF.read_text())
    one = {key: values[0] for key, values in conf.items() if len(values) == 1}
    assert one["allow_anonymous"] == "false" and one["per_listener_settings"] == "false"
    assert one["password_file"] == "/mosquitto/secrets/passwd" and one["acl_file"] == "/mosquitto/config/acl"
    # the dynamic-security plugin (the controller's quarantine), its config on the writable data volume
    assert one["plugin"] == SHIPPED_PLUGIN
    assert one["plugin_opt_config_file"] == "/mosquitto/data/dynamic-security.json"
    assert one["persistence"] == "true" and one["persistence_location"] == "/mosquitto/data/"
    assert one["persistent_client_expiration"] == "7d"
    assert int(one["message_size_limit"]) == MAX_PAYLOAD_BYTES
    assert int(one["max_queued_messages"]) >= 10_000 and int(one["max_inflight_messages"]) >= 20
    assert one["log_dest"] == "stdout"
    assert conf["listener"] == ["1883", "8883"]
    assert one["cafile"] == "/mosquitto/certs/ca.crt" and one["certfile"] == "/mosquitto/certs/server.crt"
    assert one["keyfile"] == "/mosquitto/certs/server.key" and one["tls_version"] == "tlsv1.2"
    # mutual TLS is offered, commented out, with an explanation
    assert "require_certificate" not in conf
    assert "#require_certificate true" in SHIPPED_CONF.read_text()
    # the TLS settings belong to the 8883 listener: they come after it
    text = SHIPPED_CONF.read_text()
    assert text.index("\nlistener 8883") < text.index("\ncafile ")


def test_shipped_acl_rules() -> None:
    rules = [line.strip() for line in SHIPPED_ACL.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert rules == [
        "pattern write kgpu/v1/edge/%u/+",
        "pattern read kgpu/v1/cloud/%u/+",
        "user kgpu-controller",
        "topic read kgpu/v1/edge/#",
        "topic readwrite kgpu/v1/cloud/#",
        "user kgpu-watch",
        "topic read kgpu/v1/#",
    ]


def test_the_shipped_conf_starts_with_both_listeners(kit: ShippedBroker) -> None:
    assert (kit.workdir / "acl").read_bytes() == SHIPPED_ACL.read_bytes()
    derived = kit.config.read_text().splitlines()
    shipped = SHIPPED_CONF.read_text().splitlines()
    # the derived conf is the shipped one plus `user root`/`log_dest file`, with paths and ports rewritten
    body = [line for line in derived if not line.startswith(("user root", "log_dest file"))]
    assert len(body) == len(shipped)
    changed = [(s, d) for s, d in zip(shipped, body) if s != d]
    assert all(s.startswith(("listener ", *(f"{k} " for k in
               ("persistence_location", "password_file", "acl_file", "cafile", "certfile", "keyfile", "plugin",
                "plugin_opt_config_file"))))
               for s, _ in changed), changed
    log = wait_for(lambda: next((t for t in [kit.log_path.read_text()] if " running" in t), ""),
                   timeout=5, interval=0.05, what="mosquitto's start-up in its log")
    startup = log[:log.index(" running")]  # what mosquitto said while loading the conf
    assert f"Opening ipv4 listen socket on port {kit.port}." in startup
    assert f"Opening ipv4 listen socket on port {kit.tls_port}." in startup
    assert "Error" not in startup and "Warning" not in startup
    assert "Loading plugin: " in startup and "dynamic_security" in startup  # with its seeded config


# ---- the ACL at work -------------------------------------------------------------------------

def test_node_publishes_its_own_topics_and_the_controller_receives_them(kit: ShippedBroker, clients) -> None:
    controller = clients(kit.url("kgpu-controller"), "ctl-own", "kgpu/v1/edge/+/#")
    will = unique("will-offline")
    node = clients(kit.url("edge-a"), "kgpu-edge-edge-a", "kgpu/v1/cloud/edge-a/#",
                   will=Will("kgpu/v1/edge/edge-a/status", will))
    status, telemetry, event = unique("status"), unique("telemetry"), unique("event")
    node.publish("kgpu/v1/edge/edge-a/status", status, retain=True)
    node.publish("kgpu/v1/edge/edge-a/telemetry", telemetry, qos=0)
    node.publish("kgpu/v1/edge/edge-a/events", event)
    got = {m.payload: m.topic for m in controller.receive(event)}
    assert got[status] == "kgpu/v1/edge/edge-a/status" and got[event] == "kgpu/v1/edge/edge-a/events"
    wait_for(lambda: telemetry in got or got.update({m.payload: m.topic for m in controller.drain()}),
             timeout=5, interval=0.05, what="telemetry (QoS 0)")
    # the last will (checked against the ACL when the node connects) reaches the controller too
    node.link._client.socket().close()  # the node vanishes without DISCONNECT
    node.link._stop.set()
    assert controller.receive(will)[-1].topic == "kgpu/v1/edge/edge-a/status"


def test_node_cannot_speak_for_another_node(kit: ShippedBroker, clients) -> None:
    controller = clients(kit.url("kgpu-controller"), "ctl-spoof", "kgpu/v1/edge/#")
    edge_b = clients(kit.url("edge-b"), "kgpu-edge-edge-b", "kgpu/v1/cloud/edge-b/#")
    edge_a = clients(kit.url("edge-a"), "edge-a-spoofer")
    spoofs = {
        "kgpu/v1/edge/edge-b/events": unique("spoofed-event"),
        "kgpu/v1/edge/edge-b/status": unique("spoofed-status"),
        "kgpu/v1/cloud/edge-b/commands": unique("forged-command"),
        "kgpu/v1/cloud/edge-a/ack": unique("forged-ack-to-self"),
        "kgpu/v1/edge": unique("outside-its-subtree"),
        # read as node `edge-a.site-2` by the controller (dots carried as levels): one level only
        "kgpu/v1/edge/edge-a/site-2/status": unique("spoofed-dotted-node"),
    }
    for topic, payload in spoofs.items():
        edge_a.publish(topic, payload, retain=topic.endswith("status"))  # PUBACKed, yet dropped
    marker = unique("own-event")
    edge_a.publish("kgpu/v1/edge/edge-a/events", marker)
    command_marker = unique("real-command")
    clients(kit.url("kgpu-controller"), "ctl-cmd").publish("kgpu/v1/cloud/edge-b/commands", command_marker)
    # both were published after the spoofs, so anything not dropped would have arrived first
    assert not set(payloads(controller.receive(marker))) & set(spoofs.values())
    assert payloads(edge_b.receive(command_marker)) == [command_marker]
    # and no retained status was stored for edge-b: a fresh subscriber gets edge-a's retained
    # status (subscribed second) and nothing before it
    own_status = unique("edge-a-status")
    edge_a.publish("kgpu/v1/edge/edge-a/status", own_status, retain=True)
    fresh = clients(kit.url("kgpu-controller"), "ctl-fresh", "kgpu/v1/edge/edge-b/status",
                    "kgpu/v1/edge/edge-a/status")
    assert payloads(fresh.receive(own_status)) == [own_status]


def test_node_cannot_read_another_nodes_commands(kit: ShippedBroker, clients) -> None:
    # mosquitto 2.0 grants these SUBSCRIBEs; the ACL is applied to each message at delivery
    nosy = clients(kit.url("edge-a"), "edge-a-nosy", "kgpu/v1/cloud/edge-b/#", "kgpu/v1/cloud/+/commands",
                   "kgpu/v1/#", "kgpu/v1/cloud/edge-a/#")
    assert all(code < 0x80 for codes in nosy.subacks for code in codes), nosy.subacks  # granted...
    edge_b = clients(kit.url("edge-b"), "edge-b-reader", "kgpu/v1/cloud/edge-b/#")
    controller = clients(kit.url("kgpu-controller"), "ctl-commands")
    command, policy = unique("command-for-b"), unique("policy-for-b")
    controller.publish("kgpu/v1/cloud/edge-b/commands", command)
    controller.publish("kgpu/v1/cloud/edge-b/policy", policy, retain=True)
    marker = unique("command-for-a")
    controller.publish("kgpu/v1/cloud/edge-a/commands", marker)
    assert set(payloads(edge_b.receive(policy))) == {command, policy}
    seen = nosy.receive(marker)
    assert all(m.topic.startswith("kgpu/v1/cloud/edge-a/") for m in seen), [(m.topic, m.payload) for m in seen]
    assert not {command, policy} & set(payloads(seen))  # ...yet nothing of edge-b's is delivered
    # retained messages are checked too: edge-b's policy is not handed to edge-a on subscribe
    own_policy = unique("policy-for-a")
    controller.publish("kgpu/v1/cloud/edge-a/policy", own_policy, retain=True)
    fresh = clients(kit.url("edge-a"), "edge-a-fresh", "kgpu/v1/cloud/edge-b/policy", "kgpu/v1/cloud/edge-a/policy")
    assert payloads(fresh.receive(own_policy)) == [own_policy]


def test_client_id_takeover_kicks_the_victim_but_leaks_nothing(kit: ShippedBroker, clients) -> None:
    """A limit of username-based ACLs: client ids are not bound to users, so a node that knows
    another node's client id can take over its durable session and kick it off. The ACL still
    holds: messages for the victim are re-checked against the intruder's username and dropped, so
    they are neither leaked nor kept for the victim (the controller re-sends commands until their
    result arrives)."""
    session = "kgpu-edge-edge-b-takeover"
    victim = clients(kit.url("edge-b"), session, "kgpu/v1/cloud/edge-b/#")
    leave(kit, victim)  # offline, durable session with its subscription
    controller = clients(kit.url("kgpu-controller"), "ctl-takeover")
    queued = unique("queued-for-victim")
    controller.publish("kgpu/v1/cloud/edge-b/commands", queued)
    thief = clients(kit.url("edge-a"), session, "kgpu/v1/cloud/edge-a/#")  # resumes edge-b's session
    live, marker = unique("live-for-victim"), unique("marker-for-thief")
    controller.publish("kgpu/v1/cloud/edge-b/commands", live)
    controller.publish("kgpu/v1/cloud/edge-a/commands", marker)
    assert not {queued, live} & set(payloads(thief.receive(marker)))
    leave(kit, thief)
    back = clients(kit.url("edge-b"), session, "kgpu/v1/cloud/edge-b/#")
    after = unique("after-takeover")
    controller.publish("kgpu/v1/cloud/edge-b/commands", after)
    # what arrived for edge-b while the intruder held its session was dropped, not kept
    assert not {queued, live} & set(payloads(back.receive(after)))
    # and an intruder connecting with the id kicks the connected owner off
    kicks = kit.log_path.read_text().count(f"Client {session} already connected, closing old connection")
    intruder = clients(kit.url("edge-a"), session)
    wait_for(lambda: kit.log_path.read_text().count(f"Client {session} already connected") > kicks,
             timeout=5, interval=0.05, what="the owner kicked off")
    intruder.stop()
    back.stop()
    clients(kit.url("edge-b"), session, clean_session=True).stop()  # drop the durable session


def test_controller_shared_subscription_splits_the_fleet(kit: ShippedBroker, clients) -> None:
    group = "$share/kgpu/kgpu/v1/edge/+/#"
    replica_1 = clients(kit.url("kgpu-controller"), "ctl-replica-1", group, clean_session=True)
    replica_2 = clients(kit.url("kgpu-controller"), "ctl-replica-2", group, clean_session=True)
    node = clients(kit.url("edge-a"), "edge-a-shared")
    sent = [unique(f"shared-{i}") for i in range(20)]
    for payload in sent:
        node.publish("kgpu/v1/edge/edge-a/events", payload)
    got_1: list[bytes] = []
    got_2: list[bytes] = []

    def all_arrived() -> bool:
        got_1.extend(m.payload for m in replica_1.drain() if m.topic.endswith("/events"))
        got_2.extend(m.payload for m in replica_2.drain() if m.topic.endswith("/events"))
        return set(got_1) | set(got_2) >= set(sent)

    wait_for(all_arrived, timeout=10, interval=0.05, what="every event at one replica")
    assert got_1 and got_2 and not set(got_1) & set(got_2), (got_1, got_2)
    assert sorted(got_1 + got_2) == sorted(sent)
    # a replica that leaves (clean session) leaves the group: the other one now gets everything
    leave(kit, replica_2)
    replica_1.drain()
    after = [unique(f"after-{i}") for i in range(6)]
    for payload in after:
        node.publish("kgpu/v1/edge/edge-a/events", payload)
    assert [p for p in payloads(replica_1.receive(after[-1])) if p in after] == after
    # mosquitto 2.0 hands a joining shared subscriber the retained messages (MQTT 5 says it should
    # not, and EMQX does not: the controller takes its status snapshot without $share)
    status = unique("retained-status")
    node.publish("kgpu/v1/edge/edge-a/status", status, retain=True)
    late = clients(kit.url("kgpu-controller"), "ctl-replica-late", group, clean_session=True)
    assert late.receive(status)[-1].retain


def test_a_durable_replica_that_is_offline_still_takes_its_share(kit: ShippedBroker, clients) -> None:
    """Why the controller's shared-subscription clients must use clean sessions: mosquitto 2.0
    keeps assigning a group member its share while that member is offline with a durable session
    (queued until it returns or its session expires: 7 days with the shipped conf)."""
    group = "$share/durable-demo/kgpu/v1/edge/+/events"
    live = clients(kit.url("kgpu-controller"), "ctl-durable-live", group, clean_session=True)
    gone = clients(kit.url("kgpu-controller"), "ctl-durable-gone", group, clean_session=False)
    leave(kit, gone)
    node = clients(kit.url("edge-a"), "edge-a-durable")
    sent = [unique(f"durable-{i}") for i in range(6)]
    for payload in sent:
        node.publish("kgpu/v1/edge/edge-a/events", payload)  # all routed (PUBACKed) while `gone` is away
    back = clients(kit.url("kgpu-controller"), "ctl-durable-gone", clean_session=False)
    live_got: list[bytes] = []
    queued: list[bytes] = []

    def all_arrived() -> bool:
        live_got.extend(p for p in payloads(live.drain()) if p in sent)
        queued.extend(p for p in payloads(back.drain()) if p in sent)
        return set(live_got) | set(queued) >= set(sent)

    wait_for(all_arrived, timeout=5, interval=0.05, what="every event, live or queued")
    assert queued and live_got and sorted(live_got + queued) == sorted(sent), (live_got, queued)
    back.stop()
    clients(kit.url("kgpu-controller"), "ctl-durable-gone", clean_session=True).stop()  # drop the session


def test_watch_user_reads_everything_but_cannot_publish(kit: ShippedBroker, clients) -> None:
    watch = clients(kit.url("kgpu-watch"), "watch", "kgpu/v1/#")
    node = clients(kit.url("edge-a"), "edge-a-watched", "kgpu/v1/cloud/edge-a/#")
    controller = clients(kit.url("kgpu-controller"), "ctl-watched", "kgpu/v1/edge/+/#")
    event, command = unique("watched-event"), unique("watched-command")
    node.publish("kgpu/v1/edge/edge-a/events", event)
    controller.publish("kgpu/v1/cloud/edge-a/commands", command)
    got = payloads(watch.receive(command))
    assert event in got and command in got
    forged = {"kgpu/v1/cloud/edge-a/commands": unique("watch-command"),
              "kgpu/v1/edge/edge-a/events": unique("watch-event")}
    for topic, payload in forged.items():
        watch.publish(topic, payload)
    markers = unique("after-watch-cmd"), unique("after-watch-event")
    controller.publish("kgpu/v1/cloud/edge-a/commands", markers[0])
    node.publish("kgpu/v1/edge/edge-a/events", markers[1])
    assert not set(payloads(node.receive(markers[0]))) & set(forged.values())
    assert not set(payloads(controller.receive(markers[1]))) & set(forged.values())
    assert not set(payloads(watch.receive(markers[1]))) & set(forged.values())


def test_anonymous_and_bad_credentials_are_refused(kit: ShippedBroker, clients) -> None:
    attempts = {
        "anonymous": f"mqtt://127.0.0.1:{kit.port}",
        "wrong-password": f"mqtt://edge-a:not-the-password@127.0.0.1:{kit.port}",
        "unknown-user": f"mqtt://edge-z:whatever@127.0.0.1:{kit.port}",
    }
    refused = {name: clients(url, name, wait=False) for name, url in attempts.items()}
    for name, client in refused.items():
        wait_for(lambda client=client: client.link.last_error and "refused" in client.link.last_error, timeout=5,
                 what=f"{name} refused")
        assert not client.link.connected.is_set() and client.link.connects == 0


def test_oversized_payload_is_dropped_by_the_broker(kit: ShippedBroker, clients) -> None:
    controller = clients(kit.url("kgpu-controller"), "ctl-size", "kgpu/v1/edge/edge-a/events")
    node = clients(kit.url("edge-a"), "edge-a-size")
    too_big = b"x" * (MAX_PAYLOAD_BYTES + 1)
    largest = b"y" * MAX_PAYLOAD_BYTES
    node.publish("kgpu/v1/edge/edge-a/events", too_big)
    node.publish("kgpu/v1/edge/edge-a/events", largest)
    assert [len(p) for p in payloads(controller.receive(largest, timeout=10))] == [MAX_PAYLOAD_BYTES]


# ---- TLS -------------------------------------------------------------------------------------

def test_tls_listener_with_the_ca_from_make_certs(kit: ShippedBroker, clients, tmp_path: Path) -> None:
    ca = TlsOptions(ca_file=kit.certs_dir / "ca.crt")
    controller = clients(kit.url("kgpu-controller"), "ctl-tls", "kgpu/v1/edge/edge-a/events")
    for host in ("localhost", "127.0.0.1"):  # both are subjectAltNames of the server certificate
        node = clients(f"mqtts://edge-a@{host}:{kit.tls_port}", f"edge-a-tls-{host}",
                       password_file=kit.password_file("edge-a"), tls=ca)
        assert node.link._client.socket().version() in ("TLSv1.2", "TLSv1.3")
        event = unique(f"over-tls-{host}")
        node.publish("kgpu/v1/edge/edge-a/events", event)
        assert controller.receive(event)[-1].topic == "kgpu/v1/edge/edge-a/events"
        # the same ACL holds on the TLS listener
        node.publish("kgpu/v1/edge/edge-b/events", unique("tls-spoof"))
        marker = unique("tls-marker")
        node.publish("kgpu/v1/edge/edge-a/events", marker)
        assert payloads(controller.receive(marker)) == [marker]
        node.stop()
    # a client that trusts another CA refuses the server
    make_certs(tmp_path / "other", "localhost")
    stranger = clients(f"mqtts://edge-a@localhost:{kit.tls_port}", "edge-a-other-ca", wait=False,
                       password_file=kit.password_file("edge-a"), tls=TlsOptions(ca_file=tmp_path / "other" / "ca.crt"))
    wait_for(lambda: stranger.link.last_error is not None, timeout=5, what="a certificate error")
    assert "certificate" in stranger.link.last_error.lower() and not stranger.link.connected.is_set()


def test_make_certs_issues_server_and_client_certificates(kit: ShippedBroker) -> None:
    certs = kit.certs_dir
    assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key",
                                                  "client-edge-a.crt", "client-edge-a.key"}
    for key in certs.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt"),
                             str(certs / "client-edge-a.crt")], capture_output=True, text=True, check=True)
    assert verify.stdout.count(": OK") == 2
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "TLS Web Server Authentication" in text
    client = subprocess.run(["openssl", "x509", "-in", str(certs / "client-edge-a.crt"), "-noout", "-subject"],
                            capture_output=True, text=True, check=True).stdout
    assert "CN = edge-a" in client or "CN=edge-a" in client


def test_mutual_tls_when_require_certificate_is_enabled(tmp_path: Path, clients) -> None:
    broker = ShippedBroker(tmp_path / "mtls", uncomment=("require_certificate true",)).start()
    try:
        assert "\nrequire_certificate true\n" in broker.config.read_text()
        certs = broker.certs_dir
        url = f"mqtts://edge-a@localhost:{broker.tls_port}"
        without = clients(url, "edge-a-no-cert", wait=False, password_file=broker.password_file("edge-a"),
                          tls=TlsOptions(ca_file=certs / "ca.crt"))
        with_cert = clients(url, "edge-a-cert", password_file=broker.password_file("edge-a"),
                            tls=TlsOptions(ca_file=certs / "ca.crt", cert_file=certs / "client-edge-a.crt",
                                           key_file=certs / "client-edge-a.key"))
        assert with_cert.link.connected.is_set()
        # with TLS 1.3 the client finishes its handshake before the broker checks for a certificate,
        # so the client sees only a closed connection; the broker logs why
        wait_for(lambda: "peer did not return a certificate" in broker.log_path.read_text(), timeout=5,
                 what="the broker to refuse the certificate-less client")
        assert not without.link.connected.is_set() and without.link.connects == 0
        # the plain in-cluster listener is unaffected
        assert clients(broker.url("kgpu-controller"), "ctl-mtls").link.connected.is_set()
        # a new CA: SIGHUP reloads the server certificate but not cafile, so client certificates
        # from the new CA are refused until the broker restarts
        make_certs(certs, "--new-ca", "--client", "edge-a", "localhost")
        reload(broker)
        new_cert = TlsOptions(ca_file=certs / "ca.crt", cert_file=certs / "client-edge-a.crt",
                              key_file=certs / "client-edge-a.key")
        refused = clients(url, "edge-a-new-ca", wait=False, password_file=broker.password_file("edge-a"), tls=new_cert)
        wait_for(lambda: "certificate verify failed" in broker.log_path.read_text(), timeout=5,
                 what="the new client certificate refused before a restart")
        assert refused.link.connects == 0
        refused.stop()
        broker.restart()
        assert clients(url, "edge-a-after-restart", password_file=broker.password_file("edge-a"),
                       tls=new_cert).link.connected.is_set()
    finally:
        broker.stop()


def test_certificate_rotation_with_sighup(tmp_path: Path, clients) -> None:
    broker = ShippedBroker(tmp_path / "rotation").start()
    certs = broker.certs_dir
    url = f"mqtts://edge-a@localhost:{broker.tls_port}"
    password = broker.password_file("edge-a")

    def tls_client(name: str, ca: Path, wait: bool = True) -> Client:
        return clients(url, name, wait=wait, password_file=password, tls=TlsOptions(ca_file=ca))

    def serial(client: Client) -> str:
        return client.link._client.socket().getpeercert()["serialNumber"]

    try:
        old_ca = tmp_path / "old-ca.crt"
        old_ca.write_bytes((certs / "ca.crt").read_bytes())
        first = tls_client("edge-a-first", old_ca)
        # 1. a new server certificate from the same CA: SIGHUP, and new connections get it
        make_certs(certs, "localhost", "127.0.0.1")
        reload(broker)
        second = tls_client("edge-a-second", old_ca)
        assert serial(second) != serial(first)
        assert first.link.connected.is_set() and first.link.connects == 1  # not dropped
        # 2. a new CA: clients trusting the bundle (old + new) accept the new server certificate,
        # clients trusting only the old CA do not
        make_certs(certs, "--new-ca", "localhost", "127.0.0.1")
        assert (certs / "ca-previous.crt").read_bytes() == old_ca.read_bytes()
        assert (certs / "ca-bundle.crt").read_bytes() == (certs / "ca.crt").read_bytes() + old_ca.read_bytes()
        reload(broker)
        tls_client("edge-a-bundle", certs / "ca-bundle.crt")
        tls_client("edge-a-new-ca", certs / "ca.crt")
        stale = tls_client("edge-a-old-ca", old_ca, wait=False)
        wait_for(lambda: stale.link.last_error is not None, timeout=5, what="the old CA to be refused")
        assert "certificate" in stale.link.last_error.lower() and stale.link.connects == 0
    finally:
        broker.stop()


# ---- users, reloads, persistence ---------------------------------------------------------------

def reload(broker: ShippedBroker) -> None:
    """SIGHUP, and wait until mosquitto has reloaded (it logs each reload)."""
    count = broker.log_path.read_text().count("Reloading config.")
    broker.hup()
    wait_for(lambda: broker.log_path.read_text().count("Reloading config.") > count, timeout=5, interval=0.05,
             what="mosquitto to reload")


def test_make_users_is_idempotent_rotates_and_reloads(tmp_path: Path, clients) -> None:
    broker = ShippedBroker(tmp_path / "users-broker").start()
    users = broker.users_dir
    try:
        creds = users / "credentials"
        assert stat.S_IMODE((users / "passwd").stat().st_mode) == 0o600
        for path in creds.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        names = {line.split(":")[0] for line in (users / "passwd").read_text().splitlines()}
        assert names == {"edge-a", "edge-b", "kgpu-controller", "kgpu-watch"}  # not the dynsec admin
        assert stat.S_IMODE((users / "dynamic-security.json").stat().st_mode) == 0o600
        assert broker.password_file(BROKER_ADMIN).exists()
        url_a = broker.url("edge-a")
        password_a = broker.password_file("edge-a").read_text().strip()
        assert url_a == f"mqtt://edge-a:{password_a}@127.0.0.1:{broker.port}" and len(password_a) == 48
        assert broker.password_file("edge-b").read_text() != broker.password_file("edge-a").read_text()

        before = {p.name: p.read_text() for p in creds.iterdir()}
        hashes_before = dict(line.split(":", 1) for line in (users / "passwd").read_text().splitlines())
        again = make_users(users, "--broker", f"mqtt://127.0.0.1:{broker.port}", "edge-a", "edge-b", "edge-c")
        assert password_a not in again.stdout + again.stderr  # passwords never go to the terminal
        hashes_after = dict(line.split(":", 1) for line in (users / "passwd").read_text().splitlines())
        assert {k: hashes_after[k] for k in hashes_before} == hashes_before and "edge-c" in hashes_after
        assert {p.name: p.read_text() for p in creds.iterdir() if p.name in before} == before

        bad = make_users(users, "edge/+", check=False)
        assert bad.returncode != 0 and "not a valid node name" in bad.stderr

        old = clients(url_a, "edge-a-old")
        edge_b = clients(broker.url("edge-b"), "edge-b-steady")
        reload(broker)  # the new user edge-c exists only after a reload
        clients(broker.url("edge-c"), "edge-c")
        assert old.link.connected.is_set()  # a reload leaves clients whose password still holds alone

        rotated = make_users(users, "--rotate", "edge-a")
        assert "rotated edge-a" in rotated.stdout
        new_a = broker.url("edge-a")
        assert new_a != url_a and broker.password_file("edge-b").read_text() == before["edge-b.password"]
        reload(broker)
        stale = clients(url_a, "edge-a-stale", wait=False)
        wait_for(lambda: stale.link.last_error and "refused" in stale.link.last_error, timeout=5,
                 what="the old password refused after the reload")
        stale.stop()
        assert clients(new_a, "edge-a-new").link.connected.is_set()
        # mosquitto 2.0 re-checks connected clients on reload: the old password's session is
        # dropped (and cannot come back), users whose password did not change stay connected
        wait_for(lambda: not old.link.connected.is_set(), timeout=5, what="the rotated-out client dropped")
        assert edge_b.link.connected.is_set() and edge_b.link.connects == 1

        make_users(users, "--delete", "edge-c")
        assert "edge-c:" not in (users / "passwd").read_text() and not (creds / "edge-c.url").exists()
    finally:
        broker.stop()


def test_persistence_keeps_an_offline_nodes_session_across_a_broker_restart(tmp_path: Path, clients) -> None:
    broker = ShippedBroker(tmp_path / "persist").start()
    try:
        node = clients(broker.url("edge-b"), "kgpu-edge-edge-b", "kgpu/v1/cloud/edge-b/#", clean_session=False)
        leave(broker, node)  # offline, with a durable session
        controller = clients(broker.url("kgpu-controller"), "ctl-persist")
        command, policy = unique("queued-command"), unique("retained-policy")
        controller.publish("kgpu/v1/cloud/edge-b/policy", policy, retain=True)
        controller.publish("kgpu/v1/cloud/edge-b/commands", command)
        controller.stop()
        broker.restart()  # a clean shutdown writes /mosquitto/data/mosquitto.db
        assert (broker.workdir / "data" / "mosquitto.db").exists()
        back = clients(broker.url("edge-b"), "kgpu-edge-edge-b", "kgpu/v1/cloud/edge-b/#", clean_session=False)
        got: set[bytes] = set()
        wait_for(lambda: got.update(payloads(back.drain())) or {command, policy} <= got, timeout=5,
                 what="the queued command and the retained policy after the restart")
    finally:
        broker.stop()


# ---- quarantine at the broker: the dynamic-security admin ------------------------------------------

def test_the_broker_admin_from_make_users_shuts_a_node_out_and_lets_it_back(tmp_path: Path, clients) -> None:
    """What the controller does to a flooding node (cloud/quarantine.py), with the admin password
    make-users.sh issued; and the admin's password rotation as deploy/mosquitto/README.md says."""
    broker = ShippedBroker(tmp_path / "dynsec").start()
    admin: DynsecAdmin | None = None
    try:
        old = broker.password_file(BROKER_ADMIN).read_text().strip()
        assert connack(broker.port, BROKER_ADMIN, old) == 0
        admin = DynsecAdmin(broker.port, BROKER_ADMIN, old)
        assert admin.ok({"command": "listClients"})[0]["data"]["clients"] == [BROKER_ADMIN]
        controller = clients(broker.url("kgpu-controller"), "ctl-quarantine", "kgpu/v1/edge/+/events")
        node = clients(broker.url("edge-a"), "kgpu-edge-edge-a", "kgpu/v1/cloud/edge-a/#")
        bystander = clients(broker.url("edge-b"), "kgpu-edge-edge-b")
        admin.ok({"command": "createClient", "username": "edge-a", "password": "random-password"},
                 {"command": "disableClient", "username": "edge-a"})
        wait_for(lambda: not node.link.connected.is_set(), timeout=5, interval=0.02, what="edge-a kicked")
        wait_for(lambda: node.link.last_error and "refused" in node.link.last_error, timeout=5,
                 what="edge-a's reconnect refused")
        assert connack(broker.port, "edge-a", broker.password_file("edge-a").read_text().strip()) == NOT_AUTHORISED
        assert controller.link.connected.is_set() and bystander.link.connected.is_set()
        assert controller.link.connects == 1 and bystander.link.connects == 1  # nobody else was touched

        admin.ok({"command": "deleteClient", "username": "edge-a"})
        wait_for(node.link.connected.is_set, timeout=10, interval=0.02, what="edge-a back by itself")
        event = unique("after-quarantine")
        node.publish("kgpu/v1/edge/edge-a/events", event)
        assert controller.receive(event)[-1].topic == "kgpu/v1/edge/edge-a/events"

        # --rotate: a new password and seed; the running broker keeps its own copy until told
        rotated = make_users(broker.users_dir, "--rotate", BROKER_ADMIN)
        assert f"rotated {BROKER_ADMIN}" in rotated.stdout and "setClientPassword" in rotated.stdout
        new = broker.password_file(BROKER_ADMIN).read_text().strip()
        assert new != old and new not in rotated.stdout + rotated.stderr
        assert (broker.users_dir / "dynamic-security.json").read_bytes() != broker.dynsec_path.read_bytes()
        assert connack(broker.port, BROKER_ADMIN, new) == NOT_AUTHORISED
        # The broker disconnects the admin as soon as its password changes, sometimes before the
        # answer goes out: mosquitto_ctrl then waits for ever (the README wraps it in `timeout`).
        # What counts is the outcome: the new password in, the old one out.
        try:
            ctrl = subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(broker.port), "-u", BROKER_ADMIN,
                                   "-P", old, "dynsec", "setClientPassword", BROKER_ADMIN],
                                  input=f"{new}\n{new}\n", capture_output=True, text=True, timeout=10)
            assert "Error" not in ctrl.stdout + ctrl.stderr, ctrl
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: connack(broker.port, BROKER_ADMIN, new) == 0, timeout=5, what="the new admin password")
        assert connack(broker.port, BROKER_ADMIN, old) == NOT_AUTHORISED
    finally:
        if admin is not None:
            admin.stop()
        broker.stop()
