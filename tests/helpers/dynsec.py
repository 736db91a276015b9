"""mosquitto's dynamic-security plugin from a test's side: an admin that sends commands on
`$CONTROL/dynamic-security/v1` and reads their answers, a node whose connects and drops are
recorded, and `connack`, the CONNACK return code of one raw MQTT 3.1.1 login (what a node that
is shut out gets: 5, "not authorised").

Why paho directly: the tests need the broker's own answers (CONNACK codes, kicks), which
shared.mqtt.MqttLink turns into reconnects."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.quarantine import CONTROL_TOPIC, RESPONSE_TOPIC
from kgpu.lab.processes import wait_for
from kgpu.lab.raw_mqtt import DISCONNECT, connect_packet, read_connack

NOT_AUTHORISED = 5  # MQTT 3.1.1 CONNACK "connection refused: not authorised"


def connack(port: int, username: str | None = None, password: str | None = None,
            client_id: str = "kgpu-connack-probe") -> int:
    """The return code of the broker's CONNACK to one MQTT 3.1.1 CONNECT (0: accepted)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(connect_packet(client_id, username, password, keepalive_s=30))
        answer = read_connack(sock)
        assert len(answer) == 4, f"the broker closed the connection without a CONNACK (got {answer!r})"
        assert answer[:2] == b"\x20\x02", f"not a CONNACK: {answer!r}"
        if answer[3] == 0:
            sock.sendall(DISCONNECT)
        return answer[3]


class Recorder:
    """A paho client that records every CONNACK reason and every drop; it reconnects by itself
    (0.1-0.5 s apart), as an edge does. Subclasses override the `_on_*` callbacks, which are in
    place before the first connect."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None) -> None:
        self.connacks: list[str] = []
        self.drops = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # typed int; floats work
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect_async("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connacks.append(str(reason))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.drops += 1

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        pass

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        pass

    def connected(self) -> bool:
        return self.client.is_connected()

    def wait_connected(self, timeout: float = 10.0) -> Recorder:
        wait_for(self.connected, timeout=timeout, interval=0.02, what=f"{self.client._client_id!r} connected "
                 f"(CONNACKs so far: {self.connacks})")
        return self

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1, and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"no PUBACK for {topic}"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DynsecAdmin(Recorder):
    """The dynamic-security admin: `command(...)` sends commands in one message and returns the
    broker's `responses`, in order."""

    def __init__(self, port: int, username: str, password: str, client_id: str = "kgpu-test-dynsec-admin") -> None:
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribed = threading.Event()
        super().__init__(port, client_id, username, password)
        self.wait_ready()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        """Subscribe on every connect: a clean session, so a broker restart forgets the subscription."""
        super()._on_connect(_c, _u, _f, reason, _p)
        if not reason.is_failure:
            self.client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_disconnect(self, *args: Any) -> None:
        self._subscribed.clear()
        super()._on_disconnect(*args)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        self.answers.put(json.loads(message.payload))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if all(not code.is_failure for code in codes):
            self._subscribed.set()

    def wait_ready(self, timeout: float = 10.0) -> DynsecAdmin:
        """Connected, and subscribed to the answers."""
        self.wait_connected(timeout)
        wait_for(lambda: self._subscribed.is_set() and self.connected(), timeout=timeout, interval=0.02,
                 what=f"a SUBACK for {RESPONSE_TOPIC}")
        return self

    def command(self, *commands: dict[str, Any], timeout: float = 5.0) -> list[dict[str, Any]]:
        self.publish(CONTROL_TOPIC, json.dumps({"commands": list(commands)}).encode())
        deadline = time.monotonic() + timeout
        try:
            answer = self.answers.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no answer on {RESPONSE_TOPIC} to {commands}") from None
        responses: list[dict[str, Any]] = answer["responses"]
        assert [r["command"] for r in responses] == [c["command"] for c in commands], answer
        return responses

    def ok(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """`command`, asserting that no response is an error."""
        responses = self.command(*commands)
        assert not [r for r in responses if "error" in r], responses
        return responses
