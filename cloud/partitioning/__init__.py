"""GPU partitioning from the cloud: `GPUPartitioning` objects → one retained `NodePartitioning`
per node (MIG layouts and time-slicing per GPU model), applied by the edge.

Modules: `resolution` (the pure rules: which object wins a node, whether its MIG layouts fit the
node's GPU models, the objects' status), `sources` (the Kubernetes side: objects, node labels,
status subresource), `manager` (the leader's reconcile loop, publishing, the read view), `http`
(the read routes). See docs/partitioning.md.
"""

from cloud.partitioning.manager import PartitioningManager
from cloud.partitioning.sources import GROUP, KIND, PLURAL, VERSION

__all__ = ["GROUP", "KIND", "PLURAL", "VERSION", "PartitioningManager"]
