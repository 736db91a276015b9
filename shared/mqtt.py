"""The MQTT link both sides use: paho-mqtt 2 on its own network thread, handed to asyncio.

Why our own thread loop rather than paho's `loop_start`: we want reconnects with exponential
backoff *and jitter* (a whole fleet reconnecting at once after a broker restart must not arrive
in lock-step), and one place that logs why a connection failed.

Messages arrive on the network thread and are put on an `asyncio.Queue` with
`call_soon_threadsafe`; `publish` may be called from the event loop (paho's publish is
thread-safe and only queues bytes).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from shared.logs import get_logger, scrub

log = get_logger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The URL without the password, for logs."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str, *, password_file: Path | None = None) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:port]` or `mqtts://...`; a password file overrides the URL's."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"MQTT URL must look like mqtt://host:port or mqtts://host:port, got {redact(url)!r}")
    tls = parts.scheme == "mqtts"
    password = unquote(parts.password) if parts.password else None
    if password_file is not None:
        password = password_file.read_text().strip()
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=password,
    )


def redact(url: str) -> str:
    """Hide a password in a URL before it is logged or shown."""
    return scrub(url)


@dataclass(frozen=True)
class TlsOptions:
    ca_file: Path | None = None  # None: the system's trust store
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    insecure: bool = False  # skip hostname verification: only by explicit operator choice


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class MqttLink:
    """One MQTT connection, kept up by a background thread until `stop()`."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: Will | None = None,
        tls: TlsOptions | None = None,
        clean_session: bool = False,
        keepalive_s: int = 30,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_inflight: int = 100,
        on_connected: Callable[[], object] | None = None,
        on_disconnected: Callable[[str], object] | None = None,
        on_message: Callable[[Received], object] | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.address = address
        self.password_file = password_file  # read again before every connect: rotation needs no restart
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.keepalive_s = keepalive_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_message = on_message
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_info: paho.MQTTMessageInfo | None = None

        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=paho.MQTTv311, reconnect_on_failure=False,
        )
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if address.tls:
            tls = tls or TlsOptions()
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if tls.insecure:
                log.warning("MQTT TLS hostname verification is off (tls_insecure)")
                client.tls_insecure_set(True)
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # unbounded: callers bound what they publish
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (the broker then does not publish the last will) and end the thread."""
        self._stop.set()
        if self.connected.is_set():
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        backoff = self.backoff_min_s
        while not self._stop.is_set():
            if self.password_file is not None and self.address.username is not None:
                try:
                    self._client.username_pw_set(self.address.username, self.password_file.read_text().strip())
                except OSError as exc:
                    self._note_failure(f"cannot read the MQTT password file: {exc.strerror}")
            try:
                self._client.connect(self.address.host, self.address.port, keepalive=self.keepalive_s)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                self._note_failure(f"cannot connect to {self.address.display}: {exc}")
            else:
                while not self._stop.is_set():
                    rc = self._client.loop(timeout=0.2)
                    if rc != paho.MQTT_ERR_SUCCESS:
                        break
                if self._stop.is_set():
                    # flush the DISCONNECT we sent in stop()
                    for _ in range(5):
                        if self._client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                            break
                    break
                if self.connected.is_set():
                    self._mark_down("connection lost")
            if self.connects and self.last_error is None:
                backoff = self.backoff_min_s
            delay = random.uniform(backoff / 2, backoff)  # jitter: a fleet must not reconnect in step
            backoff = min(backoff * 2, self.backoff_max_s)
            self._stop.wait(delay)

    def _note_failure(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("MQTT: %s", reason)
        self.last_error = reason

    def _mark_down(self, reason: str) -> None:
        if self.connected.is_set():
            self.connected.clear()
            log.warning("MQTT link down: %s", reason, extra={"broker": self.address.display})
            if self._on_disconnected is not None:
                self._on_disconnected(reason)

    # ---- paho callbacks (network thread) ----------------------------------------------------

    def _handle_connect(self, client: paho.Client, _userdata: object, _flags: object, reason: object,
                        _properties: object) -> None:
        if getattr(reason, "is_failure", False):
            self._note_failure(f"broker {self.address.display} refused the connection: {reason}")
            client.disconnect()
            return
        self.last_error = None
        self.connects += 1
        for topic, qos in self.subscriptions:
            client.subscribe(topic, qos)
        self.connected.set()
        log.info("MQTT link up", extra={"broker": self.address.display, "client_id": self.client_id})
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, _client: paho.Client, _userdata: object, _flags: object, reason: object,
                           _properties: object) -> None:
        self._mark_down(str(reason))

    def _handle_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(Received(message.topic, bytes(message.payload), bool(message.retain)))

    # ---- publishing -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message; False when the link is down (the caller keeps it for later)."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            self._last_info = info
        return info.rc == paho.MQTT_ERR_SUCCESS

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the broker has acknowledged the last QoS>0 message published (in order, so
        all before it too); False if that did not happen within the timeout."""
        info = self._last_info
        if info is None:
            return True
        try:
            info.wait_for_publish(timeout_s)
        except (ValueError, RuntimeError):  # the message was dropped with the connection
            return False
        return info.is_published()


class AsyncMqtt:
    """An `MqttLink` whose messages and link changes arrive on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: BrokerAddress, client_id: str,
                 **options: object) -> None:
        self.messages: asyncio.Queue[Received] = asyncio.Queue()
        self.link_changes: asyncio.Queue[bool] = asyncio.Queue()
        self.link = MqttLink(
            address, client_id,
            on_message=lambda m: loop.call_soon_threadsafe(self.messages.put_nowait, m),
            on_connected=lambda: loop.call_soon_threadsafe(self.link_changes.put_nowait, True),
            on_disconnected=lambda _reason: loop.call_soon_threadsafe(self.link_changes.put_nowait, False),
            **options,  # type: ignore[arg-type]
        )

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    def start(self) -> None:
        self.link.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.link.stop)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        return self.link.publish(topic, payload, qos=qos, retain=retain)
