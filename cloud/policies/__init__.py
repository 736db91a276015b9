"""GPU power policies: `GPUPowerPolicy` objects (or the REST API) → one retained policy per node.

Sources, one per mode (one source of truth each):

* With a cluster, the `GPUPowerPolicy` objects (kgpu.io/v1alpha1, cluster-scoped) and the
  Kubernetes nodes' labels, polled every `poll_interval` seconds by the leader. The REST API
  then only reads: PUT/DELETE answer 409, because a policy written there would be overwritten
  by the next poll (or would disagree with what `kubectl get gpupowerpolicies` shows).
* With `--no-kube`, `PUT|GET|DELETE /api/v1/policies/{name}` and node labels from
  `PUT /api/v1/nodes/{node}/labels` (a node without labels matches empty selectors only). The
  nodes are then those the fleet store knows plus those given labels.

The leader's reconcile loop (a `Periodic`) resolves every node with the pure rules of
`cloud.policies.resolution`, stores each node's version and content hash (version first, publish
second, so a crash can repeat a publish but never reuse a version), then publishes each changed
policy RETAINED with QoS 1 on `kgpu/v1/cloud/<node>/policy`. Retained means an edge that is
offline, or has never connected yet, gets it from the broker the moment it (re)subscribes: no
one has to act when it comes back. An online node that still reports an older version after
`resend_after` gets the message again (covers a broker that lost its retained store).

A node that no policy matches gets nothing: its edge keeps the policy it has (its config's, or
the last one from the cloud, which it caches). If the cloud had published one before, the
retained message is cleared (an empty retained payload), so an edge installed afresh starts
from its config and not from a policy that no longer selects it.

"Applied" comes from the edges' status (`policy_name`/`policy_version` in the nodes table):
a node is applied when it reports exactly the resolved name and version, pending otherwise.
Each policy's status (`observedGeneration`, `nodesMatched`, `applied`, `pending`, conditions
`Valid` and `Applied`) is stored and, with a cluster, written to the object's status
subresource when it changes.

Modules: `resolution` (the pure rules), `sources` (the Kubernetes side: objects, node labels,
status), `repository` (the policy tables), `manager` (the reconcile loop, publishing), `http`
(the routes).
"""

from cloud.policies.manager import PolicyManager
from cloud.policies.repository import PolicyRepository, Snapshot
from cloud.policies.sources import GROUP, PLURAL, SOURCE_API, SOURCE_KUBERNETES, VERSION

__all__ = ["GROUP", "PLURAL", "SOURCE_API", "SOURCE_KUBERNETES", "VERSION", "PolicyManager", "PolicyRepository",
           "Snapshot"]
