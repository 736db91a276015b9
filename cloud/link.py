"""The controller's MQTT link to the edges: started by the composition root (cloud/app.py),
published through by the parts (`Services.publish`), watched by /healthz and /metrics.

Its state exists before the link does (HTTP serves before the first connection), so everything
here answers sensibly while `mqtt` is still None: not connected, nothing published."""

from __future__ import annotations

import asyncio

from cloud.config import CloudSettings
from shared.logs import get_logger
from shared.mqtt import AsyncMqtt, Received, TlsOptions, parse_broker_url
from shared.protocol import AckBody, Kind, make_envelope
from shared.topics import EDGE_WILDCARD, cloud_topic

log = get_logger(__name__)


class EdgeLink:
    """The MQTT connection of one controller replica (a `Publish` for the parts)."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.mqtt: AsyncMqtt | None = None

    @property
    def connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.connected

    @property
    def last_error(self) -> str | None:
        return self.mqtt.link.last_error if self.mqtt is not None else None

    def subscription(self) -> str:
        group = self.settings.shared_subscription
        return f"$share/{group}/{EDGE_WILDCARD}" if group else EDGE_WILDCARD

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        s = self.settings
        address = parse_broker_url(s.mqtt, password_file=s.mqtt_password_file)
        self.mqtt = AsyncMqtt(
            loop, address, s.client_id, subscriptions=[(self.subscription(), 1)],
            tls=TlsOptions(s.mqtt_ca_file, s.mqtt_cert_file, s.mqtt_key_file, s.mqtt_tls_insecure),
            # Alone, a durable session lets the broker queue events while the controller restarts.
            # In a $share group it would keep a dead replica's round-robin share queued for days,
            # so replicas use clean sessions; the edges re-send anything not acked.
            clean_session=s.shared_subscription is not None,
            password_file=s.mqtt_password_file,
        )
        self.mqtt.start()

    async def stop(self) -> None:
        if self.mqtt is not None:
            await self.mqtt.stop()

    async def receive(self) -> Received:
        """The next message from the edges (after `start`)."""
        assert self.mqtt is not None
        return await self.mqtt.messages.get()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """QoS 1 publish to an edge; False when the link is down (the caller retries)."""
        return self.mqtt is not None and self.mqtt.publish(topic, payload, qos=1, retain=retain)

    def publish_ack(self, node: str, upto: int, epoch: str | None) -> None:
        """The ingest's cumulative ack to a node, after the commit."""
        ack = make_envelope(node, AckBody(upto=upto, epoch=epoch), Kind.ACK)
        if not self.publish(cloud_topic(node, "ack"), ack.to_json()):
            log.warning("link down: ack up to %d not sent (the edge will send again)", upto, extra={"node": node})
