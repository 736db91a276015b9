"""shared/mqtt.py against a real mosquitto: round trip, reconnect, last will, auth, TLS."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import pytest

from kgpu.lab.broker import Mosquitto, TlsFiles, mosquitto_binary
from kgpu.lab.processes import wait_for
from shared.mqtt import AsyncMqtt, MqttLink, Received, TlsOptions, Will, parse_broker_url, redact

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/test.sh installs it)")


def link(url: str, client_id: str, inbox: queue.Queue[Received] | None = None, **kw: object) -> MqttLink:
    return MqttLink(parse_broker_url(url), client_id, backoff_min_s=0.1, backoff_max_s=0.5,
                    on_message=(inbox.put if inbox is not None else None), **kw)  # type: ignore[arg-type]


def test_parse_and_redact() -> None:
    address = parse_broker_url("mqtts://edge%2D1:s3cr%40t@broker.kgpu:8884")
    assert (address.host, address.port, address.tls, address.username, address.password) == (
        "broker.kgpu", 8884, True, "edge-1", "s3cr@t")
    assert "s3cr" not in address.display and "s3cr" not in repr(address)
    assert parse_broker_url("mqtt://h").port == 1883 and parse_broker_url("mqtts://h").port == 8883
    assert redact("mqtt://u:pw@h:1") == "mqtt://u:***@h:1"
    with pytest.raises(ValueError, match="mqtt://"):
        parse_broker_url("http://u:pw@h")


def test_round_trip_and_reconnect_after_broker_restart(broker: Mosquitto) -> None:
    inbox: queue.Queue[Received] = queue.Queue()
    sub = link(broker.url, "sub", inbox, subscriptions=[("t/#", 1)])
    pub = link(broker.url, "pub")
    assert sub.connected_since is None
    sub.start(), pub.start()
    try:
        wait_for(lambda: sub.connected.is_set() and pub.connected.is_set(), what="both connected")
        first_since = sub.connected_since
        assert first_since is not None and first_since <= time.monotonic()
        assert pub.publish("t/a", b"one")
        assert inbox.get(timeout=5).payload == b"one"
        broker.stop()
        wait_for(lambda: not sub.connected.is_set(), timeout=15, what="the link to go down")
        assert sub.connected_since is None  # the edge measures no ack's lateness across an outage
        broker.start()
        wait_for(lambda: sub.connects >= 2 and pub.connects >= 2, timeout=15, what="reconnects")
        second_since = sub.connected_since
        assert second_since is not None and second_since > first_since
        wait_for(lambda: pub.publish("t/a", b"two"), what="publish after reconnect")
        got = inbox.get(timeout=5)
        while got.payload == b"one":  # QoS 1 is at least once: a broker saved before it saw the ack sends it again
            got = inbox.get(timeout=5)
        assert got.payload == b"two" and got.topic == "t/a"
    finally:
        sub.stop(), pub.stop()


def test_publish_while_down_says_so(tmp_path: Path) -> None:
    down = link("mqtt://127.0.0.1:1", "nobody")
    down.start()
    try:
        wait_for(lambda: down.last_error is not None, what="a connection error")
        assert "cannot connect" in down.last_error
        assert down.publish("t", b"x") is False
    finally:
        down.stop()


def test_last_will_marks_a_dead_client(broker: Mosquitto) -> None:
    inbox: queue.Queue[Received] = queue.Queue()
    watcher = link(broker.url, "watcher", inbox, subscriptions=[("status/#", 1)])
    watcher.start()
    dying = link(broker.url, "dying", will=Will("status/dying", b"offline"), keepalive_s=1)
    dying.start()
    try:
        wait_for(lambda: watcher.connected.is_set() and dying.connected.is_set(), what="connected")
        dying._client.socket().close()  # the process vanishes without DISCONNECT
        dying._stop.set()
        message = inbox.get(timeout=10)
        assert (message.topic, message.payload) == ("status/dying", b"offline")
    finally:
        watcher.stop()


def test_clean_stop_sends_no_last_will(broker: Mosquitto) -> None:
    inbox: queue.Queue[Received] = queue.Queue()
    watcher = link(broker.url, "watcher", inbox, subscriptions=[("status/#", 1)])
    watcher.start()
    leaving = link(broker.url, "leaving", will=Will("status/leaving", b"offline"))
    leaving.start()
    wait_for(lambda: watcher.connected.is_set() and leaving.connected.is_set(), what="connected")
    leaving.stop()
    time.sleep(1.0)
    assert inbox.empty()
    watcher.stop()


def test_wrong_password_is_refused_and_reported(tmp_path: Path) -> None:
    server = Mosquitto(tmp_path / "b", users={"edge-1": "right"}).start()
    try:
        bad = link(f"mqtt://edge-1:wrong@127.0.0.1:{server.port}", "edge-1")
        bad.start()
        wait_for(lambda: bad.last_error and "refused" in bad.last_error, what="a refusal")
        assert not bad.connected.is_set() and "wrong" not in bad.last_error
        bad.stop()
        good = link(f"mqtt://edge-1:right@127.0.0.1:{server.port}", "edge-1")
        good.start()
        wait_for(good.connected.is_set, what="connected with the right password")
        good.stop()
    finally:
        server.stop()


def test_tls_with_the_right_ca_only(tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path / "tls")
    server = Mosquitto(tmp_path / "b", tls=tls).start()
    try:
        secure = link(f"mqtts://127.0.0.1:{server.tls_port}", "secure", tls=TlsOptions(ca_file=tls.ca))
        secure.start()
        wait_for(secure.connected.is_set, what="TLS connection")
        secure.stop()
        other_ca = TlsFiles(tmp_path / "other")
        untrusted = link(f"mqtts://127.0.0.1:{server.tls_port}", "untrusted", tls=TlsOptions(ca_file=other_ca.ca))
        untrusted.start()
        wait_for(lambda: untrusted.last_error is not None, what="a certificate error")
        assert "certificate" in untrusted.last_error.lower() and not untrusted.connected.is_set()
        untrusted.stop()
    finally:
        server.stop()


def test_a_rotated_password_file_is_read_again_on_reconnect(tmp_path: Path) -> None:
    import signal
    import subprocess

    server = Mosquitto(tmp_path / "b", users={"edge-1": "first"}).start()
    secret = tmp_path / "password"
    secret.write_text("first\n")
    client = MqttLink(parse_broker_url(f"mqtt://edge-1@127.0.0.1:{server.port}"), "edge-1",
                      backoff_min_s=0.1, backoff_max_s=0.5, password_file=secret)
    client.start()
    try:
        wait_for(client.connected.is_set, what="connected with the first password")
        # the operator rotates: new password in the broker and in the mounted secret, then SIGHUP
        subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "b" / "passwd"), "edge-1", "second"], check=True)
        secret.write_text("second\n")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: client.connects >= 2 and client.connected.is_set(), timeout=15,
                 what="reconnected with the rotated password")
    finally:
        client.stop()
        server.stop()


def test_accept_drops_on_the_network_thread_and_bursts_arrive_whole_and_in_order(broker: Mosquitto) -> None:
    """`AsyncMqtt(accept=...)`: what it refuses never reaches the loop; the rest arrives complete
    and in order although the loop is woken once per burst, not once per message."""
    refused_on: set[str] = set()

    def accept(message: Received) -> bool:
        if message.topic != "t/drop":
            return True
        refused_on.add(threading.current_thread().name)
        return False

    async def scenario() -> tuple[list[bytes], int, set[str]]:
        sub = AsyncMqtt(asyncio.get_running_loop(), parse_broker_url(broker.url), "burst-sub",
                        subscriptions=[("t/#", 1)], accept=accept, max_received=50)
        sub.start()
        pub = link(broker.url, "burst-pub")
        pub.start()
        try:
            await asyncio.to_thread(wait_for, lambda: sub.connected and pub.connected.is_set(), 20, 0.1,
                                    "both connected")
            for i in range(500):  # more than max_received: the network thread waits for room meanwhile
                pub.publish("t/drop", b"x")
                pub.publish("t/keep", str(i).encode())
            got: list[bytes] = []
            async with asyncio.timeout(60):
                while len(got) < 500:
                    got.append((await sub.messages.get()).payload)
            return got, sub.not_accepted, refused_on
        finally:
            pub.stop()
            await sub.stop()

    got, not_accepted, threads = asyncio.run(scenario())
    assert got == [str(i).encode() for i in range(500)]
    assert not_accepted == 500 and threads == {"mqtt-burst-sub"}


def test_a_connection_reset_is_reported_with_the_socket_error() -> None:
    """paho's socket errors reach the link through a logger that takes ERROR only (formatting
    paho's debug line for every packet cost a draining controller 3 %): a broker that resets the
    connection must still be reported with the reason the socket gave."""
    import socket
    import struct

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def broker_that_resets() -> None:
        conn, _ = server.accept()
        conn.recv(4096)  # CONNECT
        conn.sendall(bytes([0x20, 0x02, 0x00, 0x00]))  # CONNACK, accepted (MQTT 3.1.1)
        time.sleep(0.3)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # with linger 0: a RST, not a FIN (the server stays: a reconnection waits there)

    threading.Thread(target=broker_that_resets, daemon=True).start()
    reset = link(f"mqtt://127.0.0.1:{port}", "reset")
    reset.start()
    try:
        wait_for(lambda: reset.connects >= 1, timeout=10, what="the CONNACK")
        wait_for(lambda: reset.last_error is not None, timeout=10, what="the reset to be reported")
        assert reset.last_error is not None and "reset by peer" in reset.last_error.lower(), reset.last_error
    finally:
        reset.stop()
        server.close()


def test_messages_waiting_in_the_socket_are_read_in_a_burst_whole_and_in_order(broker: Mosquitto) -> None:
    """`MqttLink._read_burst`: once `loop()` has read a message, those already in the socket are
    read one after the other (paho's `loop_read`), not one per select(); none is lost or reordered."""
    got: list[bytes] = []
    first = threading.Event()
    go = threading.Event()

    def on_message(message: Received) -> None:
        got.append(message.payload)
        if len(got) == 1:  # hold the network thread: the rest queue up in the socket meanwhile
            first.set()
            go.wait(30)

    sub = MqttLink(parse_broker_url(broker.url), "burst-reader", backoff_min_s=0.1, backoff_max_s=0.5,
                   subscriptions=[("b/#", 0)], on_message=on_message)
    pub = link(broker.url, "burst-writer")
    sub.start()
    pub.start()
    try:
        wait_for(lambda: sub.connected.is_set() and pub.connected.is_set(), 20, 0.05, "both connected")
        time.sleep(0.3)  # subscribed
        pub.publish("b/x", b"0", qos=0)
        assert first.wait(20)
        for i in range(1, 300):
            pub.publish("b/x", str(i).encode(), qos=0)
        assert pub.flush(20)
        time.sleep(0.5)  # delivered by the broker: waiting in the reader's socket
        go.set()
        wait_for(lambda: len(got) == 300, 20, 0.05, "all 300 read")
    finally:
        go.set()
        pub.stop()
        sub.stop()
    assert got == [str(i).encode() for i in range(300)]
    assert sub.read_in_bursts >= 100  # most of them without a select() each (up to READ_BURST a burst)
