"""The MQTT link both sides use: paho-mqtt 2 on its own network thread, handed to asyncio.

Why our own thread loop rather than paho's `loop_start`: we want reconnects with exponential
backoff *and jitter* (a whole fleet reconnecting at once after a broker restart must not arrive
in lock-step), a backoff that keeps growing while a broker accepts and then closes at once (it
is reset only by a connection that stayed up `stable_after_s`), and one place that logs why a
connection failed (CONNACK code, disconnect reason, socket error).

SUBACKs are checked: a refused subscription (0x80) is logged as an error naming the filter,
counted, and kept in `refused_subscriptions` for /healthz.

Messages arrive on the network thread. An optional `accept` check runs there first: what it
refuses (a node over its ingest budget) is dropped before it costs the event loop anything. The
rest go into a deque, and the loop is woken once per burst (one `call_soon_threadsafe` when the
deque goes from empty to not empty, not one per message: each is a write to the loop's self-pipe)
to move them onto an `asyncio.Queue`. `publish` may be called from the event loop (paho's publish
is thread-safe and only queues bytes). Both directions are bounded: `AsyncMqtt.messages` holds at
most `max_received` messages and `max_received_bytes` of payload (a message is let in whenever it
is empty, however large), and when it is full the network thread waits (it stops reading
the socket, so TCP pushes back to the broker, which queues for us); paho's outgoing queue holds
at most `max_queued_out` QoS 1 messages, and `publish` answers False beyond (callers keep the
message for later). A queue full for longer than 1.5 x keepalive means no PINGREQ goes out: the
broker then closes the connection, and we reconnect when there is room (a durable session keeps
what was queued for us; edges re-send what was not acked).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections import deque
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


STABLE_AFTER_S = 10.0  # a connection up this long resets the reconnect backoff
MAX_QUEUED_OUT = 10_000  # paho's outgoing QoS 1 messages (in flight + waiting), at most
MAX_RECEIVED = 10_000  # AsyncMqtt.messages, at most
MAX_RECEIVED_BYTES = 16 * 1024 * 1024  # ... and of their payloads, at most
READ_BURST = 100  # messages read one after the other between two `loop()`s (MqttLink._read_burst)


class _SocketErrorLogger(logging.Logger):
    """paho's logger for one link: its ERROR lines (a socket error, the reason a connection went
    down) are kept by the link for the disconnect's log line; nothing below ERROR is formatted."""

    def __init__(self, link: MqttLink) -> None:
        super().__init__("kgpu.mqtt.paho", logging.ERROR)  # outside logging's tree: no handler but this
        self._link = link

    def handle(self, record: logging.LogRecord) -> None:
        self._link.note_socket_error(record.getMessage())


class MqttLink:
    """One MQTT connection, kept up by a background thread until `stop()`."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        retired_subscriptions: Sequence[str] = (),
        will: Will | None = None,
        tls: TlsOptions | None = None,
        clean_session: bool = False,
        keepalive_s: int = 30,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_inflight: int = 100,
        max_queued_out: int = MAX_QUEUED_OUT,
        stable_after_s: float = STABLE_AFTER_S,
        on_connected: Callable[[], object] | None = None,
        on_disconnected: Callable[[str], object] | None = None,
        on_message: Callable[[Received], object] | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.address = address
        self.password_file = password_file  # read again before every connect: rotation needs no restart
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        # filters an older version subscribed to in a durable session: dropped at every connect
        self.retired_subscriptions = list(retired_subscriptions)
        self.keepalive_s = keepalive_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_message = on_message
        self.received = 0  # messages handed on (read by `_read_burst`, on the network thread)
        self.read_in_bursts = 0  # of them, read by `_read_burst` (without a select() each)
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self.retry_in_s: float | None = None  # the wait before the next connect, while down
        # filter -> the SUBACK code that refused it (until a later SUBACK grants it), for /healthz
        self.refused_subscriptions: dict[str, str] = {}
        self.subscriptions_refused = 0  # SUBACK refusals counted since start
        self.publish_queue_full = 0  # publishes refused because paho's outgoing queue was full
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_info: paho.MQTTMessageInfo | None = None
        self._connected_at: float | None = None  # monotonic time of the last CONNACK accepted
        self._socket_error: str | None = None  # paho's last socket error log line, for the reason
        self._disconnect_reason: str | None = None  # CONNACK code or paho's disconnect reason
        self._subs_lock = threading.Lock()
        self._pending_subs: dict[int, tuple[list[str], bool]] = {}  # mid -> (filters, unsubscribe after)

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
        client.max_queued_messages_set(max_queued_out)  # beyond: publish() answers False
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_suback
        # paho's errors through a logger of this link's own that takes ERROR only: with `on_log`
        # paho formatted a debug line for every packet (3 % of a controller draining telemetry)
        client.enable_logger(_SocketErrorLogger(self))
        # paho writes a publish to the socket at once, from the publishing thread, unless a write
        # callback is registered; our network thread runs `loop()` at the same time, and two
        # threads taking packets off paho's outgoing queue reorder them (seen in CI: a QoS 1
        # stream arrived 0, 1, 2, 4, 5, 3) or interleave a partial write with another packet.
        # With these (no-op) callbacks `publish` only queues and wakes our loop's select, and
        # the network thread alone writes, in order.
        client.on_socket_register_write = _no_op
        client.on_socket_unregister_write = _no_op
        self._client = client

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()

    @property
    def connected_since(self) -> float | None:
        """Monotonic time the broker accepted the current connection; None while down. Set on the
        network thread before any message of that connection is handed on."""
        return self._connected_at if self.connected.is_set() else None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

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
            self._connected_at = None
            self._socket_error = None
            self.retry_in_s = None
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
                rc = paho.MQTT_ERR_SUCCESS
                while not self._stop.is_set():
                    rc = self._client.loop(timeout=0.2)
                    if rc == paho.MQTT_ERR_SUCCESS:
                        rc = self._read_burst()
                    if rc != paho.MQTT_ERR_SUCCESS:
                        break
                if self._stop.is_set():
                    # flush the DISCONNECT we sent in stop()
                    for _ in range(5):
                        if self._client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                            break
                    break
                reason = self._why_closed(rc)
                if self.connected.is_set():
                    self._mark_down(reason)
                elif self._connected_at is None and not reason.startswith("CONNACK"):
                    self._note_failure(f"{self.address.display} closed the connection before accepting it: {reason}")
                self._disconnect_reason = None
            up_for = time.monotonic() - self._connected_at if self._connected_at is not None else 0.0
            if up_for >= self.stable_after_s:
                backoff = self.backoff_min_s  # it stayed up: this is an ordinary reconnect
            delay = random.uniform(backoff / 2, backoff)  # jitter: a fleet must not reconnect in step
            backoff = min(backoff * 2, self.backoff_max_s)
            self.retry_in_s = delay
            if self._connected_at is not None and up_for < self.stable_after_s:
                subscribed = ", ".join(topic for topic, _qos in self.subscriptions) or "nothing"
                log.warning("MQTT: %s closed the connection %.1f s after accepting it (%s); we had subscribed to "
                            "%s (a broker may close rather than refuse a filter it does not support: ejabberd "
                            "does so for $share/...); retrying in %.1f s", self.address.display, up_for,
                            self.last_error, subscribed, delay,
                            extra={"broker": self.address.display, "refused": sorted(self.refused_subscriptions)})
            self._stop.wait(delay)

    def _read_burst(self) -> paho.MQTTErrorCode:
        """After `loop()` read a message: read on while messages keep coming, up to READ_BURST.
        paho's `loop()` reads ONE packet per select() (with its Python around it: a tenth of the
        controller's telemetry thread in a backlog drain); `loop_read()` (paho's API for an
        outside loop) reads the next one from the socket directly, and answers the same whether
        it read one or found none, so the link counts the messages it handed on instead. The
        burst is bounded, so that `loop()` (keepalive, writes) still runs every READ_BURST."""
        client = self._client
        for _ in range(READ_BURST):
            before = self.received
            rc = client.loop_read()
            if rc != paho.MQTT_ERR_SUCCESS or self.received == before:
                return rc
            self.read_in_bursts += 1
        return paho.MQTT_ERR_SUCCESS

    def _why_closed(self, rc: paho.MQTTErrorCode | int) -> str:
        """The broker's reason a connection ended, as precisely as paho lets us know it."""
        reason = self._disconnect_reason or paho.error_string(rc)
        if self._socket_error:
            reason = f"{reason}: {self._socket_error}"
        return reason

    def _note_failure(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("MQTT: %s", reason)
        self.last_error = reason

    def _mark_down(self, reason: str) -> None:
        if self.connected.is_set():
            self.last_error = reason
            self.connected.clear()
            log.warning("MQTT link down: %s", reason, extra={"broker": self.address.display})
            if self._on_disconnected is not None:
                self._on_disconnected(reason)

    # ---- paho callbacks (network thread) ----------------------------------------------------

    def _handle_connect(self, client: paho.Client, _userdata: object, _flags: object, reason: object,
                        _properties: object) -> None:
        if getattr(reason, "is_failure", False):
            self._note_failure(f"broker {self.address.display} refused the connection: CONNACK {reason}")
            self._disconnect_reason = f"CONNACK {reason}"
            client.disconnect()
            return
        self.last_error = None
        self.connects += 1
        self._connected_at = time.monotonic()
        with self._subs_lock:
            self._pending_subs.clear()  # SUBACKs of an earlier connection never come
        if self.retired_subscriptions:
            client.unsubscribe(self.retired_subscriptions)
        for subscription in self.subscriptions:  # one SUBSCRIBE each: one SUBACK per filter
            self._subscribe([subscription], temporary=False)
        self.connected.set()
        log.info("MQTT link up", extra={"broker": self.address.display, "client_id": self.client_id})
        if self._on_connected is not None:
            self._on_connected()

    def _handle_disconnect(self, _client: paho.Client, _userdata: object, _flags: object, reason: object,
                           _properties: object) -> None:
        # MQTT 3.1.1 has no DISCONNECT from the broker: paho says "Unspecified error" for a closed
        # socket; the socket error paho logged just before says more
        if self._disconnect_reason is None:
            text = str(reason)
            self._disconnect_reason = "the broker closed the connection" if text == "Unspecified error" else text
        self._mark_down(self._why_closed(paho.MQTT_ERR_CONN_LOST))

    def note_socket_error(self, message: str) -> None:
        self._socket_error = message

    def _subscribe(self, filters: Sequence[tuple[str, int]], *, temporary: bool) -> bool:
        """SUBSCRIBE, remembering which filters the SUBACK's codes are for."""
        with self._subs_lock:
            rc, mid = self._client.subscribe(list(filters))
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subs[mid] = ([topic for topic, _qos in filters], temporary)
        return rc == paho.MQTT_ERR_SUCCESS

    def _handle_suback(self, client: paho.Client, _userdata: object, mid: int, reason_codes: list[paho.ReasonCode],
                       _properties: object) -> None:
        with self._subs_lock:
            filters, temporary = self._pending_subs.pop(mid, ([], False))
        refused = dict(self.refused_subscriptions)  # a new dict each time: other threads read it
        for topic, code in zip(filters, reason_codes, strict=False):
            if code.is_failure:
                self.subscriptions_refused += 1
                refused[topic] = f"0x{code.value:02x} {code}"
                log.error("MQTT: the broker %s refused the subscription to %s (SUBACK 0x%02x %s): nothing "
                          "arrives through it", self.address.display, topic, code.value, code,
                          extra={"broker": self.address.display, "topic": topic})
            else:
                refused.pop(topic, None)
        self.refused_subscriptions = refused
        if temporary and filters:
            client.unsubscribe(filters)

    def subscribe_once(self, topics: Sequence[str], *, chunk: int = 200, qos: int = 1) -> int:
        """Subscribe to `topics` and unsubscribe each chunk as soon as its SUBACK is in: the broker
        sends the retained messages of those topics in between. For brokers that deliver none to
        wildcard subscriptions (RabbitMQ). Returns how many chunks went out (0 while down)."""
        sent = 0
        for start in range(0, len(topics), chunk):
            if not self.connected.is_set():
                break
            if self._subscribe([(t, qos) for t in topics[start:start + chunk]], temporary=True):
                sent += 1
        return sent

    def _handle_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self.received += 1
        if self._on_message is not None:
            self._on_message(Received(message.topic, bytes(message.payload), bool(message.retain)))

    # ---- publishing -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Queue a message; False when the link is down or paho's outgoing queue is full (the
        caller keeps it for later)."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            self.publish_queue_full += 1
            return False
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


def _no_op(*_args: object) -> None:
    """A paho socket callback that does nothing: its presence is what matters (MqttLink.__init__)."""


class ReceiveRoom:
    """Room in a receive queue, by messages and by payload bytes, shared by the network thread
    (`take` before it hands a message over) and the loop (`give` as a message is taken). A message
    fits whenever the queue is empty, however large, so that one message over the byte bound still
    goes through."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self._changed = threading.Condition()

    def _fits(self, size: int) -> bool:
        return self.messages == 0 or (self.messages < self.max_messages and self.bytes + size <= self.max_bytes)

    def take(self, size: int, timeout: float = 0.0) -> bool:
        """Room for a message of `size` bytes, waiting up to `timeout` seconds for it; False: none."""
        with self._changed:
            if not self._fits(size) and (timeout <= 0 or not self._changed.wait_for(lambda: self._fits(size),
                                                                                   timeout)):
                return False
            self.messages += 1
            self.bytes += size
            return True

    def give(self, size: int) -> None:
        with self._changed:
            self.messages -= 1
            self.bytes -= size
            self._changed.notify()


class ReceiveQueue(asyncio.Queue[Received]):
    """An asyncio queue that gives room back to the network thread for each message taken
    (`get` and `get_nowait` both go through `_get`), so consumers need not know it is bounded."""

    def __init__(self, room: ReceiveRoom) -> None:
        super().__init__()
        self._room = room

    def _get(self) -> Received:
        item: Received = super()._get()
        self._room.give(len(item.payload))
        return item


class AsyncMqtt:
    """An `MqttLink` whose messages and link changes arrive on the asyncio loop.

    At most `max_received` messages and `max_received_bytes` of payload wait in `messages`; beyond,
    the network thread waits for room (back-pressure to the broker) instead of holding them in memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: BrokerAddress, client_id: str,
                 *, max_received: int = MAX_RECEIVED, max_received_bytes: int = MAX_RECEIVED_BYTES,
                 accept: Callable[[Received], bool] | None = None,
                 divert: Callable[[Received], bool] | None = None,
                 on_ready: Callable[[], object] | None = None, **options: object) -> None:
        self._room = ReceiveRoom(max_received, max_received_bytes)
        self.messages: asyncio.Queue[Received] = ReceiveQueue(self._room)
        self.link_changes: asyncio.Queue[bool] = asyncio.Queue()
        self.receive_full = 0  # times the network thread found `messages` full and waited
        self.not_accepted = 0  # messages `accept` refused on the network thread
        # Called on the network thread (thread-safe, cheap): False drops the message there.
        self._accept = accept
        # Called on the network thread after `accept`: True when it took the message itself (it
        # never reaches `messages`); it may wait, as `_offer` waits for room (back-pressure).
        self._divert = divert
        self._on_ready = on_ready  # on the loop, after messages were put on `messages`
        self._loop = loop
        self._full_logged_at = -10.0
        self._inbox: deque[Received] = deque()  # network thread -> loop, moved by _hand_over
        self._wake_pending = False  # a _hand_over is scheduled and has not started yet
        self.link = MqttLink(
            address, client_id,
            on_message=self._offer,
            on_connected=lambda: loop.call_soon_threadsafe(self.link_changes.put_nowait, True),
            on_disconnected=lambda _reason: loop.call_soon_threadsafe(self.link_changes.put_nowait, False),
            **options,  # type: ignore[arg-type]
        )

    def _offer(self, message: Received) -> None:
        """On the network thread: drop what `accept` refuses, leave what `divert` takes; wait for
        room in `messages`, in short slices so that `stop` is never held up (paho reads nothing
        more from the socket meanwhile); hand the message to the loop, waking it only if no
        hand-over is pending already."""
        if self._accept is not None and not self._accept(message):
            self.not_accepted += 1
            return
        if self._divert is not None and self._divert(message):
            return
        size = len(message.payload)
        if not self._room.take(size):
            self.receive_full += 1
            now = time.monotonic()
            if now - self._full_logged_at >= 10.0:
                self._full_logged_at = now
                log.warning("MQTT receive queue full (%d messages, %d bytes): not reading from the broker until "
                            "they are handled", self._room.messages, self._room.bytes,
                            extra={"client_id": self.link.client_id})
            while not self._room.take(size, 0.5):
                if self.link.stopping:
                    return  # stopping: what the broker still sends is not ours to keep
        self._inbox.append(message)
        # The loop clears the flag before it empties the deque, and we append before we look at it:
        # either the pending hand-over takes this message, or we schedule a new one.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError:  # the loop is closed: the process is ending
                self._wake_pending = False

    def _hand_over(self) -> None:
        """On the loop: move what the network thread received onto `messages`."""
        self._wake_pending = False
        inbox, put = self._inbox, self.messages.put_nowait
        while inbox:
            put(inbox.popleft())
        if self._on_ready is not None:
            self._on_ready()

    @property
    def connected(self) -> bool:
        return self.link.connected.is_set()

    @property
    def connected_since(self) -> float | None:
        """`MqttLink.connected_since`."""
        return self.link.connected_since

    @property
    def refused_subscriptions(self) -> dict[str, str]:
        """filter -> the SUBACK code the broker refused it with (`MqttLink.refused_subscriptions`)."""
        return dict(self.link.refused_subscriptions)

    def start(self) -> None:
        self.link.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.link.stop)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        return self.link.publish(topic, payload, qos=qos, retain=retain)
