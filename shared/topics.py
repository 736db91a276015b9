"""MQTT topic names (DESIGN.md): everything under `kgpu/v1/`."""

import re
from dataclasses import dataclass
from typing import Literal

PREFIX = "kgpu/v1"

# A node name is a Kubernetes node name: a DNS subdomain. It must never contain MQTT wildcards.
NODE_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

EdgeTopicKind = Literal["status", "telemetry", "events"]
CloudTopicKind = Literal["ack", "policy", "commands"]
EDGE_KINDS: tuple[str, ...] = ("status", "telemetry", "events")
CLOUD_KINDS: tuple[str, ...] = ("ack", "policy", "commands")


def edge_topic(node: str, kind: EdgeTopicKind) -> str:
    return f"{PREFIX}/edge/{node}/{kind}"


def cloud_topic(node: str, kind: CloudTopicKind) -> str:
    return f"{PREFIX}/cloud/{node}/{kind}"


EDGE_WILDCARD = f"{PREFIX}/edge/+/#"


def cloud_wildcard_for(node: str) -> str:
    return f"{PREFIX}/cloud/{node}/#"


@dataclass(frozen=True)
class TopicParts:
    side: Literal["edge", "cloud"]
    node: str
    kind: str


class BadTopic(ValueError):
    """A topic outside kgpu's scheme (wrong prefix, side, node name or kind)."""


def parse_topic(topic: str) -> TopicParts:
    """Split `kgpu/v1/<side>/<node>/<kind>`; raise BadTopic for anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        raise BadTopic(f"not a kgpu/v1 topic: {topic!r}")
    side, node, kind = parts[2], parts[3], parts[4]
    if side == "edge" and kind in EDGE_KINDS or side == "cloud" and kind in CLOUD_KINDS:
        if not NODE_NAME_RE.match(node):
            raise BadTopic(f"bad node name in topic: {node!r}")
        return TopicParts(side=side, node=node, kind=kind)  # type: ignore[arg-type]
    raise BadTopic(f"unknown topic kind {side}/{kind!r}")
