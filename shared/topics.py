"""MQTT topic names (DESIGN.md): everything under `kgpu/v1/`."""

import functools
import re
from dataclasses import dataclass
from typing import Literal

PREFIX = "kgpu/v1"

# A node name is a Kubernetes node name: a DNS subdomain. It must never contain MQTT wildcards.
NODE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

EdgeTopicKind = Literal["status", "telemetry", "events"]
CloudTopicKind = Literal["ack", "policy", "commands", "partitioning"]
EDGE_KINDS: tuple[str, ...] = ("status", "telemetry", "events")
CLOUD_KINDS: tuple[str, ...] = ("ack", "policy", "commands", "partitioning")


def edge_topic(node: str, kind: EdgeTopicKind) -> str:
    return f"{PREFIX}/edge/{node}/{kind}"


def cloud_topic(node: str, kind: CloudTopicKind) -> str:
    return f"{PREFIX}/cloud/{node}/{kind}"


EDGE_WILDCARD = f"{PREFIX}/edge/+/#"
# Every node's retained status at start-up, without `$share` (a shared subscription need not get
# retained messages: MQTT 5 says it must not): docs/broker.md section 5.
EDGE_STATUS_WILDCARD = f"{PREFIX}/edge/+/status"


def cloud_wildcard_for(node: str) -> str:
    return f"{PREFIX}/cloud/{node}/#"


def cloud_topics_for(node: str) -> list[str]:
    """The exact topics an edge subscribes to. Not `cloud_wildcard_for`: RabbitMQ delivers no
    retained message to a subscription with a wildcard, and a new node must get its policy at once."""
    return [cloud_topic(node, kind) for kind in CLOUD_KINDS]  # type: ignore[arg-type]


@dataclass(frozen=True)
class TopicParts:
    side: Literal["edge", "cloud"]
    node: str
    kind: str


class BadTopic(ValueError):
    """A topic outside kgpu's scheme (wrong prefix, side, node name or kind)."""


class BadTopicNode(BadTopic):
    """A kgpu/v1 topic of a known side and kind whose several node levels, joined with `.`, form
    no node name: the node cannot be recovered (a broker that rewrites topic levels in a way we
    do not know, or a publisher outside kgpu)."""

    def __init__(self, message: str, node_levels: str) -> None:
        super().__init__(message)
        self.node_levels = node_levels


@functools.lru_cache(maxsize=65_536)  # the controller's hot path: a fleet's topics, over and over (bad ones not kept)
def parse_topic(topic: str) -> TopicParts:
    """Split `kgpu/v1/<side>/<node>/<kind>`; raise BadTopic for anything else.

    The node may span several levels: RabbitMQ's MQTT plugin maps `.` to a topic level, so
    `kgpu/v1/edge/peer-d.site-1/status` arrives as `kgpu/v1/edge/peer-d/site-1/status`. A
    Kubernetes node name never holds `/`, so joining the levels with `.` recovers it unambiguously
    (docs/broker.md, "Node names with dots"). The payload's node must still equal it."""
    parts = topic.split("/")
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise BadTopic(f"not a kgpu/v1 topic: {topic!r}")
    side, kind = parts[2], parts[-1]
    if side == "edge" and kind in EDGE_KINDS or side == "cloud" and kind in CLOUD_KINDS:
        node = ".".join(parts[3:-1])
        if not NODE_NAME_RE.match(node):
            if len(parts) == 5:
                raise BadTopic(f"bad node name in topic: {node!r}")
            raise BadTopicNode(f"the levels {'/'.join(parts[3:-1])!r} of topic {topic!r} joined with '.' are "
                               "no node name", "/".join(parts[3:-1]))
        return TopicParts(side=side, node=node, kind=kind)  # type: ignore[arg-type]
    raise BadTopic(f"unknown topic kind {side}/{kind!r}")
