"""GPU Feature Discovery-style labels on the Kubernetes Nodes, written by the controller from each
node's status: `gfd`, `amd`, `intel` (each vendor's pure label rules, joined by `vendors`),
`writer` (`NodeLabeler`, the leader's patches)."""

from cloud.labels.gfd import labels_for
from cloud.labels.vendors import node_labels
from cloud.labels.writer import GFD_MARKER, OWNED_ANNOTATION, NodeLabeler, label_patch

__all__ = ["GFD_MARKER", "OWNED_ANNOTATION", "NodeLabeler", "label_patch", "labels_for", "node_labels"]
